"""What structured pruning saves on this CPU: prefill and decode tokens/s against dense, same run.

    nice -n 10 .venv/bin/python benchmarks/bench_structure.py [--out artifacts/bench_structure.json]

On the embedded SmolLM2-135M (``--model``, default ``/tmp/base/model``): the dense model, 30% of
every MLP's channels removed (``wanda`` and ``flap`` scores), one of its three key/value groups
removed, and unstructured Wanda 50% (same speed as dense in transformers, for its perplexity).
Every candidate is timed interleaved with the dense model (dense, candidate, dense, ...), so
machine load moves both alike; speedups are dense time over candidate time (above 1 = faster),
by CPU time (``process_time``: what the model costs, robust on a shared machine) and by wall
time (which also holds waits for other work on the machine). Prefill: one
forward of ``--prompt`` tokens keeping only the last position's logits (as ``generate`` does);
decode: ``--decode`` greedy tokens with the KV cache after a short prompt. Perplexity: wikitext-2
test, ``--ppl-windows`` windows of ``--ppl-seqlen``. Last, a tiny random Mixtral with half its
experts removed shows the parameter and weight-memory reduction.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_structure")


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clocks()
    return wall - start[0], cpu - start[1]


def _prefill_s(model, ids) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        start = _clocks()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return _since(start)


def _decode_s(model, ids, new_tokens: int) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = _clocks()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return _since(start)


def _timed_pair(dense, candidate, fn, repetitions: int) -> dict[str, float]:
    """Median wall and CPU seconds of ``fn(model)`` for dense and candidate, interleaved after one
    warm-up each. CPU time (this process, all threads) is what the model costs; wall time also
    holds the waits of a machine shared with other work."""
    fn(dense), fn(candidate)
    times: dict[str, list[tuple[float, float]]] = {"dense": [], "candidate": []}
    for _ in range(repetitions):
        times["dense"].append(fn(dense))
        times["candidate"].append(fn(candidate))
    return {f"{who}_{clock}": statistics.median(t[i] for t in times[who])
            for who in times for i, clock in enumerate(("wall", "cpu"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/base/model")
    parser.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens decoded with the KV cache")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--ppl-seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time per token is then not inflated by waits between threads)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_structure.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from tasks.offline import apply_offline_env

    apply_offline_env()
    torch.set_num_threads(args.threads)
    from wanda import PruneConfig, prune_model
    from wanda.atomic import write_json
    from wanda.calibration import CalibrationConfig, sample_calibration
    from wanda.data import TextSource
    from wanda.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
    from wanda.model_io import load_model
    from wanda.structure import StructureConfig, apply_structure, parameter_count

    dense, tokenizer = load_model(args.model, dtype="float32")
    dense.eval()
    calib = sample_calibration(tokenizer, CalibrationConfig(
        source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=args.calib_samples,
        seqlen=args.calib_seqlen, seed=0))
    ppl_config = PerplexityConfig(seqlen=args.ppl_seqlen, max_windows=args.ppl_windows)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, dense.config.vocab_size, (1, args.prompt), generator=generator)
    short = prompt[:, :16]

    def ppl(model) -> float:
        return round(evaluate_perplexity(model, tokenizer, ppl_config).perplexity, 3)

    results: dict[str, dict] = {"dense": {"params": parameter_count(dense), "perplexity": ppl(dense)}}
    candidates = {
        "mlp30_wanda": StructureConfig(mlp_channels_removed=0.3, width_score="wanda"),
        "mlp30_flap": StructureConfig(mlp_channels_removed=0.3, width_score="flap"),
        "kv1of3_wanda": StructureConfig(kv_groups_removed=1, width_score="wanda"),
        "kv1of3_flap": StructureConfig(kv_groups_removed=1, width_score="flap"),
    }
    for name, config in candidates.items():
        smaller, report = apply_structure(dense, calib.tokens, config)
        pre = _timed_pair(dense, smaller, lambda m: _prefill_s(m, prompt), args.repetitions)
        dec = _timed_pair(dense, smaller, lambda m: _decode_s(m, short, args.decode), args.repetitions)
        results[name] = {
            "params": report["params_after"], "param_reduction": report["param_reduction"],
            "config_changes": report["config_changes"], "perplexity": ppl(smaller),
            "prefill_tokens_per_cpu_s": round(args.prompt / pre["candidate_cpu"], 1),
            "dense_prefill_tokens_per_cpu_s": round(args.prompt / pre["dense_cpu"], 1),
            "prefill_speedup_cpu": round(pre["dense_cpu"] / pre["candidate_cpu"], 3),
            "prefill_speedup_wall": round(pre["dense_wall"] / pre["candidate_wall"], 3),
            "decode_tokens_per_cpu_s": round(args.decode / dec["candidate_cpu"], 1),
            "dense_decode_tokens_per_cpu_s": round(args.decode / dec["dense_cpu"], 1),
            "decode_speedup_cpu": round(dec["dense_cpu"] / dec["candidate_cpu"], 3),
            "decode_speedup_wall": round(dec["dense_wall"] / dec["candidate_wall"], 3),
        }
        log.info("%s: %s", name, json.dumps(results[name]))
        del smaller

    # Unstructured Wanda 50% for its perplexity (dense runtimes run it at dense speed).
    unstructured, _ = load_model(args.model, dtype="float32")
    prune_model(unstructured, calib.tokens, PruneConfig(sparsity=0.5, mode="one_pass"))
    results["wanda_unstructured_50"] = {"params": parameter_count(unstructured), "perplexity": ppl(unstructured),
                                        "note": "zeros stored dense: same size and speed as dense in transformers"}
    del unstructured

    from tests.tiny_moe import tiny_moe_model

    moe = tiny_moe_model("mixtral")
    moe_tokens = torch.randint(3, 128, (8, 32), generator=generator)
    smaller, report = apply_structure(moe, moe_tokens, StructureConfig(experts_removed=0.5))
    weight_bytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    results["tiny_mixtral_half_experts"] = {
        "params_before": report["params_before"], "params_after": report["params_after"],
        "param_reduction": report["param_reduction"],
        "weight_bytes_ratio": round(weight_bytes(smaller) / weight_bytes(moe), 4)}

    meta = {"model": args.model, "threads": torch.get_num_threads(), "prompt_tokens": args.prompt,
            "decode_tokens": args.decode, "repetitions": args.repetitions, "torch": torch.__version__,
            "calibration": f"{args.calib_samples}x{args.calib_seqlen} wikitext-2 valid",
            "perplexity": f"wikitext-2 test, {args.ppl_windows} windows x {args.ppl_seqlen}"}
    write_json(args.out, {"settings": meta, "results": results})
    print(json.dumps({"settings": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
