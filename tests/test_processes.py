"""Killing ``wanda-pipeline`` leaves no process behind (issue 14, item 6): ``kill -9`` during the
masks stage, and within seconds DVC, the stage and Prefect's server are gone; the next run
recovers and writes the masks an uninterrupted run writes."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_project import copy_project, env, sh, status

psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.integration

RUN = ("-m", "flows.cli", "run", "--no-track", "--target", "masks", "-S", "masks.sparsity=0.6")
MASKS = "artifacts/masks/masks.safetensors"


def _cmdline(process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _alive(processes) -> list:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_kill_9_mid_stage_leaves_no_process_and_the_next_run_recovers(tmp_path):
    root = copy_project(tmp_path / "p")
    with open(tmp_path / "cli.log", "w") as log:
        cli = subprocess.Popen([sys.executable, *RUN], cwd=root, env=env(), stdout=log, stderr=subprocess.STDOUT)
    parent = psutil.Process(cli.pid)
    deadline = time.monotonic() + 300
    children: list = []
    while time.monotonic() < deadline and cli.poll() is None:
        children = parent.children(recursive=True)
        if any("tasks.masks" in _cmdline(c) for c in children):
            break
        time.sleep(0.05)
    assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
    cmdlines = [_cmdline(c) for c in children]
    assert any("uvicorn" in c and "prefect" in c for c in cmdlines), cmdlines  # Prefect's temporary server
    assert any(" dvc repro" in c for c in cmdlines), cmdlines
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    psutil.wait_procs(children, timeout=10)
    assert _alive(children) == [], [_cmdline(p) for p in _alive(children)]

    again = sh(root, sys.executable, *RUN, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    reference = copy_project(tmp_path / "reference")
    sh(reference, sys.executable, *RUN)
    digest = {r: hashlib.sha256((r / MASKS).read_bytes()).hexdigest() for r in (root, reference)}
    assert digest[root] == digest[reference]
    assert "masks" not in status(root)
    assert not list((root / "artifacts").glob(".masks.tmp-*"))  # nothing half-written left behind
