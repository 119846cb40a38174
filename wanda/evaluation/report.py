"""Dense vs candidates, as the paper's tables show them: a markdown table and a PNG plot."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ..atomic import atomic_temp_path
from .results import EvaluationResult

log = logging.getLogger(__name__)

TASK_NAMES = {
    "boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
    "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA",
}


def _task_name(task: str) -> str:
    return TASK_NAMES.get(task, task)


def _tasks(results: list[EvaluationResult]) -> list[str]:
    """Tasks in the order the dense result lists them, then any others seen."""
    ordered: list[str] = []
    for result in results:
        if result.zeroshot:
            ordered += [t for t in result.zeroshot.tasks if t not in ordered]
    return ordered


def _score(result: EvaluationResult, task: str, metric: str) -> float | None:
    if not result.zeroshot or task not in result.zeroshot.tasks:
        return None
    return getattr(result.zeroshot.tasks[task], metric)


def _fmt(value: float | None, delta: float | None = None, scale: float = 1.0) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    text = f"{value * scale:.2f}"
    if delta is not None and math.isfinite(delta):
        text += f" ({delta * scale:+.2f})"
    return text


def comparability_notes(dense: EvaluationResult, candidates: list[EvaluationResult]) -> list[str]:
    """Why a candidate's numbers may not compare with the dense ones (empty when they do)."""
    notes: list[str] = []
    for cand in candidates:
        if dense.perplexity and cand.perplexity and dense.perplexity.tokens_digest != cand.perplexity.tokens_digest:
            notes.append(f"{cand.label}: perplexity evaluated on other tokens than dense "
                         f"(digest {cand.perplexity.tokens_digest[:12]} vs {dense.perplexity.tokens_digest[:12]})")
        if dense.zeroshot and cand.zeroshot:
            d, c = dense.zeroshot, cand.zeroshot
            if set(d.tasks) != set(c.tasks):
                notes.append(f"{cand.label}: zero-shot tasks {sorted(c.tasks)} differ from dense {sorted(d.tasks)}, "
                             "so the means average different tasks")
            if (d.limit, d.num_fewshot) != (c.limit, c.num_fewshot):
                notes.append(f"{cand.label}: zero-shot limit/num_fewshot {c.limit}/{c.num_fewshot} "
                             f"differ from dense {d.limit}/{d.num_fewshot}")
            for task in set(d.tasks) & set(c.tasks):
                if d.tasks[task].definition_digest != c.tasks[task].definition_digest:
                    notes.append(f"{cand.label}: task {task} definition or data differs from dense")
        if dense.settings_digest != cand.settings_digest:
            notes.append(f"{cand.label}: evaluation settings digest {cand.settings_digest[:12]} "
                         f"differs from dense {dense.settings_digest[:12]}")
    return notes


def comparison_table(dense: EvaluationResult, candidates: list[EvaluationResult], metric: str = "acc") -> str:
    """Markdown: perplexity, per-task ``metric`` (percent) and mean, each with its delta to dense.

    The mean column is each result's own zero-shot mean (the paper's mean of ``acc``).
    """
    results = [dense, *candidates]
    tasks = _tasks(results)
    has_ppl = any(r.perplexity for r in results)
    header = ["Model"]
    if has_ppl:
        header += ["Perplexity"]
    header += [_task_name(t) for t in tasks]
    if tasks:
        header += [f"Mean ({dense.zeroshot.mean_metric if dense.zeroshot else 'acc'})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for result in results:
        is_dense = result is dense
        row = [result.label]
        if has_ppl:
            value = result.perplexity.perplexity if result.perplexity else None
            base = dense.perplexity.perplexity if dense.perplexity else None
            row.append(_fmt(value, None if is_dense or value is None or base is None else value - base))
        for task in tasks:
            value, base = _score(result, task, metric), _score(dense, task, metric)
            row.append(_fmt(value, None if is_dense or value is None or base is None else value - base, 100))
        if tasks:
            value = result.zeroshot.mean if result.zeroshot else None
            base = dense.zeroshot.mean if dense.zeroshot else None
            row.append(_fmt(value, None if is_dense or value is None or base is None else value - base, 100))
        lines.append("| " + " | ".join(row) + " |")

    foot: list[str] = []
    if tasks:
        zs = dense.zeroshot
        limit = "all documents" if zs is None or zs.limit is None else f"limit {zs.limit} per task"
        foot.append(f"Accuracy in %, metric `{metric}`; deltas to {dense.label} in parentheses; "
                    f"{limit}, {zs.num_fewshot if zs else 0}-shot.")
    if dense.perplexity:
        p = dense.perplexity
        foot.append(f"Perplexity: {p.windows} windows of {p.seqlen} tokens of {Path(p.source).name} "
                    f"(tokens {p.tokens_digest[:12]}).")
    foot += [f"Not comparable: {note}" for note in comparability_notes(dense, candidates)]
    return "\n".join(lines + [""] + foot) + "\n"


def comparison_plot(dense: EvaluationResult, candidates: list[EvaluationResult], path: str | Path,
                    metric: str = "acc") -> Path:
    """PNG: perplexity per model (left) and per-task accuracy with the mean (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [dense, *candidates]
    tasks = _tasks(results)
    has_ppl = any(r.perplexity for r in results)
    panels = int(has_ppl) + int(bool(tasks))
    if panels == 0:
        raise ValueError("nothing to plot: the results hold neither perplexity nor zero-shot accuracy")
    widths = ([1.0] if has_ppl else []) + ([max(2.0, 0.45 * (len(tasks) + 1))] if tasks else [])
    fig = Figure(figsize=(4.0 + 1.3 * sum(widths), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, width_ratios=widths, squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(results))]

    panel = 0
    if has_ppl:
        ax = axes[panel]
        panel += 1
        values = [r.perplexity.perplexity if r.perplexity else float("nan") for r in results]
        bars = ax.bar(range(len(results)), values, color=colors)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8, padding=2)
        ax.set_xticks(range(len(results)), [r.label for r in results], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("perplexity (lower is better)")
        if dense.perplexity:
            ax.axhline(dense.perplexity.perplexity, color=colors[0], linestyle="--", linewidth=0.8)
            ax.set_title(f"{Path(dense.perplexity.source).name}, seqlen {dense.perplexity.seqlen}", fontsize=9)
        finite = [v for v in values if math.isfinite(v)]
        if finite and max(finite) / max(min(finite), 1e-9) > 20:
            ax.set_yscale("log")  # a collapsed candidate would flatten every other bar
        ax.margins(y=0.12)
    if tasks:
        ax = axes[panel]
        groups = [*tasks, "mean"]
        width = 0.8 / len(results)
        for index, result in enumerate(results):
            values = [_score(result, t, metric) for t in tasks]
            values.append(result.zeroshot.mean if result.zeroshot else None)
            offsets = [g + (index - (len(results) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(offsets, [100 * v if v is not None else float("nan") for v in values], width,
                   color=colors[index], label=result.label)
        ax.set_xticks(range(len(groups)), [_task_name(g) if g != "mean" else "Mean" for g in groups], fontsize=8)
        ax.axvline(len(tasks) - 0.5, color="grey", linewidth=0.6)
        ax.set_ylabel(f"zero-shot {metric} (%)")
        ax.set_ylim(0, 100)
        zs = dense.zeroshot
        ax.set_title(f"zero-shot {metric}" + (f", limit {zs.limit}" if zs and zs.limit else ""), fontsize=9)
        ax.legend(fontsize=8, loc="upper right", ncols=min(len(results), 3))
        ax.grid(axis="y", linewidth=0.4, alpha=0.6)
    path = Path(path)
    with atomic_temp_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path
