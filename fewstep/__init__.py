"""fewstep: distill diffusion and flow-matching models into 1-4 step samplers.

The main classes are importable from here (``from fewstep import FewStepScheduler``) but load lazily, so that
``import fewstep`` (and ``fewstep --help``) stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FewStepScheduler": "fewstep.export.scheduling_fewstep",
    "Denoiser": "fewstep.teacher",
    "load_pipeline": "fewstep.loading",
    "load_denoiser": "fewstep.loading",
    "DigitsPipeline": "fewstep.worlds.digits.pipeline",
    "SamplingPlan": "fewstep.sampling",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fewstep' has no attribute {name!r}")
