"""SiD's guidance against mingyuanzhou/SiD-LSG (training/sid_training_loop.py, run_sid.sh): the fake score is trained
at the guidance it is read at, long-short guidance (kappa1 = cfg_train_fake, kappa2 = kappa3 = cfg_eval_fake,
kappa4 = cfg_eval_real), and the presets that claim SiD-LSG's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fewstep.recipes.sid as sid_module
from fewstep.errors import FewstepError
from fewstep.loading import load_denoiser
from fewstep.recipes.sid import SiD, SiDConfig
from fewstep.training.config import find_preset, merge_into, read_toml
from fewstep.training.data import DigitsBatches, null_class_of


def _label_tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.endswith("class_embedder.embedding_table.weight")]


@pytest.mark.parametrize("mode", ["zero", "anti"])
def test_sid_fake_loss_trains_the_fakes_null_class_row(random_digits: Path, mode: str) -> None:
    """Zero-CFG reads the fake unconditionally and Anti-CFG as u + w (c - u): the null-class row of the fake's label
    embedding is part of what is read, so the fake's own loss must move it."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SiD(teacher, SiDConfig(guidance_mode=mode))  # type: ignore[arg-type]
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=8)(0)
    null = null_class_of(teacher.model)
    tables = _label_tables(recipe.fake.model)
    grads = torch.autograd.grad(recipe.loss(batch, 0)["fake"], tables, allow_unused=True)
    null_rows = [0.0 if g is None else float(g[null].abs().max()) for g in grads]
    assert max(null_rows) > 0, f"null-class rows of the fake's label tables got no gradient: {null_rows}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"guidance_mode": "zero"},
        {"guidance_mode": "anti", "anti_guidance": -1.0},
        {"guidance_mode": "cfg", "guidance": 3.0},
        {"guidance_mode": "lsg", "kappa1": 2.5, "kappa2": 2.5, "kappa4": 4.0},
    ],
    ids=["zero", "anti", "cfg", "lsg"],
)
def test_sid_trains_the_fake_at_the_guidance_it_reads_it(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict[str, Any]
) -> None:
    """The denoiser the fake's DSM loss regresses is the one the generator loss reads (SiD-LSG: kappa1 = kappa2)."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SiD(teacher, SiDConfig(**overrides))
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    trained: list[Any] = []
    real_loss = sid_module.fake_score_loss

    def recording(x0: torch.Tensor, t: torch.Tensor, schedule: Any, fake: Any, **kw: Any) -> torch.Tensor:
        trained.append(fake)
        return real_loss(x0, t, schedule, fake, **kw)

    monkeypatch.setattr(sid_module, "fake_score_loss", recording)
    recipe.loss(batch, 0)
    _, read = recipe.scores(batch)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.6)
    with torch.no_grad():
        torch.testing.assert_close(trained[0](x, t), read(x, t), atol=1e-5, rtol=1e-5)


def test_sid_lsg_reads_teacher_at_kappa4_and_fake_at_kappa2_and_trains_it_at_kappa1(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SiD(teacher, SiDConfig(guidance_mode="lsg", kappa1=1.5, kappa2=3.0, kappa4=4.5))
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.6)

    def guided(net: Any, w: float) -> torch.Tensor:
        c, u = net(x, t, batch.cond), net(x, t, batch.uncond)
        return u + w * (c - u)

    real, fake = recipe.scores(batch)
    trained: list[Any] = []
    real_loss = sid_module.fake_score_loss
    monkeypatch.setattr(
        sid_module, "fake_score_loss", lambda x0, tt, s, f, **kw: trained.append(f) or real_loss(x0, tt, s, f, **kw)
    )
    recipe.loss(batch, 0)
    with torch.no_grad():
        torch.testing.assert_close(real(x, t), guided(recipe.teacher, 4.5), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fake(x, t), guided(recipe.fake, 3.0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trained[0](x, t), guided(recipe.fake, 1.5), atol=1e-5, rtol=1e-5)


def test_sid_lsg_defaults_follow_sid_lsg_run_script() -> None:
    """SiD-LSG's run_sid.sh sets kappa1 = kappa2 = kappa3 = kappa4 (2 in every branch); its alpha 1 is the sd3 preset's
    (the default alpha 1.2 is SiD's EDM value)."""
    cfg = SiDConfig()
    assert cfg.kappa1 == cfg.kappa2 == cfg.kappa4 == 2.0


def test_sd3_preset_is_sid_lsg(random_digits: Path) -> None:
    """The sd3 preset claims SiD-LSG's settings: alpha 1 and long-short guidance with equal kappas (its README's
    released SD checkpoints are trained at 4.5 for all four), lr 1e-6 for both networks."""
    preset = {k: v for k, v in read_toml(find_preset("sid", "sd3")).items() if k != "train"}
    cfg = merge_into(SiDConfig(), preset)
    assert cfg.alpha == 1.0
    assert cfg.guidance_mode == "lsg"
    assert cfg.kappa1 == cfg.kappa2 == cfg.kappa4 == 4.5
    assert cfg.lr == cfg.fake_lr == 1e-6


@pytest.mark.parametrize("mode", ["lsg", "anti"])
def test_sid_guided_fake_trains_on_prompts(sd3_folder: Path, tmp_path: Path, mode: str) -> None:
    """Long-short and Anti-CFG guidance on a tiny text-to-image flow transformer: the fake score's guided step runs
    with prompt embeddings and the empty prompt, and both losses stay finite."""
    import json

    from fewstep.distill import run_distill

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nthe blue square\n")
    run = {
        "train": {"max_steps": 2, "batch_size": 2, "progress": False, "checkpoint_every": 1},
        "data": {"teacher_steps": 2, "teacher_guidance": 2.0, "prompts": str(prompts)},
    }
    cfg = merge_into(SiDConfig(guidance_mode=mode, kappa1=2.0, kappa2=2.0, kappa4=3.0), run)  # type: ignore[arg-type]
    run_distill(SiD, cfg, teacher=str(sd3_folder), output=tmp_path / "run", bench=False)
    history = json.loads((tmp_path / "run" / "checkpoints" / "losses.json").read_text())
    assert len(history) == 2
    assert all(torch.isfinite(torch.tensor(v)) for h in history for v in h.values() if isinstance(v, float))


def test_sid_per_step_fakes_learn_each_step_of_one_trajectory(
    random_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fake_per_step``: the k-th fake score regresses the k-th step's output of one run of the n-step plan (the
    outputs equal the generator's own backward simulation to step k from the same noise) on its share of the rows."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SiD(teacher, SiDConfig(fake_per_step=True, train_steps=4, plan_steps=(1, 2, 4)))
    assert len(recipe.fakes) == 4 and len({id(f.model) for f in recipe.fakes}) == 4
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    torch.manual_seed(3)
    outputs = recipe._trajectory(batch)
    plan = recipe.generator.plans[4]
    for k in range(4):
        torch.manual_seed(3)
        with torch.no_grad():
            _, _, x0_k = recipe.generator.sample(batch.cond, torch.randn_like(batch.x0), plan, k)
        torch.testing.assert_close(outputs[k], x0_k)
    pairs: list[tuple[torch.Tensor, Any]] = []
    real_loss = sid_module.fake_score_loss
    monkeypatch.setattr(
        sid_module, "fake_score_loss", lambda x0, t, s, f, **kw: pairs.append((x0, f)) or real_loss(x0, t, s, f, **kw)
    )
    torch.manual_seed(3)
    recipe.fake_loss(batch)
    x, t = torch.randn(1, 1, 8, 8), torch.full((1,), 0.6)
    assert len(pairs) == 4
    for k, (x0, f) in enumerate(pairs):  # fake k: step k's output on rows k, k + 4, ... (row k of 4 here)
        torch.testing.assert_close(x0, outputs[k][k : k + 1])
        with torch.no_grad():
            torch.testing.assert_close(f(x, t), recipe.fakes[k](x, t, batch.rows(slice(k, k + 1), 4).cond))


def test_sid_per_step_generator_loss_reads_its_steps_fake(random_digits: Path) -> None:
    """The generator loss of step k reads fake k: changing another step's fake leaves it, changing fake k moves it."""
    teacher, _ = load_denoiser(str(random_digits))
    recipe = SiD(teacher, SiDConfig(fake_per_step=True, train_steps=4, plan_steps=(1, 2, 4)))
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    plan = recipe.generator.plans[4]
    recipe.generator.draw = lambda choices=None, weights=None: (plan, 2)  # type: ignore[method-assign]

    def loss() -> float:
        torch.manual_seed(5)
        with torch.no_grad():
            return float(recipe.generator_loss(batch))

    base = loss()
    with torch.no_grad():
        for p in recipe.fakes[1].model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert loss() == base
    with torch.no_grad():
        for p in recipe.fakes[2].model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert loss() != base


def test_sid_per_step_fakes_refuse_the_gan_term(random_digits: Path) -> None:
    teacher, _ = load_denoiser(str(random_digits))
    with pytest.raises(FewstepError, match="fake_per_step"):
        SiD(teacher, SiDConfig(fake_per_step=True, adv_weight=0.01))


def test_sid_step_weights_share_the_generators_draws_among_the_steps(random_digits: Path) -> None:
    """``step_weights``: the generator's step k is drawn in proportion to them (here all on one step), and they must
    hold one weight per step of the trained plan."""
    teacher, _ = load_denoiser(str(random_digits))
    batch = DigitsBatches(null_class_of(teacher.model), batch_size=4)(0)
    for only in (0, 3):
        weights = tuple(float(k == only) for k in range(4))
        recipe = SiD(teacher, SiDConfig(fake_per_step=True, train_steps=4, step_weights=weights))
        torch.manual_seed(0)
        assert {recipe._sample(batch)[0] for _ in range(6)} == {only}
    for bad in ((1.0, 1.0), (0.0, 0.0, 0.0, 0.0)):
        with pytest.raises(FewstepError, match="step_weights"):
            SiD(teacher, SiDConfig(train_steps=4, step_weights=bad))
