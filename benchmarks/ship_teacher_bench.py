"""Measure an embedded world's teacher rows once and ship them with the package (``fewstep.bench.shipped``), so that
the first ``fewstep distill`` on a machine reports without benching the teacher first.

    python benchmarks/ship_teacher_bench.py [--world video] [--steps 1,2,4] [--from REPORT_DIR]

The rows are the ones ``fewstep distill`` benches the teacher at for students of those step counts (the counts and
50, at the world's guidance, the bench's 3 seeds of 1,000 samples; ``distill.teacher_bench_config``); on the video
world about 40 minutes of 2 cores. --from ships an existing report of the teacher alone measured under exactly those
settings (e.g. distill's cache entry, ~/.cache/fewstep/teacher-bench/KEY) instead of measuring again. Writes
fewstep/assets/WORLD/teacher_bench/ (report.json with the rows and the key they stand for, and their grids).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fewstep.bench.run import run_bench
from fewstep.bench.shipped import ship, shipped_folder
from fewstep.distill import teacher_bench_config
from fewstep.errors import FewstepError
from fewstep.worlds import EMBEDDED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=EMBEDDED, default="video")
    parser.add_argument("--steps", default="1,2,4", help="the students' step counts (default 1,2,4: MCM's and DCM's)")
    parser.add_argument("--from", dest="source", type=Path, help="an existing report of the teacher to ship")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    cfg = teacher_bench_config(args.world, steps)
    command = f"python benchmarks/ship_teacher_bench.py --world {args.world} --steps {args.steps}"
    out = shipped_folder(args.world)
    try:
        if args.source is not None:
            ship(args.source, args.world, cfg, out, command)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                run_bench([args.world], Path(tmp) / "report", cfg)
                ship(Path(tmp) / "report", args.world, cfg, out, command)
    except (ValueError, OSError, FewstepError) as err:
        print(f"ship_teacher_bench: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
