"""``--data DIR``: captioned real images for text-to-image distillation, encoded by the teacher's own VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.distill import run_distill
from fewstep.errors import FewstepError
from fewstep.loading import load_denoiser
from fewstep.recipes.lcm import LCM, LCMConfig
from fewstep.training.config import merge_into
from fewstep.training.data import DataConfig, PromptBatches
from fewstep.training.image_data import read_captioned_images
from fewstep.training.text import encode_prompts

CAPTIONS = ["a red circle", "the blue square", "a green line", "the yellow dot"]


def _image(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))  # not square: it is cropped


@pytest.fixture
def sidecar_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        _image(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n")
    return folder


def test_both_layouts_give_the_same_pairs(sidecar_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "jsonl"
    folder.mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS):
        _image(i).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    a, b = read_captioned_images(sidecar_folder), read_captioned_images(folder)
    assert [c for _, c in a] == [c for _, c in b] == CAPTIONS
    assert [p.name for p, _ in a] == [p.name for p, _ in b]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: f.mkdir(), "holds no captioned images"),
        (lambda f: (f.mkdir(), _image(0).save(f / "a.png")), "has no caption"),
        (lambda f: (f.mkdir(), (f / "metadata.jsonl").write_text('{"file_name": "x.png", "prompt": "p"}\n')), "x.png"),
        (lambda f: (f.mkdir(), (f / "metadata.jsonl").write_text('{"prompt": "p"}\n')), "file_name"),
    ],
)
def test_bad_folders_are_one_line_errors(tmp_path: Path, setup, message: str) -> None:
    folder = tmp_path / "bad"
    setup(folder)
    with pytest.raises(FewstepError, match=message):
        read_captioned_images(folder)
    with pytest.raises(FewstepError, match="does not exist"):
        read_captioned_images(tmp_path / "missing")


@pytest.mark.parametrize("teacher", ["sd_folder", "sd3_folder"])
def test_x0_are_vae_draws_in_the_backbone_space_and_conds_the_captions(
    teacher: str, sidecar_folder: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = str(request.getfixturevalue(teacher))
    denoiser, pipe = load_denoiser(folder)
    cfg = DataConfig(images=str(sidecar_folder))
    batches = PromptBatches.for_teacher(pipe, denoiser, folder, cfg, batch_size=2, seed=0, cache_dir=tmp_path / "c")
    cond, _ = encode_prompts(pipe, CAPTIONS)
    for k, v in cond.items():
        torch.testing.assert_close(batches.cond[k], v)
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(
        [Image.open(sidecar_folder / f"{i}.png").convert("RGB") for i in range(4)],
        height=batches.x0.shape[-2] * pipe.vae_scale_factor, width=batches.x0.shape[-1] * pipe.vae_scale_factor,
        resize_mode="crop",
    )  # fmt: skip
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    # x0 = (z - shift) * scale with z ~ N(mean, std^2): standardised, the draws are standard normal
    z = (batches.x0 / scale + shift - posterior.mean) / posterior.std
    assert abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15
    again = PromptBatches.for_teacher(pipe, denoiser, folder, cfg, batch_size=2, seed=0, cache_dir=tmp_path / "c")
    assert torch.equal(again.x0, batches.x0)  # from the cache


def test_lcm_distills_from_real_images(sd_folder: Path, sidecar_folder: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    run = {"train": {"max_steps": 2, "batch_size": 2, "progress": False}, "data": {"images": str(sidecar_folder)}}
    student = run_distill(LCM, merge_into(LCMConfig(), run), teacher=str(sd_folder), output=tmp_path / "run")
    assert any(p.name.startswith("image-latents-") for p in (tmp_path / "run" / "cache").iterdir())
    pipe = DiffusionPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=CAPTIONS[:2], num_inference_steps=2, guidance_scale=1.0, output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
