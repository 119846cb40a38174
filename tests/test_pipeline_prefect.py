"""The Prefect flows on a tiny model, under Prefect's test harness (a temporary local server).

Each test copies the session's cold-run repository (tests.pipeline_project.cold_project).
"""
from __future__ import annotations

import json

import pytest

from tasks.common import read_manifest
from tests.pipeline_project import copy_project, status

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os

    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts() if a.key}


def _logs() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs travel to the server in batches
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs()]


def test_pipeline_flow_runs_changed_stages_then_everything_is_cached(harness, tmp_path):
    from flows.pipeline import prune_pipeline

    root = copy_project(tmp_path / "p")
    result = prune_pipeline(repo=str(root), overrides=["masks.sparsity=0.6"])
    actions = {o["address"]: o["action"] for o in result["outcomes"]}
    assert {k for k, v in actions.items() if v == "ran"} == {"masks", "prune", "evaluate", "export_24", "engine",
                                                             "benchmark", "savings"}
    assert {k for k, v in actions.items() if v == "cached"} == {"materialize", "calibration", "statistics",
                                                                "dense_eval"}
    assert "sparsity: 0.6" in (root / "params.yaml").read_text()  # DVC read the override from params.yaml
    assert result["metrics"]["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert status(root) == {}
    assert {"wanda-pipeline-stages", "wanda-layer-sparsity", "wanda-metrics"} <= _artifact_keys()
    logs = _logs()
    assert any("perplexity: windows 4/4" in m for m in logs)  # stage progress reaches Prefect's log

    again = prune_pipeline(repo=str(root))
    assert {o["action"] for o in again["outcomes"]} == {"cached"}
    assert again["seconds"] < result["seconds"]


def test_sweep_shares_statistics_runs_points_in_parallel_and_caches(harness, tmp_path):
    from flows.sweep import sweep

    root = copy_project(tmp_path / "p")
    stats_before = read_manifest(root / "artifacts/statistics")
    result = sweep(axes=["masks.sparsity=0.4,0.6"], name="t", repo=str(root), workers=2)
    actions = {o["address"]: o["action"] for o in result["outcomes"]}
    assert actions["statistics"] == "cached" and actions["dense_eval"] == "cached"
    points = {row["point"]: row for row in result["points"]}
    assert set(points) == {"sparsity-0_4", "sparsity-0_6"}
    assert all(row["perplexity"] > 0 for row in points.values())
    assert "sweeps/t/dvc.yaml:sparsity-0_4-masks" in actions
    assert (root / "artifacts/sweeps/t/report/perplexity_vs_sparsity.png").stat().st_size > 1000
    assert (root / "artifacts/sweeps/t/report/block_sparsity.png").stat().st_size > 1000
    assert "| sparsity-0_6 |" in result["table"]
    assert read_manifest(root / "artifacts/statistics") == stats_before  # one statistics pass served both
    assert status(root) == {}  # the parallel points (own workspaces) landed in dvc.lock via the run cache
    assert "wanda-sweep-t" in _artifact_keys()
    from flows.status import pipeline_status

    states = {s.address: s.state for s in pipeline_status(root)}
    assert states["sweeps/t/dvc.yaml:report"] == "cached" and set(states.values()) == {"cached"}

    again = sweep(axes=["masks.sparsity=0.4,0.6"], name="t", repo=str(root), workers=1)
    assert {o["action"] for o in again["outcomes"]} == {"cached"}
    # Where each point ran, beside the report: this run computed nothing, the first run did.
    placed = json.loads((root / "artifacts/sweeps/t/placement.json").read_text())["points"]
    assert {r["point"]: r["worker"] for r in placed} == {"sparsity-0_4": "cached", "sparsity-0_6": "cached"}
    assert {r["point"] for r in result["placement"]} == {"sparsity-0_4", "sparsity-0_6"}
    assert all(r["wall_s"] > 0 for r in result["placement"])
