"""Runtime settings of a bench (dtype, attention backend, torch.compile): checked before any work, applied to the
pipeline, and recorded in every row so that differently run rows sit side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewstep.bench.run import BenchConfig, grid_name, merge_rows, run_bench
from fewstep.bench.runtime import XFORMERS_NEEDS, check_runnable, load_pipelines, runtime_tag
from fewstep.errors import FewstepError


def small(**kw: object) -> BenchConfig:
    base = dict(steps=(1,), num=10, seeds=1, batch_size=10, latency_batch=10, repeats=2, floor_subsets=2)
    return BenchConfig(**{**base, "progress": False, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad,needle",
    [({"attention": "flash"}, "--attention"), ({"dtype": "fp8"}, "--dtype"), ({"compile": "yes"}, "compile")],
)
def test_bad_settings_fail_on_one_line_before_any_work(bad: dict, needle: str, tmp_path: Path) -> None:
    with pytest.raises(FewstepError, match=needle) as err:
        run_bench(["digits"], tmp_path / "report", small(**bad))
    assert len(str(err.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_xformers_without_cuda_says_so_on_one_line(random_digits: Path, tmp_path: Path) -> None:
    with pytest.raises(FewstepError) as err:
        run_bench([str(random_digits)], tmp_path / "report", small(attention="xformers"))
    assert str(err.value) == XFORMERS_NEEDS
    assert list(tmp_path.iterdir()) == []


def test_compile_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n\nSet TORCHDYNAMO_VERBOSE=1 for more")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(FewstepError, match=r"^torch.compile cannot run on cpu: InvalidCxxCompiler: No working C\+\+ "):
        check_runnable("sdpa", True, "cpu")
    check_runnable("sdpa", False, "cpu")  # not asked for: not probed


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_dtypes_run_on_cpu(dtype: str, expected: torch.dtype, random_digits: Path) -> None:
    """torch >= 2.1 runs fp16 and bf16 on a CPU (diffusers' warning that fp16 cannot is wrong there)."""
    (pipe,) = load_pipelines([str(random_digits)], "cpu", "sdpa", False, dtype)
    assert pipe.transformer.dtype == expected
    images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=2, guidance_scale=2.0).images
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_rows_carry_their_settings_and_do_not_replace_each_other(random_digits: Path, tmp_path: Path) -> None:
    report_dir = tmp_path / "report"
    run_bench([str(random_digits)], report_dir, small())
    run_bench([str(random_digits)], report_dir, small(dtype="bf16"))
    run_bench([str(random_digits)], report_dir, small(dtype="bf16"))  # same settings again: replaces
    rows = json.loads((report_dir / "report.json").read_text())["rows"]
    assert sorted((r["dtype"], r["attention"], r["compile"]) for r in rows) == [
        ("bf16", "sdpa", False),
        ("fp32", "sdpa", False),
    ]
    assert len({r["grid"] for r in rows}) == 2 and all((report_dir / r["grid"]).is_file() for r in rows)
    md = (report_dir / "report.md").read_text()
    assert "| random-digits | 1 |" in md and "| random-digits [bf16] | 1 |" in md  # defaults stay unmarked


def test_merge_keys_on_settings_and_reads_old_rows_as_defaults() -> None:
    old = [{"source": "/a", "steps": 1, "guidance": 1.0, "fid": 9.0}]  # a row from before the settings existed
    compiled = {"source": "/a", "steps": 1, "guidance": 1.0, "fid": 8.0, "attention": "sdpa", "compile": True}
    merged = merge_rows(old, [{**compiled, "dtype": "fp32"}])
    assert [r["fid"] for r in merged] == [9.0, 8.0]
    plain = {**compiled, "compile": False, "dtype": "fp32", "fid": 7.0}
    assert [r["fid"] for r in merge_rows(merged, [plain])] == [8.0, 7.0]


def test_runtime_tag_and_grid_names() -> None:
    assert runtime_tag({}) == "" and runtime_tag({"attention": "sdpa", "compile": False, "dtype": "fp32"}) == ""
    tag = runtime_tag({"attention": "xformers", "compile": True, "dtype": "fp16"})
    assert tag == "fp16, xformers, compiled"
    assert grid_name("m", 2, 1.5, tag) == "grid_m_2steps_w1.5_fp16_xformers_compiled.png"
    assert grid_name("m", 2, 1.5) == "grid_m_2steps_w1.5.png"


@pytest.mark.slow
def test_compiled_denoiser_matches_eager_and_benches(random_digits: Path, tmp_path: Path) -> None:
    """torch.compile (inductor, which needs a C++ compiler on a CPU): the compiled DiT gives the eager images, the
    NFE hook still counts through it, and the row says it was compiled. One input shape throughout: one compile."""
    (eager,) = load_pipelines([str(random_digits)], "cpu", "sdpa", False, "fp32")
    (compiled,) = load_pipelines([str(random_digits)], "cpu", "sdpa", True, "fp32")
    call = {"class_labels": list(range(10)), "num_inference_steps": 2}
    expected = eager(**call, generator=torch.Generator().manual_seed(0)).images
    got = compiled(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    (row,) = run_bench([str(random_digits)], tmp_path / "report", small(compile=True))["rows"]
    assert row["compile"] is True and row["nfe"] == 1 and row["latency_ms"] > 0
    assert "| random-digits [compiled] | 1 |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.gpu
def test_xformers_fp16_compiled_on_cuda(random_digits: Path, tmp_path: Path) -> None:
    pytest.importorskip("xformers")
    cfg = small(attention="xformers", compile=True, dtype="fp16", device="cuda")
    (row,) = run_bench([str(random_digits)], tmp_path / "report", cfg)["rows"]
    assert (row["attention"], row["compile"], row["dtype"]) == ("xformers", True, "fp16")
    assert "[fp16, xformers, compiled]" in (tmp_path / "report" / "report.md").read_text()
