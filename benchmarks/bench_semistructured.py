"""Semi-structured (2:4) sparsity speed on this GPU: per-layer matmuls and end-to-end decode.

Runs on a CUDA GPU with compute capability >= 8.0; anywhere else it exits with status 2 and
says what is missing, before loading any model.

    python benchmarks/bench_semistructured.py                       # embedded SmolLM2-135M, pruned 2:4
    python benchmarks/bench_semistructured.py --model path/to/pruned_model --out result.json

A model that is not yet 2:4 (the embedded default) is pruned here by magnitude, 2 of every 4
inputs: speed depends only on the pattern, not on which weights survive. Pass a Wanda-pruned
model directory to measure the pipeline's own model.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_semistructured")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model source (default: the embedded model)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "cusparselt", "cutlass"])
    parser.add_argument("--tokens", default="1,16,128,512", help="comma-separated token counts for per-layer matmuls")
    parser.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens end to end (0 skips it)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--max-layers", type=int, default=None, help="time only the first N layers")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_semistructured.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from wanda.errors import ConfigError
    from wanda.export.semistructured import (SemiStructuredUnavailableError, require_semistructured_support,
                                             resolve_backend)

    try:
        device = require_semistructured_support()
        # Before loading any model: CUTLASS kernels exist for 8.x only, cuSPARSELt may be absent.
        backend = resolve_backend(args.backend, device.cusparselt_available, device.capability)
    except (SemiStructuredUnavailableError, ConfigError) as exc:
        print(f"bench_semistructured: {exc}", file=sys.stderr)
        return 2
    log.info("GPU %s (sm_%d%d), torch %s, CUDA %s, cuSPARSELt %s, backend %s", device.name, *device.capability,
             device.torch_version, device.cuda_version, device.cusparselt_available, backend)

    import torch

    from wanda.architecture import discover
    from wanda.atomic import write_json
    from wanda.export.semistructured import benchmark_semistructured
    from wanda.export.sparse24 import check_24, magnitude_24_
    from wanda.model_io import EMBEDDED_DEFAULT, load_model

    model, _ = load_model(args.model or EMBEDDED_DEFAULT, dtype="float32")
    pruned = 0
    with torch.no_grad():
        for name in discover(model).all_targets():
            weight = model.get_submodule(name).weight
            if not check_24(weight, name).compliant:
                magnitude_24_(weight.data)
                pruned += 1
    if pruned:
        log.info("pruned %d linear layers 2:4 by magnitude for the benchmark", pruned)
    result = benchmark_semistructured(
        model, dtype=args.dtype, backend=backend, token_counts=[int(t) for t in args.tokens.split(",")],
        repetitions=args.repetitions, decode_tokens=args.decode_tokens, prompt_len=args.prompt_len,
        max_layers=args.max_layers)
    write_json(args.out, {"model": args.model or EMBEDDED_DEFAULT, "pruned_here_by_magnitude": pruned,
                          **result.model_dump(mode="json")})
    summary = {"per_layer_median_speedup_by_tokens": result.median_speedup_by_tokens}
    if result.decode is not None:
        summary["decode_speedup_per_token"] = round(result.decode.speedup_per_token, 3)
        summary["decode_ms_per_token"] = {"dense": round(result.decode.dense_ms_per_token, 4),
                                          "sparse": round(result.decode.sparse_ms_per_token, 4)}
    print(json.dumps(summary, indent=2))
    print(f"full result: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
