"""Does ``tie_break: topk`` reproduce the reference's Wanda 2:4 on the embedded model, bit for bit?

Prunes the model twice from the same dense weights and calibration set:

- the pipeline: ``wanda.prune_model`` with ``method: wanda``, ``mode: sequential``, the N:M
  pattern and ``tie_break: topk`` (batched forwards, ``--batch-size``);
- the reference, transcribed independently in ``tests/reference_wanda.py``
  (``reference_wanda_topk``: locuslab/wanda ``prune_wanda`` with WrappedGPT's float32
  ``scaler_row``, one sample per forward, and ``reference_nm_topk_loop``, one ``torch.topk`` per
  [rows, M] column slice);

then counts, per layer, the mask bits where the two differ (the claim: 0 everywhere), names the
first differing block, layer, row and inputs if any, and evaluates both models' WikiText-2
perplexity with the protocol of ``benchmarks/bench_methods.py`` (the first ``--windows``
windows of ``--seqlen`` tokens of ``wiki.test.raw``; ``--windows 0`` takes the whole test set).
The reference code itself, run unchanged on CPU, gives 166.144 on this protocol (issue 23).

    .venv/bin/python benchmarks/bench_reference_24.py [--threads 1] [--pattern 2:4] [--json out.json]

Exit status 1 when any mask bit differs.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import wanda  # noqa: E402
from tests.reference_wanda import reference_wanda_topk  # noqa: E402
from wanda.calibration import CalibrationConfig, sample_calibration  # noqa: E402
from wanda.data import TextSource  # noqa: E402
from wanda.evaluation import PerplexityConfig, evaluate_perplexity  # noqa: E402

REFERENCE_PERPLEXITY = 166.144  # locuslab/wanda lib/prune.py unchanged, CPU, this protocol (issue 23)


def _first_difference(name: str, ours: torch.Tensor, theirs: torch.Tensor, m: int) -> dict:
    rows, cols = torch.nonzero(ours != theirs, as_tuple=True)
    row, col = int(rows[0]), int(cols[0])
    group = col - col % m
    return {"layer": name, "row": row, "inputs": list(range(group, group + m)),
            "pipeline_pruned": [j for j in range(group, group + m) if bool(ours[row, j])],
            "reference_pruned": [j for j in range(group, group + m) if bool(theirs[row, j])]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=wanda.EMBEDDED_DEFAULT)
    parser.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32, help="evaluation windows (0: the whole test set)")
    parser.add_argument("--batch-size", type=int, default=8, help="the pipeline's calibration and evaluation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    try:
        n, m = (int(v) for v in args.pattern.split(":"))
        if not 0 < n < m:
            raise ValueError
    except ValueError:
        parser.error(f"--pattern {args.pattern!r}: expected N:M with 0 < N < M, e.g. 2:4")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        record = wanda.materialize(args.model, Path(tmp) / "model")
        base, tokenizer = wanda.load_model(str(record.path))
    calib = sample_calibration(tokenizer, CalibrationConfig(
        source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed))
    ppl_cfg = PerplexityConfig(source=TextSource(path="shared:wikitext-2-raw/wiki.test.raw"), seqlen=args.seqlen,
                               max_windows=args.windows or None, batch_size=args.batch_size)
    print(f"calibration {args.nsamples}x{args.seqlen} (digest {calib.digest[:12]}), pattern {args.pattern}, "
          f"evaluation {'first ' + str(args.windows) if args.windows else 'all'} windows of {args.seqlen}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    config = wanda.PruneConfig(method="wanda", mode="sequential", pattern=args.pattern, sparsity=n / m,
                               tie_break="topk", batch_size=args.batch_size)
    model = copy.deepcopy(base)
    tick = time.perf_counter()
    ours = wanda.prune_model(model, calib.tokens, config)
    ours = {name: ours[name] for name in ours}  # unpacked once
    pipeline_s = time.perf_counter() - tick
    pipeline_ppl = evaluate_perplexity(model, tokenizer, ppl_cfg)
    print(f"pipeline: pruned in {pipeline_s:.1f} s, perplexity {pipeline_ppl.perplexity:.4f}", flush=True)
    del model

    model = base  # the last use of the dense weights: prune them in place
    tick = time.perf_counter()
    theirs, _ = reference_wanda_topk(model, calib.tokens, n / m, (n, m))
    reference_s = time.perf_counter() - tick
    reference_ppl = evaluate_perplexity(model, tokenizer, ppl_cfg)
    print(f"reference transcription: pruned in {reference_s:.1f} s, perplexity {reference_ppl.perplexity:.4f}",
          flush=True)

    if sorted(ours) != sorted(theirs):
        print(f"layer sets differ: pipeline only {sorted(set(ours) - set(theirs))}, "
              f"reference only {sorted(set(theirs) - set(ours))}")
        return 1
    differing = {name: int((ours[name] != theirs[name]).sum()) for name in theirs}
    blocks: dict[int, int] = {}
    for name, bits in differing.items():
        index = int(name.split(".")[2])
        blocks[index] = blocks.get(index, 0) + bits
    first = next((_first_difference(name, ours[name], theirs[name], m) for name in theirs if differing[name]), None)
    total_bits = sum(differing.values())
    print(f"\n{len(differing)} layers in {len(blocks)} blocks; mask bits differing: {total_bits} "
          f"({sum(1 for v in differing.values() if v)} layers)")
    print("per block: " + " ".join(f"{i}:{blocks[i]}" for i in sorted(blocks)))
    if first:
        print(f"first difference: {json.dumps(first)}")
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "calibration_digest": calib.digest,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pipeline": {"perplexity": round(pipeline_ppl.perplexity, 4), "prune_s": round(pipeline_s, 1)},
        "reference_transcription": {"perplexity": round(reference_ppl.perplexity, 4),
                                    "prune_s": round(reference_s, 1)},
        "reference_code_perplexity": REFERENCE_PERPLEXITY,
        "differing_bits_total": total_bits,
        "differing_bits_per_block": blocks,
        "differing_bits_per_layer": differing,
        "first_difference": first,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"\nperplexity: pipeline {pipeline_ppl.perplexity:.4f}, reference transcription "
          f"{reference_ppl.perplexity:.4f}, reference code {REFERENCE_PERPLEXITY}; wall {result['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if total_bits == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
