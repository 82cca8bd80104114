"""Phased DMD's phases and plans in the teacher's scheduler time. LightX2V (ModelTC/LightX2V, lightx2v_train
trainers/phased_dmd/math.py ``raw_timesteps_to_sigmas``) names its denoising steps [1000, 750, 500, 250] and its
expert switch ``match_timestep`` 500 in the scheduler's unshifted timesteps and reads each as
``scheduler.timesteps[N - raw]``, i.e. through the shift. On a shift-3 SD3 teacher the switch is at sigma 0.75; on
the unshifted digits teacher nothing moves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fewstep.distill import export_student
from fewstep.loading import load_denoiser
from fewstep.objectives.generator import uniform_plans
from fewstep.recipes.phased_dmd import PhasedDMD, PhasedDMDConfig
from fewstep.training.config import find_preset, merge_into, read_toml
from fewstep.training.data import DigitsBatches, null_class_of

LIGHTX2V_STEPS = (1000, 750, 500, 250)  # configs/train/phased_dmd/wan2_1_t2v_1_3b_phased_dmd.yaml
MATCH_TIMESTEP = 500


def record_fake_times(recipe: PhasedDMD) -> dict[int, torch.Tensor]:
    """Wrap each phase's fake score so the times it is read at land in the returned dict (phase -> last times)."""
    seen: dict[int, torch.Tensor] = {}

    def recording(p: int, fake: Any) -> Any:
        def read(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            seen[p] = t
            return fake(x, t, cond)

        return read

    recipe.fakes = [recording(p, fake) for p, fake in enumerate(recipe.fakes)]
    return seen


def lightx2v_sigmas(scheduler: Any, raw: tuple[int, ...]) -> list[float]:
    """LightX2V's map from raw timesteps to sigmas: the training scheduler's timesteps (0 appended) at N - raw, / N.

    ``FlowMatchEulerDiscreteScheduler``'s own training grid is the same shifted grid as LightX2V's
    ``CausalForcingFlowMatchScheduler`` (N sigmas (N - i) / N, shifted)."""
    n = scheduler.config.num_train_timesteps
    grid = torch.cat([scheduler.timesteps.double(), torch.zeros(1, dtype=torch.float64)])
    return [float(grid[n - r]) / n for r in raw]


@pytest.fixture(scope="module")
def sd3(sd3_folder: Path) -> tuple[Any, Any]:
    return load_denoiser(str(sd3_folder))


def test_sd3_expert_switch_is_timestep_500_through_the_shift(sd3: tuple[Any, Any]) -> None:
    teacher, pipe = sd3
    shift = teacher.native.shift
    assert shift == 3.0
    recipe = PhasedDMD(teacher, PhasedDMDConfig(boundaries=(0.5,)))
    switch = shift * 0.5 / (1 + (shift - 1) * 0.5)  # SD3 Eq. 23 at s = 0.5: 0.75
    assert recipe.edges[1] == pytest.approx(switch, abs=1e-12)
    assert recipe.edges[1] == pytest.approx(lightx2v_sigmas(pipe.scheduler, (MATCH_TIMESTEP,))[0], abs=1e-6)
    assert [recipe.phase_of(t) for t in (1.0, 0.8, 0.75, 0.6)] == [0, 0, 1, 1]


def test_sd3_plan_times_are_lightx2v_timesteps_through_the_shift(sd3: tuple[Any, Any]) -> None:
    teacher, pipe = sd3
    recipe = PhasedDMD(teacher, PhasedDMDConfig(boundaries=(0.5,), plan_steps=(2, 4)))
    plans = recipe.plan()
    torch.testing.assert_close(
        torch.tensor(plans[4].times, dtype=torch.float64),
        torch.tensor(lightx2v_sigmas(pipe.scheduler, LIGHTX2V_STEPS), dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(
        torch.tensor(plans[2].times, dtype=torch.float64),
        torch.tensor(lightx2v_sigmas(pipe.scheduler, (1000, MATCH_TIMESTEP)), dtype=torch.float64),
        rtol=0,
        atol=1e-6,
    )
    # the same times as fewstep's other generators' plans (SiD, TDM) on this teacher
    for n, plan in uniform_plans(teacher.native, (2, 4), recipe.cfg.gamma).items():
        assert plans[n].times == pytest.approx(plan.times, abs=1e-12)


def test_sd3_dmd_and_fake_times_stay_in_their_shifted_phase(sd3: tuple[Any, Any]) -> None:
    """Each phase reads the scores between its own edges; the time floor is unshifted too (0.1 -> sigma 0.25)."""
    teacher, _ = sd3
    recipe = PhasedDMD(teacher, PhasedDMDConfig(phase_steps=1, fake_steps=1, t_floor=0.1))
    seen = record_fake_times(recipe)
    batch = _sd3_batch(teacher, 32)
    torch.manual_seed(0)
    for step in (0, 1):
        recipe.loss(batch, step)
    assert bool(((seen[0] >= 0.75) & (seen[0] <= 1.0)).all())
    assert bool(((seen[1] >= 0.25) & (seen[1] <= 0.75)).all())


def _sd3_batch(teacher: Any, b: int) -> Any:
    from fewstep.recipes.base import Batch

    gen = torch.Generator().manual_seed(0)
    cond = {
        "encoder_hidden_states": torch.randn(b, 6, 64, generator=gen),
        "pooled_projections": torch.randn(b, 64, generator=gen),
    }
    return Batch(x0=torch.zeros(b, 4, 8, 8), cond=cond, uncond={k: torch.zeros_like(v) for k, v in cond.items()})


@torch.no_grad()
def test_sd3_exported_experts_switch_where_the_scheduler_passes_timestep_500(
    sd3: tuple[Any, Any], tmp_path: Path
) -> None:
    """The exported pipeline's own loop: the first two of LightX2V's four steps go to expert 0, the last two to
    expert 1, and the TimestepExperts boundary is the timestep the scheduler passes at the switch (step index 2,
    LightX2V's ``boundary_step_index``), which is the teacher scheduler's timestep for raw 500."""
    from diffusers import DiffusionPipeline

    teacher, pipe = sd3
    recipe = PhasedDMD(teacher, PhasedDMDConfig(boundaries=(0.5,), plan_steps=(2, 4)))
    out = export_student(recipe, recipe.experts, pipe, teacher.native, teacher.prediction, tmp_path / "student")
    student = DiffusionPipeline.from_pretrained(out)
    student.set_progress_bar_config(disable=True)
    experts = student.transformer
    served: list[list[float]] = [[] for _ in experts.experts]
    for k, expert in enumerate(experts.experts):
        expert.register_forward_pre_hook(
            lambda _m, _a, kw, k=k: served[k].append(float(torch.as_tensor(kw["timestep"]).flatten()[0])),
            with_kwargs=True,
        )
    student(prompt=["a red circle"], num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    passed = student.scheduler.timesteps.tolist()
    (boundary,) = experts.boundaries
    assert served == [passed[:2], passed[2:]]
    assert boundary == pytest.approx(passed[2], abs=1e-3)
    expected = pipe.scheduler.config.num_train_timesteps * lightx2v_sigmas(pipe.scheduler, (MATCH_TIMESTEP,))[0]
    assert boundary == pytest.approx(expected, abs=1e-3)  # 750 at shift 3


def test_digits_preset_phases_and_plans_are_uniform_in_the_unshifted_teacher(random_digits: Path) -> None:
    """The digits teacher has shift 1: edges, time floor and plans stay where they were, uniform in its time."""
    teacher, _ = load_denoiser(str(random_digits))
    assert teacher.native.shift == 1.0
    preset = {k: v for k, v in read_toml(find_preset("phased_dmd", "digits")).items() if k != "train"}
    recipe = PhasedDMD(teacher, merge_into(PhasedDMDConfig(), preset))
    assert recipe.edges == [1.0, 0.5, 0.0] and recipe.t_floor == 0.1
    assert {n: p.times for n, p in recipe.plan().items()} == {2: (1.0, 0.5), 4: (1.0, 0.75, 0.5, 0.25)}
    data = DigitsBatches(null_class_of(teacher.model), batch_size=64)
    recipe = PhasedDMD(teacher, merge_into(PhasedDMDConfig(), {**preset, "phase_steps": 1, "fake_steps": 1}))
    seen = record_fake_times(recipe)
    for step in (0, 1):
        recipe.loss(data(step), step)
    assert bool(((seen[0] >= 0.5) & (seen[0] <= 1.0)).all()) and bool(((seen[1] >= 0.1) & (seen[1] <= 0.5)).all())
