"""Stage ``export_24``: a TensorRT-LLM checkpoint with the 2:4 weights in compressed form.

Runs on CPU. Skipped, with the reason recorded in the manifest, when the pruned model is not
2:4 (TensorRT-LLM's sparse kernels accelerate 2:4 only) or when ``export_24.enabled`` is false.
"""
from __future__ import annotations


from .common import StageContext, StageResult, load_model_dir, stage_entry

NAME = "export_24"
CHECKPOINT = "checkpoint"


def _body(ctx: StageContext) -> StageResult:
    pruned = ctx.input("prune")
    recipe = pruned.summary.get("recipe") or {}
    pattern = recipe.get("pattern", "unstructured")
    if pattern != "2:4":
        return StageResult.skipped(
            f"masks.pattern is {pattern!r}, not '2:4' (TensorRT-LLM's sparse kernels need 2:4)", pattern=pattern)
    if not ctx.params.export_24.enabled:
        return StageResult.skipped("export_24.enabled is false", pattern=pattern)

    from wanda.export import export_trtllm_checkpoint

    model, _ = load_model_dir(pruned.file("model"), ctx.params)
    result = export_trtllm_checkpoint(model.to("cpu"), ctx.work / CHECKPOINT, dtype=ctx.params.export_24.dtype,
                                      targets=recipe.get("targets"), ignore=recipe.get("ignore"))
    summary = {
        "pattern": pattern,
        "checkpoint": CHECKPOINT,
        "architecture": result.config.architecture,
        "dtype": ctx.params.export_24.dtype,
        "sparse_tensors": len(result.sparse_tensors),
        "dense_sparse_bytes": result.dense_sparse_bytes,
        "compressed_bytes": result.compressed_bytes,
        "vocab_size": result.config.vocab_size,
        "warnings": result.warnings,
    }
    return StageResult(summary=summary)


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
