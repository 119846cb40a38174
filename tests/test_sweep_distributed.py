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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.common import read_manifest
from tests.pipeline_project import copy_project, env, status

pytestmark = pytest.mark.integration

POINTS = ["sparsity-0_3", "sparsity-0_4", "sparsity-0_5", "sparsity-0_6"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    """One Prefect server for the module's CLI runs (and the workers' task runs)."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(api: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    values = env()
    values.update({"PREFECT_API_URL": api, **(extra or {})})
    return values


def _cli(root: Path, api: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--json", *args], cwd=root,
                            env=_env(api), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"sweep failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout[result.stdout.index("{"):])


class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes; every one stopped by its pid."""

    def __init__(self, root: Path, api: str, workspaces: Path, names: list[str]):
        self.port = _free_port()
        self.address = f"dask://127.0.0.1:{self.port}"
        # Workers import the project copy's code, as its CLI does; the points' workspaces go
        # where the test can watch them.
        worker_env = _env(api, {"PYTHONPATH": str(root), "WANDA_WORKSPACES": str(workspaces)})
        self.logs = root.parent / f"dask-{self.port}"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs["scheduler"] = self._start("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                                            "--port", str(self.port), "--no-dashboard"], worker_env)
        for name in names:
            # --no-nanny: the pid is the worker itself, so killing it kills the worker (no restart)
            self.procs[name] = self._start(name, [str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{self.port}",
                                                  "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                                  "--resources", "MEMORY=4"], worker_env)
        self._wait_for(len(names))

    def _start(self, name: str, argv: list[str], values: dict[str, str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen(argv, cwd=self.logs, env=values, stdout=out, stderr=subprocess.STDOUT)

    def _wait_for(self, count: int) -> None:
        from distributed import Client

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with Client(f"tcp://127.0.0.1:{self.port}", timeout="5s") as client:
                    client.wait_for_workers(count, timeout=60)
                    return
            except (OSError, TimeoutError):
                time.sleep(1)
        raise AssertionError(f"Dask cluster did not start; logs in {self.logs}")

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _results(root: Path, name: str) -> dict[str, bytes]:
    """The bytes that must not depend on where a point ran: masks and metrics of every point."""
    base = root / "artifacts" / "sweeps" / name
    found = {f"report/results.json": (base / "report" / "results.json").read_bytes()}
    for point in sorted(p.name for p in base.iterdir() if p.name != "report"):
        found[f"{point}/masks"] = (base / point / "masks" / "masks.safetensors").read_bytes()
        found[f"{point}/sparsity"] = (base / point / "masks" / "sparsity.json").read_bytes()
        found[f"{point}/result"] = (base / point / "evaluate" / "result.json").read_bytes()
    return found


@pytest.fixture(scope="module")
def local_sweep(api_url, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("local") / "p")
    result = _cli(root, api_url, "--sparsity", "0.3,0.4,0.5,0.6", "--name", "s", "--runner", "local",
                  "--workers", "1")
    return root, result


def test_dask_sweep_equals_local_sweep_on_two_workers(api_url, local_sweep, tmp_path):
    local_root, local = local_sweep
    root = copy_project(tmp_path / "p")
    stats_before = read_manifest(root / "artifacts/statistics")
    cluster = DaskCluster(root, api_url, tmp_path / "ws", ["w1", "w2"])
    try:
        result = _cli(root, api_url, "--sparsity", "0.3,0.4,0.5,0.6", "--name", "s", "--runner", cluster.address)
    finally:
        cluster.stop()
    assert all(p.poll() is not None for p in cluster.procs.values())
    placement = {p["point"]: p["worker"] for p in result["placement"]}
    assert set(placement) == set(POINTS)
    assert set(placement.values()) == {"w1", "w2"}  # both workers took points
    assert _results(root, "s") == _results(local_root, "s")  # bit for bit
    assert [r["perplexity"] for r in result["points"]] == [r["perplexity"] for r in local["points"]]
    # Shared stages ran once (before this sweep, in the cold project): nothing recomputed them.
    shared = {o["address"]: o["action"] for o in result["outcomes"] if ":" not in o["address"]}
    assert set(shared.values()) == {"cached"}
    assert read_manifest(root / "artifacts/statistics") == stats_before
    points = [o for o in result["outcomes"] if ":" in o["address"] and not o["address"].endswith(":report")]
    assert {o["action"] for o in points} == {"ran"} and {o["worker"] for o in points} == {"w1", "w2"}
    assert status(root) == {}  # the points landed in the main dvc.lock
    assert list((tmp_path / "ws").iterdir()) == []  # every workspace removed


def test_gpu_point_is_not_placed_without_gpu_worker(api_url, tmp_path):
    root = copy_project(tmp_path / "p")
    cluster = DaskCluster(root, api_url, tmp_path / "ws", ["cpu-only"])
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
    cluster = DaskCluster(root, api_url, workspaces, ["victim", "survivor"])
    try:
        sweep = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep", "--json", "--sparsity", "0.3,0.4,0.5,0.6",
                                  "--name", "s", "--runner", cluster.address], cwd=root, env=_env(api_url),
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
    assert {p["point"] for p in result["placement"] if p["worker"] == "survivor"}
    assert _results(root, "s") == _results(local_root, "s")
    assert status(root) == {}
