"""``trtllm-bench`` on the sparse engine and its dense baselines: dataset, commands, reports.

Dataset: the JSON-lines format ``trtllm-bench`` documents ("Preparing a Dataset" in
docs/source/performance/perf-benchmarking.md): one request per line,
``{"task_id": 0, "input_ids": [...], "output_tokens": 128}``. We generate token ids directly
(seeded, fixed lengths), so no tokenizer download and no text-length jitter between engines.

Commands (TensorRT-LLM 1.2): ``trtllm-bench --model NAME --model_path HF_DIR latency --backend
tensorrt --engine_dir E --dataset D --report_json R`` (``throughput`` likewise, with
``--streaming`` so TTFT/TPOT are measured). ``--model_path`` is the pruned HF directory: the
benchmark reads its config and tokenizer from there, never from the hub.

Reports: ``--report_json`` writes ``ReportUtility.get_statistics_dict()``; the console report
has the same numbers. Both parsers are tolerant of missing sections and older key names.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..atomic import atomic_file, write_json
from ..errors import ConfigError, WandaError
from ..hashing import sha256_file
from .engine import BENCH_TOOL, EngineBuildError, EngineShapes, ToolRunner

log = logging.getLogger(__name__)

Mode = Literal["latency", "throughput"]


class BenchReportError(WandaError, ValueError):
    """trtllm-bench output holds no report we can read."""


# --------------------------------------------------------------------------- dataset


class TokenDatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_requests: int = Field(32, ge=1)
    input_len: int = Field(128, ge=1)
    output_len: int = Field(128, ge=1)
    vocab_size: int = Field(..., ge=2)
    seed: int = 0
    exclude_ids: tuple[int, ...] = ()  # e.g. bos/eos/pad: keep special tokens out of prompts

    @model_validator(mode="after")
    def _room(self) -> "TokenDatasetSpec":
        if len(set(i for i in self.exclude_ids if 0 <= i < self.vocab_size)) >= self.vocab_size:
            raise ValueError("exclude_ids leave no token to sample")
        return self


class TokenDataset(BaseModel):
    path: Path
    spec: TokenDatasetSpec
    sha256: str

    @property
    def max_seq_len(self) -> int:
        return self.spec.input_len + self.spec.output_len


def write_token_dataset(path: str | Path, spec: TokenDatasetSpec) -> TokenDataset:
    """Write ``num_requests`` seeded requests of exactly ``input_len`` random ids each."""
    allowed = torch.tensor(sorted(set(range(spec.vocab_size)) - set(spec.exclude_ids)), dtype=torch.int64)
    generator = torch.Generator().manual_seed(spec.seed)
    picks = torch.randint(len(allowed), (spec.num_requests, spec.input_len), generator=generator)
    ids = allowed[picks].tolist()
    path = Path(path)
    with atomic_file(path, "w") as handle:
        for task_id, row in enumerate(ids):
            handle.write(json.dumps({"task_id": task_id, "input_ids": row, "output_tokens": spec.output_len},
                                    separators=(",", ":")) + "\n")
    path.chmod(0o644)  # read by trtllm-bench, possibly as another user inside a container
    return TokenDataset(path=path, spec=spec, sha256=sha256_file(path))


def check_dataset_fits(dataset: TokenDataset, max_input_len: int, max_seq_len: int) -> None:
    """Refuse, before any GPU time, a dataset the engines were not built for (trtllm-bench
    would fail only after loading the engine)."""
    spec = dataset.spec
    if spec.input_len > max_input_len or spec.input_len + spec.output_len > max_seq_len:
        raise ConfigError(
            "benchmark.dataset",
            f"requests of {spec.input_len} input + {spec.output_len} output tokens do not fit engines built with "
            f"max_input_len={max_input_len}, max_seq_len={max_seq_len}",
            f"input_len <= {max_input_len} and input_len + output_len <= {max_seq_len}",
        )


# --------------------------------------------------------------------------- commands


def bench_command(model_name: str, engine_dir: str | Path, dataset: str | Path, *, mode: Mode = "latency",
                  model_path: str | Path | None = None, num_requests: int | None = None, warmup: int = 2,
                  concurrency: int | None = None, report_json: str | Path | None = None,
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The ``trtllm-bench`` argv (no container prefix) for one engine.

    ``latency`` runs one request at a time by default (``--concurrency 1``); ``throughput`` gets
    ``--streaming`` so it also reports TTFT and TPOT.
    """
    if mode not in ("latency", "throughput"):
        raise ConfigError("benchmark.mode", f"unknown mode {mode!r}", "latency, throughput")
    argv = [BENCH_TOOL, "--model", model_name]
    if model_path is not None:
        argv += ["--model_path", str(model_path)]
    argv += [mode, "--backend", "tensorrt", "--engine_dir", str(engine_dir), "--dataset", str(dataset),
             "--warmup", str(warmup)]
    if num_requests:
        argv += ["--num_requests", str(num_requests)]
    if concurrency is None and mode == "latency":
        concurrency = 1
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if mode == "throughput":
        argv.append("--streaming")
    if report_json is not None:
        argv += ["--report_json", str(report_json)]
    return argv + list(extra_args)


# --------------------------------------------------------------------------- results


class Percentiles(BaseModel):
    """Milliseconds (or tokens/s for throughputs); keys as trtllm-bench names them."""

    model_config = ConfigDict(extra="allow")

    minimum: float | None = None
    maximum: float | None = None
    average: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None


class BenchResult(BaseModel):
    """One engine's numbers (times in ms, throughputs per second)."""

    engine: str = ""
    mode: Mode | None = None
    source: Literal["json", "text"]
    trtllm_version: str | None = None
    num_requests: int | None = None
    avg_input_len: float | None = None
    avg_output_len: float | None = None
    request_throughput: float | None = None  # req/s
    output_tokens_per_s: float | None = None  # all requests together
    total_tokens_per_s: float | None = None
    per_user_output_tokens_per_s: float | None = None
    total_latency_ms: float | None = None
    avg_request_latency_ms: float | None = None
    avg_ttft_ms: float | None = None
    avg_tpot_ms: float | None = None
    request_latency_ms: Percentiles | None = None
    ttft_ms: Percentiles | None = None
    tpot_ms: Percentiles | None = None


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _percentiles(data: Any) -> Percentiles | None:
    if not isinstance(data, dict):
        return None
    values = {str(k).lower(): _num(v) for k, v in data.items() if _num(v) is not None}
    return Percentiles(**values) if values else None


def parse_report_json(data: dict | str | Path, engine: str = "", mode: Mode | None = None) -> BenchResult:
    """Parse the ``--report_json`` file (or its loaded dict)."""
    if not isinstance(data, dict):
        data = json.loads(Path(data).read_text())
    perf = data.get("performance", {}) or {}
    stream = data.get("streaming_metrics", {}) or {}
    req = data.get("request_info", {}) or {}
    eng = data.get("engine", {}) or {}
    return BenchResult(
        engine=engine, mode=mode, source="json", trtllm_version=eng.get("version"),
        num_requests=req.get("num_requests"),
        avg_input_len=_num(req.get("avg_input_length")), avg_output_len=_num(req.get("avg_output_length")),
        request_throughput=_num(perf.get("request_throughput_req_s")),
        output_tokens_per_s=_num(perf.get("system_output_throughput_tok_s", perf.get("output_throughput_tok_s"))),
        total_tokens_per_s=_num(perf.get("system_total_throughput_tok_s")),
        per_user_output_tokens_per_s=_num(perf.get("output_throughput_per_user_tok_s")),
        total_latency_ms=_num(perf.get("total_latency_ms")),
        avg_request_latency_ms=_num(perf.get("avg_request_latency_ms")),
        avg_ttft_ms=_num(stream.get("avg_ttft_ms")), avg_tpot_ms=_num(stream.get("avg_tpot_ms")),
        request_latency_ms=_percentiles(perf.get("request_latency_percentiles_ms")),
        ttft_ms=_percentiles(stream.get("ttft_percentiles")), tpot_ms=_percentiles(stream.get("tpot_percentiles")),
    )


_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
# Console labels of ReportUtility.report_statistics (1.x) and their pre-1.0 spellings.
_LABELS: dict[str, tuple[str, ...]] = {
    "num_requests": ("Number of requests",),
    "avg_input_len": ("Average Input Length (tokens)",),
    "avg_output_len": ("Average Output Length (tokens)",),
    "request_throughput": ("Request Throughput (req/sec)",),
    "output_tokens_per_s": ("Total Output Throughput (tokens/sec)", "Token Throughput (tokens/sec)"),
    "total_tokens_per_s": ("Total Token Throughput (tokens/sec)",),
    "per_user_output_tokens_per_s": ("Per User Output Throughput [w/ ctx] (tps/user)",
                                     "Per User Output Throughput (tokens/sec/user)"),
    "total_latency_ms": ("Total Latency (ms)",),
    "avg_request_latency_ms": ("Average request latency (ms)",),
    "avg_ttft_ms": ("Average time-to-first-token [TTFT] (ms)", "Average time-to-first-token (ms)"),
    "avg_tpot_ms": ("Average time-per-output-token [TPOT] (ms)", "Average time-per-output-token (ms)"),
}
_TAGGED = re.compile(r"^\s*\[(TTFT|TPOT|Latency|GTPS)\]\s*([A-Za-z0-9]+)\s*:\s*" + _NUMBER, re.I)
_VERSION = re.compile(r"TensorRT[ -]LLM Version\s*:\s*(\S+)", re.I)


def parse_report_text(text: str, engine: str = "", mode: Mode | None = None) -> BenchResult:
    """Parse trtllm-bench's console report (the ``= PERFORMANCE OVERVIEW`` block and the
    ``[TTFT]``/``[TPOT]``/``[Latency]`` breakdown lines)."""
    fields: dict[str, Any] = {}
    for field, labels in _LABELS.items():
        for label in labels:
            # Last match wins: warmup or earlier sections may print the same label.
            matches = re.findall(r"^[ \t]*" + re.escape(label) + r"\s*:\s*" + _NUMBER, text, re.M)
            if matches:
                fields[field] = float(matches[-1])
                break
    if "num_requests" in fields:
        fields["num_requests"] = int(fields["num_requests"])
    tagged: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if m := _TAGGED.match(line):
            tagged.setdefault(m.group(1).lower(), {})[m.group(2).lower()] = float(m.group(3))
    version = _VERSION.search(text)
    if not fields and not tagged:
        raise BenchReportError("no trtllm-bench report found in the output (no PERFORMANCE OVERVIEW numbers)")
    return BenchResult(engine=engine, mode=mode, source="text", trtllm_version=version.group(1) if version else None,
                       request_latency_ms=_percentiles(tagged.get("latency")), ttft_ms=_percentiles(tagged.get("ttft")),
                       tpot_ms=_percentiles(tagged.get("tpot")), **fields)


# --------------------------------------------------------------------------- comparison


class MetricRatio(BaseModel):
    metric: str
    sparse: float
    dense: float
    ratio: float  # sparse / dense
    speedup: float  # > 1 means the sparse engine is better (dense/sparse for times)


# (metric, path into BenchResult, lower is better)
_METRICS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("ttft_avg_ms", ("avg_ttft_ms",), True),
    ("ttft_p50_ms", ("ttft_ms", "p50"), True),
    ("tpot_avg_ms", ("avg_tpot_ms",), True),
    ("tpot_p50_ms", ("tpot_ms", "p50"), True),
    ("request_latency_avg_ms", ("avg_request_latency_ms",), True),
    ("request_latency_p50_ms", ("request_latency_ms", "p50"), True),
    ("request_latency_p90_ms", ("request_latency_ms", "p90"), True),
    ("request_latency_p95_ms", ("request_latency_ms", "p95"), True),
    ("request_latency_p99_ms", ("request_latency_ms", "p99"), True),
    ("output_tokens_per_s", ("output_tokens_per_s",), False),
    ("per_user_output_tokens_per_s", ("per_user_output_tokens_per_s",), False),
    ("request_throughput", ("request_throughput",), False),
)


def _get(result: BenchResult, path: tuple[str, ...]) -> float | None:
    value: Any = result
    for part in path:
        value = getattr(value, part, None)
        if value is None:
            return None
    return float(value)


def compare(sparse: BenchResult, dense: BenchResult) -> list[MetricRatio]:
    """Sparse/dense ratio for every metric both results have (zero or missing values skipped)."""
    out: list[MetricRatio] = []
    for metric, path, lower_better in _METRICS:
        s, d = _get(sparse, path), _get(dense, path)
        if s is None or d is None or s <= 0 or d <= 0:
            continue
        out.append(MetricRatio(metric=metric, sparse=s, dense=d, ratio=s / d, speedup=d / s if lower_better else s / d))
    return out


# --------------------------------------------------------------------------- runs


class BenchRun(BaseModel):
    engine: str
    mode: Mode
    command_line: str
    log_path: Path
    report_path: Path | None
    seconds: float
    result: BenchResult


class BenchmarkReport(BaseModel):
    model_name: str
    dataset: TokenDataset
    runner: str
    runs: list[BenchRun]
    # mode -> baseline engine -> ratios of "sparse" against it
    ratios: dict[str, dict[str, list[MetricRatio]]]


def run_benchmarks(engine_dirs: dict[str, Path], dataset: TokenDataset, out_dir: str | Path, *, model_name: str,
                   model_path: str | Path | None = None, modes: Sequence[Mode] = ("latency",),
                   runner: ToolRunner | None = None, sparse_engine: str = "sparse", warmup: int = 2,
                   timeout: float | None = None, shapes: EngineShapes | None = None) -> BenchmarkReport:
    """Benchmark every engine on the same dataset, parse the reports, compare sparse vs each dense one.

    ``shapes`` (the engines' build shapes) lets the dataset be checked before anything runs.
    """
    out_dir = Path(out_dir).resolve()
    if shapes is not None:
        check_dataset_fits(dataset, shapes.max_input_len, shapes.max_seq_len)
    runner = runner or ToolRunner()
    runner.resolve(BENCH_TOOL)
    runs: list[BenchRun] = []
    for mode in modes:
        for name, engine_dir in engine_dirs.items():
            report_path = out_dir / f"{mode}_{name}.json"
            report_path.unlink(missing_ok=True)  # never parse a stale report from an earlier run
            argv = bench_command(model_name, Path(engine_dir).resolve(), Path(dataset.path).resolve(), mode=mode,
                                 model_path=Path(model_path).resolve() if model_path else None,
                                 num_requests=dataset.spec.num_requests, warmup=warmup, report_json=report_path)
            record = runner.run(argv, out_dir / "logs" / f"bench_{mode}_{name}.log", timeout=timeout)
            text = record.log_path.read_text(errors="replace")
            if record.returncode != 0:
                tail = "\n".join(text.splitlines()[-15:])
                raise EngineBuildError(f"trtllm-bench {mode} on {name} failed (exit {record.returncode}); command: "
                                       f"{record.command_line}; log: {record.log_path}\n{tail}")
            if report_path.is_file():
                result = parse_report_json(report_path, engine=name, mode=mode)
            else:
                result = parse_report_text(text, engine=name, mode=mode)
            runs.append(BenchRun(engine=name, mode=mode, command_line=record.command_line, log_path=record.log_path,
                                 report_path=report_path if report_path.is_file() else None,
                                 seconds=record.seconds, result=result))
    ratios: dict[str, dict[str, list[MetricRatio]]] = {}
    for mode in modes:
        by_engine = {r.engine: r.result for r in runs if r.mode == mode}
        if sparse_engine in by_engine:
            ratios[mode] = {name: compare(by_engine[sparse_engine], res)
                            for name, res in by_engine.items() if name != sparse_engine}
    report = BenchmarkReport(model_name=model_name, dataset=dataset, runner=runner.describe(), runs=runs, ratios=ratios)
    write_json(out_dir / "benchmark.json", report.model_dump(mode="json"))
    for mode, baselines in ratios.items():
        for name, metric_ratios in baselines.items():
            summary = ", ".join(f"{m.metric} x{m.speedup:.2f}" for m in metric_ratios[:4])
            log.info("%s: sparse vs %s: %s", mode, name, summary or "no comparable metrics")
    return report
