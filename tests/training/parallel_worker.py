"""Run under ``torchrun`` by test_parallel.py (and imported by it for the one-process side of each comparison).

``recipes OUT --recipes a,b --modes ddp,fsdp --steps N --batch B``: each recipe trained on the digits teacher in
each mode, one after another in the same processes; rank 0 writes OUT/<recipe>-<mode>.pt with the loss history and
the student's full weights (its EMA where it has one).
``jvp OUT``: sCM's dF/dt through a tiny DiT and a tiny UNet2DConditionModel, sharded with FSDP2 and whole.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

# a few steps of each recipe that reach every loss it has: rCM's DMD term and critic, Phased DMD's second phase
SETS: dict[str, list[str]] = {
    "rcm": ["dmd_start=3", "student_update_freq=2"],
    "phased_dmd": ["phase_steps=5", "fake_steps=2"],
}


def train_digits(recipe: str, steps: int, batch: int, run_dir: Path, processes: Any) -> dict[str, Any]:
    """``recipe`` on the digits teacher for ``steps`` steps of global batch ``batch`` under ``processes``; returns
    {"history": losses per step, "weights": the student's full weights (on the first process)}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fewstep.distill import _setup, training_data
    from fewstep.recipes import resolve
    from fewstep.training.config import find_preset, presets_dir, resolve_config
    from fewstep.training.trainer import Trainer

    cls = resolve(recipe)
    preset = find_preset(recipe, "digits") if (presets_dir() / recipe / "digits.toml").is_file() else None
    sets = [
        *SETS.get(recipe, []), f"train.max_steps={steps}", f"train.batch_size={batch}", "train.progress=false",
        "train.checkpoint_every=1000000", "train.max_minutes=1000.0",
    ]  # fmt: skip
    cfg = resolve_config(cls.Config(), preset, None, sets)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, parallel=processes.mode))
    denoiser, pipe, r = _setup(cls, cfg, "digits")
    data = training_data(pipe, denoiser, "digits", cfg, run_dir / "cache")
    trainer = Trainer(r, cfg.train, run_dir, data, processes=processes)
    trainer.fit()
    student = trainer.ema.get("student") or trainer.nets["student"]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(student, options=options)
    return {"history": trainer.history, "weights": weights}


def recipes(args: argparse.Namespace) -> None:
    from fewstep.training.parallel import Processes

    first = Processes.start("ddp")
    for recipe in args.recipes.split(","):
        for mode in args.modes.split(","):
            processes = dataclasses.replace(first, mode=mode, managed=[])
            result = train_digits(recipe, args.steps, args.batch, args.out / f"run-{recipe}-{mode}", processes)
            if processes.is_main:
                torch.save(result, args.out / f"{recipe}-{mode}.pt")
            processes.barrier()
    first.finish()


def jvp(args: argparse.Namespace) -> None:
    """dF/dt of each tiny backbone, sharded (FSDP2) and whole, through fewstep's directional_derivative."""
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    from fewstep.objectives.tangent import directional_derivative
    from fewstep.training.parallel import Processes

    processes = Processes.start("fsdp")
    torch.manual_seed(0)
    models = {
        "dit": (
            DiTTransformer2DModel(
                num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=2, num_layers=2,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4,
            ),
            (2, 8, 8), lambda n: {"class_labels": torch.arange(n) % 10},
        ),
        "unet": (
            UNet2DConditionModel(
                sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, norm_num_groups=4,
                attention_head_dim=2,
            ),
            (2, 8, 8), lambda n: {"encoder_hidden_states": torch.randn(n, 3, 8)},
        ),
    }  # fmt: skip
    out: dict[str, Any] = {}
    for name, (model, shape, cond_of) in models.items():
        model.eval()
        whole = copy.deepcopy(model)
        processes.apply([model])
        x, t = torch.randn(4, *shape), torch.rand(4) * 900 + 50
        x_dot, t_dot = torch.randn_like(x), torch.randn_like(t)
        cond = cond_of(4)

        def call(net: Any, cond: dict[str, Any] = cond) -> Any:
            return lambda a, s: net(a, s, **cond).sample

        with torch.no_grad():
            _, sharded, method = directional_derivative(call(model), (x, t), (x_dot, t_dot), "jvp")
            _, reference, _ = directional_derivative(call(whole), (x, t), (x_dot, t_dot), "jvp")
        out[name] = {"sharded": sharded, "whole": reference, "method": method}
        processes.managed.clear()
    if processes.is_main:
        torch.save(out, args.out / "jvp.pt")
    processes.finish()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("recipes")
    p.add_argument("out", type=Path)
    p.add_argument("--recipes", required=True)
    p.add_argument("--modes", default="ddp,fsdp")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p = sub.add_parser("jvp")
    p.add_argument("out", type=Path)
    args = parser.parse_args()
    {"recipes": recipes, "jvp": jvp}[args.what](args)


if __name__ == "__main__":
    main()
