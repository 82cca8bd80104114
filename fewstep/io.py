"""Writing outputs atomically: everything goes to a temporary sibling folder that is renamed into place at the end,
so an interrupted or failed command leaves either the old folder or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FewstepError


def check_writable_parent(path: Path) -> None:
    """Create ``path``'s parent if needed and fail with one line when it cannot hold a new folder."""
    parent = path.expanduser().absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FewstepError(f"cannot write to {path}: {err.strerror or err}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FewstepError(f"cannot write to {path}: {parent} is not writable")
    if path.exists() and not path.is_dir():
        raise FewstepError(f"cannot write to {path}: it exists and is not a folder")


@contextmanager
def atomic_dir(path: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` when the block succeeds and is removed when it fails.

    keep_existing: start the temporary folder as a copy of the current ``path`` (to add to a report, say).
    """
    path = path.expanduser().absolute()
    check_writable_parent(path)
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
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
