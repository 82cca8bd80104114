"""Reward models (objectives/reward.py): the aesthetic head on CLIP image embeddings against its definition, its
gradient in x0, its one-line errors, and the VAE decoder it reads latents through against the pipelines' own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fewstep.errors import FewstepError
from fewstep.objectives.reward import load_reward

pytest.importorskip("open_clip")

# the LAION aesthetic predictor's layout (linear layers 0, 2, 4, 6, 7; dropouts between), at the tiny CLIP's width
WIDTHS = [(16, 32), (32, 8), (8, 4), (4, 2), (2, 1)]


def laion_head(path: Path, widths: list[tuple[int, int]] = WIDTHS, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), widths, strict=False):
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=gen)
    torch.save(state, path)
    return path


def test_aesthetic_reward_is_the_head_on_the_normalized_clip_embedding(tiny_clip_spec: str, tmp_path: Path) -> None:
    from fewstep.bench.clip import ClipScorer

    head = laion_head(tmp_path / "head.pt")
    reward = load_reward(f"aesthetic:{head}", tiny_clip_spec)
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1  # digits-like pixels in [-1, 1]
    scorer = ClipScorer.load(tiny_clip_spec)
    e = F.normalize(scorer.model.encode_image(scorer.preprocess(((x0 + 1) / 2).expand(-1, 3, -1, -1))), dim=-1)
    state = torch.load(head)
    for i in (0, 2, 4, 6, 7):  # no nonlinearity between the layers, as LAION's MLP
        e = e @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(reward(x0, {}), e.squeeze(-1), rtol=1e-5, atol=1e-6)


def test_gradient_ascent_on_x0_raises_the_aesthetic_reward(tiny_clip_spec: str, tmp_path: Path) -> None:
    reward = load_reward(f"aesthetic:{laion_head(tmp_path / 'head.pt')}", tiny_clip_spec)
    x0 = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    before = reward(x0, {}).detach()
    opt = torch.optim.Adam([x0], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        (-reward(x0, {}).mean()).backward()
        opt.step()
    assert reward(x0, {}).mean() > before.mean() + 1e-3


def test_bad_aesthetic_rewards_are_one_line_errors(tiny_clip_spec: str, tmp_path: Path) -> None:
    head = laion_head(tmp_path / "head.pt")
    cases: list[tuple[str, str, str]] = [
        (f"aesthetic:{tmp_path / 'none.pt'}", tiny_clip_spec, "does not exist"),
        (f"aesthetic:{head}", "", "reward_clip"),
        (f"aesthetic:{laion_head(tmp_path / 'wide.pt', [(768, 8), (8, 1)])}", tiny_clip_spec, "768-d embeddings"),
        (f"aesthetic:{laion_head(tmp_path / 'two.pt', [(16, 8), (8, 2)])}", tiny_clip_spec, "2 scores, not 1"),
        (f"aesthetic:{laion_head(tmp_path / 'gap.pt', [(16, 8), (4, 1)])}", tiny_clip_spec, "do not chain"),
    ]
    (tmp_path / "junk.pt").write_text("not a state dict")
    cases.append((f"aesthetic:{tmp_path / 'junk.pt'}", tiny_clip_spec, "does not load"))
    for spec, clip, message in cases:
        with pytest.raises(FewstepError, match=message) as err:
            load_reward(spec, clip)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_image_decoder_gives_the_pipelines_own_images(family: str) -> None:
    """The decoder the reward reads latents through equals the pipeline's own decode of the latents it returns
    (SD: z / scaling; SD3: z / scaling + shift), same seed, one step."""
    from conftest import tiny_sd3_pipeline, tiny_sd_pipeline

    from fewstep.training.families import image_decoder

    pipe: Any = (tiny_sd_pipeline if family == "sd" else tiny_sd3_pipeline)()
    pipe.set_progress_bar_config(disable=True)
    # the released VAEs' factors (the tiny ones are 1 and 0): SD's 0.18215, SD3's 1.5305 and 0.0609
    pipe.vae.register_to_config(**({"scaling_factor": 0.18215} if family == "sd" else
                                   {"scaling_factor": 1.5305, "shift_factor": 0.0609}))  # fmt: skip
    call = {"prompt": ["a red circle"], "num_inference_steps": 1, "guidance_scale": 1.0}
    out = {}
    for kind in ("latent", "pt"):
        torch.manual_seed(0)  # what the pipeline draws without the generator (SD3's)
        out[kind] = pipe(**call, generator=torch.Generator().manual_seed(0), output_type=kind).images
    latents, images = out["latent"], out["pt"]
    decode = image_decoder(pipe)
    assert decode is not None
    torch.testing.assert_close(decode(latents), images, rtol=1e-4, atol=1e-5)
    x0 = latents.clone().requires_grad_(True)
    decode(x0).sum().backward()  # differentiable in x0, the VAE frozen
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())
