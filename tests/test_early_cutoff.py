"""Early cutoff: a stage that runs again on unchanged inputs writes the same bytes, so DVC finds
every stage after it cached; the facts of that run (times, memory) live beside its folder and
still reach MLflow (issue 20, item 3)."""
from __future__ import annotations

import json
import sys

import pytest

from tasks.common import RUN_FACT_KEYS, read_manifest, read_run_facts, read_stage_record
from tests.pipeline_project import copy_project, sh, status

pytestmark = pytest.mark.integration

AFTER_MASKS = ("prune", "dense_eval", "evaluate", "export_24", "engine", "benchmark", "savings")


def _cli(root, *args):
    return sh(root, sys.executable, "-m", "flows.cli", *args, check=False)


def _facts(root, stage):
    return read_run_facts(root / "artifacts" / stage)


def test_forcing_a_stage_on_unchanged_inputs_reruns_that_stage_only_and_its_facts_reach_mlflow(tmp_path):
    root = copy_project(tmp_path / "p")
    manifest_bytes = (root / "artifacts/masks/manifest.json").read_bytes()
    masks_before = _facts(root, "masks")
    later_before = {stage: _facts(root, stage) for stage in AFTER_MASKS}
    assert masks_before and all(later_before.values())
    assert not any(key in read_manifest(root / "artifacts/masks") for key in RUN_FACT_KEYS)

    forced = _cli(root, "run", "--force", "--target", "masks", "--no-track")
    assert forced.returncode == 0, forced.stderr[-3000:]
    # The stage ran (new run facts) and wrote the very same manifest and outputs.
    masks_after = _facts(root, "masks")
    assert masks_after is not None and masks_after["started_at"] >= masks_before["started_at"]
    assert masks_after != masks_before
    assert (root / "artifacts/masks/manifest.json").read_bytes() == manifest_bytes

    plain = _cli(root, "run", "--no-track")
    assert plain.returncode == 0, plain.stderr[-3000:]
    # every stage current: the CLI answers without starting Prefect (issue 20, fast start)
    assert "every stage is cached: nothing to run (Prefect not started)" in plain.stdout, plain.stdout
    # Nothing after masks ran: their run facts are the ones of the first run, and DVC is clean.
    assert {stage: _facts(root, stage) for stage in AFTER_MASKS} == later_before
    assert status(root) == {}
    shown = _cli(root, "status")
    masks_row = next(line for line in shown.stdout.splitlines() if line.startswith("masks "))
    assert masks_after["started_at"] in masks_row, shown.stdout

    tracked = _cli(root, "track", "--registered-model", "wanda-cutoff", "--experiment", "wanda-cutoff", "--json")
    assert tracked.returncode == 0, tracked.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / '.mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("wanda-cutoff")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["stage.masks.wall_s"] == pytest.approx(masks_after["wall_s"])
    assert run.data.metrics["stage.masks.peak_memory_mb"] == pytest.approx(masks_after["peak_memory_mb"])


def test_run_facts_of_another_run_are_never_read(tmp_path):
    """Outputs restored from DVC's cache (or a run cut between its rename and its facts) keep
    old facts beside them: they name another manifest, so readers ignore them."""
    root = copy_project(tmp_path / "p")
    folder = root / "artifacts/masks"
    facts_file = folder.with_name("masks.run.json")
    data = json.loads(facts_file.read_text())
    data["manifest_sha256"] = "0" * 64
    facts_file.write_text(json.dumps(data))
    assert read_run_facts(folder) is None
    record = read_stage_record(folder)
    assert record["run_facts"] is None and "wall_s" not in record
    shown = _cli(root, "status")
    masks_row = next(line for line in shown.stdout.splitlines() if line.startswith("masks "))
    assert "restored from DVC's cache" in masks_row
