"""The model card of an exported student: README.md with YAML metadata, as diffusers models on a hub carry it.

It says what the folder is (recipe, paper, teacher), how to sample it (the plan per step count, the scheduler, a
usage snippet that runs as written) and, when a bench ran, its rows next to the teacher's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_file


def _yaml_list(name: str, items: Sequence[str]) -> list[str]:
    return [f"{name}:", *(f"- {json.dumps(item)}" for item in items)]


# the embedded worlds' pipelines (fewstep's own classes, conditioned on classes, not prompts)
EMBEDDED_PIPELINES = ("DigitsPipeline", "VideoDigitsPipeline")


def usage(
    folder: str,
    teacher: str,
    scheduler: str,
    lora: bool,
    steps: int,
    needs_fewstep: bool,
    pipeline: str = "",
    peft: bool = False,
    slot: str = "transformer",
    video: bool = False,
    eta: float | None = None,
) -> str:
    """A snippet that samples the student as exported (importing fewstep first when a component is fewstep's;
    SanaSprintPipeline takes intermediate_timesteps only for 2 steps; guidance embedded where the pipeline embeds
    it; ``eta`` passed where the scheduler takes it at call time, as TCDScheduler does)."""
    if pipeline in EMBEDDED_PIPELINES:  # fewstep's own worlds: class-conditional, loaded by fewstep
        out = "frames" if video else "images"
        return "\n".join([
            "from fewstep.loading import load_pipeline",
            "",
            f"pipe = load_pipeline({json.dumps(folder)})  # the student{' (base, adapter merged)' if lora else ''}"
            " and its scheduler",
            f"{out} = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={steps}).{out}",
        ])  # fmt: skip
    lines = ["from diffusers import DiffusionPipeline"]
    if needs_fewstep and not lora:
        lines.append("import fewstep  # noqa: F401  (registers fewstep's components with diffusers)")
    if not lora:
        lines.append(f"pipe = DiffusionPipeline.from_pretrained({json.dumps(folder)})")
    else:
        source = "fewstep" if scheduler == "FewStepScheduler" else "diffusers"
        lines += [f"from {source} import {scheduler}"]
        if peft:  # no diffusers LoRA loader for this pipeline: peft's adapter on its backbone
            lines += ["from peft import PeftModel"]
        lines += ["", f"pipe = DiffusionPipeline.from_pretrained({json.dumps(teacher)})"]
        if peft:
            lines += [f"pipe.{slot} = PeftModel.from_pretrained(pipe.{slot}, {json.dumps(folder)})"]
        else:
            lines += [f"pipe.load_lora_weights({json.dumps(folder)})"]
        lines += [f'pipe.scheduler = {scheduler}.from_pretrained({json.dumps(folder)}, subfolder="scheduler")']
    # no CFG for a few-step student; FLUX.1-dev and SANA-Sprint embed their guidance_scale instead: keep the default
    extra = "" if pipeline in ("FluxPipeline", "SanaSprintPipeline") else ", guidance_scale=1.0"
    if pipeline == "SanaSprintPipeline" and steps != 2:
        extra += ", intermediate_timesteps=None"
    if eta is not None:
        extra += f", eta={eta:g}"
    out = "frames" if video else "images"
    lines.append(f'{out} = pipe(prompt="a photo of a cat", num_inference_steps={steps}{extra}).{out}')
    return "\n".join(lines)


def model_card(
    *, recipe: str, paper: str, teacher: str, pipeline: str, plans: Mapping[int, Sequence[float]], scheduler: str,
    lora: bool, folder: str, needs_fewstep: bool, bench_rows: Sequence[Mapping[str, Any]] = (),
    slot: str = "transformer", video: bool = False, gammas: Mapping[int, float] | None = None,
) -> str:  # fmt: skip
    """The README.md text of an exported student (``gammas``: each plan's re-noising gamma, TCD's eta)."""
    tags = ["fewstep", f"fewstep-{recipe}", "few-step", *(["lora"] if lora else [])]
    meta = ["---", "library_name: diffusers", f"base_model: {json.dumps(teacher)}", *_yaml_list("tags", tags)]
    meta += [f"pipeline_tag: {'text-to-video' if video else 'text-to-image'}"]
    meta += ["---", ""]
    steps = sorted(plans)
    body = [
        f"# {recipe} student of {teacher}",
        "",
        f"Distilled with fewstep's recipe `{recipe}` ({paper}) from `{teacher}`"
        f" ({pipeline}){', as a LoRA' if lora else ''}. It samples in {', '.join(map(str, steps))} steps with"
        f" `{scheduler}`.",
        "",
        *_plan_table(plans, gammas),
        "",
        "## Usage",
        "",
        "```python",
        usage(
            folder,
            teacher,
            scheduler,
            lora,
            steps[-1],
            needs_fewstep,
            pipeline,
            (Path(folder) / "adapter_config.json").is_file(),
            slot,
            video,
            gammas[steps[-1]] if scheduler == "TCDScheduler" and gammas else None,
        ),
        "```",
    ]
    if scheduler == "TCDScheduler" and gammas:
        body += ["", "TCDScheduler takes its eta at call time: pass the table's gamma for the step count as `eta`."]
    if needs_fewstep:
        body += ["", "A component of this folder is fewstep's own (FewStepScheduler or TimestepExperts): `pip install"
                 " fewstep` before loading it."]  # fmt: skip
    if bench_rows:
        body += ["", *bench_section(bench_rows)]
    return "\n".join(meta + body) + "\n"


def _plan_table(plans: Mapping[int, Sequence[float]], gammas: Mapping[int, float] | None) -> list[str]:
    """One row per step count: its evaluation times and, where given, its re-noising gamma (TCD's eta: 0 is DDIM,
    1 fresh noise; the value to pass as ``eta`` where the scheduler takes it at call time, as TCDScheduler does)."""
    steps = sorted(plans)
    times = {n: ", ".join(f"{t:.6g}" for t in plans[n]) for n in steps}
    if not gammas:
        head = ["| steps | evaluation times (the teacher's own time units) |", "|---:|---|"]
        return head + [f"| {n} | {times[n]} |" for n in steps]
    head = ["| steps | evaluation times (the teacher's own time units) | gamma (TCD's eta) |", "|---:|---|---:|"]
    return head + [f"| {n} | {times[n]} | {gammas[n]:g} |" for n in steps]


# the bench columns a card shows, where any row has a value: digits (FID vs train, accuracy), text-to-image (CLIP
# score, patch-FID), both (FID)
BENCH_COLUMNS = (
    ("model", "model"), ("steps", "steps"), ("nfe", "NFE"), ("guidance", "w"), ("fid", "FID"),
    ("fid_train", "FID (train)"), ("accuracy", "accuracy"), ("clip_score", "CLIP score"), ("patch_fid", "patch FID"),
    ("latency_ms_per_image", "ms / image"),
)  # fmt: skip


def bench_section(rows: Sequence[Mapping[str, Any]], protocol: str | None = None) -> list[str]:
    """The card's "## Bench" section: one line per report row, the columns some row fills."""
    columns = [(k, name) for k, name in BENCH_COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["## Bench", ""]
    if protocol:
        lines += [f"Protocol `{protocol}` (report.json records its settings).", ""]
    lines += ["| " + " | ".join(n for _, n in columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [row.get(k) for k, _ in columns]
        lines.append(
            "| "
            + " | ".join("" if c is None else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells)
            + " |"
        )
    return lines


def add_bench_rows(folder: Path, rows: Sequence[Mapping[str, Any]], protocol: str | None = None) -> bool:
    """Put ``rows`` (a bench report's rows of this model) into ``folder``'s fewstep model card, replacing an earlier
    bench section; False (nothing written) when the folder has no fewstep card."""
    path = Path(folder) / "README.md"
    if not rows or not path.is_file():
        return False
    text = path.read_text()
    if '- "fewstep"' not in text.split("---\n", 2)[1 if text.startswith("---") else 0]:
        return False
    body = text.split("\n## Bench\n")[0].rstrip("\n")
    with atomic_file(path) as tmp:
        tmp.write_text(body + "\n\n" + "\n".join(bench_section(rows, protocol)) + "\n")
    return True


def write_model_card(folder: Path, **kwargs: Any) -> Path:
    """Write (or rewrite) ``folder/README.md`` atomically."""
    path = Path(folder) / "README.md"
    with atomic_file(path) as tmp:
        tmp.write_text(model_card(folder=str(folder), **kwargs))
    return path
