"""Peak resident memory of pruning fully loaded vs streamed from the safetensors shards.

Every measured run is its own child process, so its peak (``VmHWM``) is that run's alone; each
child also reports its resident memory once the libraries are imported (the floor every mode
pays), so the table shows the peak and what the work added on top of it.

Runs:
- the embedded SmolLM2-135M (materialized to float32 safetensors): sequential Wanda 50% fully
  loaded (load, prune, ``save_model``), streamed, and streamed with the activations on disk;
- a synthetic LLaMA-shaped model written to disk with random weights, shard by shard (hidden
  4096, intermediate 11008, 32 heads: LLaMA-7B's blocks; small vocabulary), large enough that its
  weights exceed half of this machine's memory: streamed only.

The target is the size of two blocks plus the calibration activations (one copy of
``nsamples x seqlen x hidden``).

    .venv/bin/python benchmarks/bench_streaming.py [--synthetic-blocks 16] [--skip-synthetic]
        [--work /path/with/space] [--json docs/benchmarks-streaming.json] [--markdown docs/benchmarks-streaming.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
MIB = 2**20

# LLaMA-7B's block shape; the vocabulary is small so the embeddings do not dominate the disk.
SYNTHETIC = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 1024, "max_position_embeddings": 2048}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# ----------------------------------------------------------------------------- synthetic model


def write_synthetic(folder: Path, blocks: int, seed: int = 0) -> dict:
    """A LLaMA-shaped model with random weights, one shard per block, never whole in memory.

    Deterministic: each tensor comes from its own generator seeded by (seed, tensor index).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=blocks, torch_dtype="float32", tie_word_embeddings=False, **SYNTHETIC)
    config.save_pretrained(folder)
    h, i, v = SYNTHETIC["hidden_size"], SYNTHETIC["intermediate_size"], SYNTHETIC["vocab_size"]
    block_shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h), "self_attn.v_proj.weight": (h, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    shards = [{f"model.layers.{b}.{name}": shape for name, shape in block_shapes.items()} for b in range(blocks)]
    shards.append({"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)})
    weight_map, total, counter = {}, 0, 0
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + counter)
            counter += 1
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                # ~N(0, 1/fan_in): activations keep their scale through the blocks.
                tensors[name] = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
            weight_map[name] = file
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    block_bytes = sum(_numel(s) for s in block_shapes.values()) * 4
    return {"weights_bytes": total, "block_bytes": block_bytes, "blocks": blocks}


def _numel(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


# ----------------------------------------------------------------------------- one measured run


def child(spec: dict) -> dict:
    """Run one mode in this (fresh) process and report its memory and time."""
    import torch

    import wanda  # noqa: F401  (imports torch/transformers: the floor every mode pays)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from wanda.config import PruneConfig

    logging.basicConfig(level=logging.WARNING)
    floor = _status_kib("VmRSS") * 1024
    tokens = torch.randint(3, spec["vocab"], (spec["nsamples"], spec["seqlen"]),
                           generator=torch.Generator().manual_seed(0))
    config = PruneConfig(method="wanda", sparsity=0.5, mode="sequential", batch_size=spec["batch_size"])
    started = time.perf_counter()
    if spec["mode"] == "full":
        from wanda.model_io import load_model, save_model

        model, tokenizer = load_model(spec["model"])
        masks = wanda.prune_model(model, tokens, config)
        save_model(model, tokenizer, spec["out"])
        sparsity = wanda.sparsity_report(masks)["overall"]
    else:
        from wanda.streaming import prune_checkpoint

        report = prune_checkpoint(spec["model"], spec["out"], tokens, config,
                                  offload_activations=spec["mode"] == "stream+offload", work_dir=spec["work"])
        sparsity = report["overall"]
    return {"mode": spec["mode"], "wall_s": round(time.perf_counter() - started, 1),
            "peak_rss_bytes": _status_kib("VmHWM") * 1024, "floor_rss_bytes": floor, "sparsity": sparsity}


def measure(spec: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{spec['mode']} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the table


def _row(model: str, run: dict, target: int, weights: int, loaded_peak: int | None) -> dict:
    extra = run["peak_rss_bytes"] - run["floor_rss_bytes"]
    return {
        "model": model, "mode": run["mode"], "wall_s": run["wall_s"],
        "peak_rss_mib": round(run["peak_rss_bytes"] / MIB, 1),
        "floor_rss_mib": round(run["floor_rss_bytes"] / MIB, 1),
        "peak_above_floor_mib": round(extra / MIB, 1),
        "weights_mib": round(weights / MIB, 1),
        "target_mib": round(target / MIB, 1),
        "above_floor_vs_target": round(extra / target, 2),
        "peak_vs_loaded": round(run["peak_rss_bytes"] / loaded_peak, 3) if loaded_peak else None,
        "sparsity": run["sparsity"],
    }


def markdown(rows: list[dict], facts: dict) -> str:
    lines = [
        "# Pruning models larger than memory: peak resident memory, loaded vs streamed",
        "",
        "Command: `.venv/bin/python benchmarks/bench_streaming.py` (each run in its own child process; "
        "peak = `VmHWM`, floor = `VmRSS` after importing torch/transformers/wanda, before any work).",
        "",
        f"Machine: {facts['cpus']} CPU cores (shared), {facts['mem_gib']} GiB memory, torch {facts['torch']}. "
        "Sequential Wanda, 50% unstructured, random calibration tokens.",
        "",
        "| model | mode | wall (s) | peak RSS (MiB) | floor (MiB) | peak above floor (MiB) | weights (MiB) | "
        "target: 2 blocks + activations (MiB) | above floor / target | peak / loaded peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['peak_vs_loaded']:.3f}" if r["peak_vs_loaded"] is not None else "n/a (not loaded)"
        lines.append(f"| {r['model']} | {r['mode']} | {r['wall_s']} | {r['peak_rss_mib']} | {r['floor_rss_mib']} | "
                     f"{r['peak_above_floor_mib']} | {r['weights_mib']} | {r['target_mib']} | "
                     f"{r['above_floor_vs_target']} | {ratio} |")
    lines += ["", "Settings:", ""]
    for key, value in facts["settings"].items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (needs ~2x the synthetic weights)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--synthetic-blocks", type=int, default=16)
    parser.add_argument("--synthetic-nsamples", type=int, default=4)
    parser.add_argument("--synthetic-seqlen", type=int, default=128)
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    import wanda

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-streaming-", dir=args.work))
    rows: list[dict] = []
    settings: dict = {}
    try:
        if not args.skip_embedded:
            record = wanda.materialize(wanda.EMBEDDED_DEFAULT, work / "embedded")
            from wanda.checkpoint import Checkpoint

            checkpoint = Checkpoint(record.path)
            config = json.loads((record.path / "config.json").read_text())
            block_bytes = checkpoint.nbytes([n for n in checkpoint.tensors if n.startswith("model.layers.0.")])
            activations = args.nsamples * args.seqlen * config["hidden_size"] * 4
            target = 2 * block_bytes + activations
            spec = {"model": str(record.path), "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "vocab": config["vocab_size"], "batch_size": 8, "work": str(work)}
            runs = {}
            for mode in ("full", "stream", "stream+offload"):
                out = work / f"out-{mode}"
                runs[mode] = measure({**spec, "mode": mode, "out": str(out)})
                logging.info("embedded %s: %s", mode, runs[mode])
                shutil.rmtree(out, ignore_errors=True)
            for mode, run in runs.items():
                rows.append(_row("SmolLM2-135M", run, target, checkpoint.nbytes(), runs["full"]["peak_rss_bytes"]))
            settings["SmolLM2-135M"] = (f"{config['num_hidden_layers']} blocks of {block_bytes / MIB:.1f} MiB, "
                                        f"calibration {args.nsamples} x {args.seqlen} tokens "
                                        f"({activations / MIB:.1f} MiB of activations), float32")
        if not args.skip_synthetic:
            free = shutil.disk_usage(work).free
            started = time.perf_counter()
            facts = write_synthetic(work / "synthetic", args.synthetic_blocks)
            logging.info("synthetic model written in %.0fs: %.2f GiB", time.perf_counter() - started,
                         facts["weights_bytes"] / GIB)
            if free < 2.2 * facts["weights_bytes"]:
                raise SystemExit(f"not enough disk under {work} for the pruned copy")
            activations = args.synthetic_nsamples * args.synthetic_seqlen * SYNTHETIC["hidden_size"] * 4
            target = 2 * facts["block_bytes"] + activations
            spec = {"model": str(work / "synthetic"), "nsamples": args.synthetic_nsamples,
                    "seqlen": args.synthetic_seqlen, "vocab": SYNTHETIC["vocab_size"], "batch_size": 4,
                    "work": str(work), "mode": "stream", "out": str(work / "synthetic-pruned")}
            run = measure(spec)
            logging.info("synthetic stream: %s", run)
            rows.append(_row(f"synthetic LLaMA ({args.synthetic_blocks} x 7B-sized blocks)", run, target,
                             facts["weights_bytes"], None))
            settings["synthetic"] = (f"{args.synthetic_blocks} blocks of {facts['block_bytes'] / MIB:.1f} MiB "
                                     f"(hidden 4096, intermediate 11008, 32 heads, vocab 1024), float32, "
                                     f"{facts['weights_bytes'] / GIB:.2f} GiB of weights; calibration "
                                     f"{args.synthetic_nsamples} x {args.synthetic_seqlen} tokens "
                                     f"({activations / MIB:.1f} MiB of activations)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    facts = {"cpus": os.cpu_count(), "torch": torch.__version__, "settings": settings,
             "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}
    text = markdown(rows, facts)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "facts": facts}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
