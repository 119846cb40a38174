"""Stand-in ``trtllm-bench`` (TensorRT-LLM 1.2 click options, see trtllm_flags.json)."""
from __future__ import annotations

import functools
import json
import operator
import re
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import FLAGS, fail, parse, value  # noqa: E402

TOOL = "trtllm-bench"
SPEC = FLAGS[TOOL]
# transformers 4.57 (TensorRT-LLM 1.2's pin) resolves tokenizer_class by name; transformers 5's
# "TokenizersBackend" does not exist there. Real tokenizer classes are named *Tokenizer[Fast].
KNOWN_CLASS = re.compile(r"^[A-Za-z0-9]+Tokenizer(Fast)?$")
# huggingface_hub.constants, as TensorRT-LLM imports them.
SAFETENSORS_SINGLE_FILE, SAFETENSORS_INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
SAFETENSORS_MAX_HEADER_LENGTH = 25_000_000
MODEL_DTYPES = ("float16", "bfloat16", "float32", None)


class ToolError(Exception):
    """What the real tool raises (its traceback ends in ``Type: message``; exit status 1)."""


# get_model_config(model, checkpoint_path), which `latency` and `throughput` call first (TensorRT-LLM,
# read through the stored sources: tensorrt_llm/bench/benchmark/low_latency.py latency_command and
# throughput.py throughput_command, commit 000a01de: `model_type = get_model_config(model,
# checkpoint_path).model_type` with checkpoint_path = --model_path or --model). In
# tensorrt_llm/bench/build/build.py (000a01de) get_model_config = AutoConfig.from_pretrained(path) then
# ModelConfig.from_hf; in tensorrt_llm/bench/build/dataclasses.py (stored version 04cba882):
#   parse_safetensors_file_metadata (lines 18-58): struct.unpack("<Q", f.read(8)), a header over
#     SAFETENSORS_MAX_HEADER_LENGTH raises, json.loads of the header, then every non-"__metadata__"
#     entry's dtype, shape and data_offsets (KeyError/IndexError -> RuntimeError); no tensor data is read;
#   get_safetensors_metadata (lines 61-111): model.safetensors, else the index's shards, else
#     RuntimeError "'{dir}' is not a safetensors repo. Couldn't find ... files." (the old bug: our
#     folder had config and tokenizer only);
#   ModelConfig.get_param_count: param_count = sum(metadata.parameter_count.values()) (huggingface_hub's
#     TensorInfo: the product of the shape), `assert param_count`;
#   ModelConfig (pydantic): num_hidden_layers, num_attention_heads, hidden_size required (or their
#     aliases), dtype: Literal["float16", "bfloat16", "float32", None] from "dtype" or "torch_dtype".


def _parse_header(model_path: Path, filename: str) -> dict[str, int]:
    with open(model_path / filename, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if size > SAFETENSORS_MAX_HEADER_LENGTH:
            raise ToolError(f"RuntimeError: Failed to parse safetensors header for '{filename}' (model_path "
                            f"'{model_path}'): safetensors header is too big.")
        raw = handle.read(size)
    try:
        header = json.loads(raw.decode(errors="ignore"))
        counts: dict[str, int] = {}
        for key, tensor in header.items():
            if key == "__metadata__":
                continue
            tuple(tensor["data_offsets"])
            try:
                count = functools.reduce(operator.mul, tensor["shape"])
            except TypeError:
                count = 1  # huggingface_hub TensorInfo: a scalar has no shape
            counts[tensor["dtype"]] = counts.get(tensor["dtype"], 0) + count
        return counts
    except (json.JSONDecodeError, KeyError, IndexError) as exc:
        raise ToolError(f"RuntimeError: Failed to parse safetensors header for '{filename}' (model_path "
                        f"'{model_path}'): header format not recognized.") from exc


def model_config(model_path: Path) -> dict:
    """get_model_config as TensorRT-LLM 1.2 computes it from a local folder."""
    if not (model_path / "config.json").is_file():
        raise ToolError(f"OSError: {model_path} does not appear to have a file named config.json.")
    config = json.loads((model_path / "config.json").read_text())
    for field, aliases in (("num_hidden_layers", ("num_hidden_layers", "n_layer")),
                           ("num_attention_heads", ("num_attention_heads", "n_head")),
                           ("hidden_size", ("hidden_size", "n_embd"))):
        if not any(isinstance(config.get(a), int) for a in aliases):
            raise ToolError(f"pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
                            f"{field}\n  Field required")
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype not in MODEL_DTYPES:
        raise ToolError(f"pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\ndtype\n"
                        f"  Input should be 'float16', 'bfloat16' or 'float32' [input_value={dtype!r}]")
    if (model_path / SAFETENSORS_SINGLE_FILE).is_file():
        files = [SAFETENSORS_SINGLE_FILE]
    elif (model_path / SAFETENSORS_INDEX_FILE).is_file():
        files = sorted(set(json.loads((model_path / SAFETENSORS_INDEX_FILE).read_text()).get("weight_map", {})
                           .values()))
    else:
        raise ToolError(f"RuntimeError: '{model_path}' is not a safetensors repo. Couldn't find "
                        f"'{SAFETENSORS_INDEX_FILE}' or '{SAFETENSORS_SINGLE_FILE}' files.")
    counts: dict[str, int] = {}
    for name in files:
        for code, count in _parse_header(model_path, name).items():
            counts[code] = counts.get(code, 0) + count
    param_count = sum(counts.values())
    if not param_count:
        raise ToolError(f"AssertionError: Can't get valid parameter count for model: {model_path}.")
    return {"model_type": config.get("model_type"), "dtype": dtype or "float16", "param_count": param_count,
            "parameter_count": counts}


def report(scale: float, num: int, isl: float, osl: float) -> dict:
    pct = lambda base: {k: round(base * f * scale, 4) for k, f in  # noqa: E731
                        (("p50", 1.0), ("p90", 1.1), ("p95", 1.2), ("p99", 1.3), ("minimum", 0.9),
                         ("maximum", 1.3), ("average", 1.0))}
    return {
        "engine": {"version": "1.2.0", "backend": "TRT"},
        "request_info": {"num_requests": num, "avg_input_length": isl, "avg_output_length": osl},
        "performance": {"total_latency_ms": 2000 * scale, "avg_request_latency_ms": 250 * scale,
                        "request_throughput_req_s": 4 / scale, "system_output_throughput_tok_s": 256 / scale,
                        "system_total_throughput_tok_s": 768 / scale, "output_throughput_per_user_tok_s": 256 / scale,
                        "request_latency_percentiles_ms": pct(250)},
        "streaming_metrics": {"avg_ttft_ms": 10 * scale, "avg_tpot_ms": 3.8 * scale, "ttft_percentiles": pct(10),
                              "tpot_percentiles": pct(3.8)},
    }


def main(argv: list[str]) -> int:
    top, rest = parse(TOOL, SPEC["group_options"], argv, stop_at=set(SPEC["commands"]))
    if not rest:
        fail(TOOL, f"Missing command (one of {', '.join(SPEC['commands'])}).")
    command, spec = rest[0], SPEC["commands"][rest[0]]
    args, _ = parse(f"{TOOL} {command}", spec, rest[1:])
    model_path = Path(top.get("--model_path") or top["--model"])
    try:
        seen = model_config(model_path)  # first, as latency_command / throughput_command do
    except ToolError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"[TensorRT-LLM] model_type {seen['model_type']}, dtype {seen['dtype']}, {seen['param_count']} parameters "
          f"({seen['parameter_count']})")
    config = json.loads((model_path / "tokenizer_config.json").read_text())
    cls = config.get("tokenizer_class")
    if cls and not KNOWN_CLASS.match(cls):
        print(f"ValueError: Tokenizer class {cls} does not exist or is not currently imported.", file=sys.stderr)
        return 1
    if value(args, spec, "--backend") != "tensorrt":
        print("stand-in: only --backend tensorrt is modelled", file=sys.stderr)
        return 1
    if "--max_seq_len" in args:
        print("AssertionError: max_seq_len is not a runtime parameter for C++ backend", file=sys.stderr)
        return 1
    engine = Path(args["--engine_dir"])
    build = json.loads((engine / "config.json").read_text())["build_config"]
    rows = [json.loads(line) for line in Path(args["--dataset"]).read_text().splitlines() if line.strip()]
    longest = max(len(r["input_ids"]) + r["output_tokens"] for r in rows)
    if longest > build["max_seq_len"]:
        print(f"RuntimeError: Engine supports a max sequence of {build['max_seq_len']}. Provided dataset contains "
              f"a maximum sequence of {longest}. Please rebuild a new engine tosupport this dataset.", file=sys.stderr)
        return 1
    rows = rows[: args.get("--num_requests") or None]
    isl = sum(len(r["input_ids"]) for r in rows) / len(rows)
    osl = sum(r["output_tokens"] for r in rows) / len(rows)
    data = report(0.8 if build.get("weight_sparsity") else 1.0, len(rows), isl, osl)
    if "--report_json" in args:
        Path(args["--report_json"]).write_text(json.dumps(data, indent=4))
    perf, stream = data["performance"], data["streaming_metrics"]
    print("=" * 59 + "\n= PERFORMANCE OVERVIEW \n" + "=" * 59)
    print(f"TensorRT LLM Version:\t1.2.0\nNumber of requests:             {len(rows)}")
    print(f"Request Throughput (req/sec):                     {perf['request_throughput_req_s']:.4f}")
    print(f"Total Output Throughput (tokens/sec):             {perf['system_output_throughput_tok_s']:.4f}")
    print(f"Average time-to-first-token [TTFT] (ms):          {stream['avg_ttft_ms']:.4f}")
    print(f"Average time-per-output-token [TPOT] (ms):        {stream['avg_tpot_ms']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
