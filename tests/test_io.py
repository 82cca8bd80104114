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


def _start_together(script: str, args: list[list[str]], go: Path) -> list[str]:
    """Run ``python -c script *a`` for each ``a`` at once (each waits for the file ``go``); their stdout."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(go), *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for a in args
    ]  # fmt: skip
    go.touch()
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(out)
    return outs


WAIT_FOR_GO = "import sys, time\nfrom pathlib import Path\nwhile not Path(sys.argv[1]).exists(): time.sleep(0.01)\n"


def test_locked_serializes_read_modify_write_across_processes(tmp_path: Path) -> None:
    script = WAIT_FOR_GO + (
        "from fewstep.io import locked\n"
        "counter = Path(sys.argv[2])\n"
        "with locked(counter):\n"
        "    n = int(counter.read_text()) if counter.exists() else 0\n"
        "    time.sleep(0.3)\n"  # both would read 0 without the lock
        "    counter.write_text(str(n + 1))\n"
    )
    counter = tmp_path / "counter"
    _start_together(script, [[str(counter)]] * 3, tmp_path / "go")
    assert counter.read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter", "go"]  # the lock file is gone


def test_locked_reenters_in_one_thread(tmp_path: Path) -> None:
    from fewstep.io import lock_path, locked

    with locked(tmp_path / "x"), locked(tmp_path / "x"):
        assert lock_path(tmp_path / "x").is_file()
    assert not lock_path(tmp_path / "x").exists()


def test_cached_tensors_computes_once_across_processes(tmp_path: Path) -> None:
    script = WAIT_FOR_GO + (
        "import torch\n"
        "from fewstep.io import cached_tensors\n"
        "def compute():\n"
        "    with open(sys.argv[3], 'a') as log: log.write('computed\\n')\n"
        "    time.sleep(0.5)\n"
        "    return {'x': torch.arange(4.0)}\n"
        "print(cached_tensors(Path(sys.argv[2]), compute)['x'].tolist())\n"
    )
    cache, log = tmp_path / "cache" / "c.safetensors", tmp_path / "log"
    outs = _start_together(script, [[str(cache), str(log)]] * 2, tmp_path / "go")
    assert log.read_text() == "computed\n"
    assert outs == ["[0.0, 1.0, 2.0, 3.0]\n"] * 2
