"""Stage ``report`` of a sweep: one comparison table and a plot of perplexity vs sparsity.

Reads every point's evaluation and the shared dense evaluation; writes ``table.md`` (the points
with their settings and perplexity, then the library's dense-vs-candidates table),
``results.json`` (one row per point, DVC metrics), ``perplexity_vs_sparsity.png`` and
``block_sparsity.png`` (each point's sparsity per decoder block: OWL's allocation beside the flat
profile of uniform methods).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from wanda.atomic import atomic_temp_path, write_json
from wanda.errors import ArtifactMismatchError, WandaError
from wanda.plots import block_sparsity_plot

from . import graph
from .common import StageContext, StageResult, apply_offline_env, run_stage
from .params import read_yaml

log = logging.getLogger(__name__)
NAME = "report"


def _row(point: str, overrides: dict, recipe: dict, calib: dict, result, dense) -> dict[str, Any]:
    ppl = result.perplexity.perplexity if result.perplexity else None
    base = dense.perplexity.perplexity if dense.perplexity else None
    row = {
        "point": point,
        "method": recipe.get("method"),
        "pattern": recipe.get("pattern"),
        "sparsity": recipe.get("sparsity"),
        "mode": recipe.get("mode"),
        "nsamples": calib.get("nsamples"),
        "perplexity": ppl,
        "delta_vs_dense": (ppl - base) if ppl is not None and base is not None else None,
        "overrides": {k: str(v) for k, v in overrides.items()},
    }
    if result.zeroshot:
        row["zeroshot_mean"] = result.zeroshot.mean
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "—"
    return "—" if value is None else str(value)


def points_table(rows: list[dict[str, Any]], dense_ppl: float | None) -> str:
    columns = ["point", "method", "pattern", "sparsity", "mode", "nsamples", "perplexity", "delta_vs_dense"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * 6 + ["---:"] * 2) + "|"]
    if dense_ppl is not None:
        lines.append("| dense | — | — | 0 | — | — | " + _fmt(dense_ppl) + " | 0 |")
    for row in sorted(rows, key=lambda r: (str(r["method"]), str(r["pattern"]), r["sparsity"] or 0, r["nsamples"] or 0)):
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], dense_ppl: float | None, path: Path) -> None:
    """Perplexity vs sparsity; one line per (method, unstructured/N:M, calibration size)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["perplexity"] is None or row["sparsity"] is None:
            continue
        kind = "N:M" if row["pattern"] not in (None, "unstructured") else "unstructured"
        key = f"{row['method']} {kind}" + (f", n={row['nsamples']}" if row.get("nsamples") else "")
        groups.setdefault(key, []).append(row)
    for index, (label, members) in enumerate(sorted(groups.items())):
        members.sort(key=lambda r: r["sparsity"])
        xs, ys = [r["sparsity"] for r in members], [r["perplexity"] for r in members]
        ax.plot(xs, ys, marker="o", color=f"C{index % 10}", label=label)
        for r in members:
            if r["pattern"] not in (None, "unstructured"):
                ax.annotate(r["pattern"], (r["sparsity"], r["perplexity"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", linestyle="--", linewidth=0.9, label=f"dense ({dense_ppl:.2f})")
    values = [r["perplexity"] for r in rows if r["perplexity"]] + ([dense_ppl] if dense_ppl else [])
    if values and max(values) / max(min(values), 1e-9) > 20:
        ax.set_yscale("log")  # a collapsed point would flatten every other one
    ax.set_xlabel("sparsity (fraction of pruned weights)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(linewidth=0.4, alpha=0.6)
    ax.legend(fontsize=8)
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def build(sweep_file: Path, root: Path) -> dict:
    document = read_yaml(sweep_file)
    sweep, points = document["sweep"], document["points"]
    inputs = {"dense_eval": ("dense_eval", sweep["dense_eval"])}
    for point, entry in points.items():
        inputs[f"{point}"] = ("evaluate", entry["params"]["paths"]["evaluate"])
        inputs[f"{point}:masks"] = ("masks", entry["params"]["paths"]["masks"])

    def body(ctx: StageContext) -> StageResult:
        from wanda.evaluation import comparison_table, load_result

        dense = load_result(ctx.input("dense_eval").file("result.json"))
        rows, candidates = [], []
        for point, entry in points.items():
            artifact = ctx.input(point)
            result = load_result(artifact.file("result.json"))
            if result.settings_digest != dense.settings_digest:
                raise ArtifactMismatchError(f"sweep point {point} was evaluated with other settings than dense")
            params = entry["params"]
            recipe = {**params["statistics"], **params["masks"]}
            rows.append(_row(point, entry["overrides"], recipe, params["calibration"], result, dense))
            candidates.append(result.model_copy(update={"label": point}))
        dense_ppl = dense.perplexity.perplexity if dense.perplexity else None
        table = f"# Sweep {sweep['name']}\n\n" + points_table(rows, dense_ppl) + "\n" + comparison_table(dense, candidates)
        (ctx.work / "table.md").write_text(table)
        write_json(ctx.work / "results.json", {"dense_perplexity": dense_ppl, "points": rows})
        plot(rows, dense_ppl, ctx.work / "perplexity_vs_sparsity.png")
        block_sparsity_plot({point: json.loads(ctx.input(f"{point}:masks").file("sparsity.json").read_text())
                             for point in points}, ctx.work / "block_sparsity.png")
        return StageResult(summary={"points": len(rows), "dense_perplexity": dense_ppl})

    return run_stage(NAME, None, body, root, spec=graph.SWEEP_REPORT, target=sweep["report"], inputs=inputs,
                     record={"sweep": sweep}, consistent=("base_model_fingerprint", "dense_evaluation_digest"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.sweep_report", description=__doc__)
    parser.add_argument("--params", required=True, help="the sweep's params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    apply_offline_env()
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        build(Path(args.root) / args.params, Path(args.root))
    except WandaError as exc:
        log.error("report failed: %s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
