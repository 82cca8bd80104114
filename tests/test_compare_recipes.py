"""benchmarks/compare_recipes.py on synthetic run folders: bench reports written in fewstep's own row schema, a fake
`fewstep distill` for the orchestration, and the real script for its usage errors. Nothing trains."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchmark_scripts import load_benchmark

from fewstep.bench.run import Row

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_recipes.py"


def load_script() -> ModuleType:
    return load_benchmark("compare_recipes")


@pytest.fixture(scope="module")
def cr() -> ModuleType:
    return load_script()


def row(rng: random.Random, model: str, source: str, steps: int) -> dict[str, Any]:
    fids = [rng.uniform(2.0, 40.0) for _ in range(3)]
    mean = sum(fids) / 3
    return asdict(
        Row(
            model=model,
            steps=steps,
            nfe=steps,
            guidance=1.0,
            fid=mean,
            fid_std=rng.uniform(0.1, 1.0),
            latency_ms=rng.uniform(10.0, 1500.0),
            latency_ms_p90=rng.uniform(1500.0, 2000.0),
            latency_ms_per_image=rng.uniform(0.1, 15.0),
            peak_mem_mb=rng.uniform(100.0, 200.0),
            num_samples=1000,
            fid_train=rng.uniform(1.0, 40.0),
            accuracy=rng.uniform(0.9, 1.0),
            diversity=rng.uniform(10.0, 12.0),
            fid_floor=4.3,
            fid_seeds=fids,
            source=source,
        )
    )


def report(rng: random.Random, folder: Path, steps: list[int]) -> dict[str, Any]:
    """A bench/report.json as `fewstep distill` leaves it: the teacher at the plan's steps and 50, then the student."""
    rows = [row(rng, "digits-teacher", "digits", s) for s in sorted({*steps, 50})]
    rows += [row(rng, "student", str((folder / "student").resolve()), s) for s in steps]
    config = {"steps": steps, "latency_batch": 100, "num": 1000, "seeds": 3}
    return {"rows": rows, "reference": {"real_fid_floor": 4.3}, "config": config, "env": {"torch": "x"}}


def write_run(folder: Path, data: dict[str, Any], train_steps: int) -> None:
    (folder / "bench").mkdir(parents=True)
    (folder / "bench" / "report.json").write_text(json.dumps(data))
    (folder / "training.json").write_text(json.dumps({"steps": train_steps, "recipe": folder.name}))


PLANS = {"lcm": [1, 2, 4], "scm": [1, 4], "rcm": [2]}


@pytest.fixture
def runs(cr: ModuleType, tmp_path: Path) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    rng = random.Random(0)
    out, reports = [], {}
    for i, (name, steps) in enumerate(PLANS.items()):
        folder = tmp_path / name
        reports[name] = report(rng, folder, steps)
        write_run(folder, reports[name], 100 + i)
        out.append(cr.Run(name, folder, 0, train_wall_s=60.0 * (i + 1), run_wall_s=90.0 * (i + 1)))
    return out, reports


def teacher_rows(data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["steps"]: r for r in data["rows"] if r["source"] == "digits"}


def table_lines(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| recipe")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_ratios_are_fid_over_the_teacher_at_50_steps(cr: ModuleType, runs: Any) -> None:
    run_list, reports = runs
    compare = cr.aggregate(run_list)
    t50 = teacher_rows(reports["lcm"])[50]  # the first run's teacher rows
    assert compare["teacher_50"]["fid"] == t50["fid"] and compare["teacher_50"]["fid_train"] == t50["fid_train"]
    for r in compare["rows"] + compare["teacher"]:
        assert r["fid_ratio"] == pytest.approx(r["fid"] / t50["fid"])
        assert r["fid_train_ratio"] == pytest.approx(r["fid_train"] / t50["fid_train"])
    teacher_50 = [r for r in compare["teacher"] if r["steps"] == 50]
    assert len(teacher_50) == 1 and teacher_50[0]["fid_ratio"] == pytest.approx(1.0)


def test_every_recipe_and_step_count_is_a_row(cr: ModuleType, runs: Any) -> None:
    run_list, reports = runs
    compare = cr.aggregate(run_list)
    assert sorted((r["recipe"], r["steps"]) for r in compare["rows"]) == sorted(
        (name, s) for name, steps in PLANS.items() for s in steps
    )
    for r in compare["rows"]:
        source = next(x for x in reports[r["recipe"]]["rows"] if x["source"] != "digits" and x["steps"] == r["steps"])
        for key in ("nfe", "fid", "fid_std", "fid_train", "accuracy", "diversity", "latency_ms"):
            assert r[key] == source[key], key
        run = next(x for x in run_list if x.recipe == r["recipe"])
        assert r["train_wall_s"] == run.train_wall_s
    # teacher rows: the union of every plan's step counts and 50; a count seen first in a later run comes from it
    first_seen: dict[int, dict[str, Any]] = {}
    for name in PLANS:
        for steps, t in teacher_rows(reports[name]).items():
            first_seen.setdefault(steps, t)
    assert {r["steps"]: r["fid"] for r in compare["teacher"]} == {s: t["fid"] for s, t in first_seen.items()}

    cells = table_lines(cr.markdown(compare))
    assert len(cells) == len(compare["rows"]) + len(compare["teacher"])
    for r in compare["rows"] + compare["teacher"]:
        match = [c for c in cells if c[0] == r["recipe"] and c[1] == f"{r['steps']} ({r['nfe']})"]
        assert len(match) == 1, r
        assert f"({r['fid_ratio']:.2f}x)" in match[0][2] and f"({r['fid_train_ratio']:.2f}x)" in match[0][3]
        assert match[0][4] == f"{100 * r['accuracy']:.1f}%"


def test_failed_run_is_reported_and_the_others_kept(cr: ModuleType, runs: Any, tmp_path: Path) -> None:
    run_list, _ = runs
    broken = cr.Run("sid", tmp_path / "sid", returncode=3, run_wall_s=12.0)  # no folder at all
    compare = cr.aggregate([*run_list, broken])
    status = {r["recipe"]: r for r in compare["runs"]}
    assert status["sid"]["status"] == "failed" and status["sid"]["returncode"] == 3
    assert all(status[name]["status"] == "ok" for name in PLANS)
    assert "sid" not in {r["recipe"] for r in compare["rows"]}
    assert {r["recipe"] for r in compare["rows"]} == set(PLANS)
    cells = [c for c in table_lines(cr.markdown(compare)) if c[0] == "sid"]
    assert len(cells) == 1 and cells[0][1] == "failed (exit 3)"


def test_outputs_are_written_whole(cr: ModuleType, runs: Any, tmp_path: Path) -> None:
    run_list, _ = runs
    compare = cr.aggregate(run_list)
    out = tmp_path / "compare"
    table = cr.write_outputs(compare, out)
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(compare))
    assert (out / "compare.md").read_text().startswith(table)
    assert (out / "quality_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "quality_vs_nfe.png"]


FAKE_DISTILL = """
import json, pathlib, sys
folder, spec = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
if spec["exit"]:
    sys.exit(spec["exit"])
(folder / "bench").mkdir(parents=True, exist_ok=True)
(folder / "bench" / "report.json").write_text(json.dumps(spec["report"]))
(folder / "training.json").write_text(json.dumps({"steps": 7}))
"""


def test_main_trains_reports_failures_and_reuses(cr: ModuleType, tmp_path: Path, monkeypatch: Any) -> None:
    out = tmp_path / "out"
    rng = random.Random(1)
    specs = {"lcm": {"exit": 0, "report": report(rng, out / "lcm", [1, 2])}, "scm": {"exit": 5, "report": {}}}
    calls: list[tuple[str, bool]] = []

    def fake(
        recipe: str, folder: Path, resume: bool, sets: list[str], world: str = "digits", bench_seeds: Any = None
    ) -> list[str]:
        calls.append((recipe, resume))
        return [sys.executable, "-c", FAKE_DISTILL, str(folder), json.dumps(specs[recipe])]

    monkeypatch.setattr(cr, "distill_command", fake)
    assert cr.main(["--recipes", "lcm,scm", "--output", str(out)]) == 1  # a failed run: non-zero at the end
    assert calls == [("lcm", False), ("scm", False)]
    compare = json.loads((out / "compare.json").read_text())
    assert {r["recipe"]: r["status"] for r in compare["runs"]} == {"lcm": "ok", "scm": "failed"}
    assert sorted(r["steps"] for r in compare["rows"]) == [1, 2]
    timing = json.loads((out / "lcm" / cr.TIMING).read_text())
    assert compare["rows"][0]["train_wall_s"] == timing["train_wall_s"] <= timing["run_wall_s"]
    assert not (out / "scm" / cr.TIMING).exists()

    specs["lcm"] = {"exit": 9, "report": {}}  # retraining lcm would now fail
    specs["scm"] = {"exit": 0, "report": report(rng, out / "scm", [4])}
    calls.clear()
    assert cr.main(["--recipes", "lcm,scm", "--output", str(out), "--reuse"]) == 0
    assert calls == [("scm", False)]
    again = json.loads((out / "compare.json").read_text())
    assert {r["recipe"]: r["reused"] for r in again["runs"]} == {"lcm": True, "scm": False}
    assert [r for r in again["rows"] if r["recipe"] == "lcm"] == [r for r in compare["rows"]]
    assert sorted((r["recipe"], r["steps"]) for r in again["rows"]) == [("lcm", 1), ("lcm", 2), ("scm", 4)]


def test_unknown_recipe_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--recipes", "lcm,nosuch", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_train_seeds_average_each_number_over_the_trainings(cr: ModuleType, tmp_path: Path, monkeypatch: Any) -> None:
    """--train-seeds 3 trains each recipe with train.seed 0, 1, 2 into its own folder and reports the mean over the
    three trainings with their std (the spread of the per-training means, not the bench's sampling spread)."""
    out = tmp_path / "out"
    rng = random.Random(2)
    specs = {k: {"exit": 0, "report": report(rng, out / "rcm" / f"seed{k}", [1, 2])} for k in range(3)}
    calls: list[tuple[Path, str]] = []

    def fake(
        recipe: str, folder: Path, resume: bool, sets: list[str], world: str = "digits", bench_seeds: Any = None
    ) -> list[str]:
        seed = int(sets[-1].split("=")[1])
        calls.append((folder, sets[-1]))
        return [sys.executable, "-c", FAKE_DISTILL, str(folder), json.dumps(specs[seed])]

    monkeypatch.setattr(cr, "distill_command", fake)
    assert cr.main(["--recipes", "rcm", "--output", str(out), "--train-seeds", "3"]) == 0
    assert calls == [(out / "rcm" / f"seed{k}", f"train.seed={k}") for k in range(3)]
    compare = json.loads((out / "compare.json").read_text())
    t50 = compare["teacher_50"]
    for r in compare["rows"]:
        per_run = [next(x for x in specs[k]["report"]["rows"] if x["source"] != "digits" and x["steps"] == r["steps"])
                   for k in range(3)]  # fmt: skip
        for key in ("fid", "fid_train", "accuracy"):
            assert r[key] == pytest.approx(sum(x[key] for x in per_run) / 3), key
        assert r["fid_std"] == pytest.approx(statistics.stdev(x["fid"] for x in per_run))
        assert r["fid_train_std"] == pytest.approx(statistics.stdev(x["fid_train"] for x in per_run))
        assert r["fid_ratio"] == pytest.approx(r["fid"] / t50["fid"]) and r["train_seeds"] == [0, 1, 2]
    cells = table_lines((out / "compare.md").read_text())
    rcm = [c for c in cells if c[0] == "rcm"]
    assert len(rcm) == 2 and all("+-" in c[3] and "mean of 3 seeds" in c[7] for c in rcm)
    # the plot: one line per recipe (not one per training), its bars the std over the trainings on both panels
    assert [run["recipe"] for run in compare["runs"]] == ["rcm"] * 3
    for key, std in (("fid", "fid_std"), ("fid_train", "fid_train_std")):
        series = cr.plot_series(compare, key)
        assert [name for name, *_ in series] == [cr.TEACHER, "rcm"]
        _, xs, ys, errs = series[1]
        rows = sorted(compare["rows"], key=lambda r: r["nfe"])
        assert (xs, ys, errs) == ([r["nfe"] for r in rows], [r[key] for r in rows], [r[std] for r in rows])
    assert cr.main(["--recipes", "rcm", "--output", str(out), "--train-seeds", "0"]) == 2


def test_bench_seeds_reach_each_distill_and_rebench_reused_runs(
    cr: ModuleType, tmp_path: Path, monkeypatch: Any
) -> None:
    """--bench-seeds N: each new run's distill benches with N noise seeds; with --reuse, a finished run benched with
    another number is benched again (its student at the steps of its report, next to the world's teacher) and one
    benched with N is left alone; the training is not run again."""
    out = tmp_path / "out"
    rng = random.Random(4)
    assert cr.distill_command("lcm", out, False, [], "digits", 10)[-1] == "--bench-seeds=10"
    assert not any("--bench-seeds" in a for a in cr.distill_command("lcm", out, False, []))
    specs = {name: {"exit": 0, "report": report(rng, out / name, steps)} for name, steps in PLANS.items()}
    specs["scm"]["report"]["config"]["seeds"] = 10  # already benched with 10
    seen: list[Any] = []

    def fake(recipe: str, folder: Path, resume: bool, sets: list[str], world: str = "digits", bench_seeds: Any = None):
        seen.append((recipe, bench_seeds))
        return [sys.executable, "-c", FAKE_DISTILL, str(folder), json.dumps(specs[recipe])]

    monkeypatch.setattr(cr, "distill_command", fake)
    assert cr.main(["--recipes", "lcm,scm", "--output", str(out), "--bench-seeds", "10"]) == 0
    assert seen == [("lcm", 10), ("scm", 10)]

    import fewstep.distill

    benched: list[tuple[Any, ...]] = []
    monkeypatch.setattr(fewstep.distill, "bench_student", lambda *a: benched.append(a))
    seen.clear()
    assert cr.main(["--recipes", "lcm,scm", "--output", str(out), "--reuse", "--bench-seeds", "10"]) == 0
    assert seen == [] and benched == [(out / "lcm" / "student", "digits", [1, 2, 4], out / "lcm" / "bench", 10)]
    assert cr.main(["--recipes", "lcm", "--output", str(out), "--bench-seeds", "0"]) == 2


def test_video_world_runs_the_video_recipes_on_the_video_teacher(
    cr: ModuleType, tmp_path: Path, monkeypatch: Any
) -> None:
    """--world video trains MCM and DCM by default with --teacher video, and the table adds the video measures."""
    out = tmp_path / "out"
    rng = random.Random(3)

    def video_report(folder: Path, steps: list[int]) -> dict[str, Any]:
        rows = [row(rng, "video-teacher", "video", s) | {"guidance": 1.5} for s in sorted({*steps, 50})]
        rows += [row(rng, "student", str((folder / "student").resolve()), s) for s in steps]
        for r in rows:
            r.update(frame_fid=rng.uniform(5, 50), motion_accuracy=rng.uniform(0.5, 1), jitter=rng.uniform(0, 1))
        config = {"steps": steps, "latency_batch": 100, "num": 1000, "seeds": 3}
        return {"rows": rows, "reference": {"real_fid_floor": 18.7, "world": "video"}, "config": config, "env": {}}

    specs = {name: {"exit": 0, "report": video_report(out / name, [1, 4])} for name in ("mcm", "dcm")}
    calls: list[tuple[str, str]] = []
    command = cr.distill_command("mcm", out, False, [], "video")
    assert command[4:8] == ["--recipe", "mcm", "--teacher", "video"]

    def fake(
        recipe: str, folder: Path, resume: bool, sets: list[str], world: str = "digits", bench_seeds: Any = None
    ) -> list[str]:
        calls.append((recipe, world))
        return [sys.executable, "-c", FAKE_DISTILL, str(folder), json.dumps(specs[recipe])]

    monkeypatch.setattr(cr, "distill_command", fake)
    assert cr.main(["--world", "video", "--output", str(out)]) == 0
    assert calls == [("mcm", "video"), ("dcm", "video")]
    compare = json.loads((out / "compare.json").read_text())
    assert compare["world"] == "video" and {r["steps"] for r in compare["teacher"]} == {1, 4, 50}
    table = (out / "compare.md").read_text()
    assert table.startswith("# fewstep recipes on the video teacher") and "| frame FID | motion accuracy |" in table
    mcm = [c for c in table_lines(table) if c[0] == "mcm"]
    student = next(r for r in specs["mcm"]["report"]["rows"] if r["model"] == "student" and r["steps"] == 1)
    assert len(mcm) == 2 and mcm[0][7] == f"{student['frame_fid']:.2f}"
    assert len({len(c) for c in table_lines(table)}) == 1  # every row has every column
    # ratios are to the teacher's 50 steps at its own guidance (worlds.TEACHER_GUIDANCE: 1.5), the students' at 1
    teacher_50 = next(r for r in specs["mcm"]["report"]["rows"] if r["source"] == "video" and r["steps"] == 50)
    assert compare["teacher_guidance"] == 1.5 and compare["teacher_50"]["fid"] == teacher_50["fid"]
    ratio = next(r for r in compare["rows"] if r["recipe"] == "mcm" and r["steps"] == 1)["fid_ratio"]
    assert ratio == pytest.approx(student["fid"] / teacher_50["fid"])
    assert "| teacher (Euler) (w=1.5) | 50 (50) |" in table and "guidance w 1.5" in table
