"""The recipe x family matrix: every registered recipe distills a tiny teacher of every pipeline family for a few
steps from prompts, exports, reloads with stock ``DiffusionPipeline.from_pretrained`` and samples at each step count
of its plan. README's "supported" table is generated from MATRIX (``python tests/test_family_matrix.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_sd3_pipeline, tiny_sd_pipeline
from families import CALL_KWARGS, VIDEO, in_eval_mode
from families import FAMILIES as NEW_FAMILIES
from torch import Tensor

from fewstep.distill import run_distill
from fewstep.recipes.dcm import DCM, DCMConfig
from fewstep.recipes.hyper_sd import HyperSD, HyperSDConfig
from fewstep.recipes.lcm import LCM, LCMConfig
from fewstep.recipes.mcm import MCM, MCMConfig
from fewstep.recipes.phased_dmd import PhasedDMD, PhasedDMDConfig
from fewstep.recipes.rcm import RCM, RCMConfig
from fewstep.recipes.scm import SCM, SCMConfig
from fewstep.recipes.sid import SiD, SiDConfig
from fewstep.recipes.tdm import TDM, TDMConfig
from fewstep.training.config import merge_into

PROMPTS = ["a red circle", "the blue square", "a green line", "the yellow dot"]
FAMILIES = {**NEW_FAMILIES, "sd": in_eval_mode(tiny_sd_pipeline), "sd3": in_eval_mode(tiny_sd3_pipeline)}
SIZES = {**CALL_KWARGS, "sd": {"height": 16, "width": 16}, "sd3": {"height": 16, "width": 16}}
# backbones with a slot for LCM's w ~ U[w_min, w_max]: a guidance embedding, or a UNet that gets one
EMBEDS_W = {"flux_dev", "sana_sprint", "sd"}

# Hyper-SD's sampler per family, as its cards run it: TCDScheduler at eta 0.3 on DDPM teachers (TCD's own rule, the
# default), FlowMatchEulerDiscreteScheduler (gamma 0) on flow teachers (its SD3 and FLUX LoRAs), SCMScheduler (gamma 1)
# on SANA-Sprint, whose loop runs nothing else
FLOW = frozenset({"sd3", "sana", "flux_dev", "flux_schnell", "wan"})
HYPER_GAMMA = {**dict.fromkeys(FLOW, 0.0), "sana_sprint": 1.0}

# recipe name -> (class, tiny config for a family)
RECIPES: dict[str, tuple[type, Any]] = {
    "lcm": (LCM, lambda family: LCMConfig() if family in EMBEDS_W else LCMConfig(w_min=2.0, w_max=2.0)),
    "scm": (SCM, lambda family: SCMConfig()),
    "rcm": (RCM, lambda family: RCMConfig(dmd_start=1, student_update_freq=1)),
    "sid": (SiD, lambda family: SiDConfig()),
    "tdm": (TDM, lambda family: TDMConfig()),
    "phased_dmd": (PhasedDMD, lambda family: PhasedDMDConfig(phase_steps=1, fake_steps=1)),
    # the video recipes: MCM full fine-tuned (its LoRA export is the LoRA test's), DCM one step of each expert
    "mcm": (MCM, lambda family: MCMConfig(lora_rank=0, w_min=2.0, w_max=2.0)),
    # DCM at the stock scheduler's times, so WanPipeline's own loop runs the export (its default split plan needs
    # FewStepScheduler)
    "dcm": (DCM, lambda family: DCMConfig(semantic_steps=1, lora_rank=4, lora_alpha=8, plan_times="stock")),
    # Hyper-SD full fine-tuned (its LoRA export is test_hyper_sd's), k = 8 then 4
    "hyper_sd": (
        HyperSD,
        lambda family: HyperSDConfig(lora_rank=0, stage_steps=(1, 1, 1, 1), gamma=HYPER_GAMMA.get(family, 0.3)),
    ),
}
# recipes for some families only, refused elsewhere by design: MCM distils video teachers, DCM flow-matching video
# teachers (CogVideoX, ModelScope and AnimateDiff are DDPM)
APPLIES = {"mcm": VIDEO, "dcm": frozenset({"wan"})}
# SanaSprintPipeline runs only SCMScheduler's plans (its loop drops the scheduler's last timestep and hands the
# scheduler sigma_d F, and SCMScheduler always re-noises with fresh noise): TDM's deterministic plan and Phased DMD's
# phase-aligned plans are refused before training (test_sana_sprint_refuses_plans_scm_cannot_run)
NOT_YET = {("tdm", "sana_sprint"), ("phased_dmd", "sana_sprint")}
MATRIX = [
    (recipe, family)
    for family in sorted(FAMILIES)
    for recipe in RECIPES
    if (recipe, family) not in NOT_YET and family in APPLIES.get(recipe, FAMILIES)
]


def data_settings(family: str) -> dict[str, Any]:
    """The tiny size and text length of a family (CALL_KWARGS) as data config entries."""
    keys = ("height", "width", "num_frames", "max_sequence_length")
    return {k: v for k, v in SIZES[family].items() if k in keys}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


_FOLDERS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    def folder(family: str) -> Path:
        if family not in _FOLDERS:
            path = tmp_path_factory.mktemp("teachers") / family
            FAMILIES[family]().save_pretrained(path)
            _FOLDERS[family] = path
        return _FOLDERS[family]

    return folder


@pytest.fixture(autouse=True)
def one_thread() -> Any:  # tiny models: threads cost more than they give on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sample(pipe: Any, family: str, steps: int) -> Tensor:
    kwargs = {k: v for k, v in SIZES[family].items() if k != "complex_human_instruction"}
    if family not in EMBEDS_W and family != "flux_schnell":
        kwargs["guidance_scale"] = 1.0  # few-step students sample without CFG
    if family == "sana_sprint" and steps != 2:  # its __call__ refuses intermediate_timesteps at other step counts
        kwargs["intermediate_timesteps"] = None
    if type(pipe.scheduler).__name__ == "TCDScheduler":
        kwargs["eta"] = 0.3  # the card's eta
    out = pipe(prompt=PROMPTS[:2], num_inference_steps=steps, output_type="pt", **kwargs)
    return out.frames if family in VIDEO else out.images


_STUDENTS: dict[tuple[str, str], tuple[Path, Any]] = {}


@pytest.fixture(scope="module")
def distilled(family_folder: Any, prompts: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(student folder, config) of a recipe x family pair: a few steps from prompts, exported (once per module)."""

    def run(recipe: str, family: str) -> tuple[Path, Any]:
        if (recipe, family) not in _STUDENTS:
            recipe_cls, make_config = RECIPES[recipe]
            data = {"prompts": str(prompts), "teacher_steps": 2, "teacher_guidance": 2.0, **data_settings(family)}
            train = {"max_steps": 2, "batch_size": 2, "progress": False, "checkpoint_every": 1}
            cfg = merge_into(make_config(family), {"train": train, "data": data})
            output = tmp_path_factory.mktemp(f"{recipe}-{family}") / "run"
            _STUDENTS[recipe, family] = (
                run_distill(recipe_cls, cfg, teacher=str(family_folder(family)), output=output),
                cfg,
            )
        return _STUDENTS[recipe, family]

    return run


@pytest.mark.parametrize(("recipe", "family"), MATRIX)
def test_distill_export_reload_and_sample(recipe: str, family: str, distilled: Any) -> None:
    from diffusers import DiffusionPipeline

    student, cfg = distilled(recipe, family)
    pipe = DiffusionPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    # the default plans are the pipeline's stock ones; Phased DMD's phase-aligned plans are stock only where they
    # fall on the stock grid (uniform sigmas: FluxPipeline)
    if recipe != "phased_dmd":
        assert type(pipe.scheduler).__name__ != "FewStepScheduler", (recipe, family)
    for steps in sorted(cfg.plan_steps):
        images = sample(pipe, family, steps)
        assert images.shape[0] == 2 and torch.isfinite(images).all(), (recipe, family, steps)


@pytest.mark.parametrize("recipe", sorted({r for r, f in NOT_YET if f == "sana_sprint"}))
def test_sana_sprint_refuses_plans_scm_cannot_run(
    recipe: str, family_folder: Any, prompts: Path, tmp_path: Path
) -> None:
    from fewstep.errors import FewstepError

    recipe_cls, make_config = RECIPES[recipe]
    data = {"prompts": str(prompts), "teacher_steps": 2, **data_settings("sana_sprint")}
    cfg = merge_into(make_config("sana_sprint"), {"train": {"max_steps": 1, "progress": False}, "data": data})
    with pytest.raises(FewstepError, match="SanaSprintPipeline samples only SCMScheduler"):
        run_distill(recipe_cls, cfg, teacher=str(family_folder("sana_sprint")), output=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def supported_table() -> str:
    """README's table: a row per family, a column per recipe; a cell is "yes" when the matrix tests that pair, "-"
    where the recipe does not apply to the family."""
    lines = ["| teacher family (pipeline class) | " + " | ".join(RECIPES) + " |", "|---|" + "---:|" * len(RECIPES)]
    for family in sorted(FAMILIES):
        pipe_class = type(FAMILIES[family]()).__name__
        cells = [
            "yes" if (r, family) in MATRIX else "no" if family in APPLIES.get(r, FAMILIES) else "-" for r in RECIPES
        ]
        lines.append(f"| {family} ({pipe_class}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_readme_supported_table_is_the_matrix() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- supported-table -->\n", "\n<!-- /supported-table -->"
    assert start in readme and end in readme, "README lacks the generated supported table"
    table = readme[readme.index(start) + len(start) : readme.index(end)]
    assert table == supported_table(), "regenerate it: python tests/test_family_matrix.py"


if __name__ == "__main__":
    print(supported_table())


# Run in a fresh interpreter where fewstep and fewstep_kernels cannot be imported: what a user without fewstep has.
NO_FEWSTEP_SCRIPT = """
import importlib.abc, json, sys

class RefuseFewstep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("fewstep", "fewstep_kernels"):
            raise ModuleNotFoundError(f"No module named {name!r} (refused: this process runs without fewstep)")
        return None

sys.meta_path.insert(0, RefuseFewstep())
import torch
from diffusers import DiffusionPipeline

torch.set_num_threads(1)
jobs, results = json.loads(open(sys.argv[1]).read()), {}
for job in jobs:
    pipe = DiffusionPipeline.from_pretrained(job["folder"])
    pipe.set_progress_bar_config(disable=True)
    for steps, kwargs in job["calls"]:
        torch.manual_seed(job["seed"])  # the stochastic steps of pipelines that pass no generator draw from it
        gen = torch.Generator().manual_seed(job["seed"])
        out = pipe(prompt=job["prompts"], num_inference_steps=steps, generator=gen, output_type="latent", **kwargs)
        results[job["key"] + "/" + str(steps)] = out[0]
assert not any(m.partition(".")[0] in ("fewstep", "fewstep_kernels") for m in sys.modules)
torch.save(results, sys.argv[2])
"""


def call_kwargs(family: str, steps: int, folder: Path | None = None) -> dict[str, Any]:
    """The pipeline's keyword arguments for a tiny call; with an exported ``folder`` whose scheduler is TCDScheduler,
    its ``eta``: the plan's gamma for that step count (training.json), as the model card tells users."""
    kwargs = {k: v for k, v in SIZES[family].items() if k != "complex_human_instruction"}
    if folder is not None and '"TCDScheduler"' in (folder / "scheduler" / "scheduler_config.json").read_text():
        training = json.loads((folder.parent / "training.json").read_text())
        kwargs["eta"] = float(training.get("gammas", {}).get(str(steps), training["gamma"]))
    if family not in EMBEDS_W and family != "flux_schnell":
        kwargs["guidance_scale"] = 1.0
    if family == "sana_sprint" and steps != 2:
        kwargs["intermediate_timesteps"] = None
    return kwargs


def needs_fewstep(folder: Path) -> bool:
    """Whether the exported folder names a fewstep class (its scheduler or its backbone) in model_index.json."""
    index = json.loads((folder / "model_index.json").read_text())
    return any(isinstance(v, list) and str(v[0]).startswith("fewstep") for v in index.values())


def fewstep_sampling(folder: Path, family: str, steps: int, seed: int) -> Tensor:
    """fewstep's own sampling of an exported student: its plan (training.json) run by FewStepScheduler in the same
    pipeline; for SanaSprintPipeline, whose loop runs only SCMScheduler, the plan run on fewstep's Denoiser
    (``sample_plan``) with the conditions fewstep encodes, the noise drawn in the pipeline's order."""
    from diffusers import DiffusionPipeline

    from fewstep.export.scheduling_fewstep import FewStepScheduler
    from fewstep.sampling import SamplingPlan, sample_plan
    from fewstep.schedules import schedule_from_diffusers_config
    from fewstep.teacher import Denoiser
    from fewstep.training.families import EncodeOptions, latent_shape, pixel_size
    from fewstep.training.text import encode_prompts

    training = json.loads((folder.parent / "training.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    native, prediction = schedule_from_diffusers_config(pipe.scheduler)
    gamma = float(training.get("gammas", {}).get(str(steps), training["gamma"]))
    plan = SamplingPlan(native, tuple(training["plans"][str(steps)]), gamma, training.get("rule", "ratio"))
    gen = torch.Generator().manual_seed(seed)
    if family == "sana_sprint":
        kw = SIZES[family]
        options = EncodeOptions(
            max_sequence_length=kw.get("max_sequence_length"), height=kw["height"], width=kw["width"]
        )
        size = pixel_size(pipe, options)
        cond, _ = encode_prompts(pipe, PROMPTS[:2], options, size)
        denoiser = Denoiser.from_pipeline(pipe)
        noise = torch.randn(2, *latent_shape(pipe, size), generator=gen)
        x0 = sample_plan(lambda x, t: denoiser(x, t, cond), plan, noise, generator=gen)
        return x0 / pipe.scheduler.config.sigma_data  # the pipeline returns latents in units of sigma_data
    pipe.scheduler = FewStepScheduler(
        schedule=native.config(), prediction_type=prediction, plan={str(steps): list(plan.times)}, gamma=plan.gamma,
        rule=plan.rule,
    )  # fmt: skip
    torch.manual_seed(seed)
    return pipe(prompt=PROMPTS[:2], num_inference_steps=steps, generator=gen, output_type="latent",
                **call_kwargs(family, steps))[0]  # fmt: skip


def test_exports_sample_in_plain_diffusers_without_fewstep(distilled: Any, tmp_path: Path) -> None:
    """Every export of the matrix that names no fewstep class loads and samples in a process that cannot import
    fewstep, at each step count, and matches fewstep's own sampling of its plan (same seed) to 1e-5; the exports
    that still need fewstep are exactly the ones README lists."""
    import subprocess
    import sys

    jobs, need = [], set()
    for recipe, family in MATRIX:
        folder, cfg = distilled(recipe, family)
        if needs_fewstep(folder):
            need.add(recipe)
            continue
        calls = [(n, call_kwargs(family, n, folder)) for n in sorted(cfg.plan_steps)]
        jobs.append({"key": f"{recipe}/{family}", "folder": str(folder), "prompts": PROMPTS[:2], "seed": 7,
                     "calls": calls, "family": family})  # fmt: skip
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = tmp_path / "no_fewstep.py"
    script.write_text(NO_FEWSTEP_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "jobs.json"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(tmp_path / "out.pt")
    assert len(stock) == sum(len(job["calls"]) for job in jobs)
    for job in jobs:
        for steps, _ in job["calls"]:
            ours, key = (
                fewstep_sampling(Path(job["folder"]), job["family"], steps, job["seed"]),
                f"{job['key']}/{steps}",
            )
            # fp32: eps-prediction latents at t = 999 reach hundreds (x0 = (x - sigma eps) / alpha), hence rtol too,
            # and an atol of 1e-6 of the largest value: TCD's re-noised steps carry that x0's float32 rounding into
            # every element (PixArt, 8 steps: 2e-4 apart where the largest is 670)
            atol = max(1e-5, 1e-6 * float(ours.abs().max()))
            torch.testing.assert_close(stock[key], ours, rtol=1e-5, atol=atol, msg=key)
    assert need == {"phased_dmd"}  # its backbone switches experts by time (TimestepExperts): README says so


# LoRA students of every family: LCM-LoRA (Luo et al. 2023b) with a fixed w, trained hard enough (lr 1e-2) that the
# adapter visibly moves the backbone
NO_FEWSTEP_LORA_SCRIPT = (
    NO_FEWSTEP_SCRIPT.split("import torch\n", 1)[0]
    + """
import logging, warnings
import diffusers, torch

messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger("diffusers").addHandler(Keep())
logging.getLogger("peft").addHandler(Keep())
torch.set_num_threads(1)
jobs, results = json.loads(open(sys.argv[1]).read()), {}
for job in jobs:
    pipe = diffusers.DiffusionPipeline.from_pretrained(job["teacher"])
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if job["peft"]:  # no diffusers LoRA loader (PixArt, ModelScope): peft's own adapter on its backbone
            from peft import PeftModel
            slot = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
            setattr(pipe, slot, PeftModel.from_pretrained(getattr(pipe, slot), job["folder"]))
        else:
            pipe.load_lora_weights(job["folder"])
    messages += [str(w.message) for w in caught]
    name = json.loads(open(job["folder"] + "/scheduler/scheduler_config.json").read())["_class_name"]
    pipe.scheduler = getattr(diffusers, name).from_pretrained(job["folder"], subfolder="scheduler")
    for steps, kwargs in job["calls"]:
        torch.manual_seed(job["seed"])
        gen = torch.Generator().manual_seed(job["seed"])
        out = pipe(prompt=job["prompts"], num_inference_steps=steps, generator=gen, output_type="latent", **kwargs)
        results[job["key"] + "/" + str(steps)] = out[0]
assert not any(m.partition(".")[0] in ("fewstep", "fewstep_kernels") for m in sys.modules)
results["messages"] = [m for m in messages if any(w in m.lower() for w in ("unexpected", "no lora keys", "missing"))]
torch.save(results, sys.argv[2])
"""
)


def test_lora_exports_load_without_fewstep_and_reproduce_the_student(
    family_folder: Any, prompts: Path, tmp_path: Path
) -> None:
    """Every family's LoRA export loads on its base pipeline in a process without fewstep (load_lora_weights, or
    peft's PeftModel where diffusers has no LoRA loader), with no key the loader rejects, and samples as the trained
    student itself (the run's EMA weights in fewstep) does, at every step count, to 1e-5."""
    import subprocess
    import sys

    from diffusers import DiffusionPipeline

    from fewstep.teacher import backbone_of
    from fewstep.training.checkpoint import load_checkpoint
    from fewstep.training.lora import add_lora

    jobs, runs = [], {}
    for family in sorted(FAMILIES):
        data = {"prompts": str(prompts), "teacher_steps": 2, "teacher_guidance": 2.0, **data_settings(family)}
        train = {"max_steps": 2, "batch_size": 2, "progress": False, "checkpoint_every": 1}
        cfg = merge_into(LCMConfig(w_min=2.0, w_max=2.0, lora_rank=4, lr=1e-2), {"train": train, "data": data})
        folder = run_distill(LCM, cfg, teacher=str(family_folder(family)), output=tmp_path / family)
        runs[family] = (folder, cfg)
        calls = [(n, call_kwargs(family, n)) for n in sorted(cfg.plan_steps)]
        peft = (folder / "adapter_config.json").is_file()
        jobs.append({"key": family, "folder": str(folder), "teacher": str(family_folder(family)), "peft": peft,
                     "prompts": PROMPTS[:2], "seed": 3, "calls": calls})  # fmt: skip
    assert {job["key"] for job in jobs if job["peft"]} == {"pixart_alpha", "pixart_sigma", "modelscope"}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = tmp_path / "no_fewstep_lora.py"
    script.write_text(NO_FEWSTEP_LORA_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "jobs.json"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(tmp_path / "out.pt")
    rejected = [m for m in stock.pop("messages") if "prefix='text_encoder" not in m]  # no text-encoder LoRA: fine
    assert rejected == [], rejected  # no key the loader rejected or could not place
    for family, (folder, cfg) in runs.items():
        # the full-weight student in fewstep: the base backbone with the run's EMA adapter weights
        pipe = DiffusionPipeline.from_pretrained(family_folder(family))
        pipe.set_progress_bar_config(disable=True)
        model = add_lora(backbone_of(pipe), 4)
        _, state = load_checkpoint(folder.parent / "checkpoints")
        model.load_state_dict(state["ema"]["student"])
        name = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        pipe.scheduler = getattr(__import__("diffusers"), name).from_pretrained(folder, subfolder="scheduler")
        for steps in sorted(cfg.plan_steps):
            torch.manual_seed(3)
            gen = torch.Generator().manual_seed(3)
            ours = pipe(prompt=PROMPTS[:2], num_inference_steps=steps, generator=gen, output_type="latent",
                        **call_kwargs(family, steps))[0]  # fmt: skip
            torch.testing.assert_close(stock[f"{family}/{steps}"], ours, rtol=1e-5, atol=1e-5, msg=f"{family} {steps}")
        base = DiffusionPipeline.from_pretrained(family_folder(family), scheduler=pipe.scheduler)
        base.set_progress_bar_config(disable=True)
        torch.manual_seed(3)
        plain = base(prompt=PROMPTS[:2], num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                     output_type="latent", **call_kwargs(family, steps))[0]  # fmt: skip
        assert not torch.allclose(plain, ours, rtol=1e-3, atol=1e-3), family  # the adapter was trained and applied


def test_phased_dmd_on_wan_exports_wans_own_two_experts(distilled: Any) -> None:
    """Phased DMD's two experts go out as Wan 2.2's transformer / transformer_2 / boundary_ratio (stock diffusers
    classes), and WanPipeline's own switch picks the expert TimestepExperts picks at every plan time, the one on the
    boundary included (it goes to the less noisy expert)."""
    from diffusers import DiffusionPipeline

    from fewstep.export.experts import TimestepExperts

    folder, cfg = distilled("phased_dmd", "wan")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    high, low = pipe.transformer, pipe.transformer_2
    with torch.no_grad():  # two steps leave the EMA experts nearly equal: make them differ so the switch shows
        for param in low.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    plans = json.loads((folder.parent / "training.json").read_text())["plans"]
    boundary = plans["2"][1] * 1000  # the 2-step plan's second time opens the second phase (model timesteps)
    assert boundary in [t * 1000 for t in plans["4"]]
    wrapped = DiffusionPipeline.from_pretrained(folder, transformer_2=None, boundary_ratio=None)
    wrapped.transformer = TimestepExperts.from_experts([high, low], [boundary])
    wrapped.set_progress_bar_config(disable=True)
    two_experts = {}
    for steps in sorted(cfg.plan_steps):
        outs = []
        for p in (pipe, wrapped):
            torch.manual_seed(5)
            outs.append(p(prompt=PROMPTS[:2], num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                          output_type="latent", **call_kwargs("wan", steps))[0])  # fmt: skip
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        two_experts[steps] = outs[0]
    one = DiffusionPipeline.from_pretrained(folder, transformer_2=None, boundary_ratio=None, transformer=high)
    one.set_progress_bar_config(disable=True)
    torch.manual_seed(5)
    alone = one(prompt=PROMPTS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(5),
                output_type="latent", **call_kwargs("wan", 2))[0]  # fmt: skip
    assert not torch.allclose(alone, two_experts[2])  # the second expert took its step


def test_dcm_on_wan_exports_its_experts_as_wans_two_experts(distilled: Any) -> None:
    """DCM's semantic and detail experts go out as WanPipeline's transformer / transformer_2 with boundary_ratio at
    DCM's boundary sigma'_b (grid index 35 of 50 at shift 17), and Wan's own switch picks the expert TimestepExperts
    picks at every step of every plan."""
    from diffusers import DiffusionPipeline

    from fewstep.export.experts import TimestepExperts
    from fewstep.schedules import Flow

    folder, cfg = distilled("dcm", "wan")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    cut = 1000 * float(Flow(shift=cfg.shift).shift_time(torch.tensor(cfg.boundary_index / cfg.num_euler_timesteps)))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert cut < pipe.config.boundary_ratio * 1000 < cut + 1e-3  # the next float32 above the cut: it goes to detail
    high, low = pipe.transformer, pipe.transformer_2
    with torch.no_grad():  # one step of each stage leaves the experts close: make them differ so the switch shows
        for param in low.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    wrapped = DiffusionPipeline.from_pretrained(folder, transformer_2=None, boundary_ratio=None)
    wrapped.transformer = TimestepExperts.from_experts([high, low], [cut])
    wrapped.set_progress_bar_config(disable=True)
    one = DiffusionPipeline.from_pretrained(folder, transformer_2=None, boundary_ratio=None, transformer=high)
    one.set_progress_bar_config(disable=True)
    for steps in sorted(cfg.plan_steps):
        outs = []
        for p in (pipe, wrapped, one):
            torch.manual_seed(5)
            outs.append(p(prompt=PROMPTS[:2], num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                          output_type="latent", **call_kwargs("wan", steps))[0])  # fmt: skip
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        if steps > 1:  # the stock plans' later times lie below the cut: the detail expert takes them
            assert not torch.allclose(outs[0], outs[2]), steps
