"""Every recipe on tiny text-to-image pipelines built in-process: distill a few steps from prompts (image-free: the
teacher's own samples, or data-free), export, reload with stock diffusers, sample at each step count of the plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fewstep.distill import run_distill
from fewstep.recipes.lcm import LCM, LCMConfig
from fewstep.recipes.phased_dmd import PhasedDMD, PhasedDMDConfig
from fewstep.recipes.rcm import RCM, RCMConfig
from fewstep.recipes.scm import SCM, SCMConfig
from fewstep.recipes.sid import SiD, SiDConfig
from fewstep.recipes.tdm import TDM, TDMConfig
from fewstep.training.config import merge_into

PROMPTS = ["a red circle", "the blue square", "a green line", "the yellow dot"]
TINY_RUN = {
    "train": {"max_steps": 2, "batch_size": 2, "progress": False, "checkpoint_every": 1},
    "data": {"teacher_steps": 2, "teacher_guidance": 2.0},
}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _sample_all_steps(pipe: Any, counts: tuple[int, ...] = (1, 2, 4), **kwargs: Any) -> None:
    for steps in counts:
        images = pipe(prompt=PROMPTS[:2], num_inference_steps=steps, output_type="pt", **kwargs).images
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.parametrize(
    ("recipe", "config", "teacher"),
    [
        (LCM, LCMConfig(), "sd_folder"),  # w ~ U[3, 15] with a w-embedding: the exported UNet takes timestep_cond
        (LCM, LCMConfig(w_min=1.0, w_max=1.0), "sd3_folder"),
        (SCM, SCMConfig(), "sd_folder"),  # a VP epsilon teacher answering in TrigFlow time
        (SCM, SCMConfig(), "sd3_folder"),
        (RCM, RCMConfig(dmd_start=1, student_update_freq=1), "sd_folder"),  # sCM, then DMD with a fake UNet
        (RCM, RCMConfig(dmd_start=1, student_update_freq=1, guidance=2.0), "sd3_folder"),
        (SiD, SiDConfig(guidance=2.0), "sd3_folder"),  # through both networks' inputs, data-free
        (SiD, SiDConfig(guidance_mode="zero"), "sd_folder"),  # Zero-CFG: the fake UNet reads the empty prompt
        (TDM, TDMConfig(fake_lora_rank=4), "sd3_folder"),  # the fake score a LoRA on the flow transformer
        (TDM, TDMConfig(fake_lora_rank=4, guidance=2.0), "sd_folder"),
        (PhasedDMD, PhasedDMDConfig(phase_steps=1, fake_steps=1), "sd3_folder"),  # two experts, one per phase
    ],
)
def test_distill_export_reload_and_sample(
    recipe: Any, config: Any, teacher: str, prompts: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(teacher)
    cfg = merge_into(config, {**TINY_RUN, "data": {**TINY_RUN["data"], "prompts": str(prompts)}})
    student = run_distill(recipe, cfg, teacher=str(folder), output=tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").is_dir() and any((tmp_path / "run" / "cache").iterdir())
    pipe = DiffusionPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    if recipe is LCM and teacher == "sd_folder":  # a VP teacher: the plan is LCMScheduler's own (999, 759, 499, 259)
        assert type(pipe.scheduler).__name__ == "LCMScheduler"
    _sample_all_steps(pipe, tuple(sorted(cfg.plan_steps)), guidance_scale=1.0)
    if (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).config.get("time_cond_proj_dim"):
        _sample_all_steps(pipe, guidance_scale=8.0)  # the embedded w: one evaluation per step, no CFG batch


def test_lcm_lora_loads_with_load_lora_weights(sd_folder: Path, prompts: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    run = {**TINY_RUN, "data": {**TINY_RUN["data"], "prompts": str(prompts)}}
    cfg = merge_into(LCMConfig(lora_rank=4, lr=1e-2), run)
    out = run_distill(LCM, cfg, teacher=str(sd_folder), output=tmp_path / "run")
    base = DiffusionPipeline.from_pretrained(sd_folder)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    text = torch.randn(1, 6, 32)
    before = base.unet(x, t, text).sample
    base.load_lora_weights(out)
    after = base.unet(x, t, text).sample
    assert not torch.allclose(before, after)  # the adapter was trained (lr 1e-2) and is applied

    # the trained student's own output, rebuilt from the run's last checkpoint, matches the loaded LoRA
    from fewstep.loading import load_denoiser
    from fewstep.training.checkpoint import load_checkpoint

    teacher, _ = load_denoiser(str(sd_folder))
    recipe = LCM(teacher, cfg)
    _, state = load_checkpoint(tmp_path / "run" / "checkpoints")
    recipe.model.load_state_dict(state["ema"]["student"])
    torch.testing.assert_close(recipe.model(x, t, text).sample, after, rtol=1e-4, atol=1e-5)
    # the run's scheduler rides along in scheduler/; with it the LoRA'd base pipeline samples the student's plan
    import json

    import diffusers

    import fewstep.export.scheduling_fewstep as fs

    name = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    scheduler_cls = getattr(diffusers, name, None) or getattr(fs, name)
    base.scheduler = scheduler_cls.from_pretrained(out, subfolder="scheduler")
    _sample_all_steps(base, guidance_scale=1.0)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_exported_model_card_states_the_plan_and_its_usage_snippet_runs(
    lora_rank: int, sd_folder: Path, prompts: Path, tmp_path: Path
) -> None:
    run = {**TINY_RUN, "data": {**TINY_RUN["data"], "prompts": str(prompts)}}
    cfg = merge_into(LCMConfig(lora_rank=lora_rank), run)
    out = run_distill(LCM, cfg, teacher=str(sd_folder), output=tmp_path / "run")
    card = (out / "README.md").read_text()
    meta, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: diffusers" in meta and f"base_model: {json.dumps(str(sd_folder))}" in meta
    assert ("lora" in meta) == bool(lora_rank)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    assert f"`{scheduler}`" in body and "lcm" in body
    for n in cfg.plan_steps:
        assert f"\n| {n} | " in body  # a plan row per step count
    snippet = body.split("```python\n")[1].split("```")[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "model-card", "exec"), namespace)  # the snippet as a user pastes it
    assert torch.isfinite(torch.as_tensor(np.asarray(namespace["images"][0]), dtype=torch.float32)).all()


def test_a_bench_of_a_student_puts_its_rows_in_the_model_card(
    sd_folder: Path, prompts: Path, tiny_clip_spec: str, tmp_path: Path
) -> None:
    """`fewstep bench` on an exported text-to-image student writes its rows (CLIP score here) into the student's card,
    under the protocol's name; a second bench replaces the section rather than adding another."""
    from fewstep.bench.run import BenchConfig, run_bench
    from fewstep.bench.worlds import TextOptions
    from fewstep.errors import FewstepError

    run = {**TINY_RUN, "data": {**TINY_RUN["data"], "prompts": str(prompts)}}
    out = run_distill(LCM, merge_into(LCMConfig(), run), teacher=str(sd_folder), output=tmp_path / "run")
    before = (out / "README.md").read_text()
    assert "## Bench" not in before
    cfg = BenchConfig(steps=(1, 2), num=2, seeds=1, batch_size=2, latency_batch=1, repeats=1, progress=False)
    for protocol in ("mjhq", "coco-dmd2"):
        text = TextOptions(str(prompts), tiny_clip_spec, protocol=protocol)
        run_bench([str(out)], tmp_path / f"report-{protocol}", cfg, text)
    with pytest.raises(FewstepError, match="holds rows of the coco-dmd2 protocol"):
        run_bench([str(out)], tmp_path / "report-coco-dmd2", cfg, TextOptions(str(prompts), tiny_clip_spec))
    card = (out / "README.md").read_text()
    assert card.startswith(before.rstrip("\n")) and card.count("## Bench") == 1
    section = card.split("## Bench")[1]
    assert "Protocol `coco-dmd2`" in section and "CLIP score" in section and "accuracy" not in section
    assert (
        len([line for line in section.splitlines() if line.startswith("| run ") or line.startswith("| student")]) == 2
    )
