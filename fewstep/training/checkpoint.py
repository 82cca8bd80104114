"""Training checkpoints: written atomically, verified by checksum on resume, never deleted because they are bad.

Layout: ``<run>/checkpoints/step-00000100/{state.pt, meta.json}``. meta.json is written last inside a folder that
is renamed into place, so a folder either has both files or does not exist; its sha256 catches later damage.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import FewstepError
from ..io import atomic_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and drop all but the newest ``keep`` checkpoints."""
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(path, "meta.json") as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "sha256": _sha256(tmp / "state.pt")}) + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def _verify(path: Path) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "meta.json is missing or unreadable"
    if not (path / "state.pt").is_file():
        return "state.pt is missing"
    if _sha256(path / "state.pt") != meta.get("sha256"):
        return "state.pt does not match its checksum"
    return None


def load_checkpoint(run_dir: Path, path: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` (or ``path``), verified. A damaged newest checkpoint is an error that
    names the last good one; nothing is deleted or rewritten."""
    candidates = [path] if path is not None else list_checkpoints(run_dir)
    if not candidates:
        raise FewstepError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}")
    target = candidates[-1]
    problem = _verify(target)
    if problem is not None:
        good = [p for p in list_checkpoints(run_dir) if p != target and _verify(p) is None]
        hint = f"; the last good one is {good[-1]}: remove the damaged folder to resume from it" if good else ""
        raise FewstepError(f"checkpoint {target} is damaged ({problem}){hint}")
    try:
        state = torch.load(target / "state.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling errors come in many types
        raise FewstepError(f"checkpoint {target} cannot be read: {str(err).splitlines()[0]}") from None
    return target, state
