"""Stages ``dense_eval`` and ``evaluate``: perplexity (and zero-shot accuracy when configured).

``python -m tasks.evaluate --dense`` evaluates the materialized base model: DVC caches it per
base model and evaluation setting, so every candidate of every sweep compares with one dense
run. ``python -m tasks.evaluate`` evaluates the pruned model and writes the comparison with the
dense result (``comparison.md``, ``comparison.png``). Both write ``result.json`` (a sealed
:class:`wanda.evaluation.EvaluationResult`) and ``metrics.json`` (flat numbers for DVC/MLflow).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from wanda.atomic import write_json
from wanda.errors import ArtifactMismatchError

from .common import (StageContext, StageResult, load_model_dir, offload_dir, open_streamed_dir, run_stage, stage_main,
                     streamed)
from .params import PipelineParams
from .progress import request_progress, window_progress

log = logging.getLogger(__name__)
RESULT = "result.json"


def _configs(ctx: StageContext):
    section = ctx.params.evaluate
    ppl, note = (None, None)
    if section.perplexity is not None:
        ppl, note = section.perplexity.resolve()
        if note:
            log.warning("%s", note)
    return ppl, section.zeroshot, note


def _evaluate(ctx: StageContext, model_dir: Path, label: str, fingerprint: str, source: str | None):
    from wanda.evaluation import evaluation_settings, run_evaluation

    ppl, zeroshot, note = _configs(ctx)
    if streamed(ctx.params):
        from wanda.errors import ConfigError
        from wanda.model_io import load_tokenizer, resolve_source

        if zeroshot is not None:
            raise ConfigError("runtime.load", "zero-shot evaluation (lm-eval) needs the fully loaded model",
                              "'full' when evaluate.zeroshot is set")
        blocks = open_streamed_dir(model_dir, ctx.params)
        model, tokenizer = blocks.model, load_tokenizer(resolve_source(str(model_dir)))
    else:
        (model, tokenizer), blocks = load_model_dir(model_dir, ctx.params), None
    # Streaming changes where weights live, not the numbers (equal within float rounding), so it
    # is not an evaluation setting: dense and pruned results stay comparable across modes.
    settings = evaluation_settings(ppl, zeroshot, dtype=str(model.dtype).replace("torch.", ""),
                                   device=ctx.params.runtime.device)
    with offload_dir(ctx.params) as scratch:
        result = run_evaluation(model, tokenizer, label, fingerprint, ppl, zeroshot, settings=settings,
                                model_source=source, blocks=blocks, offload_dir=scratch,
                                progress=window_progress(f"perplexity: {label}"),
                                zeroshot_progress=request_progress(f"zero-shot: {label}") if zeroshot else None)
    return result, note


def _dense_body(ctx: StageContext) -> StageResult:
    from wanda.evaluation import save_result

    base = ctx.input("materialize")
    fingerprint = base.lineage["base_model_fingerprint"]
    result, note = _evaluate(ctx, base.file("model"), "dense", fingerprint, base.summary.get("source"))
    # The stage's output holds what the model and protocol determine; timings go to the run facts.
    facts, result = result.run_facts(), result.without_run_facts()
    save_result(ctx.work / RESULT, result)
    metrics = result.metrics()
    write_json(ctx.work / "metrics.json", metrics)
    summary = {"label": "dense", "metrics": metrics, "fallback_used": note,
               "settings_digest": result.settings_digest, "dataset_digests": result.dataset_digests}
    return StageResult(summary=summary, lineage={"dense_evaluation_digest": result.content_digest}, run_facts=facts)


def _candidate_metrics(result, dense, sparsity: float | None) -> dict[str, float]:
    metrics = dict(result.metrics())
    for name, value in dense.metrics().items():
        metrics[f"dense.{name}"] = value
    if result.perplexity and dense.perplexity:
        metrics["perplexity_delta"] = result.perplexity.perplexity - dense.perplexity.perplexity
        metrics["perplexity_ratio"] = result.perplexity.perplexity / dense.perplexity.perplexity
    if sparsity is not None:
        metrics["sparsity"] = sparsity
    return metrics


def _pruned_body(ctx: StageContext) -> StageResult:
    from wanda.evaluation import comparison_plot, comparison_table, load_result, save_result

    pruned, dense_artifact = ctx.input("prune"), ctx.input("dense_eval")
    dense = load_result(dense_artifact.file(RESULT))
    base_fingerprint = ctx.lineage()["base_model_fingerprint"]
    if dense.model_fingerprint != base_fingerprint:
        raise ArtifactMismatchError(
            f"the dense evaluation is of model {dense.model_fingerprint[:16]}, but the pruned model was made from "
            f"{base_fingerprint[:16]}; re-run dense_eval")
    label = pruned.summary.get("label") or "pruned"
    result, note = _evaluate(ctx, pruned.file("model"), label, pruned.lineage["pruned_model_fingerprint"],
                             pruned.summary.get("fingerprint"))
    facts, result = result.run_facts(), result.without_run_facts()
    save_result(ctx.work / RESULT, result)
    metrics = _candidate_metrics(result, dense, pruned.summary.get("mask_sparsity"))
    write_json(ctx.work / "metrics.json", metrics)
    table = comparison_table(dense, [result])
    (ctx.work / "comparison.md").write_text(table)
    comparison_plot(dense, [result], ctx.work / "comparison.png")
    summary = {"label": label, "metrics": metrics, "fallback_used": note, "comparison": table,
               "settings_digest": result.settings_digest, "dataset_digests": result.dataset_digests,
               "comparable": dense.settings_digest == result.settings_digest}
    return StageResult(summary=summary, lineage={"evaluation_digest": result.content_digest}, run_facts=facts)


def run_dense(params: PipelineParams, root: str | Path = ".") -> dict:
    return run_stage("dense_eval", params, _dense_body, root)


def run(params: PipelineParams, root: str | Path = ".") -> dict:
    return run_stage("evaluate", params, _pruned_body, root)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dense" in argv:
        argv.remove("--dense")
        sys.exit(stage_main("dense_eval", run_dense, argv))
    sys.exit(stage_main("evaluate", run, argv))


if __name__ == "__main__":
    main()
