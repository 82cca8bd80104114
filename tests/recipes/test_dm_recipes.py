"""SiD, TDM and Phased DMD on a small random digits pipeline: registration, which networks step when, the zero first
gradient of a fake score that starts as the teacher, the plans, and exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_phased_dmd import record_fake_times

from fewstep.distill import run_distill
from fewstep.loading import load_denoiser
from fewstep.objectives.generator import FewStepGenerator, student_network, uniform_plans
from fewstep.recipes import resolve
from fewstep.recipes.phased_dmd import PhasedDMD, PhasedDMDConfig
from fewstep.recipes.sid import SiD, SiDConfig
from fewstep.recipes.tdm import TDM, TDMConfig
from fewstep.sampling import plan_state
from fewstep.schedules import Flow, append_dims, ddim_step, forward_transition
from fewstep.training.config import merge_into
from fewstep.training.data import DigitsBatches, null_class_of


@pytest.mark.parametrize(("name", "cls"), [("sid", SiD), ("tdm", TDM), ("phased_dmd", PhasedDMD)])
def test_registered(name: str, cls: type) -> None:
    assert resolve(name) is cls


def test_uniform_plans_are_the_teachers_euler_times() -> None:
    plans = uniform_plans(Flow(), (1, 2, 4), gamma=0.0)
    assert [plans[n].times for n in (1, 2, 4)] == [(1.0,), (1.0, 0.5), (1.0, 0.75, 0.5, 0.25)]
    assert plans[4].gamma == 0.0


def test_generator_sample_is_the_plan_prefix_then_a_step_with_gradient(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    gen = FewStepGenerator(teacher, student_network(teacher.model), uniform_plans(teacher.native, (4,), 1.0))
    cond = {"class_labels": torch.arange(3)}
    noise = torch.randn(3, 1, 8, 8)
    torch.manual_seed(5)
    x, t, x0 = gen.sample(cond, noise, gen.plans[4], 2)
    torch.manual_seed(5)
    expected = plan_state(gen.bind(cond), gen.plans[4], noise, 2)
    torch.testing.assert_close(x, expected)
    assert torch.equal(t, torch.full((3,), 0.5)) and x0.requires_grad and not x.requires_grad


@pytest.mark.parametrize(
    ("cls", "cfg"),
    [
        (SiD, SiDConfig()),
        (SiD, SiDConfig(guidance_mode="zero")),
        (SiD, SiDConfig(guidance_mode="anti")),
        (TDM, TDMConfig(guidance=1.0, fake_lora_rank=0)),
        (PhasedDMD, PhasedDMDConfig(fake_steps=1)),
    ],
    ids=["sid", "sid-zero-cfg", "sid-anti-cfg", "tdm", "phased"],
)
def test_first_student_gradient_is_zero_when_the_fake_is_the_teacher(random_digits: Path, cls: Any, cfg: Any) -> None:
    """Every fake score starts as a copy of the teacher, so (at the teacher's own guidance) the student's first
    distribution-matching gradient vanishes, while the fake score's own loss does not."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = cls(teacher, cfg)
    if cfg is not None and getattr(cfg, "guidance_mode", "cfg") != "cfg":  # fake and teacher read differently
        return _check_guidance_modes(recipe)
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    out = recipe.loss(batch, 0)
    params = [p for p in recipe.trainable()["student"].parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["student"], params, allow_unused=True)
    # SiD's gradient runs back through both networks, whose backward kernels round differently when weights
    # require grad: zero up to float noise (a real gradient here is of order 1e-3)
    assert all(g is None or float(g.abs().max()) < 1e-7 for g in grads)
    fake_key = next(k for k in out if k.startswith("fake"))
    assert float(out[fake_key].detach()) > 0


def _check_guidance_modes(recipe: SiD) -> None:
    """Zero-CFG: the fake score answers unconditionally; Anti-CFG: with the negative scale; the teacher is plain."""
    batch = DigitsBatches(null_class_of(recipe.teacher.model), batch_size=4)(0)
    real, fake = recipe.scores(batch)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.6)
    torch.testing.assert_close(real(x, t), recipe.teacher(x, t, batch.cond))
    c, u = recipe.fake(x, t, batch.cond), recipe.fake(x, t, batch.uncond)
    w = 0.0 if recipe.cfg.guidance_mode == "zero" else recipe.cfg.anti_guidance
    torch.testing.assert_close(fake(x, t), u + w * (c - u), atol=1e-5, rtol=1e-5)


def test_sid_steps_the_fake_every_iteration_and_the_generator_on_its_schedule(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SiD(teacher, SiDConfig(fake_steps=2))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    assert [sorted(recipe.loss(data(k), k)) for k in range(3)] == [["fake", "student"], ["fake"], ["fake", "student"]]


def test_tdm_noises_along_the_students_own_ode_inside_the_segment(random_digits: Path) -> None:
    """x_t = a x_mid + b z with x_mid the DDIM point of (x_k, x0_G) at the segment's end and t inside the segment."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = TDM(teacher, TDMConfig(fake_lora_rank=0))
    native = teacher.native
    x_k, x0 = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t_k = torch.full((5,), 0.75)
    torch.manual_seed(1)
    x_t, t = recipe.segment_noise(x_k, t_k, x0, 0.5)
    assert bool(((t > 0.5) & (t < 0.75)).all())
    c_k, c_end = native.coeffs(append_dims(t_k, 4)), native.coeffs(torch.full((5, 1, 1, 1), 0.5))
    x_mid = ddim_step(x0, x_k, c_k, c_end)
    torch.manual_seed(1)
    torch.rand_like(t_k)
    expected = forward_transition(x_mid, c_end, native.coeffs(append_dims(t, 4)), torch.randn_like(x_mid))
    torch.testing.assert_close(x_t, expected)


def test_phased_plans_and_phases(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = PhasedDMD(teacher, PhasedDMDConfig(boundaries=(0.5,), phase_steps=3))
    assert recipe.plan()[4].times == (1.0, 0.75, 0.5, 0.25) and recipe.plan()[2].times == (1.0, 0.5)
    assert [recipe.phase_of(t) for t in (1.0, 0.75, 0.5, 0.25)] == [0, 0, 1, 1]  # a boundary opens the next phase
    assert [recipe.phase_at(s) for s in (0, 2, 3, 100)] == [0, 0, 1, 1]
    with pytest.raises(Exception, match="multiples"):
        PhasedDMD(teacher, PhasedDMDConfig(plan_steps=(3,), train_steps=(3,)))


def test_phased_trains_one_phase_at_a_time_then_freezes_it_at_its_ema(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = PhasedDMD(teacher, PhasedDMDConfig(phase_steps=2, fake_steps=1, lr=1e-3))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    keys = []
    opt = torch.optim.SGD(recipe.experts.parameters(), lr=1e-2)
    for step in range(3):
        out = recipe.loss(data(step), step)
        keys.append(sorted(out))
        opt.zero_grad()
        out["student"].backward(inputs=list(recipe.experts.parameters()))
        grads = [[p.grad is not None for p in e.parameters()] for e in recipe.experts]
        assert any(grads[recipe.phase_at(step)]) and not any(grads[1 - recipe.phase_at(step)])
        opt.step()
        recipe.after_step(step)
    assert keys == [["fake_0", "student"], ["fake_0", "student"], ["fake_1", "student"]]
    assert recipe.ema_count == [2, 1]
    for live, ema in zip(recipe.experts[0].parameters(), recipe.ema_experts[0].parameters(), strict=True):
        assert torch.equal(live, ema)  # phase 0 finished: its expert now samples with its EMA weights


@pytest.mark.parametrize(
    ("cls", "cfg"),
    [(SiD, SiDConfig(lr=1e-3, fake_lr=1e-3)), (PhasedDMD, PhasedDMDConfig(phase_steps=2, fake_steps=2, lr=1e-3))],
    ids=["sid", "phased"],
)
def test_distill_resumes_exactly(random_digits: Path, tmp_path: Path, cls: Any, cfg: Any) -> None:
    def with_steps(steps: int) -> Any:
        train = {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "progress": False}
        return merge_into(cfg, {"train": train})

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    run_distill(cls, with_steps(4), teacher=str(random_digits), output=straight, bench=False)
    run_distill(cls, with_steps(2), teacher=str(random_digits), output=parts, bench=False)
    run_distill(cls, with_steps(4), teacher=str(random_digits), output=parts, resume="", bench=False)
    a = json.loads((straight / "checkpoints" / "losses.json").read_text())
    b = json.loads((parts / "checkpoints" / "losses.json").read_text())
    assert len(a) == 4 and a == b
    assert all(math.isfinite(v) for h in a for v in h.values() if isinstance(v, float))
    assert (straight / "student" / "model_index.json").is_file()


def test_sid_diffusion_gan_trains_heads_on_the_fake_score_with_it(random_digits: Path, tmp_path: Path) -> None:
    """With adv_weight > 0 the GAN heads read the fake score's features and step with it (one optimizer); the
    teacher does not move."""
    from fewstep.training.trainer import TrainConfig, Trainer

    teacher, _ = load_denoiser(str(random_digits))
    frozen = [p.detach().clone() for p in teacher.model.parameters()]
    recipe = SiD(teacher, SiDConfig(adv_weight=0.01, fake_lr=1e-3))
    assert sorted(recipe.trainable()) == ["fake", "student"]
    heads = [p.detach().clone() for p in recipe.disc.heads.parameters()]  # type: ignore[union-attr]
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    Trainer(recipe, TrainConfig(max_steps=2, batch_size=4, progress=False), tmp_path, data).fit()
    assert any(not torch.equal(a, b) for a, b in zip(heads, recipe.disc.heads.parameters(), strict=True))  # type: ignore[union-attr]
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.model.parameters(), strict=True))


@pytest.mark.parametrize("t_floor", [0.0, 0.4])
def test_phased_reads_the_scores_no_lower_than_its_time_floor(random_digits: Path, t_floor: float) -> None:
    """The last phase draws its DMD / fake times in [max(t_floor, t_min), its start]; earlier phases are unchanged."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = PhasedDMD(teacher, PhasedDMDConfig(phase_steps=1, fake_steps=1, t_floor=t_floor))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=64)
    seen = record_fake_times(recipe)
    for step in (0, 1):
        recipe.loss(data(step), step)
    assert bool(((seen[0] >= 0.5) & (seen[0] <= 1.0)).all())
    last = seen[1]
    assert bool((last <= 0.5).all())
    if t_floor > 0:
        assert bool((last >= t_floor).all())
    else:
        assert bool((last < 0.4).any())
    with pytest.raises(Exception, match="t_floor"):
        PhasedDMD(teacher, PhasedDMDConfig(t_floor=0.5))
