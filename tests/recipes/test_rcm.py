"""rCM on a small random digits pipeline: sCM alone until dmd_start, then the DMD term on backward-simulated student
samples with a fake score that starts as the teacher and steps on its own schedule."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from test_scm import digits_config, median_log_ratio, old_scm_loss, recorder, unit_batch

from fewstep.distill import run_distill
from fewstep.loading import load_denoiser
from fewstep.objectives.dmd import distribution_matching_loss, fake_score_loss, uniform_times
from fewstep.recipes import resolve
from fewstep.recipes.base import Batch
from fewstep.recipes.rcm import RCM, RCMConfig, rcm_critic_loss, rcm_dmd_loss, shifted_uniform_times
from fewstep.sampling import SamplingPlan, plan_state
from fewstep.schedules import Flow, TrigFlow, append_dims
from fewstep.teacher import guidance_condition
from fewstep.training.config import find_preset, merge_into, read_toml
from fewstep.training.data import DigitsBatches, null_class_of


def test_registered() -> None:
    assert resolve("rcm") is RCM


def test_fake_score_starts_as_the_teacher_so_the_first_dmd_gradient_is_zero(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig())
    x0 = torch.randn(6, 1, 8, 8)
    cond = {"class_labels": torch.arange(6)}
    native = recipe.real.schedule
    t = uniform_times(native, 6)
    real = lambda x, s: recipe.real(x, s, cond)  # noqa: E731
    fake = lambda x, s: recipe.fake(x, s, cond)  # noqa: E731
    loss, grad = distribution_matching_loss(x0, t, native, real, fake)
    assert torch.equal(grad, torch.zeros_like(grad)) and float(loss) == 0.0
    assert all(p.requires_grad for p in recipe.fake.model.parameters())
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_schedule_of_losses(random_digits: Path) -> None:
    """sCM alone before dmd_start; then the fake score on every iteration and the student on every k-th."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(dmd_start=2, student_update_freq=3, plan_steps=(1, 2)))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    keys = [sorted(recipe.loss(data(step), step)) for step in range(7)]
    assert keys[:2] == [["student"], ["student"]]
    assert keys[2:] == [["fake", "student"], ["fake"], ["fake"], ["fake", "student"], ["fake"]]


def test_distill_trains_student_and_fake_and_resumes_exactly(random_digits: Path, tmp_path: Path) -> None:
    def cfg(steps: int) -> RCMConfig:
        train = {"max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "progress": False}
        rcm = RCMConfig(dmd_start=1, student_update_freq=2, fake_lr=1e-3, lr=1e-3, plan_steps=(1, 2))
        return merge_into(rcm, {"train": train})

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    run_distill(RCM, cfg(4), teacher=str(random_digits), output=straight, bench=False)
    run_distill(RCM, cfg(2), teacher=str(random_digits), output=parts, bench=False)
    run_distill(RCM, cfg(4), teacher=str(random_digits), output=parts, resume="", bench=False)
    a = json.loads((straight / "checkpoints" / "losses.json").read_text())
    b = json.loads((parts / "checkpoints" / "losses.json").read_text())
    assert [sorted(k for k in h if k in ("student", "fake")) for h in a] == [
        ["student"], ["fake", "student"], ["fake"], ["fake", "student"]
    ]  # fmt: skip
    assert [(h.get("student"), h.get("fake")) for h in a] == [(h.get("student"), h.get("fake")) for h in b]
    assert (straight / "student" / "model_index.json").is_file()


def test_dmd_alone_when_the_consistency_weight_is_zero(random_digits: Path) -> None:
    """scm_weight = 0 and dmd_start = 0: the student's loss is the DMD term alone (the ablation baseline)."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(dmd_start=0, scm_weight=0.0, plan_steps=(1,)))
    data = DigitsBatches(null_class_of(teacher.model), batch_size=4)
    calls = []
    recipe.scm.loss = lambda *a: calls.append(a) or {}  # type: ignore[method-assign]
    out = recipe.loss(data(0), 0)
    assert sorted(out) == ["fake", "student"] and not calls
    assert float(out["student"]) == 0.0  # the fake score starts as the teacher: DMD's first gradient is zero


# ---------------------------------------------------------------------------------------------------------------
# rCM's own balance (issue 15, item 3) and sigma_data (item 4)


def old_rcm_loss(recipe: RCM, batch: Batch, step: int) -> dict[str, torch.Tensor]:
    """rCM's loss as it was computed before rCM's options, written out (sCM's part by ``old_scm_loss``)."""
    cfg = recipe.cfg
    if step < cfg.dmd_start:
        return old_scm_loss(recipe.scm, batch, step)
    assert batch.x0 is not None
    b = batch.x0.shape[0]
    cond = {**batch.cond, **guidance_condition(recipe.scm.student.model, torch.full((b,), cfg.guidance))}
    student_step = (step - cfg.dmd_start) % cfg.student_update_freq == 0
    native = recipe.real.schedule
    fake = lambda x, t: recipe.fake(x, t, batch.cond)  # noqa: E731
    out = old_scm_loss(recipe.scm, batch, step) if student_step and cfg.scm_weight > 0 else {}
    with torch.set_grad_enabled(student_step):
        n = cfg.plan_steps[int(torch.randint(len(cfg.plan_steps), ()))]
        times = (math.pi / 2, cfg.plan_mid) if n == 2 else tuple(math.pi / 2 * (1 - i / n) for i in range(n))
        plan = SamplingPlan(TrigFlow(cfg.sigma_data), times, gamma=1.0)
        denoise = lambda x, t: recipe.scm.student(x, t, cond)  # noqa: E731
        with torch.no_grad():
            x = plan_state(denoise, plan, torch.randn_like(batch.x0), plan.steps - 1)
        x0_G = denoise(x, torch.full((b,), plan.times[-1]))
    if student_step:
        real = lambda x, t: recipe.real.guided(x, t, batch.cond, batch.uncond, cfg.guidance)  # noqa: E731
        dmd, _ = distribution_matching_loss(x0_G, uniform_times(native, b, cfg.dmd_t_min, cfg.dmd_t_max), native,
                                            real, fake)  # fmt: skip
        out["student"] = cfg.scm_weight * out.get("student", 0.0) + cfg.dmd_weight * dmd
    t_f = uniform_times(native, b, cfg.dmd_t_min, cfg.dmd_t_max)
    out["fake"] = fake_score_loss(x0_G, t_f, native, fake, weighting=cfg.fake_weighting)
    return out


def test_digits_preset_losses_are_the_old_code_paths(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, digits_config("rcm", RCMConfig()))
    assert recipe.cfg.sigma_data == 0.5
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=8)(0)
    start = recipe.cfg.dmd_start
    for step in (0, start, start + 1, start + 2):
        torch.manual_seed(step)
        new = recipe.loss(batch, step)
        torch.manual_seed(step)
        old = old_rcm_loss(recipe, batch, step)
        assert sorted(new) == sorted(old), step
        # the same computation to float32 rounding: on some CPUs (an AMD EPYC here) the two paths' kernels round
        # apart by 1e-7 relative on the fake score's loss (measured: 1.7379223 vs 1.7379222 at dmd_start + 1)
        for k in new:
            torch.testing.assert_close(new[k], old[k], rtol=1e-6, atol=0, msg=f"{k} at step {step}")


def sd3_config() -> RCMConfig:
    preset = {k: v for k, v in read_toml(find_preset("rcm", "sd3")).items() if k != "train"}
    return merge_into(RCMConfig(), preset)


def test_sd3_preset_is_rcms() -> None:
    """Every choice of NVlabs/rcm's Wan2.1 1.3B experiment (rcm/configs/experiments/rcm/wan2pt1_t2v.py) and of its
    model (rcm/models/t2v_model_distill_rcm.py)."""
    cfg = sd3_config()
    assert (cfg.sigma_data, cfg.p_mean, cfg.p_std, cfg.p_sigma_data) == (1.0, 0.7, 1.6, 1.0)
    assert (cfg.scm_loss, cfg.loss_scale, cfg.dmd_loss, cfg.dmd_weight) == ("rcm", 100.0, "rcm", 1.0)
    assert (cfg.dmd_times, cfg.dmd_time_shift) == ("shifted", 5.0)
    assert (cfg.backward_simulation, cfg.max_simulation_steps) == ("rcm", 4)
    assert cfg.plan_t_max == pytest.approx(math.atan(80)) and cfg.plan_mids == (1.5, 1.4, 1.0)
    assert cfg.plan_steps == (1, 2, 3, 4)
    assert (cfg.tangent_warmup_steps, cfg.dmd_start, cfg.student_update_freq) == (1000, 1000, 5)
    assert cfg.fake_on_student_steps is False  # is_student_phase: the critic steps only on the other iterations
    assert (cfg.lr, cfg.fake_lr, cfg.betas, cfg.fake_betas, cfg.guidance) == (
        2e-6,
        4e-7,
        (0.0, 0.999),
        (0.0, 0.999),
        5.0,
    )


def test_sd3_preset_proposal_is_rcms_p_G(random_digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rCM's p_G = LogNormal(0.7, 1.6) in sigma, t = atan(sigma) with sigma_data 1: the median noise-to-signal
    ratio on unit-variance data is e^0.7."""
    import fewstep.recipes.scm as scm_module

    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, replace(sd3_config(), time_max_freq=math.inf))
    seen = recorder(monkeypatch, scm_module, "trigflow_time_proposal")
    torch.manual_seed(0)
    recipe.loss(unit_batch(teacher.model, 1024), 0)
    assert median_log_ratio(recipe.scm.trig, seen[0]) == pytest.approx(0.7, abs=0.2)


def perturbed_fake(recipe: RCM, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in recipe.fake.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_rcm_dmd_loss_is_loss_scale_dmd_times_the_summed_square(random_digits: Path) -> None:
    """rCM's DMD term (_student_dmd_step): loss_scale_dmd * sum over elements of (x0_G - sg(x0_G - grad))^2, i.e.
    2 * numel times DMD2's 1/2 mean, and the gradient 2 grad per element (per sample, averaged over the batch)."""
    teacher, _ = load_denoiser(str(random_digits))
    base = dict(dmd_start=0, scm_weight=0.0, plan_steps=(1,))
    dmd2, rcm = RCM(teacher, RCMConfig(**base)), RCM(teacher, RCMConfig(**base, dmd_loss="rcm"))
    perturbed_fake(dmd2)
    rcm.fake.model.load_state_dict(dmd2.fake.model.state_dict())
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    torch.manual_seed(0)
    a = dmd2.loss(batch, 0)["student"]
    torch.manual_seed(0)
    b = rcm.loss(batch, 0)["student"]
    assert float(a) > 0
    torch.testing.assert_close(b, 2 * batch.x0[0].numel() * a)

    x0_G = torch.randn(3, 2, 5, requires_grad=True)
    grad = torch.randn(3, 2, 5)
    loss = rcm_dmd_loss(x0_G, grad)
    torch.testing.assert_close(loss, (grad**2).flatten(1).sum(1).mean())
    loss.backward()
    torch.testing.assert_close(x0_G.grad, 2 * grad / 3)


def test_rcm_critic_is_the_summed_trigflow_f_loss() -> None:
    """rCM's critic (training_step_critic): sum over elements of (x0_G - x0_fake)^2 / sin^2 t_D, with x_t noised in
    TrigFlow time (sigma_data 1) at the time of the same noise-to-signal ratio as the native t_D."""
    trig, native = TrigFlow(1.0), Flow()
    x0_G, eps = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t_native = torch.tensor([0.1, 0.5, 0.9])

    def fake(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # any denoiser in TrigFlow time
        return torch.tanh(x) * append_dims(t.cos(), x.ndim)

    t = torch.atan(t_native / (1 - t_native))  # rCM's rf_to_trig_time
    x_t = append_dims(t.cos(), 3) * x0_G + append_dims(t.sin(), 3) * eps
    expected = ((x0_G - fake(x_t, t)) ** 2 / append_dims(t.sin() ** 2, 3)).flatten(1).sum(1).mean()
    torch.testing.assert_close(rcm_critic_loss(x0_G, t_native, native, trig, fake, eps), expected)


def test_shifted_uniform_times_are_rcms_uniform_shift() -> None:
    """rCM's p_D = UniformShift(5) (rcm/utils/timestep_utils.py): u ~ U[0, 1), rf = 5u / (1 + 4u) in flow time,
    the same noise-to-signal ratio rf / (1 - rf) on any schedule (TrigFlow: atan(rf / (1 - rf)))."""
    for schedule, to_time in ((Flow(), lambda rf: rf), (TrigFlow(1.0), lambda rf: torch.atan(rf / (1 - rf)))):
        torch.manual_seed(0)
        t = shifted_uniform_times(schedule, 1000, 5.0)
        torch.manual_seed(0)
        u = torch.rand(1000, dtype=torch.float64)
        torch.testing.assert_close(t, to_time(5 * u / (1 + 4 * u)).float())


def test_dmd_and_fake_times_follow_the_configured_distribution(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(dmd_start=0, plan_steps=(1,), dmd_times="shifted", dmd_time_shift=5.0))
    torch.manual_seed(0)
    assert float(recipe.dmd_times(20000).median()) == pytest.approx(5 * 0.5 / (1 + 4 * 0.5), abs=0.01)
    calls: list[torch.Tensor] = []
    draw = recipe.dmd_times
    recipe.dmd_times = lambda n: calls.append(draw(n)) or calls[-1]  # type: ignore[method-assign]
    recipe.loss(DigitsBatches(null_class_of(teacher.model), batch_size=4)(0), 0)
    assert len(calls) == 2  # t_D of the student's DMD term and t of the fake score's loss


def test_rcm_backward_simulation_steps_cycle_as_rcms() -> None:
    """n = effective iteration % 4 + 1 for student steps and the critic's own count for fake-only steps
    (is_student_phase, get_effective_iteration, get_effective_iteration_fake in t2v_model_distill_rcm.py)."""
    W, f = 3, 5
    cfg = RCMConfig(dmd_start=W, student_update_freq=f, backward_simulation="rcm", max_simulation_steps=4)
    for i in range(W, 40):
        student = (i - W) % f == 0
        effective = W + (i - W) // f
        expected = (effective if student else i - effective - 1) % 4 + 1
        assert RCM.simulation_steps(cfg, i) == expected, i


def test_rcm_backward_simulation_draws_decreasing_times(random_digits: Path) -> None:
    """From pi/2, each next time min(previous, t ~ p_D) per sample; x = cos t x0 + sin t sd z between steps; only
    the last student call records a gradient."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(backward_simulation="rcm", dmd_times="shifted", dmd_start=0))
    calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []

    def student(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        calls.append((x.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return torch.full_like(x, 0.3)

    recipe.scm.student = student  # type: ignore[assignment]
    torch.manual_seed(0)
    _, x0_G = recipe.student_sample({}, torch.zeros(64, 1, 8, 8), 4)
    assert torch.equal(x0_G, torch.full_like(x0_G, 0.3))
    assert [grad for *_, grad in calls] == [False, False, False, True]
    times = [t for _, t, _ in calls]
    assert torch.equal(times[0], torch.full((64,), math.pi / 2))
    assert all((b <= a).all() for a, b in zip(times, times[1:], strict=False)) and times[-1].unique().numel() > 1
    for x, t, _ in calls[1:]:
        z = (x - append_dims(t.cos(), 4) * 0.3) / append_dims(t.sin(), 4)  # sigma_data 1
        assert abs(float(z.std()) - 1) < 0.05 and abs(float(z.mean())) < 0.05


@pytest.mark.parametrize("on_student_steps", [True, False])
def test_fake_score_steps_on_student_iterations_only_when_asked(random_digits: Path, on_student_steps: bool) -> None:
    """DMD2 updates its fake score on every iteration; rCM alternates (is_student_phase): its critic does not step on
    the student's iterations. With student_update_freq 2 and dmd_start 0, steps 0 and 2 are the student's."""
    teacher, _ = load_denoiser(str(random_digits))
    cfg = RCMConfig(
        dmd_start=0, student_update_freq=2, fake_on_student_steps=on_student_steps, adaptive_weighting=False
    )
    recipe = RCM(teacher, cfg)
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=2)(0)
    steps = {step: set(recipe.loss(batch, step)) for step in range(3)}
    fake_on_student = {"student", "fake"} if on_student_steps else {"student"}
    assert steps == {0: fake_on_student, 1: {"fake"}, 2: fake_on_student}


def test_fake_per_plan_trains_and_reads_the_drawn_plans_fake(random_digits: Path) -> None:
    """``fake_per_plan``: the plan drawn for an iteration picks the one fake score its critic loss trains and its DMD
    term reads; the other plans' fakes get no gradient and do not change the student's loss."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = RCM(teacher, RCMConfig(dmd_start=0, student_update_freq=1, plan_steps=(1, 2, 4), fake_per_plan=True))
    assert len({id(f.model) for f in recipe.fakes}) == 3
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    drawn: list[int] = []
    sample = recipe.student_sample

    def recording(*a: Any, **k: Any) -> tuple[int, torch.Tensor]:
        j, x0 = sample(*a, **k)
        drawn.append(j)
        return j, x0

    recipe.student_sample = recording  # type: ignore[method-assign]

    def losses() -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        return recipe.loss(batch, 0)

    out = losses()
    j = drawn[-1]
    params = [list(f.model.parameters()) for f in recipe.fakes]
    grads = torch.autograd.grad(out["fake"], [p for ps in params for p in ps], allow_unused=True)
    per_fake = [grads[i * len(params[0]) : (i + 1) * len(params[0])] for i in range(3)]
    for i, g in enumerate(per_fake):
        reached = any(x is not None and bool(x.abs().max() > 0) for x in g)
        assert reached == (i == j), (i, j)
    student = float(out["student"])
    with torch.no_grad():
        for p in params[(j + 1) % 3]:
            p.add_(0.05 * torch.randn_like(p))
    assert float(losses()["student"]) == student and drawn[-1] == j
    with torch.no_grad():
        for p in params[j]:
            p.add_(0.05 * torch.randn_like(p))
    assert float(losses()["student"]) != student


def test_fake_per_plan_needs_the_plan_simulation(random_digits: Path) -> None:
    from fewstep.errors import FewstepError

    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="fake_per_plan"):
        RCM(teacher, RCMConfig(fake_per_plan=True, backward_simulation="rcm"))


def test_plan_weights_pick_the_simulated_plan(random_digits: Path) -> None:
    """``plan_weights``: the backward simulation's plan is drawn in proportion to them (here all on one plan); one
    weight per plan, and only with the plan simulation."""
    from fewstep.errors import FewstepError

    teacher, _ = load_denoiser(str(random_digits))
    like = torch.zeros(2, 1, 8, 8)
    cond = DigitsBatches(null_class_of(teacher.model), batch_size=2)(0).cond
    for only in (0, 2):
        weights = tuple(float(j == only) for j in range(3))
        recipe = RCM(teacher, RCMConfig(plan_steps=(1, 2, 4), plan_weights=weights))
        torch.manual_seed(0)
        with torch.no_grad():
            assert {recipe.student_sample(cond, like)[0] for _ in range(4)} == {only}
    for cfg in (RCMConfig(plan_steps=(1, 2, 4), plan_weights=(1.0, 1.0)),
                RCMConfig(plan_weights=(1.0, 1.0, 1.0), backward_simulation="rcm")):  # fmt: skip
        with pytest.raises(FewstepError, match="plan_weights"):
            RCM(teacher, cfg)
