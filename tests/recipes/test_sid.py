"""SiD's guidance against mingyuanzhou/SiD-LSG (training/sid_training_loop.py, run_sid.sh): the fake score is trained
at the guidance it is read at, long-short guidance (kappa1 = cfg_train_fake, kappa2 = kappa3 = cfg_eval_fake,
kappa4 = cfg_eval_real), and the presets that claim SiD-LSG's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fewstep.recipes.sid as sid_module
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
