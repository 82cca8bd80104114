"""Teacher bench rows shipped with an embedded world, so that the first ``fewstep distill`` on a machine need not bench
the teacher before it can report: the video teacher's 50-step rows (3 seeds of 1,000 clips) take about 40 minutes
of 2 CPU cores, longer than its recipes train.

The rows are one measurement of the shipped teacher, made by ``benchmarks/ship_teacher_bench.py`` and kept in
``fewstep/assets/<world>/teacher_bench`` (report.json and the grids, no GIFs) with the key of what they measured
(``rows_key``: the teacher's files, the shipped evaluators, the bench settings and the row's columns). They stand in
only where that key is the one a bench would have now; a report marks them as measured elsewhere, with where and
when. A machine that has benched the teacher itself (distill's cache) uses its own rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..loading import embedded_path, resolve_source
from ..worlds import EMBEDDED

SHIPPED = "teacher_bench"  # the asset folder's name under fewstep/assets/<world>/


def files_digest(folders: list[Path]) -> str:
    """sha256 over every file's relative path and bytes in ``folders`` (each walked in sorted order)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def evaluator_folders() -> list[Path]:
    """The shipped evaluators the embedded worlds' metrics read (a retrained one changes every row)."""
    return [Path(str(embedded_path("evaluator", world))) for world in EMBEDDED]


def rows_key(teacher: str, cfg: Any) -> str:
    """A digest of what a teacher's bench rows measure, apart from the machine: the teacher's files, the shipped
    evaluators, the bench settings (a ``BenchConfig``) and the row's columns."""
    from .run import Row

    files = files_digest([Path(resolve_source(teacher)), *evaluator_folders()])
    settings = json.dumps([asdict(cfg), list(Row.__dataclass_fields__)], sort_keys=True, default=str)
    return hashlib.sha256((files + settings).encode()).hexdigest()


def shipped_folder(world: str) -> Path:
    return Path(str(embedded_path(SHIPPED, world)))


def shipped_rows(teacher: str, cfg: Any) -> Path | None:
    """The shipped folder of ``teacher``'s rows under ``cfg``, or None: not an embedded world, nothing shipped, or
    shipped for other teacher files, evaluators, settings or columns."""
    if teacher not in EMBEDDED:
        return None
    report = shipped_folder(teacher) / "report.json"
    if not report.is_file():
        return None
    return report.parent if json.loads(report.read_text())["shipped"]["key"] == rows_key(teacher, cfg) else None


def ship(measured: Path, teacher: str, cfg: Any, out: Path, command: str) -> None:
    """Write ``out`` (a shipped folder) from ``measured``, a report of ``teacher`` alone benched under ``cfg``: its
    rows (each marked with where and when it was measured) and their grids, and the key they stand for."""
    from ..io import atomic_dir

    report = json.loads((measured / "report.json").read_text())
    sources = {row["source"] for row in report["rows"]}
    if sources != {teacher}:
        raise ValueError(f"{measured} holds rows of {sorted(sources)}, not of {teacher} alone")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    if report["config"] != config:
        raise ValueError(f"{measured} was benched under other settings: {report['config']} against {config}")
    env = report["env"]
    where = f"{env.get('date', '?')[:10]}, {env.get('platform', '?')}, {env.get('torch_threads', '?')} threads"
    rows = [{**row, "animation": None, "shipped": where} for row in report["rows"]]
    with atomic_dir(out, "report.json") as tmp:
        for row in rows:
            if row.get("grid"):
                shutil.copyfile(measured / row["grid"], tmp / row["grid"])
        shipped = {"key": rows_key(teacher, cfg), "measured": where, "command": command}
        text = {**report, "rows": rows, "shipped": shipped}
        (tmp / "report.json").write_text(json.dumps(text, indent=2) + "\n")
