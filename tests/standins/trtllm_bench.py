"""Stand-in ``trtllm-bench`` (TensorRT-LLM 1.2 click options, see trtllm_flags.json)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import FLAGS, fail, parse, value  # noqa: E402

TOOL = "trtllm-bench"
SPEC = FLAGS[TOOL]
# transformers 4.57 (TensorRT-LLM 1.2's pin) resolves tokenizer_class by name; transformers 5's
# "TokenizersBackend" does not exist there. Real tokenizer classes are named *Tokenizer[Fast].
KNOWN_CLASS = re.compile(r"^[A-Za-z0-9]+Tokenizer(Fast)?$")


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
    config = json.loads((model_path / "tokenizer_config.json").read_text())
    cls = config.get("tokenizer_class")
    if cls and not KNOWN_CLASS.match(cls):
        print(f"ValueError: Tokenizer class {cls} does not exist or is not currently imported.", file=sys.stderr)
        return 1
    if not (model_path / "config.json").is_file():
        print(f"OSError: {model_path} does not appear to have a file named config.json.", file=sys.stderr)
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
