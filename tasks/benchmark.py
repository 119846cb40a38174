"""Stage ``benchmark``: ``trtllm-bench`` latency of the sparse engine against the dense ones.

Skipped (with the reason) when the engine stage was skipped or ``benchmark.enabled`` is false.
Writes ``benchmark.json`` (a :class:`wanda.export.BenchmarkReport`) and ``trtllm_model/``, the
folder ``trtllm-bench --model_path`` reads: config in the engine's dtype, a header-only
``model.safetensors`` (its parameter count) and a tokenizer the transformers version TensorRT-LLM
1.2 pins (4.57) can load (see :mod:`wanda.export.tokenizer_compat`).
"""
from __future__ import annotations


from wanda.atomic import write_json

from .common import StageContext, StageResult, stage_entry
from .engine import gpu_environment

NAME = "benchmark"
TRTLLM_MODEL = "trtllm_model"


def _body(ctx: StageContext) -> StageResult:
    engine, export, pruned = ctx.input("engine"), ctx.input("export_24"), ctx.input("prune")
    section = ctx.params.benchmark
    env = gpu_environment(engine.summary.get("container"))
    if engine.skipped:
        return StageResult.skipped(f"no engines to benchmark; {engine.reason}", environment=env)
    if not section.enabled:
        return StageResult.skipped("benchmark.enabled is false", environment=env)

    from wanda.export import EngineShapes, TokenDatasetSpec, ToolRunner, run_benchmarks, write_token_dataset
    from wanda.export.tokenizer_compat import write_trtllm_model_dir

    spec = TokenDatasetSpec(num_requests=section.num_requests, input_len=section.input_len,
                            output_len=section.output_len, seed=section.seed,
                            vocab_size=int(export.summary["vocab_size"]))
    dataset = write_token_dataset(ctx.work / "requests.jsonl", spec)
    engine_dirs = {name: engine.path / rel for name, rel in engine.summary["engines"].items()}
    model_path = write_trtllm_model_dir(pruned.file("model"), ctx.work / TRTLLM_MODEL, dtype=export.summary["dtype"])
    report = run_benchmarks(engine_dirs, dataset, ctx.work, model_name="pruned",
                            model_path=model_path, modes=section.modes,
                            runner=ToolRunner(engine.summary.get("container")), warmup=section.warmup,
                            timeout=section.timeout_s, shapes=EngineShapes(**engine.summary["shapes"]))
    write_json(ctx.work / "benchmark.json", report.model_dump(mode="json"))
    return StageResult(summary={"ratios": report.model_dump(mode="json")["ratios"], "environment": env})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
