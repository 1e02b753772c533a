"""Sweep results as a markdown table and a perplexity-vs-bits Pareto plot."""

from __future__ import annotations

import math
from pathlib import Path


def as_points(rows) -> list[dict]:
    """Rows (``sweep.Row`` or their ``as_dict()``) as {method, label, bits, ppl} dicts, failures dropped."""
    points = []
    for r in rows:
        d = r if isinstance(r, dict) else r.as_dict()
        if d["config"]["method"] == "fp" or not math.isfinite(d["ppl"]) or not math.isfinite(d["bits_per_weight"]):
            continue
        points.append({"method": d["config"]["method"], "label": d["config"]["label"],
                       "bits": d["bits_per_weight"], "ppl": d["ppl"], "options": d["config"].get("options", {})})
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both bits and perplexity, by increasing bits."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["bits"], p["ppl"])):
        if p["ppl"] < best:
            front.append(p)
            best = p["ppl"]
    return front


def pareto_plot(rows, path: str | Path, fp_ppl: float | None = None, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in as_points(rows) if not p["options"]]  # ablations stay out of the picture
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method in sorted({p["method"] for p in points}):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["bits"])
        ax.plot([p["bits"] for p in pts], [p["ppl"] for p in pts], marker="o", label=method)
    front = pareto_front(points)
    ax.plot([p["bits"] for p in front], [p["ppl"] for p in front], color="black", lw=3, alpha=0.2,
            label="Pareto front")
    if fp_ppl:
        ax.axhline(fp_ppl, color="gray", ls="--", lw=1, label=f"fp ({fp_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per weight (codes + codebooks/scales + metadata + outliers)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_table(rows) -> str:
    lines = ["| config | honest bits/weight | index bits/weight | ppl |", "|---|---|---|---|"]
    for r in rows:
        d = r if isinstance(r, dict) else r.as_dict()
        lines.append(f"| {d['config']['label']} | {d['bits_per_weight']:.3f} | {d['index_bits_per_weight']:.3f} "
                     f"| {d['ppl']:.3f} |")
    return "\n".join(lines) + "\n"
