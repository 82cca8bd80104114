"""Named text-to-image bench protocols (bench/protocol.py): DMD2's COCO evaluator and the MJHQ-style default."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.bench.protocol import center_crop_resize, get_protocol
from fewstep.bench.run import BenchConfig, run_bench
from fewstep.bench.worlds import TextOptions, TextWorld
from fewstep.errors import FewstepError

pytest.importorskip("open_clip")


def test_center_crop_keeps_the_middle_square_then_resizes() -> None:
    """A 30 x 20 image whose middle 20 x 20 is one color and whose side bands another: the crop keeps only the
    middle (squashing would mix the bands in), and LANCZOS keeps a constant image constant."""
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, 5:25] = (200, 40, 10)
    out = center_crop_resize(10)(Image.fromarray(rgb))
    assert out.size == (10, 10) and (np.asarray(out) == (200, 40, 10)).all()
    assert center_crop_resize(None)(Image.fromarray(rgb)).size == (20, 20)


def dmd2_tokens(tokenizer: Any, caption: str) -> torch.Tensor:
    """DMD2's token surgery (coco_evaluator.compute_clip_score), restated: the caption's tokens (truncated, EOT last),
    "A photo depicts " spliced in after the start token, cut to 77 with EOT forced into the last non-pad slot."""
    tokens = tokenizer([caption])
    prefix = tokenizer(["A photo depicts "])[:, 1:4]
    joined = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)[:, :77]
    last = joined[:, 76:77].clone()
    last[last > 0] = 49407
    return torch.cat([joined[:, :76], last], dim=1)


def test_prompt_template_is_dmd2s_token_surgery(tiny_clip_spec: str) -> None:
    """Prefixing the text gives exactly DMD2's tokens, for a short caption and for one past the context length."""
    from fewstep.bench.clip import ClipScorer

    scorer = ClipScorer.load(tiny_clip_spec)
    for caption in ["a red bus parked by the road", " ".join(["giraffe"] * 90)]:
        torch.testing.assert_close(
            scorer.tokenizer(["A photo depicts " + caption]), dmd2_tokens(scorer.tokenizer, caption)
        )
    images = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    captions = ["a cat", "two dogs"]
    scorer.template, scorer.definition, scorer.image_side = "A photo depicts ", "cos", 256
    with torch.no_grad():
        img = scorer.model.encode_image(scorer.preprocess(images))
        txt = scorer.model.encode_text(torch.cat([dmd2_tokens(scorer.tokenizer, c) for c in captions]))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean()
    assert scorer(images, captions) == pytest.approx(float(expected), abs=1e-6)  # the mean cosine, no 100x, no clamp


def test_bad_protocol_choices_are_one_line_errors() -> None:
    with pytest.raises(FewstepError, match="unknown bench protocol"):
        get_protocol("coco")
    with pytest.raises(FewstepError, match="drop --fid-resolution"):
        get_protocol("mjhq", 256)
    assert get_protocol("coco-dmd2", 256).fid_resolution == 256 and get_protocol("coco-dmd2").fid_resolution == 512


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local TorchScript feature network (a stand-in for Inception)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path_factory.mktemp("features") / "features.pt"
    torch.jit.script(net).save(str(path))
    return path


def test_generated_equal_to_references_scores_zero_fid_and_patch_fid(features: Path, tmp_path: Path) -> None:
    """The identity behind both FIDs of coco-dmd2: a pipeline whose images are the reference images (300 px, so a
    299 px patch exists) scores ~0 on both, through the same crop as the references."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (300, 300, 3), dtype=np.uint8) for _ in range(8)]
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(ref / f"{i}.png")
    stack = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])

    def pipe(prompt: list[str], **_: Any) -> Any:
        return SimpleNamespace(images=stack[: len(prompt)])

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\n")
    options = TextOptions(str(prompts), None, str(ref), str(features), "coco-dmd2", 64)
    world = TextWorld.load(pipe, options)
    assert world.resolution == (300, 300) and world.patch_fid is not None
    scored = world.score(pipe, 8, 1, 1.0, 0, 8)
    assert abs(scored.metrics["fid"]) < 1e-2 and abs(scored.metrics["patch_fid"]) < 1e-2
    shifted = SimpleNamespace(images=stack * 0.5)  # other content: the FID moves
    assert world.score(lambda prompt, **_: shifted, 8, 1, 1.0, 0, 8).metrics["patch_fid"] > 1e-2


def test_coco_dmd2_bench_records_its_protocol(
    sd_folder: Path, features: Path, tiny_clip_spec: str, tmp_path: Path
) -> None:
    """Reference images of mixed sizes (COCO's) load through the center crop; report.json names the protocol, the
    prompt file's hash, the seeds and resolution; CLIP score is a cosine; no patch-FID below 299 px."""
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(20, 16), (16, 24), (32, 32), (24, 18)] * 2):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = BenchConfig(steps=(1,), num=4, seeds=2, batch_size=4, latency_batch=2, repeats=1, progress=False)
    text = TextOptions(str(prompts), tiny_clip_spec, str(ref), str(features), "coco-dmd2", 16)
    report = run_bench([str(sd_folder)], tmp_path / "report", cfg, text)
    protocol = report["reference"]["protocol"]
    assert protocol["name"] == "coco-dmd2" and protocol["fid_resolution"] == 16
    assert protocol["prompts_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    assert protocol["seeds"] == [0, 1] and protocol["resolution"] == [16, 16] and protocol["num_prompts"] == 2
    assert protocol["clip_template"] == "A photo depicts " and protocol["reference_clip"] == "OpenAI CLIP ViT-B/32"
    row = report["rows"][0]
    assert -1 <= row["clip_score"] <= 1 and isinstance(row["fid"], float) and row["patch_fid"] is None
    assert "Protocol coco-dmd2" in (tmp_path / "report" / "report.md").read_text()
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["reference"]["protocol"] == protocol


def test_a_seed_is_one_sample_set_with_a_stochastic_stock_scheduler(sd3_folder: Path, tmp_path: Path) -> None:
    """StableDiffusion3Pipeline passes no generator to scheduler.step, so FlowMatchEuler's stochastic_sampling draws
    from the global generator: the bench seeds that too, and the same seed scores the same images."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(sd3_folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    world = TextWorld(TextOptions(str(prompts)), ["a cat", "a dog"], get_protocol("mjhq"))
    a = world.score(pipe, 2, 2, 1.0, 0, 2).grid
    torch.manual_seed(123)  # whatever ran before
    b = world.score(pipe, 2, 2, 1.0, 0, 2).grid
    c = world.score(pipe, 2, 2, 1.0, 1, 2).grid
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
