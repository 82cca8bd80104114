"""benchmarks/one_step_bound.py: its ideal consistency student is the teacher's own ODE solver, checked by identity
on the embedded digits teacher (a few Euler steps, a few samples)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from benchmark_scripts import load_benchmark

from fewstep.loading import load_denoiser
from fewstep.sampling import SamplingPlan, euler_sample, euler_times, sample_plan


def load_script() -> ModuleType:
    return load_benchmark("one_step_bound")


def test_the_ideal_one_step_student_is_the_teachers_euler_sampler() -> None:
    script = load_script()
    teacher, _ = load_denoiser("digits")
    labels = torch.arange(6) % 10
    eps = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    native = teacher.native
    with torch.no_grad():
        ideal = sample_plan(script.ode_map(teacher, labels, 4), SamplingPlan(native, (native.t_max,)), eps)
        euler = euler_sample(lambda x, t: teacher(x, t, {"class_labels": labels}), native, eps, euler_times(native, 4))
    torch.testing.assert_close(ideal, euler)


def test_the_ideal_student_solves_from_an_intermediate_time_on_the_same_grid_density() -> None:
    script = load_script()
    teacher, _ = load_denoiser("digits")
    labels = torch.arange(4) % 10
    x_t = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1)) * 0.5
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        got = script.ode_map(teacher, labels, 4)(x_t, t)
        # 4 steps over the whole range -> 2 Euler steps from t = 0.5, starting at x_t itself
        x = x_t
        for a, b in ((0.5, 0.25), (0.25, 0.0)):
            v = (x - teacher(x, torch.full((4,), a), {"class_labels": labels})) / a  # flow: x0 + t v = x_t
            x = x + (b - a) * v
    torch.testing.assert_close(got, x)


def test_plan_pairs_regress_each_plan_time_onto_the_ode_solution_from_there(tmp_path: Path, monkeypatch) -> None:
    script = load_script()
    teacher, _ = load_denoiser("digits")
    native = teacher.native
    gen = torch.Generator().manual_seed(2)
    noise, x0 = torch.randn((2, 5, 1, 8, 8), generator=gen)
    pairs = {"noise": noise, "labels": torch.arange(5), "x0": x0}
    plan = SamplingPlan(native, (native.t_max, 0.5))
    first, later = script.plan_pairs(teacher, pairs, plan, 4, 0, tmp_path / "pairs.pt")
    torch.testing.assert_close(first[1], pairs["x0"])
    torch.testing.assert_close(first[0], pairs["noise"] * native.prior_std(torch.tensor(native.t_max)))
    x_t, target = later
    # x_t lies on the re-noising line of its pair's x0 at t = 0.5 (flow: x_t = (1 - t) x0 + t eps)
    eps = (x_t - 0.5 * pairs["x0"]) / 0.5
    assert eps.std() > 0.5 and not torch.allclose(eps, pairs["noise"])  # fresh noise, not the pair's own
    with torch.no_grad():
        expected = script.ode_map(teacher, pairs["labels"], 4)(x_t, torch.full((5,), 0.5))
    torch.testing.assert_close(target, expected)

    def no_solve(*_args, **_kwargs):
        raise AssertionError("a cached time was solved again")

    monkeypatch.setattr(script, "ode_map", no_solve)
    again = script.plan_pairs(teacher, pairs, plan, 4, 0, tmp_path / "pairs.pt")
    torch.testing.assert_close(again[1][0], x_t)
    torch.testing.assert_close(again[1][1], target)


def test_score_plan_averages_the_given_number_of_noise_seeds() -> None:
    """--noise-seeds: each score is the mean over that many seeds of ``num`` samples (3 as `fewstep bench` by
    default), one FID per seed."""
    from fewstep.schedules import Flow

    script = load_script()
    fids: list[float] = []

    class Metrics:
        def fid_held_out(self, images: torch.Tensor) -> float:
            fids.append(float(len(fids) + 1))  # 1, 2, 3, ...
            return fids[-1]

        def fid_train(self, images: torch.Tensor) -> float:
            return 2.0 * len(fids)

        def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
            return 0.5

    plan = SamplingPlan(Flow(), (1.0,))
    zeros = lambda labels: lambda x, t: torch.zeros_like(x)  # noqa: E731
    got = script.score_plan(zeros, Metrics(), plan, num=4, seeds=2)
    assert fids == [1.0, 2.0] and got == {"fid": 1.5, "fid_train": 3.0, "accuracy": 50.0}
    fids.clear()
    assert script.score_plan(zeros, Metrics(), plan, num=4)["fid"] == 2.0 and len(fids) == 3


def test_the_bound_runs_the_plans_the_presets_export() -> None:
    """The digits presets sample at the pipeline's stock times (uniform sigmas), and so must the exact-map bound:
    LCM's 4-step plan is 1, 0.75, 0.5, 0.25 (its own grid's 0.76 and 0.26 only without the stock samplers)."""
    script = load_script()
    plans = script.digits_plans(script.digits_teacher(), "lcm")
    assert plans[4].times == pytest.approx((1.0, 0.75, 0.5, 0.25))
    assert script.digits_plans(script.digits_teacher(), "scm")[2].times == pytest.approx((1.0, 0.5))
