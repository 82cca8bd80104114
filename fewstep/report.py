"""Bench reports: report.json (the data), report.md (a table people read) and PNG plots people look at."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PLOTS = ("quality_vs_nfe.png", "quality_vs_latency.png")


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by model and guidance, each sorted by NFE."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        name = row["model"] if row.get("guidance") in (None, 1.0) else f"{row['model']} (w={row['guidance']:g})"
        groups[name].append(row)
    return {k: sorted(v, key=lambda r: r["nfe"]) for k, v in groups.items()}


def plot_quality(rows: list[dict[str, Any]], reference: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows)
    floor = reference.get("real_fid_floor")
    written = []
    for fname, x_key, x_label in (
        ("quality_vs_nfe.png", "nfe", "NFE (network evaluations per sample, CFG counted)"),
        ("quality_vs_latency.png", "latency_ms_per_image", "latency per image (ms)"),
    ):
        fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, pts in series.items():
            xs = [p[x_key] for p in pts]
            line = ax_fid.errorbar(
                xs,
                [p["fid"] for p in pts],
                yerr=[p["fid_std"] for p in pts],
                marker="o",
                capsize=3,
                label=f"{name} vs held-out",
            )
            if all(p.get("fid_train") is not None for p in pts):
                ax_fid.plot(
                    xs,
                    [p["fid_train"] for p in pts],
                    ls=":",
                    marker=".",
                    color=line[0].get_color(),
                    label=f"{name} vs train",
                )
            if all(p.get("accuracy") is not None for p in pts):
                ax_acc.plot(xs, [100 * p["accuracy"] for p in pts], marker="o", label=name)
            for p in pts:
                ax_fid.annotate(
                    f"{p['steps']}", (p[x_key], p["fid"]), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        if floor is not None:
            ax_fid.axhline(floor, color="gray", ls="--", lw=1, label=f"real-vs-real floor {floor:.2f}")
        for ax in (ax_fid, ax_acc):
            ax.set_xscale("log")
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3, which="both")
        ax_fid.set_yscale("log")
        ax_fid.set_ylabel("FID (lower is better; labels are step counts)")
        ax_acc.set_ylabel("class accuracy (%)")
        ax_fid.legend(fontsize=7)
        ax_acc.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    guided = [r for r in rows if r.get("accuracy") is not None]
    if len({r.get("guidance") for r in guided}) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        by_model_steps: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in guided:
            by_model_steps[(r["model"], r["steps"])].append(r)
        for (model, steps), pts in sorted(by_model_steps.items()):
            pts.sort(key=lambda r: r["guidance"])
            ax.plot(
                [p["fid"] for p in pts],
                [100 * p["accuracy"] for p in pts],
                marker="o",
                label=f"{model}, {steps} steps",
            )
            for p in pts:
                ax.annotate(
                    f"w={p['guidance']:g}",
                    (p["fid"], 100 * p["accuracy"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, -8),
                )
        ax.set_xlabel("FID vs held-out")
        ax.set_ylabel("class accuracy (%)")
        ax.set_title("guidance: accuracy / FID trade-off")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "guidance_tradeoff.png", dpi=110)
        plt.close(fig)
        written.append("guidance_tradeoff.png")
    return written


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
    ref = report["reference"]
    rows = sorted(report["rows"], key=lambda r: (r["model"], r.get("guidance") or 0, r["steps"]))
    lines = [
        "# fewstep bench report",
        "",
        f"Real-vs-real FID floor: **{ref['real_fid_floor']:.2f}** +- {ref.get('real_fid_floor_std', 0):.2f} "
        f"({ref.get('floor_num_samples')} train images vs the held-out split, mean of "
        f"{ref.get('real_fid_floor_subsets')} subsets). Held-out vs the whole train split: "
        f"{_fmt(ref.get('held_out_vs_train_fid'))}. FIDs below are means over noise seeds (std after +-); "
        "differences under ~0.5 are noise at these counts.",
        "",
        "| model | steps | NFE | w | FID held-out | FID / floor | FID train | accuracy | CLIP | latency ms (p90) "
        "| ms / image | peak MB | samples | grid |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r["fid"] / ref["real_fid_floor"] if ref.get("real_fid_floor") else None
        acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
        grid = f"[png]({r['grid']})" if r.get("grid") else "-"
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['nfe']} | {_fmt(r.get('guidance'), 1)} | {r['fid']:.2f} +- "
            f"{r['fid_std']:.2f} | {_fmt(ratio)} | {_fmt(r.get('fid_train'))} | {_fmt(acc, 1)} | "
            f"{_fmt(r.get('clip_score'))} | {r['latency_ms']:.1f} ({r['latency_ms_p90']:.1f}) | "
            f"{_fmt(r.get('latency_ms_per_image'), 3)} | {r['peak_mem_mb']:.0f} | {r['num_samples']} | {grid} |"
        )
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    env = report.get("env", {})
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, the plots and report.md into ``out_dir`` (a folder being written atomically)."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = plot_quality(report["rows"], report["reference"], out_dir)
    (out_dir / "report.md").write_text(markdown(report, plots))
