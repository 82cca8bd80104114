"""The smooth time embedding: channel frequencies read off diffusers' own sinusoids, columns removed on every
backbone, the student's time path then free of fast channels, and training that keeps them removed."""

from __future__ import annotations

import math

import torch
from conftest import TinyModel

from fewstep.time_embedding import smooth_time_embedding, time_input_layers


def _timestep_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Timesteps"]


def test_channel_frequencies_match_diffusers_sinusoids(tiny: TinyModel) -> None:
    """For each (sin, cos) pair at frequency w, |d/dt emb| over the pair is exactly w: jvp of diffusers' own module."""
    model = tiny.build()
    layers = time_input_layers(model)
    assert layers, f"{tiny.name}: no time embedding found"
    from fewstep.time_embedding import channel_frequencies

    for proj in _timestep_modules(model):
        freqs = channel_frequencies(proj)
        half = proj.num_channels // 2
        t = torch.tensor([317.25], dtype=torch.float64)
        emb, emb_dot = torch.func.jvp(lambda t, proj=proj: proj(t).double(), (t,), (torch.ones_like(t),))
        pair_speed = (emb_dot[0, :half] ** 2 + emb_dot[0, half : 2 * half] ** 2).sqrt()
        torch.testing.assert_close(pair_speed, freqs[:half], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(freqs[:half], freqs[half : 2 * half])


def test_removed_columns_are_the_fast_ones_on_every_backbone(tiny: TinyModel) -> None:
    model = tiny.build()
    max_freq = 0.1
    expected = sum(int((freqs > max_freq).sum()) for _, freqs in time_input_layers(model))
    assert expected > 0
    assert smooth_time_embedding(model, max_freq) == expected
    for linear, freqs in time_input_layers(model):
        assert torch.all(linear.weight[:, freqs > max_freq] == 0)
        assert torch.all(linear.weight[:, freqs <= max_freq].abs().sum(0) > 0)  # the slow ones are kept


def test_smoothed_time_mlp_sees_only_slow_channels() -> None:
    """After smoothing, the time MLP's first layer gives the same output for embeddings that differ only in fast
    channels: its output's derivative in t is bounded by max_freq times the weights, however fast the original."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.time_proj = Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=1)
    parent.timestep_embedder = TimestepEmbedding(64, 16)
    linear = parent.timestep_embedder.linear_1
    smooth_time_embedding(parent, max_freq=0.05)

    def h(t: torch.Tensor) -> torch.Tensor:
        return linear(parent.time_proj(t))

    t = torch.tensor([500.0])
    _, h_dot = torch.func.jvp(h, (t,), (torch.ones_like(t),))
    bound = 0.05 * linear.weight.abs().sum(1)
    assert torch.all(h_dot.abs()[0] <= bound + 1e-6)
    assert float(h_dot.detach().abs().max()) > 0  # still depends on time


def _smoothed_time_mlp() -> tuple[torch.nn.Module, torch.nn.Linear, torch.Tensor]:
    """(a parent with a 32-channel sinusoid and its time MLP, smoothed at exp(-3); its first linear; the columns'
    frequencies)."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.time_proj = Timesteps(32, flip_sin_to_cos=False, downscale_freq_shift=0)
    parent.timestep_embedder = TimestepEmbedding(32, 8)
    smooth_time_embedding(parent, max_freq=math.exp(-3))
    ((linear, freqs),) = time_input_layers(parent)
    return parent, linear, freqs


def test_removed_columns_stay_zero_through_training() -> None:
    parent, linear, freqs = _smoothed_time_mlp()
    opt = torch.optim.AdamW(parent.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        out = parent.timestep_embedder(parent.time_proj(torch.rand(4) * 1000))
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.all(linear.weight[:, freqs > math.exp(-3)] == 0)
    assert torch.all(linear.weight[:, freqs <= math.exp(-3)] != 0)


def test_flux_guidance_embedding_is_left_alone() -> None:
    """Flux embeds guidance through the same sinusoid module; only the timestep's MLP is smoothed."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    embedder = model.time_text_embed
    guidance_before = embedder.guidance_embedder.linear_1.weight.detach().clone()
    assert smooth_time_embedding(model, 0.1) > 0
    assert torch.equal(guidance_before, embedder.guidance_embedder.linear_1.weight)
    assert torch.any(embedder.timestep_embedder.linear_1.weight == 0)


def test_time_embedding_mask_survives_a_replaced_parameter() -> None:
    """FSDP2 and replicate train other tensors than the Parameter a gradient hook was put on; the removed time
    channels must stay out of training anyway (they trained again on two processes before the mask moved to the
    layer's input)."""
    parent, linear, freqs = _smoothed_time_mlp()
    linear.weight = torch.nn.Parameter(linear.weight.detach().clone())  # what an engine does to a module's parameters
    out = parent.timestep_embedder(parent.time_proj(torch.rand(4) * 1000))
    out.square().mean().backward()
    assert linear.weight.grad is not None
    assert torch.all(linear.weight.grad[:, freqs > math.exp(-3)] == 0)
    assert torch.any(linear.weight.grad[:, freqs <= math.exp(-3)] != 0)
