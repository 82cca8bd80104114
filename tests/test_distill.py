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
