"""Plots of where the pruning went: per-layer and per-block sparsity (PNG, matplotlib Agg).

Per block matters for OWL, whose allocation is the point: a uniform method is a flat line,
OWL a profile that averages to the target.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_temp_path

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def _layer_values(report: Mapping[str, Any]) -> dict[str, float]:
    layers = report.get("layers") or {}
    return {name: float(v["sparsity"] if isinstance(v, Mapping) else v) for name, v in layers.items()}


def block_sparsities(report: Mapping[str, Any]) -> list[tuple[int, float]]:
    """``(block index, fraction pruned)`` per decoder block from a ``sparsity_report``, weighted
    by each layer's size when the report has counts; layers outside numbered blocks are left out."""
    totals: dict[int, list[float]] = {}
    for name, value in (report.get("layers") or {}).items():
        match = _BLOCK_INDEX.search(name)
        if match is None:
            continue
        if isinstance(value, Mapping) and value.get("total"):
            pruned, total = float(value.get("pruned", value["sparsity"] * value["total"])), float(value["total"])
        else:
            sparsity = float(value["sparsity"] if isinstance(value, Mapping) else value)
            pruned, total = sparsity, 1.0
        acc = totals.setdefault(int(match.group(1)), [0.0, 0.0])
        acc[0] += pruned
        acc[1] += total
    return [(block, pruned / total) for block, (pruned, total) in sorted(totals.items()) if total]


def layer_sparsity_plot(report: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path | None:
    """Bars: the actual sparsity of every pruned layer in model order, the overall as a dashed
    line. None when the report names no layers."""
    layers = _layer_values(report)
    if not layers:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, values = list(layers), list(layers.values())
    fig = Figure(figsize=(min(16.0, max(6.0, 0.08 * len(names) + 2)), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color="C0", width=0.8)
    if "overall" in report:
        overall = float(report["overall"])
        ax.axhline(overall, color="C3", linestyle="--", linewidth=0.8, label=f"overall {overall:.3f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of weights pruned")
    ax.set_xlabel(f"{len(names)} pruned layers, in model order")
    if title:
        ax.set_title(title, fontsize=9)
    step = max(1, len(names) // 24)  # label every layer only when they fit
    ax.set_xticks(range(0, len(names), step), [names[i] for i in range(0, len(names), step)], rotation=90,
                  fontsize=6)
    path = Path(path)
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


def block_sparsity_plot(reports: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path | None:
    """Lines: per-block sparsity of each labelled report (e.g. sweep points), so OWL's
    non-uniform allocation shows beside the flat profile of uniform methods."""
    profiles = {label: block_sparsities(report) for label, report in reports.items()}
    profiles = {label: profile for label, profile in profiles.items() if profile}
    if not profiles:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for index, (label, profile) in enumerate(sorted(profiles.items())):
        ax.plot([b for b, _ in profile], [s for _, s in profile], marker=".", color=f"C{index % 10}", label=label)
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("fraction of weights pruned in the block")
    ax.grid(linewidth=0.4, alpha=0.6)
    ax.legend(fontsize=7, ncol=2 if len(profiles) > 6 else 1)
    path = Path(path)
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def tokens_per_expert_plot(tokens: Mapping[str, list[int]], path: str | Path) -> Path | None:
    """Heat map: routed calibration tokens per expert (columns) per experts container (rows, one
    per MoE block), with the counts written in; starved experts show as the palest cells.
    None when there is no experts container."""
    if not tokens:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted(tokens, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    width = max(len(tokens[n]) for n in names)
    grid = [[tokens[n][e] if e < len(tokens[n]) else 0 for e in range(width)] for n in names]
    fig = Figure(figsize=(min(16.0, 2.5 + 0.35 * width), min(12.0, 1.5 + 0.3 * len(names))), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="routed calibration tokens")
    if width * len(names) <= 400:  # counts stay legible
        for row, counts in enumerate(grid):
            for col, count in enumerate(counts):
                ax.text(col, row, str(count), ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("expert")
    ax.set_ylabel("experts container")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    path = Path(path)
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
