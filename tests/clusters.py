"""A Dask cluster as real processes on loopback: ``dask scheduler`` and ``dask worker``s, each
stopped (or killed) by its own pid. Used by the distributed sweep tests and the benchmark."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.servers import free_port

BIN = Path(sys.executable).parent


class DaskCluster:
    """One scheduler and ``names`` workers (``--nthreads 1``, no nanny: a worker's pid is the
    worker itself, so killing it kills the worker and nothing restarts it)."""

    def __init__(self, logs: Path, env: dict[str, str], names: list[str], resources: str = "MEMORY=4"):
        self.port = free_port()
        self.address = f"dask://127.0.0.1:{self.port}"
        self.logs = logs / f"dask-{self.port}"
        self.logs.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        try:
            self.procs["scheduler"] = self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port",
                                                                str(self.port), "--no-dashboard"], env)
            for name in names:
                self.procs[name] = self._start(name, ["worker", f"tcp://127.0.0.1:{self.port}", "--name", name,
                                                      "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                                      "--resources", resources], env)
            self._wait_for(len(names))
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as out:
            return subprocess.Popen([str(BIN / "dask"), *args], cwd=self.logs, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)

    def _wait_for(self, count: int, timeout_s: float = 180) -> None:
        from distributed import Client

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with Client(f"tcp://127.0.0.1:{self.port}", timeout="10s") as client:
                    client.wait_for_workers(count, timeout=timeout_s)
                    return
            except (OSError, TimeoutError):
                time.sleep(1)
        raise RuntimeError(f"Dask cluster did not start within {timeout_s}s; logs in {self.logs}")

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


class RayHead:
    """``ray start --head --block`` on loopback: the one process started here; SIGTERM to it
    stops every Ray process it started (GCS, raylet, workers)."""

    ATTEMPTS = 3

    def __init__(self, logs: Path, env: dict[str, str], cpus: int = 2):
        # A port chosen free can be taken before Ray binds it (Ray then exits at once): a fresh
        # set of ports, a bounded number of times.
        for attempt in range(1, self.ATTEMPTS + 1):
            self._start(logs, env, cpus)
            try:
                self._wait()
                return
            except RuntimeError:
                exited = self.proc.poll() is not None  # exited by itself, not timed out
                self.stop()
                if attempt == self.ATTEMPTS or not exited:
                    raise

    def _start(self, logs: Path, env: dict[str, str], cpus: int) -> None:
        self.client_port = free_port()
        self.address = f"ray://127.0.0.1:{self.client_port}"
        self.logs = logs / f"ray-{self.client_port}"
        self.logs.mkdir(parents=True, exist_ok=True)
        gcs_port, agent_port = free_port(), free_port()
        # Worker ports: 201 fixed ports that must not hold another component's port (Ray refuses
        # to start then). free_port() hands out the kernel's ephemeral ports (32768 and up on
        # Linux), so a range below it, moved off those ports should the range be configured otherwise.
        taken = (gcs_port, self.client_port, agent_port)
        worker_base = 20000 + (self.client_port % 50) * 240
        while any(worker_base <= port <= worker_base + 200 for port in taken):
            worker_base = (worker_base + 240 - 1024) % 30000 + 1024
        # Ray's socket paths must stay under 107 bytes: a short folder, not the test's own.
        self.temp = Path(tempfile.mkdtemp(prefix="wray-"))
        argv = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                "--port", str(gcs_port), "--ray-client-server-port", str(self.client_port),
                "--dashboard-agent-listen-port", str(agent_port),
                "--min-worker-port", str(worker_base), "--max-worker-port", str(worker_base + 200),
                "--num-cpus", str(cpus), "--include-dashboard", "false", "--disable-usage-stats",
                "--temp-dir", str(self.temp)]
        with open(self.logs / "head.log", "w") as out:
            self.proc = subprocess.Popen(argv, cwd=self.logs, env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
                                         stdout=out, stderr=subprocess.STDOUT)

    def _wait(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}; logs in {self.logs}")
            if "will now block forever" in (self.logs / "head.log").read_text():
                return
            time.sleep(1)
        raise RuntimeError(f"Ray head did not start within {timeout_s}s; logs in {self.logs}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)
