"""Writing outputs atomically: everything goes to a temporary sibling folder that replaces the target at the end,
so an interrupted or failed command leaves either the old folder or the new one, never half of one. A folder that
holds something else (no marker file of ours) is never replaced."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import FewstepError


def check_writable_parent(path: Path, marker: str | None = None) -> None:
    """Fail with one line when ``path`` cannot become our output folder: an unwritable parent, a file in the way,
    or (with ``marker``) a non-empty folder that is not one of ours."""
    path = path.expanduser().absolute()
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FewstepError(f"cannot write to {path}: {err.strerror or err}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FewstepError(f"cannot write to {path}: {parent} is not writable")
    if path.exists() and not path.is_dir():
        raise FewstepError(f"cannot write to {path}: it exists and is not a folder")
    if marker is not None and path.is_dir() and any(path.iterdir()) and not (path / marker).exists():
        raise FewstepError(f"{path} exists and holds other files (no {marker}); choose another output folder")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextmanager
def atomic_dir(path: Path, marker: str, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` when the block succeeds and is removed when it fails.

    marker: the file that identifies our output (e.g. report.json); an existing non-empty folder without it is refused.
    keep_existing: start the temporary folder as a copy of the current ``path`` (to add rows to a report, say).
    """
    path = path.expanduser().absolute()
    check_writable_parent(path, marker)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        raise FewstepError(f"cannot write to {path}: {err.strerror or err}") from None
    try:
        if keep_existing and path.is_dir():
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):  # the old folder now sits at tmp
        shutil.rmtree(tmp, ignore_errors=True)
    else:  # two renames: a crash between them leaves the old folder at .<name>.old-*
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def cached_tensors(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The tensors stored at ``path`` (safetensors), computing and writing them atomically on first use."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(str(path))
    tensors = {k: v.contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))
    return tensors


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Write a file through a temporary name in the same folder, renamed over ``path`` only on success."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
