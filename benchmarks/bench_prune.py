"""Cost and quality of Wanda on the embedded model, against baselines measured in the same run.

Prints: one plain forward over the calibration set; the prune time of each mode and its ratio
to that forward; peak memory; perplexity of dense, magnitude 50%, Wanda 50% (sequential and
one-pass), Wanda 4:8 and Wanda 2:4 on the first windows of wiki.test.raw.

    .venv/bin/python benchmarks/bench_prune.py [--nsamples 32 --seqlen 512 --windows 32]

``--memory`` instead measures the peak resident memory (VmHWM) of each pruning mode, each in its
own child process with the same setup (load the materialized model, sample calibration, prune),
beside a reference-style baseline: a transcription of the reference's ``prune_wanda`` loop (two
[nsamples, seqlen, hidden] activation buffers, samples one at a time, ``scaler_row`` running
averages, a full stable sort per layer).
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
    parser.add_argument("--memory", action="store_true", help="peak memory per mode, each in its own process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.child:
        return _child(args)
    if args.memory:
        return _memory(args)

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


MEMORY_MODES = ("reference", "sequential", "one_pass", "sequential-2:4")


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _memory(args) -> int:
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = wanda.materialize(args.model, Path(tmp) / "model").path
        for mode in MEMORY_MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir),
                                  "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                                  "--batch-size", str(args.batch_size), "--seed", str(args.seed)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| mode ({args.nsamples} x {args.seqlen} tokens) | peak RSS, VmHWM (MiB) | before pruning (MiB) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['vmhwm_mib']:.0f} | {r['loaded_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"memory": rows}, indent=2))
    return 0


def _child(args) -> int:
    """One mode in a fresh process: load, sample, prune; print VmHWM as a JSON line."""
    model, tokenizer = wanda.load_model(args.model_dir)
    calib = sample_calibration(
        tokenizer, CalibrationConfig(source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=args.nsamples,
                                     seqlen=args.seqlen, seed=args.seed))
    loaded = _vmhwm_mib()
    if args.child == "reference":
        _reference_prune(model, calib.tokens, 0.5)
    else:
        mode, _, pattern = args.child.partition("-")
        config = wanda.PruneConfig(mode=mode, pattern=pattern or "unstructured", batch_size=args.batch_size)
        wanda.prune_model(model, calib.tokens, config)
    print(json.dumps({"mode": args.child, "vmhwm_mib": round(_vmhwm_mib(), 1), "loaded_mib": round(loaded, 1)}))
    return 0


@torch.no_grad()
def _reference_prune(model, tokens: torch.Tensor, sparsity: float) -> None:
    """The reference's ``prune_wanda`` loop, transcribed (its memory shape is what is compared):
    inps/outs buffers for all samples, a Catcher on block 0, WrappedGPT's scaler_row, the
    unstructured stable-sort mask. Block keyword arguments are the captured ones (the reference's
    own attention_mask/position_ids no longer suffice for current transformers)."""
    from torch import nn

    layers = model.model.layers
    nsamples, seqlen = tokens.shape
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=next(model.parameters()).dtype)
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for row in tokens:
        try:
            model(row.unsqueeze(0), use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    outs = torch.zeros_like(inps)
    kwargs = cache["kwargs"]
    for layer in layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        scaler, count = {n: torch.zeros(m.in_features) for n, m in subset.items()}, {n: 0 for n in subset}

        def add_batch(name):
            def hook(_, inp, out):
                x = inp[0].data.reshape(-1, inp[0].shape[-1]).t().float()
                scaler[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                scaler[name] += torch.norm(x, p=2, dim=1) ** 2 / count[name]
            return hook

        handles = [subset[n].register_forward_hook(add_batch(n)) for n in subset]
        for j in range(nsamples):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for h in handles:
            h.remove()
        for name, module in subset.items():
            metric = torch.abs(module.weight.data) * torch.sqrt(scaler[name].reshape((1, -1)))
            mask = torch.zeros_like(metric) == 1
            indices = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
            mask.scatter_(1, indices, True)
            module.weight.data[mask] = 0
        for j in range(nsamples):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps


if __name__ == "__main__":
    sys.exit(main())
