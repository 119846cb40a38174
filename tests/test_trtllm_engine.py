"""Engine build / benchmark adapters and the PyTorch semi-structured backend, without a GPU.

``trtllm-build`` and ``trtllm-bench`` are replaced by small fake scripts on the PATH that write
what the real tools write (engine directory, report JSON, console report, (Sparsity) log lines).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_model
from wanda.architecture import discover
from wanda.errors import ConfigError
from wanda.export.bench_trtllm import (
    BenchReportError,
    TokenDatasetSpec,
    bench_command,
    check_dataset_fits,
    compare,
    parse_report_json,
    parse_report_text,
    run_benchmarks,
    write_token_dataset,
)
from wanda.export.engine import (
    CONTAINER_ENV,
    DEFAULT_VARIANTS,
    EngineBuildError,
    EngineShapes,
    EngineUnavailableError,
    EngineVariant,
    ToolRunner,
    build_commands,
    build_engines,
    docker_prefix,
    parse_sparsity_log,
    parse_trtllm_version,
)
from wanda.export.semistructured import (
    SemiStructuredUnavailableError,
    benchmark_semistructured,
    require_semistructured_support,
    resolve_backend,
    select_semistructured_layers,
)
from wanda.export.sparse24 import magnitude_24_
from wanda.export.trtllm_checkpoint import export_trtllm_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# As TensorRT prints them through TRT-LLM's logger ("[TRT] [I] ..."), layer names as TRT-LLM
# gives them (the module path of the network). --use_fused_mlp is on by default in 1.2, so the
# gated MLP's two input GEMMs are one layer, mlp/fused_fc; lm_head is dense, never eligible.
SPARSE_LOG = """\
[TensorRT-LLM] TensorRT LLM version: 1.2.0
[05/02/2026-10:00:01] [TRT-LLM] [I] Set PluginConfig.gemm_plugin to None.
[05/02/2026-10:00:09] [TRT] [I] (Sparsity) Layers eligible for sparse math: LLaMAForCausalLM/transformer/layers/0/attention/qkv/MATMUL_0, LLaMAForCausalLM/transformer/layers/0/mlp/fused_fc/MATMUL_0, LLaMAForCausalLM/transformer/layers/1/mlp/proj/MATMUL_0, LLaMAForCausalLM/transformer/layers/1/attention/dense/MATMUL_0
[05/02/2026-10:00:09] [TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: LLaMAForCausalLM/transformer/layers/0/mlp/fused_fc/MATMUL_0, LLaMAForCausalLM/transformer/layers/1/mlp/proj/MATMUL_0
[05/02/2026-10:00:10] [TRT-LLM] [I] Engine generation completed in 8.1 seconds.
"""

LATENCY_REPORT = """\
[05/02/2026-10:05:00] [TRT-LLM] [I] Benchmark done. Reporting results...

===========================================================
= ENGINE DETAILS
===========================================================
Model:\t\t\tsmollm2-135m
Engine Directory:\t/x/sparse
TensorRT LLM Version:\t1.2.0
Dtype:\t\t\tfloat16

===========================================================
= REQUEST DETAILS 
===========================================================
Number of requests:             8
Number of concurrent requests:  1.0000
Average Input Length (tokens):  128.0000
Average Output Length (tokens): 64.0000
===========================================================
= PERFORMANCE OVERVIEW 
===========================================================
Request Throughput (req/sec):                     4.0000
Total Output Throughput (tokens/sec):             256.0000
Total Token Throughput (tokens/sec):              768.0000
Total Latency (ms):                               2000.0000
Average request latency (ms):                     250.0000
Per User Output Throughput [w/ ctx] (tps/user):   256.0000
Per GPU Output Throughput (tps/gpu):              256.0000
Average time-to-first-token [TTFT] (ms):          10.0000
Average time-per-output-token [TPOT] (ms):        3.8000
Per User Output Speed (tps/user):                 263.1579

-- Per-Request Time-per-Output-Token [TPOT] Breakdown (ms)

[TPOT] MINIMUM: 3.7000
[TPOT] MAXIMUM: 4.1000
[TPOT] AVERAGE: 3.8000
[TPOT] P50    : 3.8000
[TPOT] P90    : 4.0000
[TPOT] P95    : 4.1000
[TPOT] P99    : 4.1000

-- Per-Request Time-to-First-Token [TTFT] Breakdown (ms) 

[TTFT] MINIMUM: 9.0000
[TTFT] MAXIMUM: 12.0000
[TTFT] AVERAGE: 10.0000
[TTFT] P50    : 10.0000
[TTFT] P90    : 11.0000
[TTFT] P95    : 12.0000
[TTFT] P99    : 12.0000

-- Request Latency Breakdown (ms) -----------------------

[Latency] P50    : 249.0000
[Latency] P90    : 255.0000
[Latency] P95    : 260.0000
[Latency] P99    : 262.0000
[Latency] MINIMUM: 240.0000
[Latency] MAXIMUM: 262.0000
[Latency] AVERAGE: 250.0000
"""


def report_dict(scale: float) -> dict:
    """A ``--report_json`` document; ``scale`` multiplies every time (throughputs divide)."""
    pct = lambda base: {"p50": base * scale, "p90": base * 1.1 * scale, "p95": base * 1.2 * scale,  # noqa: E731
                        "p99": base * 1.3 * scale, "minimum": base * 0.9 * scale, "maximum": base * 1.3 * scale,
                        "average": base * scale}
    return {
        "engine": {"model": "m", "engine_dir": "/x", "version": "1.2.0", "backend": "TRT"},
        "request_info": {"num_requests": 8, "avg_input_length": 128.0, "avg_output_length": 64.0},
        "performance": {"total_latency_ms": 2000 * scale, "avg_request_latency_ms": 250 * scale,
                        "request_throughput_req_s": 4 / scale, "system_output_throughput_tok_s": 256 / scale,
                        "system_total_throughput_tok_s": 768 / scale, "output_throughput_per_user_tok_s": 256 / scale,
                        "request_latency_percentiles_ms": pct(250)},
        "streaming_metrics": {"avg_ttft_ms": 10 * scale, "avg_tpot_ms": 3.8 * scale, "ttft_percentiles": pct(10),
                              "tpot_percentiles": pct(3.8), "token_output_speed_tok_s": 263 / scale},
    }


def write_tool(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


FAKE_BUILD = """\
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
out = Path(argv[argv.index("--output_dir") + 1])
print("[TensorRT-LLM] TensorRT-LLM version: 1.2.0")
if os.environ.get("FAKE_BUILD_FAIL"):
    print("[TRT] [E] out of memory"); sys.exit(3)
out.mkdir(parents=True)
(out / "rank0.engine").write_bytes(b"engine")
(out / "config.json").write_text(json.dumps({"version": "1.2.0", "build_config": {"max_seq_len": 192}}))
(out / "argv.json").write_text(json.dumps(argv))
if "--weight_sparsity" in argv and not os.environ.get("FAKE_NO_SPARSE"):
    print(os.environ["FAKE_SPARSE_LOG"])
"""

FAKE_BENCH = """\
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
engine = Path(argv[argv.index("--engine_dir") + 1]).name
scale = 0.8 if engine == "sparse" else 1.0
report = json.loads(os.environ["FAKE_REPORT"])
def scaled(x, k):
    if isinstance(x, dict): return {a: scaled(b, a) for a, b in x.items()}
    if isinstance(x, (int, float)) and not isinstance(x, bool) and k not in ("num_requests", "avg_input_length", "avg_output_length"):
        return x / scale if ("throughput" in k or "tok_s" in k) else x * scale
    return x
if "--report_json" in argv and not os.environ.get("FAKE_NO_JSON"):
    Path(argv[argv.index("--report_json") + 1]).write_text(json.dumps(scaled(report, "")))
print(os.environ["FAKE_TEXT"])
"""


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_tool(bin_dir, "trtllm-build", FAKE_BUILD)
    write_tool(bin_dir, "trtllm-bench", FAKE_BENCH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(CONTAINER_ENV, raising=False)
    monkeypatch.setenv("FAKE_SPARSE_LOG", SPARSE_LOG)
    monkeypatch.setenv("FAKE_REPORT", json.dumps(report_dict(1.0)))
    monkeypatch.setenv("FAKE_TEXT", LATENCY_REPORT)
    return bin_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = tiny_model("llama")
    for name in discover(model).all_targets():
        magnitude_24_(model.get_submodule(name).weight.data)
    out = tmp_path_factory.mktemp("export") / "ckpt"
    export_trtllm_checkpoint(model, out)
    return out


# --------------------------------------------------------------------------- build commands


def test_build_commands_sparse_and_both_dense_baselines_share_shapes(tmp_path):
    shapes = EngineShapes(max_batch_size=4, max_input_len=128, max_seq_len=192)
    cmds = build_commands(tmp_path / "ckpt", tmp_path / "engines", shapes)
    assert list(cmds) == ["sparse", "dense", "dense_gemm_plugin"]

    def flag(argv, name):
        return argv[argv.index(name) + 1] if name in argv else None

    for argv in cmds.values():
        assert argv[0] == "trtllm-build"
        assert flag(argv, "--checkpoint_dir") == str(tmp_path / "ckpt")
        assert [flag(argv, f) for f in ("--max_batch_size", "--max_input_len", "--max_seq_len", "--max_num_tokens",
                                        "--max_beam_width")] == ["4", "128", "192", "512", "1"]
    assert "--weight_sparsity" in cmds["sparse"] and flag(cmds["sparse"], "--gemm_plugin") == "disable"
    assert "--weight_sparsity" not in cmds["dense"] and flag(cmds["dense"], "--gemm_plugin") == "disable"
    assert "--weight_sparsity" not in cmds["dense_gemm_plugin"]
    assert flag(cmds["dense_gemm_plugin"], "--gemm_plugin") == "auto"
    from tests.standins import FLAGS
    build_flags = json.loads(FLAGS.read_text())["trtllm-build"]["options"]
    assert build_flags["--gemm_plugin"]["default"] is None  # trtllm-build's default: disabled
    for argv in cmds.values():  # every flag we pass exists in TensorRT-LLM 1.2's trtllm-build
        assert {a for a in argv[1:] if a.startswith("--")} <= set(build_flags)
    assert flag(cmds["sparse"], "--output_dir") == str(tmp_path / "engines" / "sparse")


def test_variant_and_shape_validation():
    with pytest.raises(ValueError, match="gemm_plugin disable"):
        EngineVariant(name="bad", weight_sparsity=True, gemm_plugin="float16")
    with pytest.raises(ValueError, match="max_seq_len"):
        EngineShapes(max_input_len=128, max_seq_len=128)
    with pytest.raises(ConfigError, match="engine.variants"):
        build_commands("c", "e", EngineShapes(), variants=[DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[0]])
    with pytest.raises(ConfigError, match="log_level"):
        build_commands("c", "e", EngineShapes(), log_level="warning")


# --------------------------------------------------------------------------- runner


def test_missing_tool_names_what_is_missing_and_the_checkpoint(tmp_path, monkeypatch, checkpoint):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.delenv(CONTAINER_ENV, raising=False)
    with pytest.raises(EngineUnavailableError) as info:
        build_engines(checkpoint, tmp_path / "engines", EngineShapes())
    message = str(info.value)
    assert "trtllm-build not found on PATH and no container command configured" in message
    assert f"the exported checkpoint is at {checkpoint.resolve()}" in message
    assert not (tmp_path / "engines").exists()
    with pytest.raises(EngineUnavailableError, match="container runtime 'no-such-docker'"):
        ToolRunner("no-such-docker run --gpus all img").resolve("trtllm-build", checkpoint)


def test_container_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv(CONTAINER_ENV, "env FOO=1")
    runner = ToolRunner()
    assert runner.resolve("trtllm-build") == ["env", "FOO=1", "trtllm-build"]
    prefix = docker_prefix("nvcr.io/nvidia/tensorrt-llm/release:1.2.0", [tmp_path, tmp_path, "/data"])
    assert prefix[:5] == ["docker", "run", "--rm", "--gpus", "all"] and prefix[-1].endswith("release:1.2.0")
    mounts = [prefix[i + 1] for i, a in enumerate(prefix) if a == "-v"]
    assert mounts == [f"{tmp_path.resolve()}:{tmp_path.resolve()}", "/data:/data"]


# --------------------------------------------------------------------------- log parsing


def test_parse_sparsity_log_finds_sparse_layers():
    summary = parse_sparsity_log(SPARSE_LOG)
    assert summary.sparsity_lines_found and summary.has_sparse_layers and not summary.warnings
    assert len(summary.eligible) == 4 and len(summary.picked) == 2
    assert summary.picked_modules == ["transformer.layers.0.mlp.fused_fc", "transformer.layers.1.mlp.proj"]
    assert "transformer.layers.0.attention.qkv" in summary.eligible_modules
    assert len(summary.eligible_modules) == 4  # the fused MLP GEMM counts as one module
    assert parse_trtllm_version(SPARSE_LOG) == "1.2.0"
    unfused = SPARSE_LOG.replace("mlp/fused_fc/MATMUL_0", "mlp/fc/MATMUL_0, LLaMAForCausalLM/transformer/layers/0/mlp/gate/MATMUL_0")
    assert parse_sparsity_log(unfused).picked_modules == ["transformer.layers.0.mlp.fc", "transformer.layers.0.mlp.gate",
                                                          "transformer.layers.1.mlp.proj"]


def test_parse_sparsity_log_tolerates_other_spellings_and_warns():
    old_style = ("[TensorRT] INFO: (Sparsity) Layers eligible for sparse math: MatMul_1, MatMul_2\n"
                 "[TensorRT] INFO: (Sparsity) TRT inference plan picked sparse implementation for layers:\n")
    summary = parse_sparsity_log(old_style)
    assert summary.eligible == ["MatMul_1", "MatMul_2"] and not summary.has_sparse_layers
    assert "picked no sparse implementation" in summary.warnings[0]
    none = parse_sparsity_log("[TRT-LLM] [I] Engine generation completed\n")
    assert not none.sparsity_lines_found and "no TensorRT '(Sparsity)' lines" in none.warnings[0]
    empty = parse_sparsity_log("[I] [TRT] (Sparsity) Layers eligible for sparse math: \n")
    assert "no layer eligible" in empty.warnings[0]


# --------------------------------------------------------------------------- builds (fake tool)


def test_build_engines_with_fake_tool(fake_bin, checkpoint, tmp_path):
    shapes = EngineShapes(max_batch_size=1, max_input_len=128, max_seq_len=192)
    report = build_engines(checkpoint, tmp_path / "engines", shapes)
    engines = report.engine_dirs()
    assert set(engines) == {"sparse", "dense", "dense_gemm_plugin"}
    for build in report.builds:
        assert build.engine_dir.is_dir() and "rank0.engine" in build.engine_files
        assert build.trtllm_version == "1.2.0" and build.run.returncode == 0
        assert build.run.log_path.read_text().startswith("$ ")
        argv = json.loads((build.engine_dir / "argv.json").read_text())
        assert argv[argv.index("--max_seq_len") + 1] == "192"
    sparse = next(b for b in report.builds if b.variant.name == "sparse")
    assert sparse.sparsity.picked_modules == ["transformer.layers.0.mlp.fused_fc", "transformer.layers.1.mlp.proj"]
    assert not report.warnings and report.versions["runner"] == "host PATH"
    recorded = json.loads((tmp_path / "engines" / "engine_build.json").read_text())
    assert "--weight_sparsity" in recorded["builds"][0]["run"]["command"]
    assert not list((tmp_path / "engines").glob(".*building"))


def test_build_warns_when_no_layer_got_sparse_kernels(fake_bin, checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_NO_SPARSE", "1")
    report = build_engines(checkpoint, tmp_path / "engines", EngineShapes(max_seq_len=192),
                           variants=DEFAULT_VARIANTS[:1], probe=False)
    assert report.warnings and "no TensorRT '(Sparsity)' lines" in report.warnings[0]
    assert any("(Sparsity)" in r.message for r in caplog.records if r.levelname == "WARNING")


def test_failed_build_leaves_no_engine(fake_bin, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_BUILD_FAIL", "1")
    with pytest.raises(EngineBuildError, match=r"(?s)sparse engine build failed \(exit 3\).*out of memory"):
        build_engines(checkpoint, tmp_path / "engines", EngineShapes(max_seq_len=192), probe=False)
    assert not (tmp_path / "engines" / "sparse").exists()
    assert not list((tmp_path / "engines").glob(".*building"))


def test_build_through_container_prefix(fake_bin, checkpoint, tmp_path):
    runner = ToolRunner(["env", "WANDA_IN_CONTAINER=1"])  # a stand-in "container" that runs the tool
    report = build_engines(checkpoint, tmp_path / "engines", EngineShapes(max_seq_len=192), runner=runner,
                           variants=DEFAULT_VARIANTS[1:2], probe=False)
    assert report.builds[0].run.command[:3] == ["env", "WANDA_IN_CONTAINER=1", "trtllm-build"]
    assert report.runner.startswith("container: env")


# --------------------------------------------------------------------------- benchmark


def test_token_dataset_is_seeded_and_in_trtllm_bench_format(tmp_path):
    spec = TokenDatasetSpec(num_requests=5, input_len=16, output_len=8, vocab_size=50, seed=3, exclude_ids=(0, 1, 2))
    a = write_token_dataset(tmp_path / "a.jsonl", spec)
    b = write_token_dataset(tmp_path / "b.jsonl", spec)
    assert a.sha256 == b.sha256 and a.max_seq_len == 24
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == list(range(5))
    assert all(len(r["input_ids"]) == 16 and r["output_tokens"] == 8 for r in rows)
    assert all(3 <= t < 50 for r in rows for t in r["input_ids"])
    other = write_token_dataset(tmp_path / "c.jsonl", spec.model_copy(update={"seed": 4}))
    assert other.sha256 != a.sha256
    check_dataset_fits(a, max_input_len=16, max_seq_len=24)
    with pytest.raises(ConfigError, match="benchmark.dataset"):
        check_dataset_fits(a, max_input_len=16, max_seq_len=23)


def test_bench_commands():
    lat = bench_command("smollm2", "/e/sparse", "/d.jsonl", model_path="/m", num_requests=8, report_json="/r.json")
    assert lat[:5] == ["trtllm-bench", "--model", "smollm2", "--model_path", "/m"]
    assert lat[5:9] == ["latency", "--backend", "tensorrt", "--engine_dir"]
    assert lat[lat.index("--concurrency") + 1] == "1" and lat[lat.index("--report_json") + 1] == "/r.json"
    thr = bench_command("smollm2", "/e/dense", "/d.jsonl", mode="throughput")
    assert "throughput" in thr and "--streaming" in thr and "--concurrency" not in thr
    with pytest.raises(ConfigError, match="benchmark.mode"):
        bench_command("m", "e", "d", mode="offline")


def test_parse_report_text_and_json_agree():
    text = parse_report_text(LATENCY_REPORT, engine="sparse", mode="latency")
    data = parse_report_json(report_dict(1.0), engine="sparse", mode="latency")
    assert text.source == "text" and data.source == "json"
    for result in (text, data):
        assert result.num_requests == 8 and result.trtllm_version == "1.2.0"
        assert result.avg_ttft_ms == pytest.approx(10.0) and result.avg_tpot_ms == pytest.approx(3.8)
        assert result.output_tokens_per_s == pytest.approx(256.0)
        assert result.request_latency_ms.p50 == pytest.approx(250.0 if result is data else 249.0)
        assert result.ttft_ms.p99 is not None and result.tpot_ms.average == pytest.approx(3.8)
    assert text.request_latency_ms.p90 == pytest.approx(255.0)
    older = "Token Throughput (tokens/sec):  1000.5\nRequest Throughput (req/sec):   3.2\nTotal Latency (ms):  10\n"
    old = parse_report_text(older)
    assert old.output_tokens_per_s == pytest.approx(1000.5) and old.ttft_ms is None
    with pytest.raises(BenchReportError):
        parse_report_text("Traceback: engine not found")


def test_compare_ratios():
    sparse = parse_report_json(report_dict(0.8))
    dense = parse_report_json(report_dict(1.0))
    ratios = {r.metric: r for r in compare(sparse, dense)}
    assert ratios["tpot_avg_ms"].ratio == pytest.approx(0.8) and ratios["tpot_avg_ms"].speedup == pytest.approx(1.25)
    assert ratios["output_tokens_per_s"].ratio == pytest.approx(1.25)
    assert ratios["output_tokens_per_s"].speedup == pytest.approx(1.25)
    assert "request_latency_p99_ms" in ratios


def test_run_benchmarks_with_fake_tool(fake_bin, tmp_path, monkeypatch):
    engines = {}
    for name in ("sparse", "dense", "dense_gemm_plugin"):
        engines[name] = tmp_path / "engines" / name
        engines[name].mkdir(parents=True)
    dataset = write_token_dataset(tmp_path / "d.jsonl", TokenDatasetSpec(num_requests=8, input_len=128,
                                                                         output_len=64, vocab_size=128))
    report = run_benchmarks(engines, dataset, tmp_path / "bench", model_name="tiny", model_path=tmp_path,
                            modes=("latency", "throughput"))
    assert len(report.runs) == 6 and all(r.result.source == "json" for r in report.runs)
    ratios = {r.metric: r for r in report.ratios["latency"]["dense"]}
    assert ratios["ttft_avg_ms"].speedup == pytest.approx(1.25)
    assert set(report.ratios["throughput"]) == {"dense", "dense_gemm_plugin"}
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["model_name"] == "tiny"
    monkeypatch.setenv("FAKE_NO_JSON", "1")  # older tools without --report_json output: parse the console
    report = run_benchmarks({"sparse": engines["sparse"]}, dataset, tmp_path / "bench2", model_name="tiny")
    assert report.runs[0].result.source == "text" and report.runs[0].report_path is None


# --------------------------------------------------------------------------- semi-structured (CPU side)


def test_select_layers_by_pattern_and_backend_shape():
    model = tiny_model("llama")
    for name in discover(model).all_targets():
        magnitude_24_(model.get_submodule(name).weight.data)
    model.model.layers[1].self_attn.o_proj.weight.data[2, :4] = 1.0  # breaks 2:4
    cutlass = {s.name: s for s in select_semistructured_layers(model, "float16", "cutlass")}
    assert not cutlass["model.layers.1.self_attn.o_proj"].selected
    assert "not 2:4" in cutlass["model.layers.1.self_attn.o_proj"].reason
    down = cutlass["model.layers.0.mlp.down_proj"]  # (64, 96): 96 is not a multiple of 64
    assert not down.selected and "(32, 64)" in down.reason
    assert cutlass["model.layers.0.self_attn.k_proj"].selected  # (32, 64)
    cusparselt = {s.name: s for s in select_semistructured_layers(model, "bfloat16", "cusparselt")}
    assert cusparselt["model.layers.0.mlp.down_proj"].selected
    assert sum(s.selected for s in cusparselt.values()) == 13
    with pytest.raises(ConfigError, match="semistructured.dtype"):
        select_semistructured_layers(model, "float32", "cutlass")


def test_backend_resolution():
    assert resolve_backend("auto", cusparselt_available=True) == "cusparselt"
    assert resolve_backend("auto", cusparselt_available=False) == "cutlass"
    with pytest.raises(SemiStructuredUnavailableError, match="cuSPARSELt"):
        resolve_backend("cusparselt", cusparselt_available=False)
    with pytest.raises(ConfigError):
        resolve_backend("magic")


def _visible_gpu(monkeypatch, capability, name, cusparselt=True):
    """Pretend torch sees one CUDA GPU of ``capability`` (nothing runs on it in these tests)."""
    import wanda.export.semistructured as semi

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(semi, "_cusparselt_available", lambda: cusparselt)


def test_cutlass_refused_on_hopper_and_auto_picks_cusparselt(monkeypatch, capsys):
    # torch's CUTLASS 2:4 kernels exist for compute capability 8.x only.
    assert resolve_backend("auto", cusparselt_available=True, capability=(9, 0)) == "cusparselt"
    assert resolve_backend("cutlass", cusparselt_available=True, capability=(8, 6)) == "cutlass"
    with pytest.raises(ConfigError, match=r"(?s)semistructured.backend.*compute capability 9.0.*8\.x"):
        resolve_backend("cutlass", cusparselt_available=True, capability=(9, 0))
    with pytest.raises(SemiStructuredUnavailableError, match="CUTLASS 2:4 kernels run only on compute capability 8.x"):
        resolve_backend("auto", cusparselt_available=False, capability=(9, 0))
    _visible_gpu(monkeypatch, (9, 0), "NVIDIA H200")
    model = tiny_model("llama")
    for name in discover(model).all_targets():
        magnitude_24_(model.get_submodule(name).weight.data)
    with pytest.raises(ConfigError, match="'cutlass' cannot run on compute capability 9.0"):
        benchmark_semistructured(model, backend="cutlass")  # refused before anything touches the GPU
    assert next(model.parameters()).device.type == "cpu"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_semistructured
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert bench_semistructured.main(["--backend", "cutlass"]) == 2
    assert "'cutlass' cannot run on compute capability 9.0" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_no_gpu_error_is_clear():
    with pytest.raises(SemiStructuredUnavailableError, match=r"CUDA GPU with compute capability >= 8\.0 required"):
        require_semistructured_support()
    with pytest.raises(SemiStructuredUnavailableError, match="semi-structured sparsity"):
        benchmark_semistructured(tiny_model("llama"))


def test_old_gpu_error_names_the_capability(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    with pytest.raises(SemiStructuredUnavailableError, match="Tesla T4 has compute capability 7.5"):
        require_semistructured_support()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_benchmark_script_exits_clearly_without_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_semistructured.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "CUDA GPU with compute capability >= 8.0 required for semi-structured sparsity" in proc.stderr
