"""Prefect artifacts: what a run did, the per-layer sparsity, the metrics and comparisons.

Everything handed to Prefect is redacted (:mod:`flows.redact`): it is stored in its database."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .execution import StageOutcome, outcomes_table
from .redact import redact, redact_value

log = logging.getLogger(__name__)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def layer_sparsity_rows(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not report:
        return []
    rows = [{"layer": name, "sparsity": info["sparsity"], "pruned": info["pruned"], "total": info["total"]}
            for name, info in report.get("layers", {}).items()]
    rows.append({"layer": "overall", "sparsity": report.get("overall"), "pruned": report.get("pruned"),
                 "total": report.get("total")})
    return rows


def metrics_markdown(root: Path, masks_dir: str, evaluate_dir: str) -> str:
    lines = ["# Wanda pipeline: metrics", ""]
    comparison = root / evaluate_dir / "comparison.md"
    if comparison.is_file():
        lines += [comparison.read_text(encoding="utf-8"), ""]
    metrics = _json(root / evaluate_dir / "metrics.json") or {}
    if metrics:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
        lines.append("")
    manifest = _json(root / evaluate_dir / "manifest.json") or {}
    lineage = manifest.get("lineage", {})
    if lineage:
        lines += ["Lineage:", ""] + [f"- `{k}`: `{v}`" for k, v in sorted(lineage.items())]
    plot = root / evaluate_dir / "comparison.png"
    if plot.is_file():
        lines += ["", f"Plot: `{plot}`"]
    return "\n".join(lines) + "\n"


def publish_pipeline(root: Path, paths, outcomes: list[StageOutcome]) -> None:
    """Table of stages, per-layer sparsity table and the metrics, as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(key="wanda-pipeline-stages", table=redact_value(outcomes_table(outcomes)),
                          description="What each stage did in this run: cached (DVC up to date), unchanged, "
                                      "restored (DVC run cache) or ran; wall time and memory from its manifest")
    sparsity = _json(root / paths.masks / "sparsity.json")
    rows = layer_sparsity_rows(sparsity)
    if rows:
        create_table_artifact(key="wanda-layer-sparsity", table=redact_value(rows),
                              description="Fraction of pruned weights per layer")
    create_markdown_artifact(key="wanda-metrics",
                             markdown=redact(metrics_markdown(root, paths.masks, paths.evaluate)),
                             description="Perplexity (and zero-shot accuracy) of the pruned model vs dense")
    savings = root / paths.savings / "savings.md"
    if savings.is_file():
        create_markdown_artifact(key="wanda-savings", markdown=redact(savings.read_text(encoding="utf-8")),
                                 description="What the pruned model saves against dense: parameters, bytes, "
                                             "peak memory, prefill/decode tokens/s (same run)")


def artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only (at most 100)."""
    key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"{prefix}-{key}"[:100]


def publish_sweep(name: str, table_md: str, rows: list[dict[str, Any]], plot: Path | None,
                  outcomes: list[StageOutcome]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = artifact_key("wanda-sweep", name)
    create_table_artifact(key=f"{key}-stages", table=redact_value(outcomes_table(outcomes)),
                          description=f"Stages of sweep {name}: cached, restored or ran")
    if rows:
        create_table_artifact(key=f"{key}-points", table=redact_value(rows),
                              description=f"Sweep {name}: one row per point")
    text = table_md + (f"\nPlot: `{plot}`\n" if plot else "")
    create_markdown_artifact(key=key, markdown=redact(text), description=f"Sweep {name}: comparison table and plot")
