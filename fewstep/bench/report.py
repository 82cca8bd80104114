"""Bench reports: report.json (the data), report.md (a table people read) and PNG plots people look at. A row's runtime
settings away from the defaults (dtype, attention backend, torch.compile) follow its model's name, e.g.
"student [bf16, compiled]", in the table and in the plots' legends."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .runtime import runtime_tag


def _name(row: dict[str, Any]) -> str:
    """The model's label, with the row's runtime settings where they are not the defaults, and a dagger on rows
    measured on another machine (``bench.shipped``)."""
    tag = runtime_tag(row)
    name = f"{row['model']} [{tag}]" if tag else row["model"]
    return f"{name} \N{DAGGER}" if row.get("shipped") else name


def _shipped_note(rows: list[dict[str, Any]]) -> list[str]:
    """Where the rows marked with a dagger were measured, and how to measure them here."""
    notes = []
    for model, source, where in sorted({(r["model"], r["source"], r["shipped"]) for r in rows if r.get("shipped")}):
        steps = ",".join(str(n) for n in sorted({r["steps"] for r in rows if r["source"] == source}))
        notes.append(
            f"\N{DAGGER} {model}: not measured on this machine but shipped with fewstep (measured {where}); "
            f"`fewstep bench {source} --steps {steps} --report` into this folder measures them here in their place."
        )
    return notes


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by model, runtime settings and guidance, each sorted by NFE."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        name = _name(row) if row.get("guidance") in (None, 1.0) else f"{_name(row)} (w={row['guidance']:g})"
        groups[name].append(row)
    return {k: sorted(v, key=lambda r: r["nfe"]) for k, v in groups.items()}


def _second_metric(rows: list[dict[str, Any]]) -> tuple[str, float, str]:
    """Class accuracy (digits) or CLIP score (text-to-image) for the right-hand panel."""
    if any(r.get("accuracy") is not None for r in rows):
        return "accuracy", 100.0, "class accuracy (%)"
    return "clip_score", 1.0, "CLIP score"


def _plot_against(
    rows: list[dict[str, Any]], floor: float | None, x_key: str, x_label: str, path: Path, fid_name: str = "FID"
) -> None:
    import matplotlib.pyplot as plt

    key, scale, label = _second_metric(rows)
    fig, (ax_fid, ax_q) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in _series(rows).items():
        xs = [p[x_key] for p in pts]
        if all(p.get("fid") is not None for p in pts):
            fid_label = f"{name} vs held-out" if floor is not None else name
            bars = ax_fid.errorbar(
                xs, [p["fid"] for p in pts], yerr=[p["fid_std"] for p in pts], marker="o", capsize=3, label=fid_label
            )
            if all(p.get("fid_train") is not None for p in pts):
                ax_fid.plot(
                    xs,
                    [p["fid_train"] for p in pts],
                    ls=":",
                    marker=".",
                    color=bars[0].get_color(),
                    label=f"{name} vs train",
                )
            for p in pts:
                ax_fid.annotate(
                    f"{p['steps']}", (p[x_key], p["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        if all(p.get(key) is not None for p in pts):
            ax_q.plot(xs, [scale * p[key] for p in pts], marker="o", label=name)
    if floor is not None:
        ax_fid.axhline(floor, color="gray", ls="--", lw=1, label=f"real-vs-real floor {floor:.2f}")
    for ax in (ax_fid, ax_q):
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if any(r.get("fid") is not None for r in rows):
        ax_fid.set_yscale("log")
    ax_fid.set_ylabel(f"{fid_name} (lower is better; labels are step counts)")
    ax_q.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_guidance(rows: list[dict[str, Any]], path: Path) -> bool:
    """Accuracy against FID, one line per model and step count, points labelled by w; False if one w only."""
    import matplotlib.pyplot as plt

    guided = [r for r in rows if r.get("accuracy") is not None and r.get("fid") is not None]
    if len({r.get("guidance") for r in guided}) < 2:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    by_model_steps: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in guided:
        by_model_steps[(_name(r), r["steps"])].append(r)
    for (model, steps), pts in sorted(by_model_steps.items()):
        pts.sort(key=lambda r: r["guidance"])
        ax.plot(
            [p["fid"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", label=f"{model}, {steps} steps"
        )
        for p in pts:
            xy = (p["fid"], 100 * p["accuracy"])
            ax.annotate(f"w={p['guidance']:g}", xy, fontsize=7, textcoords="offset points", xytext=(4, -8))
    ax.set_xlabel("FID vs held-out")
    ax.set_ylabel("class accuracy (%)")
    ax.set_title("guidance: accuracy / FID trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_quality(rows: list[dict[str, Any]], reference: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    floor = reference.get("real_fid_floor")
    name = "clip Frechet distance" if reference.get("real_frame_fid_floor") is not None else "FID"
    _plot_against(
        rows, floor, "nfe", "NFE (network evaluations per sample, CFG counted)", out_dir / "quality_vs_nfe.png", name
    )
    _plot_against(
        rows, floor, "latency_ms_per_image", "latency per sample (ms)", out_dir / "quality_vs_latency.png", name
    )
    written = ["quality_vs_nfe.png", "quality_vs_latency.png"]
    if _plot_guidance(rows, out_dir / "guidance_tradeoff.png"):
        written.append("guidance_tradeoff.png")
    return written


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _video_intro(ref: dict[str, Any]) -> str:
    return (
        f"Video world. Real-vs-real floors ({ref.get('floor_num_samples')} train clips vs the held-out clips, mean of "
        f"{ref.get('real_fid_floor_subsets')} subsets): clip Frechet distance **{ref['real_fid_floor']:.2f}** +- "
        f"{ref.get('real_fid_floor_std', 0):.2f}, frame FID **{ref['real_frame_fid_floor']:.2f}** +- "
        f"{ref.get('real_frame_fid_floor_std', 0):.2f}. Held-out clips vs the train clips: "
        f"{_fmt(ref.get('held_out_vs_train_fid'))}. Real clips: class agreement of consecutive frames "
        f"{100 * ref['real_class_agreement']:.1f}%, jitter {ref['real_jitter']:.3f} px, diversity "
        f"{ref['real_diversity']:.2f}. Clip FD: Frechet distance of the clip evaluator's features (FVD-style); frame "
        "FID: the digits evaluator on each frame's digit window; jitter: mean |second difference| of the digit's "
        "track (0 at constant velocity); diversity: mean pairwise clip-feature distance within a (class, motion). "
        "Means over noise seeds (std after +-)."
    )


def _intro(ref: dict[str, Any]) -> str:
    if ref.get("real_frame_fid_floor") is not None:
        return _video_intro(ref)
    if ref.get("real_fid_floor") is not None:
        return (
            f"Real-vs-real FID floor: **{ref['real_fid_floor']:.2f}** +- {ref.get('real_fid_floor_std', 0):.2f} "
            f"({ref.get('floor_num_samples')} train images vs the held-out split, mean of "
            f"{ref.get('real_fid_floor_subsets')} subsets). Held-out vs the whole train split: "
            f"{_fmt(ref.get('held_out_vs_train_fid'))}. FIDs are means over noise seeds (std after +-); "
            "differences under ~0.5 are noise at these counts."
            + (
                " Diversity: mean pairwise distance of evaluator features within a class, averaged over classes "
                f"(the train split: {ref['real_diversity']:.2f})."
                if ref.get("real_diversity") is not None
                else ""
            )
        )
    text = (
        f"Prompts: {ref.get('prompts')} ({ref.get('num_prompts')}); CLIP: {ref.get('clip') or '-'}; FID reference: "
        f"{ref.get('reference_dir') or '-'} ({ref.get('fid_features') or '-'}). Means over noise seeds."
    )
    protocol = ref.get("protocol")
    if protocol:
        side = protocol.get("fid_resolution")
        patch = ", patch-FID on 299 px center crops" if protocol["patch_fid"] else ""
        text += (
            f" Protocol {protocol['name']}: references {protocol['reference_preprocessing']}"
            f"{f' to {side} px' if side else ''}{patch}"
            f"; CLIP score {protocol['clip_definition']} with template {protocol['clip_template']!r}"
            f" (the protocol's CLIP: {protocol['reference_clip']}); prompts sha256 {protocol['prompts_sha256'][:12]}."
        )
    return text


def _memory_note(env: dict[str, Any]) -> str:
    if str(env.get("device", "cpu")).startswith("cuda"):
        how = "CUDA's allocator peak"
    else:
        how = (
            "the growth of the process's peak resident set (freed heap handed back to the system first, then the "
            "kernel's high-water mark VmHWM reset and read after the call)"
        )
    return f"Peak MB: one latency-batch call's peak above the memory in use before it, measured as {how}."


def _guidance(r: dict[str, Any]) -> str:
    """w, and where the pipeline limited it to an interval of sigma, that interval: "1.5 on (0.2, 0.85]"."""
    interval = r.get("guidance_interval")
    w = _fmt(r.get("guidance"), 1)
    return w if not interval else f"{w} on ({interval[0]:g}, {interval[1]:g}]"


def _table_row(r: dict[str, Any], floor: float | None) -> str:
    fid = "-" if r.get("fid") is None else f"{r['fid']:.2f} +- {r['fid_std']:.2f}"
    floor = r.get("fid_floor", floor)  # rows merged from another run keep their own floor
    ratio = r["fid"] / floor if floor and r.get("fid") is not None else None
    acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
    grid = f"[png]({r['grid']})" if r.get("grid") else "-"
    cells = [
        _name(r), r["steps"], r["nfe"], _guidance(r), fid, _fmt(ratio), _fmt(r.get("fid_train")),
        _fmt(acc, 1), _fmt(r.get("diversity")), _fmt(r.get("clip_score")), _fmt(r.get("patch_fid")),
        f"{r['latency_ms']:.1f} ({r['latency_ms_p90']:.1f})", _fmt(r.get("latency_ms_per_image"), 3),
        f"{r['peak_mem_mb']:.0f}", r["num_samples"], grid,
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _video_row(r: dict[str, Any], ref: dict[str, Any]) -> str:
    fid = "-" if r.get("fid") is None else f"{r['fid']:.2f} +- {r['fid_std']:.2f}"
    floor, frame_floor = r.get("fid_floor", ref.get("real_fid_floor")), ref.get("real_frame_fid_floor")
    ratio = r["fid"] / floor if floor and r.get("fid") is not None else None
    frame_ratio = r["frame_fid"] / frame_floor if frame_floor and r.get("frame_fid") is not None else None
    pct = lambda key: None if r.get(key) is None else 100 * r[key]  # noqa: E731
    grid = f"[png]({r['grid']})" if r.get("grid") else "-"
    gif = f"[gif]({r['animation']})" if r.get("animation") else "-"
    cells = [
        _name(r), r["steps"], r["nfe"], _guidance(r), fid, _fmt(ratio), _fmt(r.get("fid_train")),
        _fmt(r.get("frame_fid")), _fmt(frame_ratio), _fmt(pct("accuracy"), 1), _fmt(pct("motion_accuracy"), 1),
        _fmt(pct("class_agreement"), 1), _fmt(r.get("jitter"), 3), _fmt(r.get("diversity")),
        f"{r['latency_ms']:.1f} ({r['latency_ms_p90']:.1f})", _fmt(r.get("latency_ms_per_image"), 3),
        f"{r['peak_mem_mb']:.0f}", r["num_samples"], f"{grid} {gif}",
    ]  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(rows: list[dict[str, Any]], ref: dict[str, Any]) -> list[str]:
    if ref.get("real_frame_fid_floor") is not None:
        return [
            "| model | steps | NFE | w | clip FD | FD / floor | FD train | frame FID | frame FID / floor | class acc "
            "| motion acc | class agreement | jitter px | diversity | latency ms (p90) | ms / clip | peak MB "
            "| samples | frames |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            *[_video_row(r, ref) for r in rows],
        ]
    return [
        "| model | steps | NFE | w | FID | FID / floor | FID train | accuracy | diversity | CLIP | patch FID "
        "| latency ms (p90) | ms / image | peak MB | samples | grid |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[_table_row(r, ref.get("real_fid_floor")) for r in rows],
    ]


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    ref = report["reference"]
    rows = sorted(report["rows"], key=lambda r: (_name(r), r.get("guidance") or 0, r["steps"]))
    lines = [
        "# fewstep bench report",
        "",
        _intro(ref),
        "",
        _memory_note(report.get("env", {})),
        "",
        *_table(rows, ref),
        "",
        *[line + "\n" for line in _shipped_note(rows)],
        *[f"![{p}]({p})" for p in plots],
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in report.get("env", {}).items()),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, the plots and report.md into ``out_dir`` (a folder being written atomically)."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = plot_quality(report["rows"], report["reference"], out_dir)
    (out_dir / "report.md").write_text(markdown(report, plots))
