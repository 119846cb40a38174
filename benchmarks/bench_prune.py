"""Cost and quality of Wanda on the embedded model, against baselines measured in the same run.

Prints: one plain forward over the calibration set; the prune time of each mode and its ratio
to that forward; peak memory; perplexity of dense, magnitude 50%, Wanda 50% (sequential and
one-pass), Wanda 4:8 and Wanda 2:4 on the first windows of wiki.test.raw.

    .venv/bin/python benchmarks/bench_prune.py [--nsamples 32 --seqlen 512 --windows 32]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import wanda  # noqa: E402
from wanda.blocks import batches  # noqa: E402
from wanda.calibration import CalibrationConfig, sample_calibration  # noqa: E402
from wanda.data import TextSource  # noqa: E402
from wanda.evaluation import PerplexityConfig, evaluate_perplexity  # noqa: E402
from wanda.resources import measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=wanda.EMBEDDED_DEFAULT)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        record = wanda.materialize(args.model, Path(tmp) / "model")
        base, tokenizer = wanda.load_model(str(record.path))
    calib = sample_calibration(
        tokenizer,
        CalibrationConfig(source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=args.nsamples,
                          seqlen=args.seqlen, seed=args.seed),
    )
    ppl_cfg = PerplexityConfig(source=TextSource(path="shared:wikitext-2-raw/wiki.test.raw"), seqlen=args.seqlen,
                               max_windows=args.windows, batch_size=args.batch_size)

    with measure() as forward, torch.no_grad():
        for batch in batches(calib.tokens, args.batch_size):
            base(input_ids=batch, use_cache=False)
    print(f"calibration: {args.nsamples} x {args.seqlen} tokens (digest {calib.digest[:12]}), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"plain forward over the calibration set: {forward.seconds:.1f} s", flush=True)

    rows = []

    def run(label, config, calibrated=True):
        model = copy.deepcopy(base)
        with measure() as cost:
            masks = wanda.prune_model(model, calib.tokens if calibrated else None, config)
        ppl = evaluate_perplexity(model, tokenizer, ppl_cfg)
        row = {"model": label, "prune_s": round(cost.seconds, 2),
               "ratio_to_forward": round(cost.seconds / forward.seconds, 3),
               "peak_extra_mib": round(cost.peak_extra_mib, 1),
               "sparsity": wanda.sparsity_report(masks)["overall"] if masks else 0.0,
               "perplexity": round(ppl.perplexity, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    dense = evaluate_perplexity(base, tokenizer, ppl_cfg)
    rows.append({"model": "dense", "prune_s": 0.0, "ratio_to_forward": 0.0, "peak_extra_mib": 0.0,
                 "sparsity": 0.0, "perplexity": round(dense.perplexity, 3)})
    print(json.dumps(rows[-1]), flush=True)
    bs = args.batch_size
    run("magnitude 50% (per row)", wanda.PruneConfig(method="magnitude", sparsity=0.5), calibrated=False)
    run("wanda 50% one_pass", wanda.PruneConfig(sparsity=0.5, mode="one_pass", batch_size=bs))
    run("wanda 50% sequential", wanda.PruneConfig(sparsity=0.5, mode="sequential", batch_size=bs))
    run("wanda 4:8 sequential", wanda.PruneConfig(pattern="4:8", mode="sequential", batch_size=bs))
    run("wanda 2:4 sequential", wanda.PruneConfig(pattern="2:4", mode="sequential", batch_size=bs))

    print()
    print(f"| model | prune time (s) | x one calibration forward ({forward.seconds:.1f} s) | peak extra memory (MiB) "
          f"| sparsity | perplexity ({args.windows}x{args.seqlen}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['prune_s']} | {r['ratio_to_forward']} | {r['peak_extra_mib']} | {r['sparsity']} "
              f"| {r['perplexity']} |")
    if args.json:
        args.json.write_text(json.dumps({"forward_s": forward.seconds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
