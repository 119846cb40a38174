"""The engine and benchmark stages through their own entry points, with stand-in TensorRT-LLM tools.

``trtllm-build`` / ``trtllm-bench`` are the stand-ins of ``tests/standins`` (exactly TensorRT-LLM
1.2's options, failing on anything else); the GPU the engine stage checks for is made visible by
patching ``wanda.export.engine.nvidia_gpu_visible``: in-process for ``python -m tasks.engine``
(run with runpy), through ``tests/standins/site/sitecustomize.py`` for subprocesses.
"""
from __future__ import annotations

import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import write_params_file
from tests import standins
from tests.pipeline_project import REPO, TINY_OVERRIDES
from tests.tiny import tiny_model, tiny_tokenizer
from wanda.export.safetensors_header import read_header
from wanda.export.tokenizer_compat import write_trtllm_model_dir
from wanda.model_io import save_model

CHAIN = ("materialize", "calibration", "statistics", "masks", "prune", "export_24")


def _main(module: str, root: Path) -> int:
    """``python -m tasks.<stage> --root ROOT`` in this process; its exit status."""
    argv = sys.argv
    sys.argv = [module, "--root", str(root)]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
    return 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny project pruned 2:4 and exported, up to the engine stage."""
    root = tmp_path_factory.mktemp("serving")
    save_model(tiny_model(), tiny_tokenizer(), root / "fixtures" / "tiny-model")
    rng = random.Random(0)
    for name, words in (("calib", 3000), ("eval", 2000)):
        (root / "fixtures" / f"{name}.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(words)))
    write_params_file(root / "params.yaml", (REPO / "params.yaml").read_text(),
                      TINY_OVERRIDES + ["statistics.mode=one_pass", "masks.pattern=2:4",
                                        "benchmark.num_requests=4", "benchmark.input_len=32",
                                        "benchmark.output_len=16"])
    cwd = os.getcwd()
    os.chdir(root)  # sources in the parameters are relative to the project root
    try:
        for stage in CHAIN:
            assert _main(f"tasks.{stage}", root) == 0, stage
    finally:
        os.chdir(cwd)
    return root


def _manifest(root: Path, stage: str) -> dict:
    return json.loads((root / "artifacts" / stage / "manifest.json").read_text())


@pytest.fixture
def tools(tmp_path, monkeypatch) -> Path:
    bin_dir = standins.install(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("WANDA_TRTLLM_CONTAINER", raising=False)
    return bin_dir


def test_standins_refuse_what_the_real_tools_refuse(tools, tmp_path):
    def run(*argv):
        return subprocess.run(list(argv), capture_output=True, text=True)

    bad = run("trtllm-build", "--checkpoint_dir", str(tmp_path), "--gemm_plugin", "on")
    assert bad.returncode == 2 and "invalid choice: 'on'" in bad.stderr
    assert run("trtllm-build", "--sparsity").returncode == 2
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("")
    both = run("trtllm-bench", "--model", "m", "latency", "--dataset", str(dataset), "--beam_width", "1",
               "--concurrency", "1")
    assert both.returncode == 2 and "Mutually exclusive" in both.stderr
    assert run("trtllm-bench", "latency").returncode == 2  # --model is required


def test_bench_standin_reads_the_model_folder_as_trtllm_bench_does(tools, tmp_path):
    """``get_model_config`` runs before anything else in trtllm-bench: a folder with config and
    tokenizer but no safetensors (what the benchmark stage handed it before) raises there."""
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "pruned")
    old = tmp_path / "old"
    old.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (old / name).write_bytes((tmp_path / "pruned" / name).read_bytes())
    (old / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("")

    def bench(model_path):
        return subprocess.run(["trtllm-bench", "--model", "pruned", "--model_path", str(model_path), "latency",
                               "--backend", "tensorrt", "--engine_dir", str(tmp_path), "--dataset", str(dataset)],
                              capture_output=True, text=True)

    proc = bench(old)
    assert proc.returncode == 1
    assert f"RuntimeError: '{old}' is not a safetensors repo. Couldn't find 'model.safetensors.index.json' or " \
           "'model.safetensors' files." in proc.stderr
    (old / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b'{"w": {"dtype": "F16"}}  ')
    proc = bench(old)  # a header without shape/data_offsets
    assert proc.returncode == 1 and "header format not recognized" in proc.stderr
    new = write_trtllm_model_dir(tmp_path / "pruned", tmp_path / "new", dtype="bfloat16")
    proc = bench(new)  # gets past the model folder; stops at the (empty) engine folder
    assert f"dtype bfloat16, {tiny_model().num_parameters()} parameters ({{'BF16': " in proc.stdout, proc.stderr
    assert "safetensors" not in proc.stderr.replace(str(tmp_path), "")  # past the model folder


def test_engine_and_benchmark_stages_through_their_entry_points(exported, tools, monkeypatch):
    import wanda.export.engine as engine_lib

    monkeypatch.setattr(engine_lib, "nvidia_gpu_visible", lambda: True)
    monkeypatch.chdir(exported)
    assert _main("tasks.engine", exported) == 0
    engine = _manifest(exported, "engine")
    assert engine["status"] == "completed" and engine["summary"]["environment"]["nvidia_smi"] is True
    assert set(engine["summary"]["engines"]) == {"sparse", "dense", "dense_gemm_plugin"}
    build = json.loads((exported / "artifacts" / "engine" / "engines" / "engine_build.json").read_text())
    sparse = next(b for b in build["builds"] if b["variant"]["name"] == "sparse")
    # --use_fused_mlp (default): per layer qkv, dense, fused_fc (= fc + gate) and proj are sparse.
    assert sparse["sparsity"]["picked_modules"] == [f"transformer.layers.{i}.{m}" for i in range(2) for m in
                                                    ("attention.dense", "attention.qkv", "mlp.fused_fc", "mlp.proj")]
    assert not engine["summary"]["warnings"]

    # The benchmark stage as dvc.yaml runs it: a subprocess, the GPU made visible by sitecustomize.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(standins.SITE), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "tasks.benchmark", "--root", str(exported)], cwd=exported, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = _manifest(exported, "benchmark")
    assert bench["status"] == "completed" and bench["summary"]["environment"]["nvidia_smi"] is True
    ttft = {r["metric"]: r for r in bench["summary"]["ratios"]["latency"]["dense"]}["ttft_avg_ms"]
    assert ttft["speedup"] == pytest.approx(1.25)  # the stand-in reports the sparse engine 0.8x the time
    trtllm_model = exported / "artifacts" / "benchmark" / "trtllm_model"
    tokenizer = json.loads((trtllm_model / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
    # trtllm-bench is handed the engine's dtype (the pruned model is float32) and the pruned model's
    # tensors, header only, in that dtype.
    engine_config = json.loads((exported / "artifacts" / "engine" / "engines" / "sparse" / "config.json").read_text())
    config = json.loads((trtllm_model / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == engine_config["pretrained_config"]["dtype"] == "float16"
    pruned = exported / "artifacts" / "prune" / "model"
    assert json.loads((pruned / "config.json").read_text())["dtype"] == "float32"
    header, original = read_header(trtllm_model / "model.safetensors"), read_header(pruned / "model.safetensors")
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == \
        {k: v["shape"] for k, v in original.items() if k != "__metadata__"}
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert (trtllm_model / "model.safetensors").stat().st_size < 16_384  # no tensor data
    assert "dtype float16" in (exported / "artifacts" / "benchmark" / "logs" / "bench_latency_sparse.log").read_text()


@pytest.mark.integration
def test_pipeline_run_with_two_four_builds_and_benchmarks_engines(tmp_path):
    """``wanda-pipeline run -S masks.pattern=2:4``: DVC runs every stage as dvc.yaml says, the
    engine and benchmark stages against the stand-ins (GPU visible through sitecustomize)."""
    from tests.pipeline_project import copy_project, env

    root = copy_project(tmp_path / "p")
    bin_dir = standins.install(tmp_path / "bin")
    values = env()
    values.update(PATH=f"{bin_dir}{os.pathsep}{values['PATH']}", PYTHONPATH=str(standins.SITE))
    values.pop("WANDA_TRTLLM_CONTAINER", None)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--no-track", "-S", "masks.pattern=2:4",
                           "-S", "benchmark.num_requests=4", "-S", "benchmark.input_len=32",
                           "-S", "benchmark.output_len=16"],
                          cwd=root, env=values, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for stage in ("export_24", "engine", "benchmark"):
        assert _manifest(root, stage)["status"] == "completed", stage
    build = json.loads((root / "artifacts" / "engine" / "engines" / "engine_build.json").read_text())
    assert {b["variant"]["name"] for b in build["builds"]} == {"sparse", "dense", "dense_gemm_plugin"}
    assert "transformer.layers.0.mlp.fused_fc" in \
        build["builds"][0]["sparsity"]["picked_modules"]
    assert _manifest(root, "benchmark")["summary"]["ratios"]["latency"]["dense_gemm_plugin"]
