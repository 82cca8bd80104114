"""distill's bench step: the teacher's rows are measured once per (teacher, settings, machine) and then reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fewstep.bench.run
from fewstep import distill


@pytest.fixture
def fake_bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, ...]]:
    """run_bench replaced by one that records its sources and writes a row per source, merging like the real one."""
    calls: list[tuple[str, ...]] = []

    def run_bench(sources: Any, report_dir: Path, cfg: Any, text: Any = None) -> dict[str, Any]:
        calls.append(tuple(sources))
        report_dir.mkdir(parents=True, exist_ok=True)
        path = report_dir / "report.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        rows += [
            {
                "source": s,
                "steps": list(cfg.steps),
                "guidance": list(cfg.guidance),
                "seeds": cfg.seeds,
                "measured": len(calls),
            }
            for s in sources
        ]
        path.write_text(json.dumps({"rows": rows}))
        return {"rows": rows}

    monkeypatch.setattr(fewstep.bench.run, "run_bench", run_bench)
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    return calls


def test_teacher_rows_are_measured_once_then_copied(fake_bench: list, random_digits: Path, tmp_path: Path) -> None:
    teacher = str(random_digits)
    distill.bench_student(tmp_path / "s1", teacher, [1, 2], tmp_path / "bench1")
    distill.bench_student(tmp_path / "s2", teacher, [1, 2], tmp_path / "bench2")
    assert fake_bench == [(teacher,), (str(tmp_path / "s1"),), (str(tmp_path / "s2"),)]
    first = json.loads((tmp_path / "bench1" / "report.json").read_text())["rows"]
    second = json.loads((tmp_path / "bench2" / "report.json").read_text())["rows"]
    assert first[0] == second[0] and first[0]["steps"] == [1, 2, 50]  # the teacher's row, from the cache
    assert second[1]["source"] == str(tmp_path / "s2")


def test_other_step_counts_or_teacher_weights_are_measured_anew(
    fake_bench: list, random_digits: Path, tmp_path: Path
) -> None:
    teacher = str(random_digits)
    distill.bench_student(tmp_path / "s", teacher, [1, 2], tmp_path / "a")
    distill.bench_student(tmp_path / "s", teacher, [1, 4], tmp_path / "b")
    assert fake_bench.count((teacher,)) == 2
    key = distill.teacher_bench_key(teacher, fewstep.bench.run.BenchConfig(steps=(1, 4, 50)))
    config = random_digits / "transformer" / "config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace("}", ', "extra": 1}', 1))
        assert distill.teacher_bench_key(teacher, fewstep.bench.run.BenchConfig(steps=(1, 4, 50))) != key
    finally:
        config.write_text(original)


def test_runs_at_once_measure_the_teacher_once(
    fake_bench: list, random_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs that need the same missing cache entry: one measures the teacher, the other waits and copies."""
    import threading
    import time

    record = fewstep.bench.run.run_bench

    def slow_bench(*args: Any, **kw: Any) -> Any:
        time.sleep(0.3)
        return record(*args, **kw)

    monkeypatch.setattr(fewstep.bench.run, "run_bench", slow_bench)
    teacher, errors = str(random_digits), []

    def one(i: int) -> None:
        try:
            distill.bench_student(tmp_path / f"s{i}", teacher, [1, 2], tmp_path / f"bench{i}")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and fake_bench.count((teacher,)) == 1
    for i in range(2):
        rows = json.loads((tmp_path / f"bench{i}" / "report.json").read_text())["rows"]
        assert [r["source"] for r in rows] == [teacher, str(tmp_path / f"s{i}")]


def test_a_teacher_is_benched_at_its_worlds_guidance_and_the_student_at_one(fake_bench: list, tmp_path: Path) -> None:
    """The video teacher samples at w 1.5 (worlds.TEACHER_GUIDANCE), the guidance its students are distilled with,
    named in the teacher's bench config so that its cached rows are keyed by it."""
    distill.bench_student(tmp_path / "s", "video", [1, 4], tmp_path / "bench")
    teacher, student = json.loads((tmp_path / "bench" / "report.json").read_text())["rows"]
    assert (teacher["source"], teacher["guidance"], teacher["steps"]) == ("video", [1.5], [1, 4, 50])
    assert (student["source"], student["guidance"]) == (str(tmp_path / "s"), [])  # its own: 1 (bench.run.guidance_of)


def test_bench_seeds_reach_student_and_teacher_and_a_new_bench_replaces_the_report(
    fake_bench: list, random_digits: Path, tmp_path: Path
) -> None:
    """``seeds``: both rows averaged over the same noise seeds, the teacher's cached per seed count; benching the same
    student again with more seeds leaves only the new rows (compare_recipes --bench-seeds on finished runs)."""
    teacher, report = str(random_digits), tmp_path / "bench" / "report.json"
    distill.bench_student(tmp_path / "s", teacher, [1, 2], tmp_path / "bench")
    assert [r["seeds"] for r in json.loads(report.read_text())["rows"]] == [3, 3]  # the bench's default
    distill.bench_student(tmp_path / "s", teacher, [1, 2], tmp_path / "bench", seeds=10)
    rows = json.loads(report.read_text())["rows"]
    assert [(r["source"], r["seeds"]) for r in rows] == [(teacher, 10), (str(tmp_path / "s"), 10)]
    assert fake_bench.count((teacher,)) == 2  # 3 and 10 seeds: two cache entries
    distill.bench_student(tmp_path / "s", teacher, [1, 2], tmp_path / "bench", seeds=10)
    assert fake_bench.count((teacher,)) == 2 and len(json.loads(report.read_text())["rows"]) == 2


def _measured_report(folder: Path, cfg: Any, sources: tuple[str, ...] = ("video",)) -> Path:
    """A report as run_bench writes it for ``sources`` under ``cfg``: one row per step count, a grid each."""
    from dataclasses import asdict

    folder.mkdir(parents=True)
    rows = []
    for source in sources:
        for n in cfg.steps:
            (folder / f"grid_{n}.png").write_bytes(b"png")
            rows.append({"source": source, "model": "video-teacher", "steps": n, "grid": f"grid_{n}.png",
                         "animation": f"grid_{n}.gif", "fid": 20.0 + n})  # fmt: skip
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    env = {"date": "2026-12-07T04:00:00", "platform": "Linux-test", "torch_threads": 2}
    (folder / "report.json").write_text(json.dumps({"rows": rows, "reference": {}, "config": config, "env": env}))
    return folder


@pytest.fixture
def shipped_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The shipped teacher rows' folder moved to tmp_path, empty."""
    import fewstep.bench.shipped

    folder = tmp_path / "assets" / "video" / "teacher_bench"
    monkeypatch.setattr(fewstep.bench.shipped, "shipped_folder", lambda world: folder)
    return folder


def test_shipped_teacher_rows_stand_in_where_this_machine_has_none(
    fake_bench: list, shipped_dir: Path, tmp_path: Path
) -> None:
    """The video teacher's rows shipped for (1, 2, 4, 50): a run of those counts copies them, marked, with their grids
    (no GIFs) and measures only its student; a run of other counts, or against other shipped settings, measures."""
    from fewstep.bench.shipped import ship

    cfg = distill.teacher_bench_config("video", [1, 2, 4])
    ship(_measured_report(tmp_path / "measured", cfg), "video", cfg, shipped_dir, "python ship")
    distill.bench_student(tmp_path / "s", "video", [1, 2, 4], tmp_path / "a")
    assert fake_bench == [(str(tmp_path / "s"),)]  # the teacher was not benched
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    teacher = [r for r in report["rows"] if r["source"] == "video"]
    assert [r["steps"] for r in teacher] == [1, 2, 4, 50]
    assert all(r["shipped"] == "2026-12-07, Linux-test, 2 threads" and r["animation"] is None for r in teacher)
    assert (tmp_path / "a" / "grid_50.png").read_bytes() == b"png"

    distill.bench_student(tmp_path / "s", "video", [1, 2], tmp_path / "b")  # settings nobody shipped
    assert fake_bench[-2:] == [("video",), (str(tmp_path / "s"),)]
    cache = distill.bench_cache_dir() / "teacher-bench"
    assert len(list(cache.iterdir())) == 1  # the shipped rows were not written into this machine's cache


def test_this_machines_teacher_rows_come_before_the_shipped_ones(
    fake_bench: list, shipped_dir: Path, tmp_path: Path
) -> None:
    from fewstep.bench.shipped import ship

    distill.bench_student(tmp_path / "s", "video", [1, 2, 4], tmp_path / "a")  # nothing shipped: measured here
    cfg = distill.teacher_bench_config("video", [1, 2, 4])
    ship(_measured_report(tmp_path / "measured", cfg), "video", cfg, shipped_dir, "python ship")
    distill.bench_student(tmp_path / "s", "video", [1, 2, 4], tmp_path / "b")
    assert fake_bench.count(("video",)) == 1
    rows = json.loads((tmp_path / "b" / "report.json").read_text())["rows"]
    assert not any(r.get("shipped") for r in rows)


def test_shipped_rows_stand_for_one_key_only(
    shipped_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other bench settings, another world, or another evaluator: the shipped rows are not what a bench would measure
    now."""
    import dataclasses

    import fewstep.bench.shipped as shipped

    cfg = distill.teacher_bench_config("video", [1, 2, 4])
    ship = shipped.ship
    ship(_measured_report(tmp_path / "measured", cfg), "video", cfg, shipped_dir, "python ship")
    assert shipped.shipped_rows("video", cfg) == shipped_dir
    assert shipped.shipped_rows("video", dataclasses.replace(cfg, seeds=1)) is None
    assert shipped.shipped_rows("digits", distill.teacher_bench_config("digits", [1, 2, 4])) is None
    evaluator = tmp_path / "evaluator"
    evaluator.mkdir()
    (evaluator / "weights").write_bytes(b"1")
    monkeypatch.setattr(shipped, "evaluator_folders", lambda: [evaluator])
    key = shipped.rows_key("video", cfg)
    assert shipped.shipped_rows("video", cfg) is None  # the evaluators are part of the key
    (evaluator / "weights").write_bytes(b"2")
    assert shipped.rows_key("video", cfg) != key


def test_ship_refuses_a_report_of_other_settings_or_models(shipped_dir: Path, tmp_path: Path) -> None:
    from fewstep.bench.shipped import ship

    cfg = distill.teacher_bench_config("video", [1, 2, 4])
    other = distill.teacher_bench_config("video", [1, 2])
    with pytest.raises(ValueError, match="other settings"):
        ship(_measured_report(tmp_path / "a", other), "video", cfg, shipped_dir, "python ship")
    with pytest.raises(ValueError, match="alone"):
        ship(_measured_report(tmp_path / "b", cfg, ("video", "student")), "video", cfg, shipped_dir, "python ship")
    assert not shipped_dir.exists()


def test_an_unwritable_cache_measures_the_teacher_into_the_report(
    fake_bench: list, random_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "not-a-folder"))
    record, into = fewstep.bench.run.run_bench, []

    def bench(sources: Any, report_dir: Path, cfg: Any, text: Any = None) -> Any:
        into.append(report_dir)
        return record(sources, report_dir, cfg, text)

    monkeypatch.setattr(fewstep.bench.run, "run_bench", bench)
    teacher = str(random_digits)
    distill.bench_student(tmp_path / "s", teacher, [1, 2], tmp_path / "bench")
    assert fake_bench == [(teacher,), (str(tmp_path / "s"),)] and into == [tmp_path / "bench"] * 2
    rows = json.loads((tmp_path / "bench" / "report.json").read_text())["rows"]
    assert [r["source"] for r in rows] == [teacher, str(tmp_path / "s")]
