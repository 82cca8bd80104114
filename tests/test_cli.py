"""The command-line contract: bad input gives one line, exit code 2, no traceback and nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_help_does_not_import_torch() -> None:
    code = "import sys; from fewstep.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "assert 'torch' not in sys.modules, 'torch imported'; assert 'diffusers' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "distill" in proc.stdout and "bench" in proc.stdout


def test_console_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("fewstep")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fewstep.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, "bench", str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=120
    )
    assert_one_line_error(proc.returncode, proc.stderr, "does not exist")


def test_missing_teacher_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report"
    code, _, err = run(["bench", str(tmp_path / "missing"), "--report", str(report)], capsys)
    assert_one_line_error(code, err, "does not exist")
    assert leftovers(tmp_path) == []
    code, _, err = run(["teacher", "inspect", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_folder_that_is_not_a_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "weights").mkdir()
    code, _, err = run(["sample", str(tmp_path / "weights"), "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "not a diffusers pipeline folder")
    assert leftovers(tmp_path) == ["weights"]


@pytest.mark.parametrize("command", [["teacher", "inspect"], ["sample"], ["bench"]])
def test_unsupported_model_class(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet1DModel

    from fewstep.worlds.digits.pipeline import DigitsPipeline

    folder = tmp_path / "odd"
    unet = UNet1DModel(
        block_out_channels=(8, 8, 8),
        down_block_types=("DownBlock1DNoSkip",) * 3,
        up_block_types=("UpBlock1DNoSkip",) * 3,
        mid_block_type="UNetMidBlock1D",
        in_channels=1,
        out_channels=1,
        extra_in_channels=0,
        time_embedding_type="positional",
        norm_num_groups=8,
        use_timestep_embedding=False,
        flip_sin_to_cos=True,
        downsample_each_block=False,
    )
    DigitsPipeline(transformer=unet, scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(folder)
    out = ["--output", str(tmp_path / "o")] if command == ["sample"] else []
    out = ["--report", str(tmp_path / "o")] if command == ["bench"] else out
    code, _, err = run([*command, str(folder), *out], capsys)
    assert_one_line_error(code, err, "unsupported model class UNet1DModel")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["bench", "digits", "--steps", "0"],
        ["bench", "digits", "--steps", "1,-2"],
        ["sample", "digits", "--steps", "0"],
        ["sample", "digits", "--steps", "x"],
    ],
)
def test_step_counts_below_one(command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(command, capsys)
    assert_one_line_error(code, err, "--steps")


def test_unknown_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["distill", "--recipe", "no-such-recipe"], capsys)
    assert_one_line_error(code, err, "unknown recipe 'no-such-recipe'")


def test_recipes_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from fewstep.recipes import available

    code, out, _ = run(["recipes"], capsys)
    assert code == 0
    assert len(out.strip().splitlines()) == max(len(available()), 1)


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(
        ["bench", "digits", "--steps", "1", "--num", "10", "--seeds", "1", "--report", str(blocker / "report")], capsys
    )
    assert_one_line_error(code, err, "cannot write to")
    code, _, err = run(["sample", "digits", "--output", str(blocker / "samples")], capsys)
    assert_one_line_error(code, err, "cannot write to")
    code, _, err = run(["teacher", "train", "--what", "evaluator", "--output", str(blocker / "x")], capsys)
    assert_one_line_error(code, err, "cannot write to")
    assert leftovers(tmp_path) == ["a-file"]


def test_sample_writes_grid_and_arrays(
    random_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import numpy as np

    out = tmp_path / "samples"
    code, stdout, _ = run(["sample", str(random_digits), "--steps", "2", "--num", "20", "--output", str(out)], capsys)
    assert code == 0 and str(out) in stdout
    assert {p.name for p in out.iterdir()} == {"grid.png", "samples.npz", "meta.json"}
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (20, 1, 8, 8) and images.dtype == np.uint8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 2 and meta["labels"] == sorted(meta["labels"])


def test_bad_device_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["sample", "digits", "--device", "bogus", "--output", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "device")
    assert not (tmp_path / "o").exists()


def test_existing_foreign_output_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "thesis.txt").write_text("precious")
    code, _, err = run(["sample", "digits", "--steps", "1", "--num", "2", "--output", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "holds other files")
    assert (tmp_path / "thesis.txt").read_text() == "precious"


def test_unexpected_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import fewstep.cli as cli

    def boom(args: object) -> int:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "recipes", boom)
    code, _, err = run(["recipes"], capsys)
    assert code == 1 and err.count("\n") == 1 and "RuntimeError: disk on fire" in err and "Traceback" not in err


def test_distill_runs_end_to_end_and_refuses_to_overwrite(
    random_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI trains, exports a loadable student, and a second run into the same folder needs --resume."""
    out = tmp_path / "run"
    base = ["distill", "--recipe", "scm", "--teacher", str(random_digits), "--output", str(out)]
    sets = ["--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.progress=false"]
    code, stdout, _ = run([*base, *sets], capsys)
    assert code == 0 and "wrote" in stdout
    from fewstep.loading import load_pipeline

    pipe = load_pipeline(str(out / "student"))
    # sCM's default plan is the digits pipeline's stock one: FlowMatchEuler re-noising with fresh noise
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.scheduler.config.stochastic_sampling
    assert pipe(class_labels=[1, 2], num_inference_steps=2).images.shape == (2, 1, 8, 8)
    code, _, err = run([*base, *sets], capsys)
    assert_one_line_error(code, err, "--resume")
    code, _, err = run([*base, "--set", "train.max_steps=3", "--set", "train.batch_size=4", "--resume"], capsys)
    assert code == 0


# a short run, so that a value that slips through shows up as a run that starts (before the check existed)
SHORT = ["--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "train.progress=false"]


@pytest.mark.parametrize(
    "bad,needle",
    [("train.max_steps=0", "train.max_steps must be >= 1, got 0"),
     ("train.max_steps=-5", "train.max_steps must be >= 1, got -5"),
     ("lr=0", "lr must be > 0, got 0"),
     ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1], got 1.5"),
     ("train.mixed_precision=fp8", "train.mixed_precision must be one of 'no', 'fp16', 'bf16', got 'fp8'"),
     ("plan_steps=[]", "plan_steps must not be empty"),
     ("w_min=20", "w_min must be <= w_max, got 20.0 >")],
)  # fmt: skip
def test_bad_config_values_are_one_line_errors_before_anything_is_written(
    bad: str, needle: str, random_digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = ["distill", "--recipe", "lcm", "--teacher", str(random_digits), "--output", str(out), *SHORT]
    code, _, err = run([*base, "--set", bad], capsys)
    assert_one_line_error(code, err, needle)
    assert leftovers(tmp_path) == []  # no run folder, no temporary one
    code, _, err = run(["distill", "--recipe", "lcm", "--set", bad, "--dry-run"], capsys)
    assert_one_line_error(code, err, needle)


def test_bad_values_in_a_preset_or_config_file(
    random_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fewstep.training.config as config

    presets = tmp_path / "presets"
    (presets / "sid").mkdir(parents=True)
    (presets / "sid" / "bad.toml").write_text("t_min = 0.02\nt_max = 1.5\n[train]\nmax_steps = 2\n")
    monkeypatch.setattr(config, "presets_dir", lambda: presets)
    out = tmp_path / "runs" / "run"
    base = ["distill", "--recipe", "sid", "--teacher", str(random_digits), "--output", str(out)]
    code, _, err = run([*base, "--preset", "bad", *SHORT], capsys)
    assert_one_line_error(code, err, "t_max must be in [0, 1], got 1.5")
    bad = tmp_path / "bad.toml"
    bad.write_text("guidance_mode = 'lsg-typo'\n")
    code, _, err = run([*base, "--config", str(bad), *SHORT], capsys)
    assert_one_line_error(code, err, "guidance_mode", "'lsg-typo'")
    bad.write_text("[train]\nbatch_size = 0\n")
    code, _, err = run([*base, "--config", str(bad)], capsys)
    assert_one_line_error(code, err, "train.batch_size must be >= 1, got 0")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "option,value", [("--attention", "flash"), ("--dtype", "fp8"), ("--dtype", "float16"), ("--compile", "yes")]
)
def test_bench_runtime_options_reject_bad_values(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["bench", "digits", option, value, "--report", str(tmp_path / "r")], capsys)
    needle = "unrecognized arguments: yes" if option == "--compile" else option  # a flag takes no value
    assert_one_line_error(code, err, needle)
    assert leftovers(tmp_path) == []


def test_bench_runtime_options_reach_the_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fewstep.bench.run as bench_run

    seen = []

    def fake_run_bench(sources: list[str], report_dir: Path, cfg: object, text: object) -> dict:
        seen.append(cfg)
        return {"reference": {"real_fid_floor": None}, "rows": []}

    monkeypatch.setattr(bench_run, "run_bench", fake_run_bench)
    assert run(["bench", "digits"], capsys)[0] == 0
    assert run(["bench", "digits", "--attention", "xformers", "--compile", "--dtype", "bf16"], capsys)[0] == 0
    assert [(c.attention, c.compile, c.dtype) for c in seen] == [("sdpa", False, "fp32"), ("xformers", True, "bf16")]
    help_text = run(["bench", "--help"], capsys)[1]
    assert "--attention {sdpa,xformers}" in help_text and "--compile" in help_text
    assert "--dtype {fp32,fp16,bf16}" in help_text


def test_bench_xformers_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("the error is for machines without CUDA")
    code, _, err = run(["bench", "digits", "--attention", "xformers", "--report", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "xformers attention needs CUDA and the gpu extra: pip install 'fewstep[gpu]'")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("pipeline", "recipe", "preset"),
    [("WanPipeline", "rcm", "wan"), ("PixArtSigmaPipeline", "tdm", "pixart"), ("SanaPipeline", "scm", "sana"),
     ("StableDiffusionXLPipeline", "lcm", "sdxl"), ("StableDiffusion3Pipeline", "sid", "sd3"),
     ("FluxPipeline", "lcm", None)],
)  # fmt: skip
def test_distill_picks_the_teachers_family_preset(
    pipeline: str, recipe: str, preset: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    code, out, _ = run(["distill", "--recipe", recipe, "--teacher", str(tmp_path), "--dry-run"], capsys)
    assert code == 0
    if preset is None:
        assert "# preset:" not in out
    else:
        assert f"# preset: {Path('recipes') / recipe / preset}.toml" in out.replace(str(Path.cwd()) + "/", "")


def test_sample_defaults_to_the_embedded_teachers_own_guidance(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import fewstep.sample

    seen = []
    monkeypatch.setattr(fewstep.sample, "run_sample", lambda model, out, steps, num, w, *rest: seen.append(w) or out)
    out = ["--output", str(tmp_path)]
    assert run(["sample", "video", *out], capsys)[0] == 0 and run(["sample", "digits", *out], capsys)[0] == 0
    assert run(["sample", "video", "--guidance", "1", *out], capsys)[0] == 0
    assert seen == [1.5, 1.0, 1.0]
