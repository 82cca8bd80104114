"""Training checkpoints: written atomically, verified by checksum on resume, never deleted because they are bad.

Layout: ``<run>/checkpoints/step-00000100/{state.pt, meta.json}``. meta.json is written last inside a folder that
is renamed into place, so a folder either has both files or does not exist; its sha256 catches later damage.

A run on several processes writes ``{state/, extra.pt, meta.json}`` instead: ``state/`` is a
torch.distributed.checkpoint folder of the sharded tensors (every process writes its own shards), ``extra.pt`` the
counters, history and RNG streams (the same on every process). Either kind loads into any number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import FewstepError
from ..io import atomic_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _sha256(path: Path) -> str:
    """The digest of a file, or of a folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
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


def save_sharded_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, Any], extra: dict[str, Any], processes: Any, keep: int = 2
) -> Path:
    """Every process writes its shards of ``tensors`` into a hidden folder; the first then adds ``extra`` and
    meta.json and renames the folder into place. A process that dies on the way leaves only the hidden folder."""
    import torch.distributed.checkpoint as dcp

    path = run_dir / "checkpoints" / f"step-{step:08d}"
    tmp = path.with_name(f".{path.name}.partial")
    if processes.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    processes.barrier()
    dcp.save(tensors, checkpoint_id=str(tmp / "state"))
    processes.barrier()
    if processes.is_main:
        torch.save(extra, tmp / "extra.pt")
        meta = {"step": step, "sha256": _sha256(tmp / "state"), "extra_sha256": _sha256(tmp / "extra.pt")}
        (tmp / "meta.json").write_text(json.dumps({**meta, "processes": processes.world}) + "\n")
        if path.exists():  # the same step written again (a resumed run stopping at once): the new one wins
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        for stale in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    processes.barrier()
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
    if (path / "state").is_dir():  # written by several processes
        if not (path / "extra.pt").is_file():
            return "extra.pt is missing"
        if _sha256(path / "state") != meta.get("sha256") or _sha256(path / "extra.pt") != meta.get("extra_sha256"):
            return "its files do not match their checksums"
        return None
    if not (path / "state.pt").is_file():
        return "state.pt is missing"
    if _sha256(path / "state.pt") != meta.get("sha256"):
        return "state.pt does not match its checksum"
    return None


def load_checkpoint(
    run_dir: Path, path: Path | None = None, template: Callable[[dict[str, Any]], dict[str, Any]] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` (or ``path``), verified. A damaged newest checkpoint is an error that
    names the last good one; nothing is deleted or rewritten.

    A sharded checkpoint is read into ``template(extra)``, the reading run's own tensor layout (so it loads into any
    number of processes); its state then carries ``"sharded": True``."""
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
        if (target / "state").is_dir():
            return target, _load_sharded(target, template)
        state = torch.load(target / "state.pt", map_location="cpu", weights_only=False)
    except FewstepError:
        raise
    except Exception as err:  # unpickling errors come in many types
        raise FewstepError(f"checkpoint {target} cannot be read: {str(err).strip().splitlines()[0]}") from None
    return target, state


def _load_sharded(target: Path, template: Callable[[dict[str, Any]], dict[str, Any]] | None) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if template is None:
        raise FewstepError(f"checkpoint {target} was written by several processes: load it through a Trainer")
    extra = torch.load(target / "extra.pt", map_location="cpu", weights_only=False)
    tensors = template(extra)
    stored = dcp.FileSystemReader(str(target / "state")).read_metadata().state_dict_metadata
    for name, optim in tensors.get("optimizers", {}).items():
        # a parameter that never had a gradient has no Adam state in the checkpoint; the template (made by one zero
        # step) has: it is dropped, so the loaded optimizer is the saved one
        prefix = f"optimizers.{name}.state."
        saved = {key[len(prefix) :].rsplit(".", 1)[0] for key in stored if key.startswith(prefix)}
        state = optim.get("state", {})
        for fqn in [k for k in state if k not in saved]:
            del state[fqn]
    with warnings.catch_warnings():  # DCP warns that it reads into one process when there is no group: we mean it
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, checkpoint_id=str(target / "state"), no_dist=not dist.is_initialized())
    return {**tensors, **extra, "sharded": True}
