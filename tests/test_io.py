"""Atomic output folders: a failure leaves the old folder (or none), never a half-written one, and a folder that
holds someone else's files is never replaced."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.errors import FewstepError
from fewstep.io import atomic_dir


def test_success_replaces_and_failure_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "m") as tmp:
        (tmp / "m").write_text("first")
    assert (target / "m").read_text() == "first"
    with pytest.raises(KeyboardInterrupt), atomic_dir(target, "m") as tmp:
        (tmp / "m").write_text("half")
        raise KeyboardInterrupt
    assert (target / "m").read_text() == "first"
    with atomic_dir(target, "m") as tmp:
        (tmp / "m").write_text("second")
    assert (target / "m").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_existing_adds_to_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target, "a.txt") as tmp:
        (tmp / "a.txt").write_text("a")
    with atomic_dir(target, "a.txt", keep_existing=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_on_new_folder_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new", "m") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.txt").write_text("precious")
    with pytest.raises(FewstepError, match="holds other files"), atomic_dir(tmp_path / "thesis", "meta.json"):
        pass
    assert (tmp_path / "thesis" / "chapter1.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", "meta.json") as tmp:  # an empty folder is fine
        (tmp / "meta.json").write_text("{}")


def test_target_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FewstepError, match="not a folder"), atomic_dir(tmp_path / "f", "m"):
        pass
