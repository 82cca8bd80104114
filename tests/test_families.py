"""Every tiny pipeline family in ``families.py`` saves, reloads offline, samples and encodes prompts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from families import CALL_KWARGS, ENCODE_KWARGS, FAMILIES, VIDEO

PROMPTS = ["a red circle", "the blue square"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning threads turn
    30 ms calls into 1-2 s ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, Any]:
    """(name, the pipeline as built, the pipeline reloaded from its save_pretrained folder)."""
    from diffusers import DiffusionPipeline

    name = request.param
    pipe = FAMILIES[name]()
    folder = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(folder)
    reloaded = DiffusionPipeline.from_pretrained(folder)
    reloaded.set_progress_bar_config(disable=True)
    return name, pipe, reloaded


def test_reload_round_trips(family: tuple[str, Any, Any]) -> None:
    name, pipe, reloaded = family
    assert type(reloaded) is type(pipe), name
    for key, component in pipe.components.items():
        assert type(reloaded.components[key]) is type(component), key
        if isinstance(component, torch.nn.Module):
            expected, actual = component.state_dict(), reloaded.components[key].state_dict()
            assert expected.keys() == actual.keys(), key
            assert all(torch.equal(expected[k], actual[k]) for k in expected), key
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(reloaded.scheduler.config) == public(pipe.scheduler.config)


def test_call_gives_finite_output(family: tuple[str, Any, Any]) -> None:
    name, _, pipe = family
    kwargs = CALL_KWARGS[name]
    out = pipe(prompt=PROMPTS, num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0), **kwargs)
    if name in VIDEO:
        x = out.frames
        assert x.shape == (len(PROMPTS), kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])
    else:
        x = out.images
        assert x.shape == (len(PROMPTS), 3, kwargs["height"], kwargs["width"])
    assert torch.isfinite(x).all()


def test_encode_prompt_runs(family: tuple[str, Any, Any]) -> None:
    name, _, pipe = family
    with torch.no_grad():
        encoded = pipe.encode_prompt(PROMPTS, **ENCODE_KWARGS[name])
    assert isinstance(encoded, tuple)
    embeds = encoded[0]  # every family returns the positive prompt embeddings first
    assert embeds.shape[0] == len(PROMPTS) and embeds.ndim == 3
    assert all(t is None or torch.isfinite(t.float()).all() for t in encoded)
    if "max_sequence_length" in ENCODE_KWARGS[name]:
        assert embeds.shape[1] == ENCODE_KWARGS[name]["max_sequence_length"]


@pytest.mark.parametrize("name", ["sdxl", "pixart_alpha", "cogvideox"])
def test_default_size_is_tiny(name: str) -> None:
    """Where a pipeline takes its default size from the denoiser's config, the tiny config gives the tiny size."""
    pipe = FAMILIES[name]()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in CALL_KWARGS[name].items() if k not in ("height", "width", "num_frames")}
    out = pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="pt", **kwargs)
    x = out.frames if name in VIDEO else out.images
    expected = CALL_KWARGS[name]
    assert x.shape[-2:] == (expected["height"], expected["width"])
    if name in VIDEO:
        assert x.shape[1] == expected["num_frames"]
