"""The Trainer on a toy two-network recipe: exact resume, isolated losses, NaN guard, damaged checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.recipes.base import OptimizerSpec, Recipe
from fewstep.training.checkpoint import list_checkpoints, load_checkpoint
from fewstep.training.trainer import DataStream, TrainConfig, Trainer, ema_decay_at


class Toy(Recipe):
    """A student regresses y from noisy x and is pushed by a critic; the critic steps every step, the student every
    other one; a recipe-owned EMA target is updated in after_step (like LCM's target network)."""

    name = "toy"

    def __init__(self, nan_from: int | None = None, noise: bool = True):
        torch.manual_seed(123)
        self.student, self.critic = nn.Linear(4, 4), nn.Linear(4, 1)
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self.nan_from, self.noise = nan_from, noise

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student, "critic": self.critic}

    def optimizer(self, name: str) -> OptimizerSpec:
        return OptimizerSpec(lr=1e-2)

    def loss(self, batch, step):
        x, y = batch
        if self.noise:
            x = x + 0.1 * torch.randn_like(x)  # the global RNG: a resume must restore it
        pred = self.student(x)
        out = {"critic": ((self.critic(pred.detach()) - 1) ** 2).mean()}
        if step % 2 == 0:
            out["student"] = ((pred - y) ** 2).mean() + self.critic(pred).mean()  # also reaches the critic's weights
        if self.nan_from is not None and step >= self.nan_from:
            out["critic"] = out["critic"] * float("nan")
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        for p_t, p in zip(self.target.parameters(), self.student.parameters(), strict=True):
            p_t.lerp_(p, 0.5)

    def state_dict(self):
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state) -> None:
        self.target.load_state_dict(state["target"])


def data(batch_size: int = 8) -> DataStream:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g)
    return DataStream([x, x.flip(1)], batch_size=batch_size, seed=1)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": 8, "batch_size": 8, "checkpoint_every": 4, "progress": False, **kw})


def weights(trainer: Trainer) -> list[torch.Tensor]:
    nets = [*trainer.nets.values(), *trainer.ema.values(), trainer.recipe.target]
    return [p.detach().clone() for net in nets for p in net.state_dict().values()]


def test_resume_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    full = Trainer(Toy(), cfg(), tmp_path / "full", data().batch)
    start = weights(full)
    history = full.fit()
    assert len(history) == 8 and not any(torch.equal(a, b) for a, b in zip(start, weights(full), strict=True))
    first = Trainer(Toy(), cfg(max_steps=4), tmp_path / "split", data().batch)
    first.fit()
    second = Trainer(Toy(), cfg(), tmp_path / "split", data().batch)
    second.resume()
    assert second.step == 4
    assert second.fit() == history  # the same loss sequence, float for float
    for a, b in zip(weights(full), weights(second), strict=True):
        assert torch.equal(a, b)


def test_each_loss_updates_only_its_network(tmp_path: Path) -> None:
    """A student loss that runs through the critic moves the student and leaves the critic alone."""
    trainer = Trainer(Toy(noise=False), cfg(), tmp_path, data().batch)
    critic = [p.detach().clone() for p in trainer.nets["critic"].parameters()]
    student = [p.detach().clone() for p in trainer.nets["student"].parameters()]
    toy = trainer.recipe
    toy.loss = lambda batch, step: {  # type: ignore
        "student": toy.critic(toy.student(batch[0])).mean(),
        "critic": 0 * toy.critic.weight.sum(),  # the critic steps too, with a zero gradient of its own
    }
    trainer.train_step()
    assert all(torch.equal(a, b) for a, b in zip(critic, trainer.nets["critic"].parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(student, trainer.nets["student"].parameters(), strict=True))


def test_ema_is_kept_apart_from_trained_weights(tmp_path: Path) -> None:
    trainer = Trainer(Toy(), cfg(max_steps=3, ema_decay=0.9), tmp_path, data().batch)
    start = [p.detach().clone() for p in trainer.nets["student"].parameters()]
    trainer.fit()
    live = list(trainer.nets["student"].parameters())
    ema = list(trainer.ema["student"].parameters())
    assert not any(p.requires_grad for p in ema)
    assert all(not torch.equal(e, p) and not torch.equal(e, s) for e, p, s in zip(ema, live, start, strict=True))


def test_ema_is_the_bias_corrected_average_of_the_trained_weights(tmp_path: Path) -> None:
    d = 0.9
    trainer = Trainer(Toy(), cfg(max_steps=5, ema_decay=d), tmp_path, data().batch)
    history = []
    for _ in range(5):
        trainer.train_step()
        trainer.step += 1
        history.append([p.detach().clone() for p in trainer.nets["student"].parameters()])
    n = len(history)
    w = torch.tensor([d ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
    for j, e in enumerate(trainer.ema["student"].parameters()):
        expected = sum(wi * h[j].double() for wi, h in zip(w, history, strict=True)) / w.sum()
        torch.testing.assert_close(e.double(), expected, rtol=1e-5, atol=1e-6)


def test_ema_decay_at_copies_first_then_tends_to_the_decay() -> None:
    assert ema_decay_at(0.99, 1) == 0.0
    assert ema_decay_at(0.99, 2) == pytest.approx(0.99 / 1.99)
    assert ema_decay_at(0.99, 10_000) == pytest.approx(0.99)


def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    whole = Trainer(Toy(noise=False), cfg(max_steps=3), tmp_path / "a", data(8).batch)
    halves = Trainer(Toy(noise=False), cfg(max_steps=3, grad_accum=2), tmp_path / "b", data(4).batch)
    start = weights(whole)
    whole.fit()
    halves.fit()
    assert not torch.equal(start[0], weights(whole)[0])  # it trained
    for a, b in zip(weights(whole), weights(halves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Turns(Toy):
    """The critic steps first; the student's loss then reads the stepped critic (SiD's order)."""

    def __init__(self) -> None:
        super().__init__(noise=False)
        self.seen: list[list[torch.Tensor]] = []

    def turns(self, batch, step):
        x, y = batch
        pred = self.student(x)
        yield {"critic": ((self.critic(pred.detach()) - 1) ** 2).mean()}
        self.seen.append([p.detach().clone() for p in self.critic.parameters()])
        yield {"student": ((pred - y) ** 2).mean() + self.critic(pred).mean()}


def test_a_later_turn_sees_the_networks_an_earlier_turn_stepped(tmp_path: Path) -> None:
    recipe = Turns()
    before = [p.detach().clone() for p in recipe.critic.parameters()]
    trainer = Trainer(recipe, cfg(max_steps=1), tmp_path / "a", data(8).batch)
    trainer.fit()
    after = list(recipe.critic.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the critic stepped...
    assert all(torch.equal(s, a) for s, a in zip(recipe.seen[0], after, strict=True))  # ...before the student's turn
    assert set(trainer.history[0]) == {"step", "critic", "student"}
    # turns over micro-batches: each turn accumulates over all of them before its step
    whole = Trainer(Turns(), cfg(max_steps=3), tmp_path / "b", data(8).batch)
    halves = Trainer(Turns(), cfg(max_steps=3, grad_accum=2), tmp_path / "c", data(4).batch)
    whole.fit()
    halves.fit()
    for a, b in zip(weights(whole), weights(halves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path: Path) -> None:
    trainer = Trainer(Toy(nan_from=2), cfg(max_steps=20, nan_patience=3), tmp_path, data().batch)
    with pytest.raises(FewstepError, match="3 non-finite losses or gradients in a row"):
        trainer.fit()
    assert trainer.skipped == 3 and [h["step"] for h in trainer.history] == [0, 1]


def test_damaged_checkpoint_is_a_clear_error_and_the_good_one_stays(tmp_path: Path) -> None:
    Trainer(Toy(), cfg(max_steps=8, checkpoint_every=2, keep_checkpoints=2), tmp_path, data().batch).fit()
    good, newest = list_checkpoints(tmp_path)
    blob = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(blob[: len(blob) // 2])  # torn write
    with pytest.raises(FewstepError, match="damaged.*last good one is .*step-00000006"):
        Trainer(Toy(), cfg(), tmp_path, data().batch).resume()
    assert load_checkpoint(tmp_path, good)[0] == good  # untouched, still verifies
    assert (newest / "state.pt").exists()  # nothing deleted


def test_wall_time_budget_stops_and_checkpoints(tmp_path: Path) -> None:
    trainer = Trainer(Toy(), cfg(max_steps=100, max_minutes=0.0), tmp_path, data().batch)
    trainer.fit()
    assert trainer.step == 1 and [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]


def test_data_stream_is_a_function_of_the_index() -> None:
    stream = data(batch_size=5)
    first_epoch = torch.cat([stream.batch(i)[0] for i in range(4)])  # 20 samples
    assert torch.equal(first_epoch.sort(0).values, stream.tensors[0].sort(0).values)
    assert torch.equal(data(batch_size=5).batch(7)[0], stream.batch(7)[0])


class StagedRate(Toy):
    """The student's rate triples from step 4 on (a stage's own rate), the critic's stays as built."""

    def lr_scale(self, name: str, step: int) -> float:
        return 3.0 if name == "student" and step >= 4 else 1.0


def test_a_recipes_rate_multiplier_sets_its_networks_rate_on_top_of_the_schedule(tmp_path: Path) -> None:
    trainer = Trainer(StagedRate(), cfg(max_steps=8, lr_decay="cosine"), tmp_path, data().batch)
    base = trainer.base_lr["student"][0]
    seen = []
    for _ in range(8):  # the student steps on even steps
        trainer.train_step()
        if trainer.step % 2 == 0:
            seen.append(trainer.optimizers["student"].param_groups[0]["lr"] / base)
        trainer.step += 1
    cosine = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in (0, 2, 4, 6)]
    assert seen == pytest.approx([cosine[0], cosine[1], 3 * cosine[2], 3 * cosine[3]])
    assert trainer.optimizers["critic"].param_groups[0]["lr"] / base == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8))
    )


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero(tmp_path: Path) -> None:
    trainer = Trainer(Toy(), cfg(max_steps=10, lr_warmup_steps=2, lr_decay="cosine"), tmp_path, data().batch)
    base = trainer.base_lr["critic"][0]
    seen = []
    for _ in range(10):  # the critic steps on every trainer step
        trainer.train_step()
        seen.append(trainer.optimizers["critic"].param_groups[0]["lr"] / base)  # the lr of the step just taken
        trainer.step += 1
    assert seen == pytest.approx([0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    # the student steps every other step, at the lr of the trainer's step (not of its own step count)
    assert trainer.optimizers["student"].param_groups[0]["lr"] / base == pytest.approx(seen[8])
