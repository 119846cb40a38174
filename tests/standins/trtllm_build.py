"""Stand-in ``trtllm-build`` (TensorRT-LLM 1.2 options, see trtllm_flags.json)."""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import FLAGS, fail, parse, value  # noqa: E402

TOOL = "trtllm-build"
SPEC = FLAGS[TOOL]["options"]
# TRT-LLM model class (MODEL_MAP) that names the network's layers, per checkpoint architecture.
MODEL_CLASSES = {"LlamaForCausalLM": "LLaMAForCausalLM", "MistralForCausalLM": "LLaMAForCausalLM",
                 "Qwen2ForCausalLM": "QWenForCausalLM"}


def log(level: str, text: str) -> None:
    print(f"[{datetime(2026, 5, 2, 10, 0, 0):%m/%d/%Y-%H:%M:%S}] [TRT-LLM] [{level}] {text}")


def main(argv: list[str]) -> int:
    args, _ = parse(TOOL, SPEC, argv)
    checkpoint = args.get("--checkpoint_dir")
    if checkpoint is None:
        fail(TOOL, "--checkpoint_dir is required for this stand-in (the pipeline always passes it)")
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    print("[TensorRT-LLM] TensorRT LLM version: 1.2.0")
    architecture = config["architecture"]
    if architecture not in MODEL_CLASSES:
        print(f"AssertionError: Unsupported model architecture: {architecture}", file=sys.stderr)
        return 1
    if architecture.startswith("Qwen") and "seq_length" not in config:
        # QWenDecoderLayer: max_seqlen_for_logn_scaling=config.seq_length
        print("AttributeError: 'QWenConfig' object has no attribute 'seq_length'", file=sys.stderr)
        return 1
    gemm_plugin = value(args, SPEC, "--gemm_plugin")
    gemm_plugin = None if gemm_plugin == "disable" else gemm_plugin
    fused_mlp = value(args, SPEC, "--use_fused_mlp") == "enable"
    sparse = bool(args.get("--weight_sparsity"))
    log("I", f"Set PluginConfig.gemm_plugin to {gemm_plugin}.")
    log("I", f"Set PluginConfig.use_fused_mlp to {fused_mlp}.")
    if not (Path(checkpoint) / "rank0.safetensors").is_file():
        print(f"FileNotFoundError: {checkpoint}/rank0.safetensors", file=sys.stderr)
        return 1
    cls = MODEL_CLASSES[architecture]
    mlp = ["fused_fc"] if fused_mlp else ["fc", "gate"]
    layers = [f"{cls}/transformer/layers/{i}/{m}/MATMUL_0" for i in range(config["num_hidden_layers"])
              for m in ["attention/qkv", "attention/dense", *(f"mlp/{x}" for x in mlp), "mlp/proj"]]
    if sparse and gemm_plugin is None:
        # TensorRT's own INFO lines, through TRT-LLM's logger; lm_head is dense, so not eligible.
        stamp = f"{datetime(2026, 5, 2, 10, 0, 9):%m/%d/%Y-%H:%M:%S}"
        print(f"[{stamp}] [TRT] [I] (Sparsity) Layers eligible for sparse math: {', '.join(layers)}")
        print(f"[{stamp}] [TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: "
              f"{', '.join(layers)}")
    out = Path(value(args, SPEC, "--output_dir"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank0.engine").write_bytes(b"stand-in engine " + architecture.encode())
    max_batch = args.get("--max_batch_size", 2048)
    max_input = args.get("--max_input_len", 1024)
    build_config = {
        "max_batch_size": max_batch, "max_input_len": max_input,
        "max_seq_len": args.get("--max_seq_len", config.get("max_position_embeddings")),
        "max_num_tokens": args.get("--max_num_tokens", 8192), "max_beam_width": args.get("--max_beam_width", 1),
        "weight_sparsity": sparse,
        "plugin_config": {"gemm_plugin": gemm_plugin, "use_fused_mlp": fused_mlp},
    }
    (out / "config.json").write_text(json.dumps({"version": "1.2.0", "pretrained_config": config,
                                                 "build_config": build_config}, indent=2))
    log("I", "Engine generation completed in 8.1 seconds.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
