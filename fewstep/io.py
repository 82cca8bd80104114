"""Writing outputs atomically: everything goes to a temporary sibling folder that replaces the target at the end,
so an interrupted or failed command leaves either the old folder or the new one, never half of one. A folder that
holds something else (no marker file of ours) is never replaced.

Files that several processes share (a bench report that rows merge into, the caches) are read, merged and replaced
under ``locked(path)``, an inter-process ``flock`` on a lock file next to ``path``, so concurrent writers lose nothing.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import tempfile
import threading
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


def lock_path(path: Path) -> Path:
    """The lock file that guards ``path``: a hidden sibling (not inside a folder that gets replaced whole)."""
    path = Path(path).expanduser().absolute()
    return path.parent / f".{path.name}.lock"


_held = threading.local()  # the lock files this thread holds, so that nested ``locked`` on one path re-enters


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on ``path`` (a file or folder, which need not exist) for the block.

    The lock is ``fcntl.flock`` on ``lock_path(path)``, removed again on exit. A process that waited on a lock file
    another one has removed meanwhile sees a different (or no) file at the path once it holds its lock, and retries.
    Re-entrant within a thread; other threads and processes wait. Raises OSError when the lock file cannot be created
    (an unwritable folder).
    """
    target = lock_path(path)
    held: set[Path] = _held.__dict__.setdefault("paths", set())
    if target in held:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(target)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # the file we locked was removed by the previous holder: lock the new one
    held.add(target)
    try:
        yield
    finally:
        held.discard(target)
        target.unlink(missing_ok=True)  # while still held, so that waiters on this file retry
        os.close(fd)


def cached_tensors(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The tensors stored at ``path`` (safetensors), computing and writing them atomically on first use.

    Under ``locked(path)``: of several processes that need the same missing entry, one computes it and the others
    wait for it and load it."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        if path.is_file():  # written by another process while this one waited
            return load_file(str(path))
        tensors = {k: v.contiguous() for k, v in compute().items()}
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
