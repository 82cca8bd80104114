"""DCM: its Euler grid, the experts' phases and jumps (exact on a linear path), the two stages and the hand-over
between them, LoRA merging, the re-noising of the detail stage's GAN, and training and export on a tiny video Wan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fewstep.errors import FewstepError
from fewstep.loading import load_denoiser
from fewstep.recipes.dcm import DCM, DCMConfig
from fewstep.training.data import VideoBatches
from fewstep.training.lora import merged_copy
from fewstep.training.trainer import TrainConfig, Trainer


def small(**kw: object) -> DCMConfig:
    base: dict[str, object] = {"guidance": 1.0, "lora_rank": 4, "lora_alpha": 8, "semantic_steps": 1}
    base.update(kw)
    train = TrainConfig(max_steps=2, batch_size=2, progress=False)
    return DCMConfig(**base, train=train)  # type: ignore[arg-type]


def test_grid_is_dcms_shifted_euler_grid(random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small(shift=17.0))
    shift = lambda u: 17 * u / (1 + 16 * u)  # noqa: E731
    # sigma_i = shift((i + 1) / 50), sigma'_i = shift(i / 50), sigma'_0 = shift(0.001)
    assert float(recipe.sigmas[50]) == pytest.approx(1.0)
    assert float(recipe.sigmas[36]) == pytest.approx(shift(36 / 50), rel=1e-6)  # sigma_35, the lowest semantic point
    assert float(recipe.sigmas[0]) == pytest.approx(shift(0.001), rel=1e-6)  # 0.01673, the detail phase's end
    assert recipe.boundary == pytest.approx(shift(0.7), rel=1e-9) == pytest.approx(0.97541, abs=1e-5)


def test_split_plan_switches_expert_at_the_boundary(random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small(shift=1.0))
    plans = recipe.plan()
    assert plans[1].times == pytest.approx((1.0,))
    assert plans[2].times == pytest.approx((1.0, 0.7))
    assert plans[4].times == pytest.approx((1.0, 0.85, 0.7, 0.35))
    assert plans[2].times[1] == recipe.boundary and all(p.gamma == 0.0 for p in plans.values())


def test_jump_is_exact_on_a_straight_path(random_video: Path) -> None:
    """For an expert whose x0 is the true x0 of a straight path x_s = (1 - s) x0 + s eps, the Euler jump from s to
    any end lands on the path exactly."""
    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small())
    x0, eps = torch.randn(2, 1, 8, 16, 16), torch.randn(2, 1, 8, 16, 16)
    s = torch.tensor([0.9, 0.4])
    x_s = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * eps
    oracle = lambda x, t, cond: x0  # noqa: E731
    out = recipe.jump(oracle, x_s, s, 0.2, {})  # type: ignore[arg-type]
    torch.testing.assert_close(out, 0.8 * x0 + 0.2 * eps)


def test_dcm_refuses_image_teachers_and_a_bad_stage_split(random_digits: Path, random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="dcm distils video teachers"):
        DCM(teacher, small())
    video, _ = load_denoiser(str(random_video))
    with pytest.raises(FewstepError, match="semantic_steps must lie in"):
        DCM(video, small(semantic_steps=2))


def test_merged_copy_computes_what_the_lora_model_computes(random_video: Path) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small())
    detail = recipe.experts[1]
    with torch.no_grad():
        for name, p in detail.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    plain = merged_copy(detail)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    x = torch.randn(2, 1, 8, 16, 16)
    kw = {"timestep": torch.tensor([500.0, 900.0]), "encoder_hidden_states": torch.randn(2, 2, 16)}
    torch.testing.assert_close(plain(x, **kw).sample, detail(x, **kw).sample, atol=1e-5, rtol=1e-4)


def test_stages_train_their_own_expert_and_the_detail_expert_starts_from_the_semantic(
    random_video: Path, tmp_path: Path
) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small(semantic_lr=1e-3, detail_lr=1e-3))
    semantic, detail = recipe.experts
    one = TrainConfig(max_steps=1, batch_size=2, progress=False)
    start = {n: p.detach().clone() for n, p in semantic.named_parameters()}
    Trainer(recipe, one, tmp_path, VideoBatches(2)).fit()  # the semantic stage: no critic, the semantic expert moves
    assert recipe.stage(0) == "semantic" and recipe.stage(1) == "detail"
    assert any(not torch.equal(start[n], p) for n, p in semantic.named_parameters())
    after_semantic = {n: p.detach().clone() for n, p in semantic.named_parameters()}
    # the hand-over: the detail expert's base weights and its own copies are now the semantic expert's (its LoRA
    # has had no gradient yet, so its delta is still zero)
    for name, p in merged_copy(detail).named_parameters():
        torch.testing.assert_close(p, after_semantic[name])
    lora_before = {n: p.detach().clone() for n, p in detail.named_parameters() if p.requires_grad}
    trainer = Trainer(recipe, recipe.cfg.train, tmp_path, VideoBatches(2))
    trainer.resume()
    history = trainer.fit()  # the detail stage: the semantic expert stays, the detail expert and the critic move
    assert trainer.step == 2 and "critic" in history[-1]
    assert all(torch.equal(after_semantic[n], p) for n, p in semantic.named_parameters())
    assert any(not torch.equal(lora_before[n], p) for n, p in detail.named_parameters() if p.requires_grad)
    trained = {n.split(".")[0] for n, p in detail.named_parameters() if p.requires_grad and "lora" not in n}
    assert trained == {"condition_embedder", "proj_out"}


def test_distill_dcm_exports_two_experts_switched_at_the_boundary(random_video: Path, tmp_path: Path) -> None:
    from fewstep.distill import run_distill
    from fewstep.export.experts import TimestepExperts
    from fewstep.loading import load_pipeline

    cfg = small(plan_steps=(1, 2))
    folder = run_distill(DCM, cfg, teacher=str(random_video), output=tmp_path / "run", bench=False)
    pipe = load_pipeline(str(folder))
    assert isinstance(pipe.transformer, TimestepExperts)
    assert pipe.transformer.boundaries == pytest.approx((1000 * 17 * 0.7 / (1 + 16 * 0.7),))  # 1000 sigma'_35
    frames = pipe(class_labels=[3], motions=[1], num_inference_steps=2).frames
    assert frames.shape == (1, 8, 1, 16, 16) and torch.isfinite(frames).all()
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["recipe"] == "dcm" and summary["steps"] == 2


def test_single_expert_ablation_trains_one_expert_on_the_whole_grid(random_video: Path, tmp_path: Path) -> None:
    """experts = "semantic": one expert with the semantic objective at every grid point (it jumps to sigma'_0), no
    detail stage and no critic, exported alone with a uniform plan."""
    from fewstep.distill import run_distill
    from fewstep.loading import load_pipeline

    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small(shift=1.0, experts="semantic", semantic_steps=5))  # semantic_steps is ignored
    assert len(recipe.experts) == 1 and set(recipe.trainable()) == {"student"}
    assert recipe.stage(0) == recipe.stage(10**6) == "semantic"
    assert recipe.boundary == pytest.approx(1e-3)  # sigma'_0: the one phase ends at the grid's end
    assert recipe.plan()[4].times == pytest.approx((1.0, 0.75, 0.5, 0.25))
    seen: list[Tensor] = []
    jump = recipe.jump
    recipe.jump = lambda expert, x, s, end, cond: seen.append(s) or jump(expert, x, s, end, cond)  # type: ignore[method-assign]
    torch.manual_seed(0)
    for _ in range(20):
        recipe.loss(VideoBatches(8)(0), 0)
    assert float(torch.cat(seen).min()) < 0.7  # times below DCM's boundary: the one expert covers them too
    folder = run_distill(DCM, small(experts="semantic"), teacher=str(random_video), output=tmp_path / "run",
                         bench=False)  # fmt: skip
    pipe = load_pipeline(str(folder))
    assert type(pipe.transformer).__name__ == "WanTransformer3DModel"


def test_temporal_coherence_is_the_frame_difference_mse_and_joins_the_detail_stage_only_when_asked(
    random_video: Path,
) -> None:
    teacher, _ = load_denoiser(str(random_video))
    recipe = DCM(teacher, small())
    pred, target = torch.randn(2, 1, 8, 4, 4), torch.randn(2, 1, 8, 4, 4)
    by_hand = ((pred[:, :, 3:] - pred[:, :, :-3]) - (target[:, :, 3:] - target[:, :, :-3])).pow(2).mean()
    torch.testing.assert_close(recipe.temporal_coherence(pred, target), by_hand)
    assert float(recipe.temporal_coherence(pred[:, :, :3], target[:, :, :3])) == 0.0  # no pair 3 frames apart

    batch = VideoBatches(2)(0)

    def detail_loss(**kw: object) -> float:
        torch.manual_seed(0)  # the same LoRA and critic initialization, and the same draws
        dcm = DCM(teacher, small(**kw))
        return float(dcm.loss(batch, step=1)["student"])  # step 1 >= semantic_steps 1: the detail stage

    plain = detail_loss(temporal_weight=0.0)
    assert detail_loss(temporal_weight=1e3) == plain  # DCM's: the term belongs to the semantic stage
    assert detail_loss(temporal_weight=1e3, temporal_stages="both") > plain + 1e-3
