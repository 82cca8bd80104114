"""``python -m fewstep``: the command line, for launchers that start modules (``torchrun -m fewstep distill ...``)."""

import sys

from .cli import main

sys.exit(main())
