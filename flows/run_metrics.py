"""A pipeline run's figures as flat MLflow params and metrics."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.lineage import LineageRecord


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``a.b.c: value`` strings (lists as JSON), MLflow's param form."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            flat[name] = str(value)
    return flat


def metric_name(name: str) -> str:
    # MLflow allows alphanumerics, _ - . / and spaces in metric names.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def latency_figures(benchmark: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat latency metrics, plus ``latency_ms``/``speedup`` where the benchmark has them.

    Reads a ``BenchmarkReport`` dump (``ratios[mode][baseline] = [MetricRatio...]``) or a flat
    dict of numbers. The gate's speedup is the mean request latency ratio in latency mode.
    """
    if not benchmark:
        return {}
    figures: dict[str, float] = {}
    ratios = benchmark.get("ratios")
    if isinstance(ratios, Mapping):
        for mode, by_base in ratios.items():
            for base, items in (by_base or {}).items():
                for item in items or []:
                    key = f"latency.{mode}.{base}.{item['metric']}"
                    figures[f"{key}.sparse"] = float(item["sparse"])
                    figures[f"{key}.dense"] = float(item["dense"])
                    figures[f"{key}.speedup"] = float(item["speedup"])
                    if mode == "latency" and item["metric"] == "request_latency_avg_ms" and "speedup" not in figures:
                        figures["speedup"] = float(item["speedup"])
                        figures["latency_ms"] = float(item["sparse"])
                        figures["dense.latency_ms"] = float(item["dense"])
    else:
        for key, value in benchmark.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures[key if key in ("speedup", "latency_ms") else f"latency.{key}"] = float(value)
    return figures


def savings_figures(savings: Mapping[str, Any] | None) -> dict[str, float]:
    """The savings stage's figures under ``savings.`` (``savings.param_reduction``,
    ``savings.decode_speedup``, ``savings.dense.params_total``, ...), as the gate reads them."""
    return {f"savings.{key}": float(value) for key, value in (savings or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def load_eval(path: Path | None):
    """``(EvaluationResult | None, status)``: status is ok, missing, or failed: <reason>."""
    if path is None or not Path(path).is_file():
        return None, "missing"
    from wanda.evaluation.results import load_result

    try:
        return load_result(path), "ok"
    except Exception as exc:  # noqa: BLE001 - a damaged record makes the run unreleasable, not a crash
        return None, f"failed: {exc}"[:480]


def evaluation_metrics(candidate, dense) -> dict[str, float]:
    """Candidate metrics, dense metrics under ``dense.``, and deltas to dense under ``delta.``."""
    metrics: dict[str, float] = {}
    cand = candidate.metrics() if candidate is not None else {}
    base = dense.metrics() if dense is not None else {}
    metrics.update(cand)
    metrics.update({f"dense.{k}": v for k, v in base.items()})
    for key in cand.keys() & base.keys():
        metrics[f"delta.{key}"] = cand[key] - base[key]
    if "perplexity" in cand and base.get("perplexity"):
        metrics["delta.perplexity_rel"] = cand["perplexity"] / base["perplexity"] - 1.0
    return metrics


def stage_metrics(record: LineageRecord) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, stage in record.stages.items():
        if stage.wall_s is not None:
            metrics[f"stage.{name}.wall_s"] = stage.wall_s
        if stage.peak_memory_mb is not None:
            metrics[f"stage.{name}.peak_memory_mb"] = stage.peak_memory_mb
    return metrics


def sparsity_metrics(report: Mapping[str, Any] | None) -> dict[str, float]:
    if not report:
        return {}
    metrics = {"sparsity": float(report["overall"])} if "overall" in report else {}
    for key, name in (("block_sparsity", "sparsity.block"), ("coverage", "sparsity.coverage"),
                      ("model_sparsity", "sparsity.model")):
        if key in report:  # whole-model accounting (wanda.accounting), when the masks stage recorded it
            metrics[name] = float(report[key])
    for layer, info in (report.get("layers") or {}).items():
        value = info["sparsity"] if isinstance(info, Mapping) else info
        # MLflow metric names allow no brackets: expert "...gate_up_proj[7]" logs as "...gate_up_proj.7".
        metrics[f"sparsity.layer.{layer.replace('[', '.').replace(']', '')}"] = float(value)
    return metrics
