"""The savings stage (issue 22, item 3): what the pruned model saves against its dense base,
measured in the same run, recorded in MLflow and gated (``min_param_reduction``,
``min_decode_speedup``)."""
from __future__ import annotations

import json
import sys

import pytest

from tasks.savings import UNSTRUCTURED_SENTENCE, _sentences, savings_metrics
from tests.pipeline_project import copy_project, sh

SPEED = {f"{who}.{phase}_tokens_per_s_{clock}": value
         for who, value in (("dense", 100.0), ("candidate", 125.0))
         for phase in ("prefill", "decode") for clock in ("cpu", "wall")}


def test_ratios_are_pruned_over_dense_and_the_sentence_names_what_saves_nothing():
    dense = {"params_total": 1000, "params_nonzero": 1000, "bytes": 4000}
    memory = {"dense": {"load_peak_mb": 10.0, "generate_peak_mb": 20.0},
              "pruned": {"load_peak_mb": 7.0, "generate_peak_mb": 15.0}}
    narrower = savings_metrics(dense, {"params_total": 700, "params_nonzero": 700, "bytes": 2800}, SPEED, memory)
    assert narrower["param_reduction"] == pytest.approx(0.3) and narrower["bytes_reduction"] == pytest.approx(0.3)
    assert narrower["decode_speedup_cpu"] == pytest.approx(1.25) and narrower["peak_memory_ratio"] == pytest.approx(0.75)
    assert narrower["dense.decode_tokens_per_s_cpu"] == 100.0 and narrower["decode_tokens_per_s_cpu"] == 125.0
    assert _sentences(narrower, "unstructured") == []
    unstructured = savings_metrics(dense, {"params_total": 1000, "params_nonzero": 500, "bytes": 4000}, SPEED, memory)
    assert unstructured["param_reduction"] == 0 and unstructured["nonzero_reduction"] == pytest.approx(0.5)
    assert _sentences(unstructured, "unstructured") == [UNSTRUCTURED_SENTENCE]
    assert "2:4 sparsity" in _sentences(unstructured, "2:4")[0]
    no_memory = savings_metrics(dense, dense, SPEED, {"dense": {"error": "x"}, "pruned": {"error": "x"}})
    assert "peak_memory_ratio" not in no_memory


def _cli(root, *args):
    return sh(root, sys.executable, "-m", "flows.cli", *args, check=False)


@pytest.mark.integration
def test_savings_stage_through_the_cli_tracked_and_gated(tmp_path):
    root = copy_project(tmp_path / "p")  # a cold `dvc repro` of every stage, savings included
    folder = root / "artifacts" / "savings"
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("param_reduction", "bytes_reduction", "prefill_speedup", "decode_speedup", "peak_memory_ratio"):
        assert key in metrics, key
    # 50% unstructured Wanda: the same parameters and bytes as dense, half the targets' weights zero.
    assert metrics["param_reduction"] == 0 and metrics["bytes_reduction"] == pytest.approx(0, abs=1e-3)
    assert 0.2 < metrics["nonzero_reduction"] < 0.5
    assert metrics["prefill_speedup"] > 0 and metrics["decode_speedup"] > 0 and metrics["peak_memory_ratio"] > 0
    assert "stored dense, runs at dense speed" in (folder / "savings.md").read_text()
    manifest = json.loads((folder / "manifest.json").read_text())
    settings = manifest["summary"]["settings"]
    assert (settings["prefill_tokens"], settings["decode_tokens"], settings["repetitions"]) == (128, 16, 3)
    assert settings["primary_clock"] == "cpu"

    names = ["--registered-model", "tiny-savings", "--experiment", "wanda-savings"]
    tracked = _cli(root, "track", *names, "--json")
    assert tracked.returncode == 0, tracked.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / '.mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("wanda-savings").experiment_id])
    assert run.data.metrics["savings.param_reduction"] == 0
    assert run.data.metrics["savings.decode_speedup"] == pytest.approx(metrics["decode_speedup"])
    assert "savings.md" in {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "extra")}

    version = client.get_model_version("tiny-savings", json.loads(tracked.stdout[tracked.stdout.index("{"):])["model_version"])
    assert "param_reduction 0" in version.tags["wanda.savings"] and "stored dense" in version.tags["wanda.savings"]
    # An unstructured model removes no parameter: a gate asking for 10% rejects it, by name.
    rejected = _cli(root, "release", *names, "--min-param-reduction", "0.1")
    assert rejected.returncode == 1 and "min_param_reduction" in rejected.stdout, rejected.stdout + rejected.stderr
    passed = _cli(root, "release", *names, "--min-param-reduction", "0", "--min-decode-speedup", "0.01", "--json")
    assert passed.returncode == 0, passed.stdout + passed.stderr[-2000:]
    checks = {c["criterion"]: c for c in json.loads(passed.stdout[passed.stdout.index("{"):])["decision"]["reasons"]}
    assert checks["min_param_reduction"]["ok"] and checks["min_decode_speedup"]["ok"]
    audit = _cli(root, "audit", "tiny-savings@champion", *names[2:])
    assert "savings.param_reduction" in audit.stdout and "min_decode_speedup" in audit.stdout, audit.stdout[-3000:]
