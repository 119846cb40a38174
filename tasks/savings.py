"""Stage ``savings``: what the pruned model saves against its dense base, measured in one run.

Parameters (total and nonzero), checkpoint bytes, peak memory to load and to generate, prefill
and decode tokens/s in transformers on ``runtime.device`` (:mod:`wanda.savings` says how each is
measured). Writes ``metrics.json`` (pruned over dense: ``param_reduction``, ``bytes_reduction``,
``prefill_speedup``, ``decode_speedup`` (above 1 is faster), ``peak_memory_ratio``, ...) and
``savings.md`` (a table and, where the model saves nothing in dense runtimes, a plain sentence
saying so).

Not byte-stable, deliberately: speeds and memory differ from run to run, and they are the point
of the stage, so they are in its outputs (DVC metrics, ``dvc metrics diff``) rather than only in
the run facts. The stage is a leaf (nothing reads its folder), so a re-run that writes other
figures re-runs nothing after it; early cutoff of every other stage is untouched. The
deterministic figures (parameters, bytes) are the same in every run.
"""
from __future__ import annotations

import logging

from wanda.atomic import write_json

from .common import StageContext, StageResult, load_model_dir, stage_entry, streamed

log = logging.getLogger(__name__)

NAME = "savings"

UNSTRUCTURED_SENTENCE = ("unstructured sparsity: stored dense, runs at dense speed in transformers, vLLM and "
                         "TensorRT-LLM; it saves nothing without a sparse kernel")
SEMI_STRUCTURED_SENTENCE = ("2:4 sparsity: stored dense here and runs at dense speed in transformers and vLLM; "
                            "faster only with TensorRT-LLM 1.2 sparse engines or PyTorch semi-structured kernels "
                            "on NVIDIA GPUs at large shapes (the export_24/engine/benchmark stages measure that)")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def savings_metrics(dense: dict, pruned: dict, speed: dict, memory: dict[str, dict]) -> dict[str, float]:
    """Flat figures; reductions are 1 - pruned/dense, speedups pruned tokens/s over dense."""
    metrics: dict[str, float] = {
        "params_total": pruned["params_total"], "params_nonzero": pruned["params_nonzero"],
        "dense.params_total": dense["params_total"], "dense.params_nonzero": dense["params_nonzero"],
        "checkpoint_bytes": pruned["bytes"], "dense.checkpoint_bytes": dense["bytes"],
        "param_reduction": 1.0 - _ratio(pruned["params_total"], dense["params_total"]),
        "nonzero_reduction": 1.0 - _ratio(pruned["params_nonzero"], dense["params_nonzero"]),
        "bytes_reduction": 1.0 - _ratio(pruned["bytes"], dense["bytes"]),
    }
    for key, value in speed.items():
        who, figure = key.split(".", 1)
        metrics[figure if who == "candidate" else f"dense.{figure}"] = value
    for phase in ("prefill", "decode"):
        for clock in ("cpu", "wall"):
            metrics[f"{phase}_speedup_{clock}"] = _ratio(speed[f"candidate.{phase}_tokens_per_s_{clock}"],
                                                         speed[f"dense.{phase}_tokens_per_s_{clock}"])
    for who, figures in memory.items():
        for key in ("load_peak_mb", "generate_peak_mb"):
            if key in figures:
                metrics[key if who == "pruned" else f"dense.{key}"] = figures[key]
    if all("generate_peak_mb" in memory[who] for who in ("pruned", "dense")):
        metrics["peak_memory_ratio"] = _ratio(memory["pruned"]["generate_peak_mb"], memory["dense"]["generate_peak_mb"])
    return metrics


def _sentences(metrics: dict[str, float], pattern: str) -> list[str]:
    lines = []
    structured = metrics["param_reduction"] > 0
    sparse = metrics["nonzero_reduction"] > metrics["param_reduction"] + 1e-6
    if sparse and not structured:
        lines.append(SEMI_STRUCTURED_SENTENCE if pattern != "unstructured" else UNSTRUCTURED_SENTENCE)
    elif sparse:
        lines.append("the zeros inside the remaining weights are stored dense: only the removed experts, channels "
                     "and heads save anything in dense runtimes")
    if not structured and not sparse:
        lines.append("the model equals its dense base in size: nothing to save")
    return lines


def savings_markdown(metrics: dict[str, float], primary: str, sentences: list[str], notes: list[str]) -> str:
    def fmt(value) -> str:
        return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}"

    rows = [("parameters (total)", "params_total"), ("parameters (nonzero)", "params_nonzero"),
            ("checkpoint bytes", "checkpoint_bytes"), ("peak memory to load (MiB)", "load_peak_mb"),
            ("peak memory to generate (MiB)", "generate_peak_mb"),
            (f"prefill tokens/s ({primary})", f"prefill_tokens_per_s_{primary}"),
            (f"decode tokens/s ({primary})", f"decode_tokens_per_s_{primary}")]
    other = "wall" if primary == "cpu" else "cpu"
    rows += [(f"prefill tokens/s ({other})", f"prefill_tokens_per_s_{other}"),
             (f"decode tokens/s ({other})", f"decode_tokens_per_s_{other}")]
    lines = ["# Savings against the dense base", "", "| figure | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    for label, key in rows:
        if key in metrics and f"dense.{key}" in metrics:
            lines.append(f"| {label} | {fmt(metrics[f'dense.{key}'])} | {fmt(metrics[key])} | "
                         f"{_ratio(metrics[key], metrics[f'dense.{key}']):.3f} |")
    lines += ["", *[f"**{s[0].upper()}{s[1:]}.**" for s in sentences], *notes]
    return "\n".join(lines).rstrip() + "\n"


def _pattern(recipe) -> str:
    """The sparsity pattern of the pruned model from its recipe (the PruneConfig the masks stage
    recorded), read from the prune artifact rather than the ``masks`` section: a masks parameter
    change must reach this stage through prune's bytes only, like every other stage."""
    import json

    if isinstance(recipe, str):
        try:
            recipe = json.loads(recipe)
        except ValueError:
            recipe = None
    return str((recipe or {}).get("pattern") or "unstructured") if isinstance(recipe, dict) else "unstructured"


def _body(ctx: StageContext) -> StageResult:
    from wanda.model_io import read_materialized
    from wanda.savings import SpeedSettings, checkpoint_bytes, measure_memory, measure_speed, parameter_counts

    base, pruned = ctx.input("materialize"), ctx.input("prune")
    if streamed(ctx.params):
        # Both models loaded side by side is what a model larger than memory cannot afford; the
        # declared outputs still exist (DVC), saying why there are no figures.
        reason = "runtime.load is 'stream' (model larger than memory): savings are measured only on fully loaded models"
        log.warning("savings skipped: %s", reason)
        write_json(ctx.work / "metrics.json", {})
        (ctx.work / "savings.md").write_text(f"# Savings against the dense base\n\nNot measured: {reason}.\n",
                                             encoding="utf-8")
        return StageResult.skipped(reason)
    section, device = ctx.params.savings, ctx.params.runtime.device
    base_dir, pruned_dir = base.file("model"), pruned.file("model")
    settings = SpeedSettings(prefill_tokens=section.prefill_tokens, decode_tokens=section.decode_tokens,
                             repetitions=section.repetitions, threads=section.threads, device=device)
    dense_model, _ = load_model_dir(base_dir, ctx.params, placed=False)
    pruned_model, _ = load_model_dir(pruned_dir, ctx.params, placed=False)
    figures = {}
    for who, model, folder in (("dense", dense_model, base_dir), ("pruned", pruned_model, pruned_dir)):
        total, nonzero = parameter_counts(model)
        figures[who] = {"params_total": total, "params_nonzero": nonzero, "bytes": checkpoint_bytes(folder)}
    speed = measure_speed(dense_model, pruned_model, settings)
    del dense_model, pruned_model
    notes: list[str] = []
    memory: dict[str, dict] = {}
    for who, folder in (("dense", base_dir), ("pruned", pruned_dir)):
        memory[who] = measure_memory(folder, read_materialized(folder).dtype, settings)
        if "error" in memory[who]:
            log.warning("savings: peak memory of the %s model not measured: %s", who, memory[who]["error"])
            notes.append(f"Peak memory of the {who} model not measured: {memory[who]['error']}.")
    metrics = savings_metrics(figures["dense"], figures["pruned"], speed, memory)
    # The headline speedups: CPU time on CPU (wall time on a shared machine measures the
    # neighbours too), wall time on an accelerator (the host CPU only waits there).
    primary = "cpu" if device == "cpu" else "wall"
    metrics["prefill_speedup"] = metrics[f"prefill_speedup_{primary}"]
    metrics["decode_speedup"] = metrics[f"decode_speedup_{primary}"]
    sentences = _sentences(metrics, _pattern(pruned.summary.get("recipe")))
    for sentence in sentences:
        log.warning("savings: %s", sentence)
    write_json(ctx.work / "metrics.json", metrics)
    (ctx.work / "savings.md").write_text(savings_markdown(metrics, primary, sentences, notes), encoding="utf-8")
    settings_record = {**settings.__dict__, "primary_clock": primary,
                       "memory": "fresh process per model: peak RSS (VmHWM) minus RSS after imports; "
                                 "CUDA: max_memory_allocated"}
    return StageResult(summary={"metrics": metrics, "settings": settings_record, "sentences": sentences})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
