"""Perplexity evaluation throughput: batched windows against one window at a time, in one run.

Evaluates the same windows of wiki.test.raw on the embedded model at each batch size and
prints tokens/s, the speed-up over batch 1, the peak extra memory and the perplexity (which
must agree across batch sizes: batching changes speed, never the number).

    .venv/bin/python benchmarks/bench_eval.py [--seqlen 512 --windows 16 --batch-sizes 1 4 8 --repeats 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from wanda.evaluation import PerplexityConfig, evaluate_perplexity  # noqa: E402
from wanda.model_io import EMBEDDED_DEFAULT, load_model, materialize  # noqa: E402
from wanda.resources import measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_DEFAULT)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all batch sizes, alternating their order; the best round counts")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        record = materialize(args.model, Path(tmp) / "model")
        model, tokenizer = load_model(str(record.path))
    print(f"model {args.model} ({record.fingerprint[:12]}), float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.windows} windows x {args.seqlen} tokens of wiki.test.raw",
          flush=True)
    # Untimed warm-up at the smallest and largest batch, so one-time costs land in no row.
    for batch_size in sorted({min(args.batch_sizes), max(args.batch_sizes)}):
        evaluate_perplexity(model, tokenizer, PerplexityConfig(seqlen=args.seqlen, max_windows=batch_size,
                                                               batch_size=batch_size))

    # Rounds alternate the order of batch sizes, so a slow spell on a shared machine (or a
    # warm-up effect) does not always hit the same batch size; each keeps its best round.
    runs: list[dict] = []
    for round_index in range(args.repeats):
        order = args.batch_sizes if round_index % 2 == 0 else list(reversed(args.batch_sizes))
        for batch_size in order:
            config = PerplexityConfig(seqlen=args.seqlen, max_windows=args.windows, batch_size=batch_size)
            with measure() as cost:
                result = evaluate_perplexity(model, tokenizer, config)
            runs.append({"round": round_index, "batch_size": batch_size, "windows": result.windows,
                         "tokens": result.tokens, "forward_s": round(result.tokens / result.tokens_per_s, 2),
                         "tokens_per_s": round(result.tokens_per_s, 1), "peak_extra_mib": round(cost.peak_extra_mib, 1),
                         "perplexity": result.perplexity, "tokens_digest": result.tokens_digest})
            print(json.dumps(runs[-1]), flush=True)

    rows = []
    for batch_size in args.batch_sizes:
        mine = [r for r in runs if r["batch_size"] == batch_size]
        best = max(mine, key=lambda r: r["tokens_per_s"])
        rows.append({**best, "all_tokens_per_s": [r["tokens_per_s"] for r in mine],
                     "peak_extra_mib": max(r["peak_extra_mib"] for r in mine)})
    base = next((r for r in rows if r["batch_size"] == 1), rows[0])
    spread = max(abs(r["perplexity"] - base["perplexity"]) / base["perplexity"] for r in runs)
    if len({r["tokens_digest"] for r in runs}) != 1:
        print("ERROR: batch sizes evaluated different tokens", file=sys.stderr)
        return 1
    print()
    print(f"| batch size | windows x seqlen | forward time (s) | tokens/s (best) | tokens/s (each round) "
          f"| speed-up vs batch {base['batch_size']} | peak extra memory (MiB) | perplexity |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rounds = ", ".join(f"{v:.0f}" for v in r["all_tokens_per_s"])
        print(f"| {r['batch_size']} | {r['windows']} x {args.seqlen} | {r['forward_s']} | {r['tokens_per_s']} "
              f"| {rounds} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['peak_extra_mib']} | {r['perplexity']:.4f} |")
    print(f"\nlargest relative perplexity difference between batch sizes: {spread:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "rows": rows, "max_rel_perplexity_diff": spread}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
