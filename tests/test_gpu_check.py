"""benchmarks/gpu_check.sh without a GPU: its stand-in mode, and its control flow.

The timing itself needs a GPU (README, "GPU check"). Here: the script run as the device machine
runs it (``OUT=dir bash benchmarks/gpu_check.sh``) says in one line that it is in stand-in mode and
exits 2 within 10 s, having written its header (versions, what is missing) to ``$OUT``; argument
errors name the argument; its 2:4 rule is wanda's; its layer stack is a LLaMA-3-8B decoder layer's
linears. The row loop (files written row by row, the budget, the exit status, a failing row) runs
on CPU with torch.cuda's stream/event/graph calls emulated (graph capture refused, so the eager
fallback is what runs) and the 2:4 kernels replaced by the dense weights: that tests the script's
bookkeeping, not any timing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wanda.export.sparse24 import magnitude_24_

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def _script(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}  # the interpreter with torch
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    return proc, time.monotonic() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU stand-in mode")
def test_stand_in_mode_says_so_in_one_line_within_10_s_and_writes_the_header(tmp_path):
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "table.md").write_text("rows of an earlier run\n")
    proc, seconds = _script(out)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check: stand-in mode, nothing measured: needs a CUDA build of torch")
    assert f"header written to {out / 'header.txt'}" in lines[0]
    assert seconds < 10, seconds
    header = (out / "header.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in header[1:]] == ["GPU", "driver", "torch", "cuSPARSELt", "plan", "missing"]
    assert header[1] == "GPU: none visible"
    assert header[3].startswith(f"torch: {torch.__version__} (CUDA none (CPU build))")
    assert "32 layer rows (LLaMA-3-8B shapes 4096x4096, 14336x4096, 4096x14336, 1024x4096" in header[5]
    assert "cuSPARSELt in torch" in header[6]
    assert not (out / "table.md").exists()  # an earlier run's rows are not left beside this header


def test_bad_arguments_name_the_argument(tmp_path, capsys):
    proc, _ = _script(tmp_path, "--tokens", "0,16")
    assert proc.returncode == 2 and "--tokens: '0,16' is not a comma-separated list" in proc.stderr, proc.stderr
    for args, name in ((["--dtypes", "float32"], "--dtypes: 'float32'; allowed: float16, bfloat16"),
                       (["--budget-s", "400"], "--budget-s: 400.0 (allowed: 10 to 290"),
                       (["--repetitions", "1"], "--repetitions: 1 (allowed: 3 or more)")):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main(["--out-dir", str(tmp_path), *args])
        assert exc.value.code == 2 and name in capsys.readouterr().err, args
    assert not (tmp_path / "header.txt").exists()  # refused before anything is written


def test_driver_and_cusparselt_versions(tmp_path):
    assert gpu_check.cusparselt_version(602) == "0.6.2" and gpu_check.cusparselt_version(701) == "0.7.1"
    assert gpu_check.cusparselt_version(None) == "none"
    assert gpu_check.driver_version(Path("/nonexistent"))  # says where it looked even when nothing is found
    for text in ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025",
                 "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder)"):
        (tmp_path / "version").write_text(text + "\nGCC version: gcc 12\n")
        assert gpu_check.driver_version(tmp_path / "version") == f"580.159.04 ({tmp_path / 'version'})"


def test_its_two_four_rule_is_wandas():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gpu_check.magnitude_24_(w.clone()), magnitude_24_(w.clone()))


def test_layer_stack_is_a_decoder_layers_linears_pruned_two_four():
    gen = torch.Generator().manual_seed(0)
    stack = gpu_check.make_stack(2, hidden=32, intermediate=48, kv=8, dtype=torch.float32, device="cpu",
                                 generator=gen)
    assert [{k: tuple(w.shape) for k, w in layer.items()} for layer in stack] == 2 * [
        {"q": (32, 32), "k": (8, 32), "v": (8, 32), "o": (32, 32), "gate": (48, 32), "up": (48, 32), "down": (32, 48)}]
    for layer in stack:
        for w in layer.values():
            assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # 2:4
    x = torch.randn(5, 32, generator=gen)
    y = gpu_check.stack_forward(x, stack)
    assert y.shape == (5, 32) and torch.isfinite(y).all() and not torch.equal(y, x)


class _Event:
    def __init__(self, enable_timing=False):
        self.t = 0.0

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _Stream:
    def wait_stream(self, other):
        pass


class _NoCapture:
    def __init__(self, graph, **kwargs):
        pass

    def __enter__(self):
        raise RuntimeError("emulated: no graph capture on CPU")

    def __exit__(self, *exc):
        return False


@pytest.fixture
def emulated_gpu(monkeypatch):
    """torch.cuda's calls the script makes, on CPU; tiny shapes; 2:4 kernels = the dense weights."""
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check, "LLAMA3_8B_SHAPES", (("q_proj/o_proj", 32, 32), ("down_proj", 32, 64)))
    monkeypatch.setattr(gpu_check, "LLAMA3_8B", {"hidden": 32, "intermediate": 64, "kv": 8})
    monkeypatch.setattr(gpu_check, "to_cusparselt", lambda w: w.clone())
    monkeypatch.setattr(gpu_check, "search_alg", lambda sparse, x: (3, "searched"))
    env = {"gpu": "Emulated", "capability": "9.0", "gpu_detail": "cpu", "l2_bytes": 4096, "python": "3",
           "torch": torch.__version__, "torch_cuda": "none", "driver": "none", "cuda_driver_api": 0,
           "cusparselt": "0.0.0", "cusparselt_int": 0, "cusparselt_max_alg_id": 0, "alg_search": "emulated"}
    monkeypatch.setattr(gpu_check, "environment", lambda: (env, []))
    for name, value in (("Event", _Event), ("Stream", _Stream), ("current_stream", _Stream),
                        ("stream", lambda s: torch.autograd.grad_mode.no_grad()), ("synchronize", lambda: None),
                        ("CUDAGraph", lambda: None), ("graph", _NoCapture), ("empty_cache", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, value)


def test_rows_are_written_as_measured_and_the_run_ends_with_a_summary(emulated_gpu, tmp_path, capsys):
    status = gpu_check.main(["--out-dir", str(tmp_path), "--tokens", "1,16", "--stack-layers", "2",
                             "--repetitions", "3"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.index("GPU: Emulated") < out.index("| float16 | q_proj/o_proj 32x32 | 1 |")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["dtype"], r["kind"], r["tokens"]) for r in rows] == \
        [(d, "layer", t) for d in ("float16", "bfloat16") for _ in range(2) for t in (1, 16)] + \
        [(d, "stack", t) for d in ("float16", "bfloat16") for t in (1, 16)]
    assert all(r["agree"] and r["max_rel_err"] == 0 and r["alg"] in ("alg 3", "algs 3") for r in rows)
    assert all(r["timing"].startswith("eager") for r in rows)  # capture refused: the fallback, said in the row
    assert rows[0]["weight_copies"] == 6 and rows[2]["weight_copies"] == 3  # together at least 3x the L2 size
    table = (tmp_path / "table.md").read_text()
    assert table.count("| float16 |") == 6 and "End to end, bfloat16: 2 LLaMA-3-8B decoder layers" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_status"] == 0 and not summary["skipped"] and len(summary["rows"]) == 12
    assert "gpu_check: 12 rows in" in out and "all outputs agree" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header.txt", "rows.jsonl", "summary.json", "table.md"]


def test_budget_and_failing_rows_set_the_exit_status(emulated_gpu, tmp_path, monkeypatch, capsys):
    clock = iter(range(0, 10_000, 4))  # every look at the clock: 4 s later
    monkeypatch.setattr(gpu_check, "clock", lambda: float(next(clock)))
    assert gpu_check.main(["--out-dir", str(tmp_path), "--tokens", "1,16", "--dtypes", "float16",
                           "--stack-layers", "1", "--repetitions", "3", "--budget-s", "10"]) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < len(summary["rows"]) < 6 and summary["skipped"]
    assert "budget reached" in capsys.readouterr().out

    def broken(*args, **kwargs):
        raise RuntimeError("emulated cuSPARSELt failure")

    monkeypatch.setattr(gpu_check, "measure_row", broken)
    assert gpu_check.main(["--out-dir", str(tmp_path), "--tokens", "1", "--dtypes", "float16",
                           "--stack-layers", "0", "--repetitions", "3", "--budget-s", "290"]) == 1
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("emulated cuSPARSELt failure" in r["error"] for r in rows)
