"""CLIP score from a local open_clip checkpoint, and the text-to-image bench on a tiny Stable Diffusion pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.bench.run import BenchConfig, run_bench
from fewstep.bench.worlds import TextOptions
from fewstep.errors import FewstepError

pytest.importorskip("open_clip")


def test_clip_score_invariances(tiny_clip_spec: str) -> None:
    from fewstep.bench.clip import ClipScorer

    scorer = ClipScorer.load(tiny_clip_spec)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a dog", "the", "x", "yy", "a red car"]
    cos = scorer.cosine(images, prompts)
    assert cos.shape == (6,) and cos.abs().max() <= 1 + 1e-6
    assert scorer(images, prompts) == pytest.approx(float((100 * cos.clamp_min(0)).mean()))
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    torch.testing.assert_close(scorer.cosine(images[perm], [prompts[i] for i in perm]), cos[perm])
    scorer.batch_size = 4  # batching does not change the answer
    torch.testing.assert_close(scorer.cosine(images, prompts), cos, rtol=1e-5, atol=1e-6)
    again = ClipScorer.load(tiny_clip_spec)  # the checkpoint reproduces the model
    torch.testing.assert_close(again.cosine(images, prompts), cos)


@pytest.mark.parametrize("spec,match", [("ViT-B-32", "ARCH:CHECKPOINT"), ("ViT-B-32:/no/such.bin", "does not exist")])
def test_clip_bad_spec(spec: str, match: str) -> None:
    from fewstep.bench.clip import ClipScorer

    with pytest.raises(FewstepError, match=match):
        ClipScorer.load(spec)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of 12 'real' images and a TorchScript feature network (a stand-in for a local Inception)."""
    root = tmp_path_factory.mktemp("ref")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.jit.script(net).save(str(root / "features.pt"))
    return images, root / "features.pt"


def test_text_to_image_bench(
    sd_folder: Path, reference: tuple[Path, Path], tiny_clip_spec: str, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["the cat", "a dog", "red"]) + "\n")
    cfg = BenchConfig(steps=(1, 2), guidance=(2.0,), num=6, seeds=2, batch_size=6, latency_batch=3, repeats=1,
                      progress=False)  # fmt: skip
    text = TextOptions(str(prompts), tiny_clip_spec, str(reference[0]), str(reference[1]))
    report = run_bench([str(sd_folder)], tmp_path / "report", cfg, text)
    assert report["reference"]["real_fid_floor"] is None and report["reference"]["num_prompts"] == 3
    for row in report["rows"]:
        assert isinstance(row["clip_score"], float) and isinstance(row["fid"], float) and row["accuracy"] is None
        assert row["nfe"] == 2 * row["steps"]  # SD's batched CFG
        assert (tmp_path / "report" / row["grid"]).is_file()
    assert {"report.md", "quality_vs_nfe.png", "quality_vs_latency.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()
    }


def test_text_to_image_bench_needs_prompts(sd_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FewstepError, match="--prompts"):
        run_bench([str(sd_folder)], tmp_path / "r", BenchConfig(steps=(1,), num=2, seeds=1, progress=False))
    assert not (tmp_path / "r").exists()


def test_sample_text_to_image(sd_folder: Path, tmp_path: Path) -> None:
    from fewstep.cli import main

    out = tmp_path / "samples"
    assert main(["sample", str(sd_folder), "--prompt", "the cat", "--steps", "2", "--num", "3", "--guidance", "2",
                 "--output", str(out)]) == 0  # fmt: skip
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (3, 3, 16, 16) and (out / "grid.png").is_file()
    assert json.loads((out / "meta.json").read_text())["prompt"] == "the cat"
    assert main(["sample", str(sd_folder), "--output", str(tmp_path / "x")]) == 2  # a prompt is required


@torch.no_grad()
def test_lora_export_loads_with_load_lora_weights(sd_folder: Path, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    from fewstep.export.pipeline import export_lora

    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))  # fmt: skip
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 6, 32)
    adapted = pipe.unet(x, t, encoder_hidden_states=text).sample
    export_lora(pipe, pipe.unet, tmp_path / "lora")
    fresh = DiffusionPipeline.from_pretrained(sd_folder)
    base = fresh.unet(x, t, encoder_hidden_states=text).sample
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = fresh.unet(x, t, encoder_hidden_states=text).sample
    assert not torch.allclose(base, adapted)  # the adapter changes the network
    torch.testing.assert_close(loaded, adapted, rtol=1e-5, atol=1e-5)
