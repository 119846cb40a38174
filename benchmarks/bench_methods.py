"""Perplexity and prune time of every pruning method side by side, on the embedded model.

Recipes (``--methods``, comma-separated):
    dense, magnitude, wanda, sparsegpt, ria, ria+permute, wanda+owl, wanda+owl-m10 (outlier threshold
    M=10 instead of 5), ria+owl, sparsegpt+owl, wanda+dsnot, wanda+owl+dsnot, wanda-variant,
    wanda-seq (Wanda in sequential mode, for reference)
Sparsities (``--sparsities``): fractions for unstructured masks and N:M patterns, e.g.
    0.5,0.6,0.7,4:8,2:4
Combinations a method does not define (OWL or the variant with N:M, RIA permutation without N:M)
are skipped and listed.

``--mode auto`` (default) shows the statistics reuse the pipeline offers: one one-pass statistics
collection serves every score method (wanda, magnitude, ria with OWL, variant, permutation and
DSnoT), each costing only its mask computation; SparseGPT runs sequentially (it updates weights
and needs Hessians), so its time includes its own calibration walk. ``--mode sequential`` runs
every recipe in the paper-faithful sequential mode (slower: one calibration walk each).

    .venv/bin/python benchmarks/bench_methods.py [--nsamples 32 --seqlen 512 --windows 32] \\
        [--methods wanda,sparsegpt] [--sparsities 0.5,2:4] [--json out.json]
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

import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

import wanda  # noqa: E402
from wanda.calibration import CalibrationConfig, sample_calibration  # noqa: E402
from wanda.methods.base import sequential_only_methods  # noqa: E402
from wanda.data import TextSource  # noqa: E402
from wanda.evaluation import PerplexityConfig, evaluate_perplexity  # noqa: E402
from wanda.resources import measure  # noqa: E402

RECIPES: dict[str, dict] = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "wanda-seq": {"method": "wanda", "mode": "sequential"},
    "sparsegpt": {"method": "sparsegpt"},
    "ria": {"method": "ria"},
    "ria+permute": {"method": "ria", "ria_permute": True},
    "wanda+owl": {"method": "wanda", "allocation": "owl"},
    "wanda+owl-m10": {"method": "wanda", "allocation": "owl", "owl_m": 10.0},
    "ria+owl": {"method": "ria", "allocation": "owl"},
    "sparsegpt+owl": {"method": "sparsegpt", "allocation": "owl"},
    "wanda+dsnot": {"method": "wanda", "refine": "dsnot"},
    "wanda+owl+dsnot": {"method": "wanda", "allocation": "owl", "refine": "dsnot"},
    "wanda-variant": {"method": "wanda", "variant": True},
}
DEFAULT_METHODS = "dense,magnitude,wanda,sparsegpt,ria,wanda+owl,wanda+dsnot,wanda-variant"
DEFAULT_SPARSITIES = "0.5,0.6,0.7,4:8,2:4"


def _sparsity_fields(text: str) -> dict:
    if ":" in text:
        n, m = map(int, text.split(":"))
        return {"pattern": text, "sparsity": n / m}
    return {"pattern": "unstructured", "sparsity": float(text)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=wanda.EMBEDDED_DEFAULT)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--sparsities", default=DEFAULT_SPARSITIES)
    parser.add_argument("--mode", choices=["auto", "sequential"], default="auto")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); 1 is faster on a loaded shared machine")
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after every row)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m != "dense" and m not in RECIPES]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: dense, {', '.join(RECIPES)}")
    sparsities = [s.strip() for s in args.sparsities.split(",") if s.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        record = wanda.materialize(args.model, Path(tmp) / "model")
        base, tokenizer = wanda.load_model(str(record.path))
    calib = sample_calibration(tokenizer, CalibrationConfig(
        source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed))
    ppl_cfg = PerplexityConfig(source=TextSource(path="shared:wikitext-2-raw/wiki.test.raw"), seqlen=args.seqlen,
                               max_windows=args.windows, batch_size=args.batch_size)
    print(f"calibration {args.nsamples}x{args.seqlen} (digest {calib.digest[:12]}), evaluation first "
          f"{args.windows} windows of {args.seqlen}, torch threads {torch.get_num_threads()}, mode {args.mode}",
          flush=True)

    rows: list[dict] = []
    skipped: list[str] = []
    shared_stats = None
    stats_seconds = 0.0

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "calibration_digest":
                                             calib.digest, "statistics_s": stats_seconds, "rows": rows,
                                             "skipped": skipped}, indent=2))

    if "dense" in methods:
        started = time.perf_counter()
        dense = evaluate_perplexity(base, tokenizer, ppl_cfg)
        emit({"method": "dense", "sparsity": "0", "mode": "-", "prune_s": 0.0, "sparsity_actual": 0.0,
              "perplexity": round(dense.perplexity, 3), "eval_s": round(time.perf_counter() - started, 1)})

    for name in (m for m in methods if m != "dense"):
        for level in sparsities:
            fields = {**RECIPES[name], **_sparsity_fields(level), "batch_size": args.batch_size}
            if args.mode == "sequential" or fields["method"] in sequential_only_methods():
                fields["mode"] = "sequential"
            fields.setdefault("mode", "one_pass")
            try:
                config = wanda.PruneConfig(**fields)
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"].split(";")[0]
                skipped.append(f"{name} @ {level}: {reason}")
                print(f"skip {name} @ {level}: {reason}", flush=True)
                continue
            model = copy.deepcopy(base)
            reused = config.mode == "one_pass" and config.needs_statistics
            if reused and shared_stats is None:
                with measure() as collect:
                    shared_stats = wanda.collect_statistics(base, calib.tokens, batch_size=args.batch_size)
                stats_seconds = round(collect.seconds, 1)
                print(f"one-pass statistics collected once in {collect.seconds:.1f} s", flush=True)
            with measure() as cost:
                if reused:
                    masks = wanda.compute_masks(model, shared_stats, config)
                    wanda.apply_masks(model, masks)
                else:
                    masks = wanda.prune_model(model, calib.tokens if config.needs_statistics else None, config)
            started = time.perf_counter()
            ppl = evaluate_perplexity(model, tokenizer, ppl_cfg)
            emit({"method": name, "sparsity": level, "mode": config.mode + (" (shared stats)" if reused else ""),
                  "prune_s": round(cost.seconds, 1), "sparsity_actual": wanda.sparsity_report(masks)["overall"],
                  "perplexity": round(ppl.perplexity, 3), "eval_s": round(time.perf_counter() - started, 1)})
            del model, masks

    print()
    if stats_seconds:
        print(f"One-pass statistics (shared by the score methods): {stats_seconds} s")
    levels = [s for s in sparsities]
    print("| method | " + " | ".join(levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name in methods:
        cells = []
        for level in levels:
            match = [r for r in rows if r["method"] == name and (r["sparsity"] == level or name == "dense")]
            cells.append(f"{match[0]['perplexity']} ({match[0]['prune_s']} s)" if match else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
