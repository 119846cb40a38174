"""The DVC pipeline in a temporary git repository on a tiny model: what runs, what is cached.

One cold ``dvc repro`` per session (tests.pipeline_project.cold_project); each test works on
its own copy of that repository.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks import graph
from tasks.common import load_artifact, read_manifest, read_run_facts
from tasks.params import read_yaml
from tests.pipeline_project import cold_project, copy_project, drop_from_cache, dvc, env, repro, set_params, status

pytestmark = pytest.mark.integration

ALL = set(graph.order())
FOLDERS = {name: f"artifacts/{name}" for name in ALL}


def _manifest_times(root: Path) -> dict[str, str]:
    return {name: (read_run_facts(root / folder) or {}).get("started_at") for name, folder in FOLDERS.items()}


def test_cold_run_produces_every_artifact_and_a_valid_lock():
    root = cold_project()
    for name, folder in FOLDERS.items():
        artifact = load_artifact(name, root / folder)  # exists, finished, bytes match its manifest
        assert artifact.manifest["status"] in ("completed", "skipped")
    lock = read_yaml(root / "dvc.lock")
    assert lock["schema"] == "2.0" and set(lock["stages"]) == ALL
    for name, entry in lock["stages"].items():
        assert entry["cmd"].startswith("python -m tasks."), name
        assert all(out.get("md5") for out in entry["outs"]), name
        deps = {dep["path"] for dep in entry["deps"]}
        assert set(graph.stage(name).code_files) <= deps, name
    assert lock["stages"]["masks"]["params"]["params.yaml"]["masks"]["sparsity"] == 0.5
    assert status(root) == {}
    assert "materialize" in dvc(root, "dag").stdout
    metrics = dvc(root, "metrics", "show", "--json").stdout
    assert "perplexity" in metrics


def test_second_run_recomputes_nothing(tmp_path):
    root = copy_project(tmp_path / "p")
    before = _manifest_times(root)
    ran, restored = repro(root)
    assert ran == set() and restored == set()
    assert _manifest_times(root) == before
    assert status(root) == {}


def test_sparsity_change_reruns_masks_onward_only(tmp_path):
    root = copy_project(tmp_path / "p")
    before = _manifest_times(root)
    set_params(root, "masks.sparsity=0.6")
    changed = status(root)
    assert set(changed) == {"masks"}  # DVC sees the parameter; dependents follow once masks' bytes change
    ran, restored = repro(root)
    assert ran == {"masks", "prune", "evaluate", "export_24", "engine", "benchmark", "savings"}
    after = _manifest_times(root)
    for name in ("materialize", "calibration", "statistics", "dense_eval"):
        assert after[name] == before[name], name
    assert read_manifest(root / "artifacts/masks")["summary"]["overall_sparsity"] == pytest.approx(0.6, abs=0.02)
    assert status(root) == {}
    # Back to 0.5: DVC's run cache holds that state, so nothing is recomputed.
    set_params(root, "masks.sparsity=0.5")
    ran, restored = repro(root)
    assert ran == set() and "masks" in restored


def test_deleted_artifact_is_restored_and_dependents_stay(tmp_path):
    root = copy_project(tmp_path / "p")
    recorded = read_manifest(root / "artifacts/statistics")
    import shutil

    shutil.rmtree(root / "artifacts/statistics")
    changed = status(root)
    assert changed["statistics"] == [{"changed outs": {"artifacts/statistics": "deleted"}}]
    assert set(changed) == {"statistics", "masks"}  # masks reads it
    ran, restored = repro(root)
    # Exactly that stage: its outputs come back from DVC's run cache, byte for byte, so its
    # dependents see unchanged inputs and do no work.
    assert restored == {"statistics"} and ran == set()
    assert read_manifest(root / "artifacts/statistics") == recorded
    assert status(root) == {}


def test_deleted_artifact_not_in_cache_reruns_stage_and_dependents(tmp_path):
    root = copy_project(tmp_path / "p")
    import shutil

    before = _manifest_times(root)
    shutil.rmtree(root / "artifacts/engine")
    drop_from_cache(root, "engine")
    ran, restored = repro(root)
    # Recomputed, and the same bytes again (run facts live beside the folder, issue 20): DVC's
    # early cutoff leaves everything downstream cached.
    assert ran == {"engine"} and restored == set()
    after = _manifest_times(root)
    assert all(after[name] == before[name] for name in ALL - ran)
    assert status(root) == {}


def test_corrupted_artifact_is_detected_and_rebuilt(tmp_path):
    root = copy_project(tmp_path / "p")
    target = root / "artifacts/masks/masks.safetensors"
    good = target.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    changed = status(root)
    assert changed["masks"] == [{"changed outs": {"artifacts/masks": "modified"}}]
    assert "materialize" not in changed and "statistics" not in changed
    ran, restored = repro(root)
    assert restored == {"masks"} and ran == set()
    assert target.read_bytes() == good
    load_artifact("masks", root / "artifacts/masks")  # verifies every byte against the manifest
    assert status(root) == {}


def test_corrupted_artifact_not_in_cache_reruns_stage_and_dependents(tmp_path):
    root = copy_project(tmp_path / "p")
    before = _manifest_times(root)
    target = root / "artifacts/export_24/manifest.json"
    target.write_text(target.read_text().replace('"stage"', '"stage" ', 1))
    assert status(root)["export_24"] == [{"changed outs": {"artifacts/export_24": "modified"}}]
    drop_from_cache(root, "export_24")  # the cache cannot give the bytes back: recompute
    ran, restored = repro(root)
    assert ran == {"export_24"} and restored == set()  # same bytes again: dependents stay cached
    after = _manifest_times(root)
    assert all(after[name] == before[name] for name in ALL - ran)
    assert status(root) == {}


def test_run_killed_inside_a_stage_leaves_no_finished_artifact(tmp_path):
    root = copy_project(tmp_path / "p")
    set_params(root, "masks.sparsity=0.7")
    folder = root / "artifacts/masks"
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "masks"], cwd=root, env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not list(folder.parent.glob(".masks.tmp-*")):
            assert process.poll() is None, "the stage finished before it could be interrupted"
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert list(folder.parent.glob(".masks.tmp-*")), "never saw the stage's temporary folder"
    assert not (folder / "manifest.json").exists()  # DVC removed the old outputs; no new ones
    assert "masks" in status(root)
    (root / ".dvc/tmp/rwlock").unlink(missing_ok=True)  # the killed DVC could not release its lock
    (root / ".dvc/tmp/lock").unlink(missing_ok=True)
    ran, _ = repro(root, "masks")
    assert ran == {"masks"}
    assert not list(folder.parent.glob(".masks.tmp-*"))  # the next run removed the leftover
    assert read_manifest(folder)["summary"]["overall_sparsity"] == pytest.approx(0.7, abs=0.02)
    assert "masks" not in status(root)
