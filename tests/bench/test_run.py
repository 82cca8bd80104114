"""The bench harness end to end on a small random digits pipeline, plus its measuring pieces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fewstep.bench.measure import count_nfe, percentile
from fewstep.bench.run import BenchConfig, guidance_of, merge_rows, run_bench
from fewstep.worlds.digits.pipeline import DigitsPipeline

ROW_KEYS = {
    "model": str, "steps": int, "nfe": int, "guidance": float, "fid": float, "fid_std": float, "fid_train": float,
    "accuracy": float, "latency_ms": float, "latency_ms_p90": float, "peak_mem_mb": float, "num_samples": int,
}  # fmt: skip


def small(**kw: object) -> BenchConfig:
    base = dict(num=40, seeds=2, batch_size=40, latency_batch=10, repeats=2, floor_subsets=2, progress=False)
    return BenchConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_bench_writes_every_report_file(random_digits: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    report = run_bench([str(random_digits)], report_dir, small(steps=(1, 2), guidance=(1.0, 2.0)))
    names = {p.name for p in report_dir.iterdir()}
    assert {
        "report.json",
        "report.md",
        "quality_vs_nfe.png",
        "quality_vs_latency.png",
        "guidance_tradeoff.png",
    } <= names
    on_disk = json.loads((report_dir / "report.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    assert len(on_disk["rows"]) == 4
    for row in on_disk["rows"]:
        for key, kind in ROW_KEYS.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert (report_dir / row["grid"]).is_file()
        assert row["nfe"] == row["steps"] * (1 if row["guidance"] == 1.0 else 2)  # CFG counted
        assert len(row["fid_seeds"]) == 2 and row["fid"] == pytest.approx(sum(row["fid_seeds"]) / 2)
        assert row["latency_ms_p90"] >= row["latency_ms"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0 and row["diversity"] > 0.0
    assert isinstance(on_disk["reference"]["real_fid_floor"], float)
    assert on_disk["reference"]["real_diversity"] > 0.0
    assert on_disk["env"]["torch"] == torch.__version__
    assert "| random-digits | 2 |" in (report_dir / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_bench_merges_rows_into_existing_report(random_digits: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    run_bench([str(random_digits)], report_dir, small(steps=(1,), seeds=1))
    run_bench([str(random_digits)], report_dir, small(steps=(1, 3), seeds=1))
    rows = json.loads((report_dir / "report.json").read_text())["rows"]
    assert sorted(r["steps"] for r in rows) == [1, 3]


def test_merge_rows_replaces_same_key() -> None:
    old = [{"source": "/a", "steps": 1, "guidance": 1.0, "fid": 9.0}, {"source": "/b", "steps": 1, "guidance": 1.0}]
    new = [{"source": "/a", "steps": 1, "guidance": 1.0, "fid": 5.0}]
    merged = merge_rows(old, new)
    assert [r["source"] for r in merged] == ["/b", "/a"] and merged[1]["fid"] == 5.0


def test_count_nfe_counts_batched_cfg_twice(random_digits: Path) -> None:
    pipe = DigitsPipeline.from_pretrained(random_digits)
    pipe.set_progress_bar_config(disable=True)
    with count_nfe(pipe.transformer, batch=4) as nfe:
        pipe(class_labels=[0, 1, 2, 3], num_inference_steps=3, guidance_scale=1.5)
    assert nfe[0] == 6


def test_percentile_matches_torch() -> None:
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0.0, 0.5, 0.9, 1.0):
        assert percentile(values, q) == pytest.approx(float(torch.quantile(torch.tensor(values), q)))


def test_folders_with_the_same_name_keep_separate_rows(random_digits: Path, tmp_path: Path) -> None:
    import shutil

    twin = tmp_path / "other" / random_digits.name
    shutil.copytree(random_digits, twin)
    report_dir = tmp_path / "report"
    run_bench([str(random_digits), str(twin)], report_dir, small(steps=(1,), seeds=1))
    run_bench([str(random_digits)], report_dir, small(steps=(1,), seeds=1))  # re-bench one of them
    rows = json.loads((report_dir / "report.json").read_text())["rows"]
    assert len(rows) == 2 and len({r["model"] for r in rows}) == 2 and len({r["grid"] for r in rows}) == 2
    assert all(r["fid_floor"] is not None for r in rows)


def test_unique_labels() -> None:
    from fewstep.bench.run import unique_labels

    labels = unique_labels(["/x/a/student", "/x/b/student", "digits"], taken={})
    assert labels == {"/x/a/student": "student", "/x/b/student": "b-student", "digits": "digits-teacher"}
    assert unique_labels(["/x/b/student"], taken={"b-student": "/x/b/student"}) == {"/x/b/student": "b-student"}


CONCURRENT_BENCH = """
import sys, time
from pathlib import Path
import fewstep.bench.run as run
from fewstep.cli import main

write_report = run.write_report

def slow_write(report, out_dir):  # widen the read-merge-write window so that the two runs overlap in it
    time.sleep(1.5)
    write_report(report, out_dir)

run.write_report = slow_write
go = Path(sys.argv[1])
while not go.exists():  # both processes start measuring together
    time.sleep(0.01)
sys.exit(main(["bench", *sys.argv[2:]]))
"""


def test_concurrent_benches_into_one_report_keep_every_row(random_digits: Path, tmp_path: Path) -> None:
    """Two `fewstep bench` processes started together into one --report folder both end with their rows there."""
    import subprocess
    import sys

    report_dir, go = tmp_path / "report", tmp_path / "go"
    common = ["--num", "20", "--seeds", "1", "--batch-size", "20", "--latency-batch", "5", "--repeats", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = []
    for steps in ("1", "2"):
        argv = [str(go), str(random_digits), "--steps", steps, "--report", str(report_dir), *common]
        procs.append(subprocess.Popen([sys.executable, "-c", CONCURRENT_BENCH, *argv], text=True, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert "wrote" in out
    report = json.loads((report_dir / "report.json").read_text())
    assert sorted(r["steps"] for r in report["rows"]) == [1, 2]
    md = (report_dir / "report.md").read_text()
    assert "| random-digits | 1 |" in md and "| random-digits | 2 |" in md
    assert all((report_dir / r["grid"]).is_file() for r in report["rows"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or temporary files left


def test_digits_rows_report_peak_memory_on_cpu(random_digits: Path, tmp_path: Path) -> None:
    """Generation batches larger than the latency batch leave freed memory resident; the latency call's own peak
    must still show (report.md prints whole MB, so at least 0.5)."""
    cfg = small(steps=(1, 2), seeds=1, num=200, batch_size=200, latency_batch=20)
    report = run_bench([str(random_digits)], tmp_path / "report", cfg)
    assert all(r["peak_mem_mb"] >= 0.5 for r in report["rows"]), [r["peak_mem_mb"] for r in report["rows"]]
    assert "peak resident set" in (tmp_path / "report" / "report.md").read_text()  # says how it is measured


def test_cpu_peak_memory_grows_with_batch(random_digits: Path) -> None:
    """After a large call the process keeps its freed heap: the measure must still see a small call's own peak."""
    from fewstep.bench.measure import measure_speed
    from fewstep.worlds.digits.data import balanced_labels

    pipe = DigitsPipeline.from_pretrained(random_digits)
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=balanced_labels(400), num_inference_steps=2)
    peaks = {}
    for batch in (20, 400):
        call = {"class_labels": balanced_labels(batch), "num_inference_steps": 2}
        peaks[batch] = measure_speed(pipe, call, batch, torch.device("cpu"), warmup=0, repeats=1).peak_mem_mb
    assert 0.5 <= peaks[20] < peaks[400], peaks


def test_each_model_is_benched_at_its_own_guidance_unless_told() -> None:
    """No --guidance: the video world's teacher at the w 1.5 its students distil, the digits teacher and any folder
    (students) at 1; a given list applies to every model."""
    own = BenchConfig()
    assert [guidance_of(own, s) for s in ("video", "digits", "/runs/x/student")] == [(1.5,), (1.0,), (1.0,)]
    assert guidance_of(BenchConfig(guidance=(1.0, 2.0)), "video") == (1.0, 2.0)


def test_rows_measured_elsewhere_are_marked_with_where(random_digits: Path, tmp_path: Path) -> None:
    """A report holding rows shipped with fewstep (``bench.shipped``) keeps them through a merge and marks them, in the
    table and in a note that says where they were measured and how to measure them here."""
    report_dir = tmp_path / "report"
    run_bench([str(random_digits)], report_dir, small(steps=(1,)))
    report = json.loads((report_dir / "report.json").read_text())
    report["rows"][0] |= {"source": "digits", "model": "digits-teacher", "shipped": "2026-12-07, Linux-x, 2 threads"}
    (report_dir / "report.json").write_text(json.dumps(report))
    run_bench([str(random_digits)], report_dir, small(steps=(2,)))
    md = (report_dir / "report.md").read_text()
    assert "| digits-teacher \N{DAGGER} | 1 |" in md and "| random-digits | 2 |" in md
    assert (
        "\N{DAGGER} digits-teacher: not measured on this machine but shipped with fewstep (measured 2026-12-07, "
        "Linux-x, 2 threads); `fewstep bench digits --steps 1 --report` into this folder measures them here in their "
        "place."
    ) in md
