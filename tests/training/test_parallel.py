"""Several processes on CPU (gloo): every recipe under DDP and FSDP2 against one process, resume across process
counts, JVP through sharded backbones, SIGTERM, and the launch errors. The multi-process tests start ``torchrun``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep import batch_random
from fewstep.errors import FewstepError
from fewstep.recipes.base import Batch
from fewstep.training.parallel import Processes, outer_blocks, recipe_networks, slice_batch

WORKER = Path(__file__).with_name("parallel_worker.py")
RECIPES = ("lcm", "scm", "rcm", "sid", "tdm", "phased_dmd")
TOLERANCE = 1e-4  # the bound on relative differences in fp32


def torchrun(*args: str, nproc: int = 2, timeout: float = 600, env: dict[str, str] | None = None) -> Any:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)


def fewstep(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> Any:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "fewstep", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (a tensor of exported weights, or a tangent)."""
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-12))


def same_losses(
    a: list[dict[str, float]], b: list[dict[str, float]], tolerance: float = TOLERANCE, floor: float = 1e-2
) -> bool:
    """The same steps, each loss within ``tolerance`` of ``b``'s, relative to the larger of itself and ``floor``
    times that loss's largest value over the run (a loss that crosses zero has no relative error of its own there)."""
    if [x["step"] for x in a] != [y["step"] for y in b]:
        return False
    scale = {k: max(abs(y[k]) for y in b if k in y) for k in {k for y in b for k in y if k != "step"}}
    return all(
        x.keys() == y.keys()
        and all(abs(x[k] - y[k]) <= tolerance * max(abs(y[k]), floor * scale[k]) for k in scale if k in y)
        for x, y in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------------------------------------------------------
# One process: the pieces


@pytest.mark.parametrize("draw", ["randn", "rand", "randint"])
def test_each_slice_draws_its_rows_of_the_global_draw(draw: str) -> None:
    def sample(index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(7)
        with batch_random.batch_slice(index, count):
            if draw == "randint":
                out = batch_random.randint(10, (8 // count, 3))
            else:
                out = getattr(batch_random, draw)((8 // count, 3), dtype=torch.float64)
        return out, torch.rand(1)  # the generator's next number: every slice leaves it where the global draw does

    whole, after = sample(0, 1)
    parts = [sample(i, 4) for i in range(4)]
    assert torch.equal(torch.cat([p for p, _ in parts]), whole)
    assert all(torch.equal(a, after) for _, a in parts)


def test_outside_a_slice_draws_are_plain_torch_draws() -> None:
    torch.manual_seed(3)
    ours = batch_random.randn_like(torch.zeros(5, 2))
    torch.manual_seed(3)
    assert torch.equal(ours, torch.randn_like(torch.zeros(5, 2)))


def test_slice_batch_cuts_per_sample_rows_and_keeps_shared_ones() -> None:
    x0 = torch.arange(8.0).view(8, 1)
    batch = Batch(x0, {"class_labels": torch.arange(8), "nested": {"e": torch.ones(8, 2)}}, {"p": torch.zeros(1, 3)})
    part = slice_batch(batch, 1, 4)
    assert part.x0.flatten().tolist() == [2.0, 3.0]
    assert part.cond["class_labels"].tolist() == [2, 3]
    assert part.cond["nested"]["e"].shape == (2, 2)
    assert part.uncond["p"].shape == (1, 3)
    with pytest.raises(FewstepError, match="equal slices"):
        slice_batch(batch, 0, 3)


def test_processes_without_a_parallel_mode_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FewstepError, match="train.parallel"):
        Processes.start("none")


def test_recipe_networks_are_the_top_level_ones() -> None:
    """LCM holds the teacher, the student and a target copy; its discriminator's handles on teacher blocks are parts
    of the teacher, not networks of their own."""
    from fewstep.loading import load_denoiser
    from fewstep.recipes.lcm import LCM, LCMConfig

    teacher, _ = load_denoiser("digits")
    recipe = LCM(teacher, LCMConfig(w_min=1.0, w_max=1.0, adv_weight=0.5))
    found = recipe_networks(recipe)
    assert {id(m) for m in found} >= {id(teacher.model), id(recipe.model), id(recipe.target_model)}
    assert id(recipe.disc.heads) in {id(m) for m in found}
    assert not any(m is b for m in found for b in recipe.disc.blocks)


def test_outer_blocks_of_a_unet_are_its_down_mid_and_up_blocks() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    blocks = outer_blocks(unet)
    assert blocks == [*unet.down_blocks, *unet.up_blocks, unet.mid_block] or set(map(id, blocks)) == {
        id(b) for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    }


# ---------------------------------------------------------------------------------------------------------------
# Two processes


@pytest.fixture(scope="module")
def two_process_recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every recipe, 10 steps of global batch 16, under DDP and FSDP on two processes (one torchrun)."""
    out = tmp_path_factory.mktemp("parallel")
    done = torchrun(str(WORKER), "recipes", str(out), "--recipes", ",".join(RECIPES), "--steps", "10")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_on_two_processes_matches_one(recipe: str, two_process_recipes: Path, tmp_path: Path) -> None:
    """Same global batch and seed: the per-step losses and the exported student equal the one-process run's (the
    acceptance bound, 1e-4 relative, in fp32 over 10 steps)."""
    from parallel_worker import train_digits

    one = train_digits(recipe, 10, 16, tmp_path / "one", Processes())
    for mode in ("ddp", "fsdp"):
        other = torch.load(two_process_recipes / f"{recipe}-{mode}.pt", weights_only=False)
        assert same_losses(other["history"], one["history"]), (mode, other["history"])
        assert other["weights"].keys() == one["weights"].keys()
        worst = max(relative(other["weights"][k], one["weights"][k]) for k in one["weights"])
        assert worst <= TOLERANCE, (mode, worst)


@pytest.mark.slow
def test_jvp_through_sharded_backbones_equals_the_whole_one(tmp_path: Path) -> None:
    done = torchrun(str(WORKER), "jvp", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    found = torch.load(tmp_path / "jvp.pt", weights_only=False)
    assert set(found) == {"dit", "unet"}
    for name, r in found.items():
        assert r["method"] == "jvp"
        assert relative(r["sharded"], r["whole"]) <= 1e-5, name


def distill_args(out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "distill", "--recipe", "lcm", "--output", str(out), "--no-bench", "--set", f"train.max_steps={steps}",
        "--set", "train.batch_size=16", "--set", "train.checkpoint_every=3", "--set", "train.progress=false",
        "--set", "train.dist_timeout_s=60", *extra,
    ]  # fmt: skip


def losses(run: Path) -> list[dict[str, float]]:
    return json.loads((run / "checkpoints" / "losses.json").read_text())


def student_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LCM for 6 steps on one process: the reference of the command-line tests."""
    out = tmp_path_factory.mktemp("cli") / "one"
    done = fewstep(*distill_args(out, 6))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.slow
def test_fsdp_distill_exports_what_one_process_exports(one_process_run: Path, tmp_path: Path) -> None:
    """``torchrun -m fewstep distill`` with FSDP: one student folder, written once, equal to the one-process one."""
    out = tmp_path / "fsdp"
    done = torchrun("-m", "fewstep", *distill_args(out, 6, "--set", "train.parallel=fsdp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_losses(losses(out), losses(one_process_run))
    ours, reference = student_weights(out), student_weights(one_process_run)
    assert max(relative(ours[k], reference[k]) for k in reference) <= TOLERANCE
    summary = json.loads((out / "training.json").read_text())
    assert summary["processes"] == 2 and summary["parallel"] == "fsdp"
    assert done.stdout.count("wrote ") == 1  # one process reports (and writes) the student
    # a damaged shard of the newest checkpoint: a one-line error that names the last good one, nothing touched
    shard = next((out / "checkpoints" / "checkpoints" / "step-00000006" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"damaged!")
    done = torchrun("-m", "fewstep", *distill_args(out, 9, "--set", "train.parallel=fsdp", "--resume"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("fewstep: error:")]
    assert done.returncode != 0 and errors and "damaged" in errors[0] and "step-00000003" in errors[0], errors
    assert shard.read_bytes().endswith(b"damaged!")


@pytest.mark.slow
def test_resume_across_process_counts(one_process_run: Path, tmp_path: Path) -> None:
    """A 2-process (DDP) checkpoint continues on 1 process, and a 1-process one on 2 (FSDP), each repeating the
    uninterrupted run's losses."""
    two_then_one = tmp_path / "two-then-one"
    done = torchrun("-m", "fewstep", *distill_args(two_then_one, 3, "--set", "train.parallel=ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (two_then_one / "checkpoints" / "checkpoints" / "step-00000003" / "state").is_dir()
    done = fewstep(*distill_args(two_then_one, 6, "--resume"))
    assert done.returncode == 0, done.stderr
    assert same_losses(losses(two_then_one), losses(one_process_run))

    one_then_two = tmp_path / "one-then-two"
    done = fewstep(*distill_args(one_then_two, 3))
    assert done.returncode == 0, done.stderr
    done = torchrun("-m", "fewstep", *distill_args(one_then_two, 6, "--set", "train.parallel=fsdp", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_losses(losses(one_then_two), losses(one_process_run))


def _wait_for(path: Path, proc: Any, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.2)


LONG = 80  # steps of the SIGTERM runs: long enough to be stopped in the middle


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_a_checkpoint_and_resume_repeats_the_run(nproc: int, tmp_path: Path) -> None:
    """SIGTERM (to the one process, or to rank 1 only of two) ends the run at a step boundary with a one-line
    message, after one consistent checkpoint; --resume (on as many processes) then repeats the losses of a run that
    was not stopped."""
    import psutil

    def command(out: Path, *extra: str) -> list[str]:
        args = distill_args(out, LONG, "--set", "train.checkpoint_every=1000", "--set", "train.parallel=ddp", *extra)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return [*launcher, "-m", "fewstep", *args] if nproc > 1 else [sys.executable, "-m", "fewstep", *args]

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference), capture_output=True, text=True, timeout=600, env=full_env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    _wait_for(out / "config.toml", proc)
    time.sleep(1.5)  # some steps in
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "fewstep" in " ".join(p.cmdline())]
    target = proc.pid if nproc == 1 else sorted(workers, key=lambda p: p.pid)[-1].pid
    os.kill(target, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("fewstep: error:")]
    assert 1 <= len(errors) <= nproc and all("stopped by" in e and "--resume" in e for e in errors), stderr[-3000:]
    assert any("SIGTERM" in e for e in errors)
    if nproc == 1:
        assert "Traceback" not in stderr
    saved = sorted((out / "checkpoints" / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name != f"step-{LONG:08d}", saved
    done = subprocess.run(command(out, "--resume"), capture_output=True, text=True, timeout=600, env=full_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_losses(losses(out), losses(reference))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_missing_rendezvous_is_a_one_line_error(tmp_path: Path) -> None:
    """A process told it is one of two whose partner never comes: one line after the timeout, nothing written."""
    env = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    out = tmp_path / "run"
    done = fewstep(*distill_args(out, 3, "--set", "train.parallel=ddp", "--set", "train.dist_timeout_s=3"), env=env)
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "could not join" in done.stderr
    assert not out.exists()


def test_processes_launched_without_a_parallel_mode_are_a_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = fewstep(*distill_args(out, 3), env={"WORLD_SIZE": "2", "RANK": "0"})
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "train.parallel" in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_crashed_process_ends_the_other_with_one_line_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    """Rank 1 killed outright (SIGKILL: no handler runs) after the first checkpoint: rank 0 ends with one line that
    says so instead of hanging, and the checkpoint is whole (a one-process run resumes from it)."""
    import psutil

    out = tmp_path / "run"
    args = distill_args(out, LONG, "--set", "train.checkpoint_every=10", "--set", "train.parallel=ddp")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*launcher, "-m", "fewstep", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=full_env)  # fmt: skip
    _wait_for(out / "checkpoints" / "checkpoints" / "step-00000010", proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "fewstep" in " ".join(p.cmdline())]
    sorted(workers, key=lambda p: p.pid)[-1].kill()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("fewstep: error:")]
    assert len(errors) == 1 and "another process of this run stopped" in errors[0], stderr[-3000:]
    saved = [p.name for p in sorted((out / "checkpoints" / "checkpoints").iterdir())]
    assert saved and all(name.startswith("step-") for name in saved)
    last = int(saved[-1].removeprefix("step-"))
    done = fewstep(*distill_args(out, last + 2, "--resume"))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "teacher"), [("tdm", "sd3_folder"), ("rcm", "sd_folder")])
def test_prompt_teachers_on_two_processes_match_one(
    recipe: str, teacher: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A text-to-image teacher's presets in fp32 under FSDP: prompt conditions sliced per process with the shared
    negative row kept whole; TDM's SD3 preset trains LoRA students and fake scores with gradient checkpointing, rCM
    reaches its DMD term on a UNet."""
    folder = request.getfixturevalue(teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\na green line\nthe yellow dot\n")
    extra = {"rcm": ["--set", "dmd_start=2", "--set", "student_update_freq=1"]}.get(recipe, [])

    def args(out: Path) -> list[str]:
        return [
            "distill", "--recipe", recipe, "--teacher", str(folder), "--prompts", str(prompts), "--output", str(out),
            "--no-bench", "--set", "train.max_steps=5", "--set", "train.batch_size=4", "--set", "train.progress=false",
            "--set", 'train.mixed_precision="no"', "--set", "data.teacher_steps=2", *extra,
        ]  # fmt: skip

    one = fewstep(*args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("-m", "fewstep", *args(tmp_path / "two"), "--set", "train.parallel=fsdp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert same_losses(losses(tmp_path / "two"), losses(tmp_path / "one"))
