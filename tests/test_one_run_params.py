"""One run, one set of parameters (issue 25): a second run in the workspace is refused before it
writes anything; ``params.yaml`` edited while a stage runs fails the run without recording
anything (``dvc.lock``, DVC's run cache and MLflow keep agreeing with the masks computed); a
failed run puts back the ``params.yaml`` it found.

The stages run for real on the tiny project of tests/pipeline_project.py. To hit the moment
"the masks stage has read its parameters and computed, DVC has not yet written dvc.lock"
deterministically, a ``sitecustomize`` on the stage processes' path holds the masks stage
process at its exit (after its outputs are written) until the test has edited the file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_project import copy_project, env, prefect_api, set_params, sh

pytestmark = pytest.mark.integration

_HOOK = '''
import atexit, os, sys, time
if "tasks.masks" in getattr(sys, "orig_argv", []) and os.environ.get("WANDA_TEST_HOLD_DIR"):
    def _hold():
        folder = os.environ["WANDA_TEST_HOLD_DIR"]
        open(os.path.join(folder, "masks-done"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(folder, "go")) and time.monotonic() < deadline:
            time.sleep(0.05)
    atexit.register(_hold)
_fail = os.environ.get("WANDA_TEST_FAIL_STAGE")
if _fail and f"tasks.{_fail}" in getattr(sys, "orig_argv", []):
    sys.stderr.write(f"ERROR stage {_fail} failed on purpose\\n")
    sys.exit(3)
'''


def _start(root: Path, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen:
    values = {**env(), "PREFECT_API_URL": prefect_api(), **(extra or {})}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=root, env=values,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return sh(root, sys.executable, "-m", "flows.cli", *args, check=False)


def _lock_masks(root: Path) -> dict:
    from tasks.params import read_yaml

    return read_yaml(root / "dvc.lock")["stages"]["masks"]["params"]["params.yaml"]["masks"]


def _manifest_sparsity(root: Path) -> float:
    return json.loads((root / "artifacts/masks/manifest.json").read_text())["params"]["masks"]["sparsity"]


def _wait(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"run ended ({process.returncode}) before {path.name}:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_params_edited_during_a_stage_fail_the_run_and_record_nothing(tmp_path):
    root = copy_project(tmp_path / "p")
    hook, hold = tmp_path / "hook", tmp_path / "hold"
    hook.mkdir()
    hold.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    lock_before = (root / "dvc.lock").read_bytes()
    assert _lock_masks(root)["sparsity"] == 0.5

    run = _start(root, "run", "-S", "masks.sparsity=0.6",
                 extra={"PYTHONPATH": str(hook), "WANDA_TEST_HOLD_DIR": str(hold)})
    try:
        _wait(hold / "masks-done", run)  # the masks were computed at 0.6; DVC has not recorded them
        assert _manifest_sparsity(root) == 0.6 or not (root / "artifacts/masks/manifest.json").exists()
        set_params(root, "masks.sparsity=0.7")  # someone edits the file now
        edited = (root / "params.yaml").read_bytes()
        (hold / "go").touch()
        out, err = run.communicate(timeout=600)
    finally:
        (hold / "go").touch()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, out[-2000:] + err[-3000:]
    last = err.strip().splitlines()[-1]  # the lines before it are the flow's log
    assert last.startswith("wanda-pipeline: run failed: ParamsChanged: params.yaml changed while the run was "
                           "using it (stage masks: it used masks.sparsity=0.6 (dvc.lock records 0.7))"), err[-3000:]
    assert (root / "dvc.lock").read_bytes() == lock_before  # nothing recorded: masks at 0.5 as before
    assert (root / "params.yaml").read_bytes() == edited  # the user's edit is kept, not overwritten

    # DVC's run cache does not map 0.7 to the 0.6 masks: the next run at 0.7 computes them
    again = _cli(root, "run", "--no-track")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    masks_row = next(line for line in again.stdout.splitlines() if line.startswith("masks "))
    assert " ran " in masks_row, again.stdout
    assert _lock_masks(root)["sparsity"] == 0.7 and _manifest_sparsity(root) == 0.7


def test_second_run_is_refused_before_writing_and_a_failed_run_restores_params(tmp_path):
    root = copy_project(tmp_path / "p")
    hook, hold = tmp_path / "hook", tmp_path / "hold"
    hook.mkdir()
    hold.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    original = (root / "params.yaml").read_bytes()

    first = _start(root, "run", "--no-track", "-S", "masks.sparsity=0.6",
                   extra={"PYTHONPATH": str(hook), "WANDA_TEST_HOLD_DIR": str(hold)})
    try:
        _wait(hold / "masks-done", first)  # the first run holds the workspace, mid-stage
        during = (root / "params.yaml").read_bytes()
        started = time.monotonic()
        second = _cli(root, "run", "--no-track", "-S", "masks.sparsity=0.55")
        refused_in = time.monotonic() - started
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("wanda-pipeline: run refused: another run holds the "
                                                       "workspace "), second.stderr
        assert f"pid {first.pid} " in lines[0]
        assert (root / "params.yaml").read_bytes() == during  # untouched by the refused run
        assert "Starting temporary server" not in second.stdout + second.stderr
        (hold / "go").touch()
        out, err = first.communicate(timeout=600)
    finally:
        (hold / "go").touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-2000:] + err[-3000:]
    assert _lock_masks(root)["sparsity"] == 0.6 and _manifest_sparsity(root) == 0.6
    assert refused_in < 60

    # the later run at the other value recomputes (no run-cache entry maps 0.55 to the 0.6 masks)
    later = _cli(root, "run", "--no-track", "-S", "masks.sparsity=0.55")
    assert later.returncode == 0, later.stderr[-3000:]
    assert " ran " in next(line for line in later.stdout.splitlines() if line.startswith("masks "))
    assert _lock_masks(root)["sparsity"] == 0.55 and _manifest_sparsity(root) == 0.55

    # a run whose stage fails leaves params.yaml as it was
    before = (root / "params.yaml").read_bytes()
    assert before != original
    failed = _start(root, "run", "--no-track", "-S", "masks.sparsity=0.65",
                    extra={"PYTHONPATH": str(hook), "WANDA_TEST_FAIL_STAGE": "prune"})
    out, err = failed.communicate(timeout=600)
    assert failed.returncode == 1, out[-2000:] + err[-3000:]
    assert "prune" in err and (root / "params.yaml").read_bytes() == before


def test_identical_model_is_not_registered_twice_and_partial_cache_files_are_cleaned(tmp_path, monkeypatch):
    """Issue 25: a plain re-run registers no new, identical version (it says which one it is);
    DVC's partial cache files from an interrupted write are removed by the next run."""
    # The project's own SQLite registry, whatever an earlier test in this process left set.
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    root = copy_project(tmp_path / "p")
    first = _cli(root, "run")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "registered wanda-pruned version 1" in first.stdout

    shard = root / ".dvc/cache/files/md5/ab"
    shard.mkdir(parents=True, exist_ok=True)
    stale, fresh = shard / "cdef0123.Zq9x.tmp", shard / "cdef4567.Yw8v.tmp"
    stale.write_bytes(b"\0" * 2**20)
    fresh.write_bytes(b"\0" * 1024)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # an hour old: no write is going on

    second = _cli(root, "run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "the pruned model is byte-identical to wanda-pruned version 1: not registered again" in second.stdout
    assert "removed 1 partial DVC cache file(s) (1.0 MB) left by an interrupted write" in second.stdout + second.stderr
    assert not stale.exists() and fresh.exists()  # a young one may be a write in progress

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / '.mlflow/mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='wanda-pruned'")] == ["1"]
