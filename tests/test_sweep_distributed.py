"""Sweeps on real distributed engines: a Dask scheduler and workers (and a Ray head where Ray runs
here) started as separate processes on loopback, driven through ``wanda-pipeline sweep --runner``.

Every point runs in its own workspace over the project's DVC cache; the results must equal a
``--runner local`` sweep of the same points bit for bit, land in the main workspace's dvc.lock
(``dvc status`` clean) and survive a worker killed in the middle of a point.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.common import read_manifest
from tests.clusters import DaskCluster, RayHead
from tests.pipeline_project import copy_project, env, status

pytestmark = pytest.mark.integration

# Every point on one thread, as the local reference runs (tests.pipeline_project.env): float
# reductions may differ with the thread count, and the comparison is bit for bit.
ONE_THREAD = ["-S", "sweep={resources: {threads: 1}}"]
POINTS = ["sparsity-0_3", "sparsity-0_4", "sparsity-0_5", "sparsity-0_6"]
SPARSITIES = "0.3,0.4,0.5,0.6"  # the 4-point sweep
# The fault test kills a worker inside one of two points: enough for a kill and a retry elsewhere.
FAULT_POINTS, FAULT_SPARSITIES = POINTS[1::2], "0.4,0.6"
# One point at a time per Dask worker (the workers have MEMORY=4), so two points take both.
ONE_PER_WORKER = ["-S", "sweep={resources: {threads: 1, memory_gb: 4}}"]


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    """One Prefect server for the module's CLI runs (and the workers' task runs)."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _env(api: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    values = env()
    values.update({"PREFECT_API_URL": api, **(extra or {})})
    return values


def _workers_env(root: Path, api: str, workspaces: Path) -> dict[str, str]:
    """Workers import the project copy's code, as its CLI does; the points' workspaces go where
    the test can watch them."""
    return _env(api, {"PYTHONPATH": str(root), "WANDA_WORKSPACES": str(workspaces)})


def _cli(root: Path, api: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--json", *args], cwd=root,
                            env=_env(api), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout[result.stdout.index("{"):])


def _mask_bits(path: Path) -> tuple[dict, dict[str, bytes]]:
    """A mask file's metadata and every tensor's bytes (safetensors writes the metadata map in
    no fixed order, so the header bytes alone may differ between two processes)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key).numpy().tobytes() for key in handle.keys()}


def _point_dirs(root: Path, name: str) -> list[str]:
    return sorted(p.name for p in (root / "artifacts" / "sweeps" / name).iterdir() if p.is_dir() and p.name != "report")


def _results(root: Path, name: str, points: list[str] = POINTS) -> dict:
    """What must not depend on where a point ran: every point's masks, sparsity and metrics,
    and (for the whole sweep) the sweep's metrics (timings and timestamps aside)."""
    base = root / "artifacts" / "sweeps" / name
    found: dict = {}
    if points == POINTS:
        found["report/results.json"] = (base / "report" / "results.json").read_bytes()
    for point in points:
        found[f"{point}/masks"] = _mask_bits(base / point / "masks" / "masks.safetensors")
        found[f"{point}/sparsity"] = (base / point / "masks" / "sparsity.json").read_bytes()
        found[f"{point}/metrics"] = (base / point / "evaluate" / "metrics.json").read_bytes()
    return found


@pytest.fixture(scope="module")
def local_sweep(api_url, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("local") / "p")
    result = _cli(root, api_url, "--sparsity", SPARSITIES, "--name", "s", "--runner", "local",
                  "--workers", "2", *ONE_THREAD)  # two points at a time, each on one thread
    return root, result


def test_dask_sweep_equals_local_sweep_on_two_workers(api_url, local_sweep, tmp_path):
    local_root, local = local_sweep
    root = copy_project(tmp_path / "p")
    stats_before = read_manifest(root / "artifacts/statistics")
    cluster = DaskCluster(root.parent, _workers_env(root, api_url, tmp_path / "ws"), ["w1", "w2"])
    try:
        result = _cli(root, api_url, "--sparsity", SPARSITIES, "--name", "s", "--runner", cluster.address,
                      *ONE_PER_WORKER)
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values())
    placement = {p["point"]: p["worker"] for p in result["placement"]}
    assert set(placement) == set(POINTS)
    assert set(placement.values()) == {"w1", "w2"}  # both workers took points
    recorded = json.loads((root / "artifacts/sweeps/s/placement.json").read_text())["points"]
    assert {r["point"]: r["worker"] for r in recorded} == placement and all(r["wall_s"] > 0 for r in recorded)
    assert "| sparsity-0_3 | w" in (root / "artifacts/sweeps/s/placement.md").read_text()
    assert _point_dirs(root, "s") == POINTS
    assert _results(root, "s") == _results(local_root, "s")  # bit for bit
    assert [r["perplexity"] for r in result["points"]] == [r["perplexity"] for r in local["points"]]
    # Shared stages ran once (before this sweep, in the cold project): nothing recomputed them.
    shared = {o["address"]: o["action"] for o in result["outcomes"] if ":" not in o["address"]}
    assert set(shared.values()) == {"cached"}
    assert read_manifest(root / "artifacts/statistics") == stats_before
    points = [o for o in result["outcomes"] if ":" in o["address"] and not o["address"].endswith(":report")]
    assert {o["action"] for o in points} == {"ran"} and {o["worker"] for o in points} == {"w1", "w2"}
    assert status(root) == {}  # the points landed in the main dvc.lock
    # ... in plan order, as a local sweep lists them, whichever worker finished first
    assert _lock_stages(root, "s") == _lock_stages(local_root, "s") == \
        [f"{p}-{s}" for p in POINTS for s in ("masks", "prune", "evaluate")] + ["report"]
    assert list((tmp_path / "ws").iterdir()) == []  # every workspace removed


def _lock_stages(root: Path, name: str) -> list[str]:
    import yaml

    return list(yaml.safe_load((root / "sweeps" / name / "dvc.lock").read_text())["stages"])


def test_ray_sweep_equals_local_sweep(api_url, local_sweep, tmp_path):
    local_root, _ = local_sweep
    root = copy_project(tmp_path / "p")
    head = RayHead(root.parent, _workers_env(root, api_url, tmp_path / "ws"))
    try:
        result = _cli(root, api_url, "--sparsity", SPARSITIES, "--name", "s", "--runner", head.address,
                      *ONE_THREAD)
    finally:
        head.stop()
    assert head.proc.returncode is not None
    assert {p["point"] for p in result["placement"]} == set(POINTS)
    assert all(p["worker"].startswith("ray:") for p in result["placement"])
    assert _point_dirs(root, "s") == POINTS
    assert _results(root, "s") == _results(local_root, "s")
    assert status(root) == {}


def test_gpu_point_is_not_placed_without_gpu_worker(api_url, tmp_path):
    root = copy_project(tmp_path / "p")
    cluster = DaskCluster(root.parent, _workers_env(root, api_url, tmp_path / "ws"), ["cpu-only"])
    try:
        run = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--sparsity", "0.3,0.4", "--runner",
                              cluster.address, "-S", "sweep={resources: {gpus: 1}}"], cwd=root, env=_env(api_url),
                             capture_output=True, text=True, timeout=600)
    finally:
        cluster.stop()
    assert run.returncode == 1
    assert "no worker can take a point needing 1 GPU(s)" in run.stderr and "--resources GPU=1" in run.stderr
    assert not (root / "sweeps").exists() or not (root / "artifacts" / "sweeps").exists()


def test_bad_runner_exits_2_naming_the_field(tmp_path):
    root = copy_project(tmp_path / "p")
    before = (root / "params.yaml").read_bytes()
    run = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--sparsity", "0.3", "--runner",
                          "spark://h:1"], cwd=root, env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "sweep.runner: 'spark://h:1' is not a runner (allowed: local, dask://HOST:PORT, ray://HOST:PORT)" \
        in run.stderr
    assert (root / "params.yaml").read_bytes() == before


def test_killed_worker_point_completes_on_the_other(api_url, local_sweep, tmp_path):
    local_root, _ = local_sweep
    root = copy_project(tmp_path / "p")
    workspaces = tmp_path / "ws"
    cluster = DaskCluster(root.parent, _workers_env(root, api_url, workspaces), ["victim", "survivor"])
    try:
        sweep = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep", "--json", "--sparsity", FAULT_SPARSITIES,
                                  "--name", "s", "--runner", cluster.address, *ONE_PER_WORKER], cwd=root, env=_env(api_url),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while not any("-victim-" in p.name for p in workspaces.glob("*")) and time.monotonic() < deadline:
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.2)
        time.sleep(2)  # well inside the point: workspace made, stages starting
        cluster.kill("victim")
        stdout, stderr = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            os.kill(sweep.pid, signal.SIGKILL)
        cluster.stop()
    assert sweep.returncode == 0, stderr[-4000:]
    result = json.loads(stdout[stdout.index("{"):])
    assert {p["worker"] for p in result["placement"]} <= {"victim", "survivor"}
    assert {p["point"] for p in result["placement"]} == set(FAULT_POINTS)
    assert {p["point"] for p in result["placement"] if p["worker"] == "survivor"}
    assert _point_dirs(root, "s") == FAULT_POINTS
    assert _results(root, "s", FAULT_POINTS) == _results(local_root, "s", FAULT_POINTS)
    assert status(root) == {}
