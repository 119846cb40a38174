"""Stages in-process on a tiny model: manifests, modes, refusal of mismatched inputs, atomicity."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks import calibration, common, engine, evaluate, export_24, masks, materialize, prune, statistics
from tasks.params import apply_overrides, read_yaml, validate_params
from tests.pipeline_project import REPO, TINY_OVERRIDES
from tests.tiny import tiny_model, tiny_tokenizer
from wanda.errors import ArtifactMismatchError
from wanda.masks import load_masks
from wanda.model_io import save_model

CHAIN = (materialize.run, calibration.run, statistics.run, masks.run, prune.run, evaluate.run_dense, evaluate.run,
         export_24.run, engine.run)


def _params(*overrides: str):
    return validate_params(apply_overrides(read_yaml(REPO / "params.yaml"), TINY_OVERRIDES + list(overrides)))


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    import random

    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "fixtures" / "tiny-model")
    rng = random.Random(0)
    for name, words in (("calib", 3000), ("eval", 2000)):
        (tmp_path / "fixtures" / f"{name}.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(words)))
    monkeypatch.chdir(tmp_path)  # sources in the parameters are relative to the project root
    return tmp_path


def _run_chain(root: Path, params, until: int = len(CHAIN)) -> list[dict]:
    return [run(params, root) for run in CHAIN[:until]]


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_chain_writes_manifests_and_says_which_mode(project, mode):
    params = _params(f"statistics.mode={mode}")
    manifests = _run_chain(project, params)
    by_stage = {m["stage"]: m for m in manifests}
    for manifest in manifests:
        folder = project / getattr(params.paths, manifest["stage"])
        on_disk = json.loads((folder / "manifest.json").read_text())
        facts = common.read_run_facts(folder)  # beside the folder, naming this manifest
        assert facts is not None, manifest["stage"]
        assert {**on_disk, **facts} == json.loads(json.dumps(manifest, default=str))
        for key in ("params", "inputs", "outputs", "versions", "lineage"):
            assert key in on_disk, (manifest["stage"], key)
        # Run facts are never outputs: an identical re-run must write identical bytes (early cutoff).
        for key in common.RUN_FACT_KEYS:
            assert key in facts and key not in on_disk, (manifest["stage"], key)
        assert common.load_artifact(manifest["stage"], folder)  # outputs verify against the manifest
    stats = by_stage["statistics"]
    assert stats["summary"]["mode"] == mode and stats["lineage"]["statistics_mode"] == mode
    assert (project / params.paths.statistics / "statistics.safetensors").exists() == (mode == "one_pass")
    # Sequential mode keeps the statistics it took with the masks.
    assert (project / params.paths.masks / "statistics.safetensors").exists() == (mode == "sequential")
    assert by_stage["masks"]["summary"]["overall_sparsity"] == pytest.approx(0.5)
    assert by_stage["masks"]["params"] == {"masks": params.masks.model_dump(mode="json"),
                                          "runtime": params.runtime.model_dump(mode="json")}
    assert by_stage["evaluate"]["summary"]["metrics"]["dense.perplexity"] > 0
    lineage = by_stage["evaluate"]["lineage"]
    assert lineage["base_model_fingerprint"] == by_stage["materialize"]["summary"]["fingerprint"]
    assert lineage["calibration_token_digest"] == by_stage["calibration"]["summary"]["token_digest"]
    assert by_stage["export_24"]["status"] == "skipped" and "not '2:4'" in by_stage["export_24"]["reason"]
    assert by_stage["engine"]["status"] == "skipped"


def test_one_pass_statistics_serve_several_mask_configurations(project):
    params = _params("statistics.mode=one_pass")
    _run_chain(project, params, until=4)
    stats_bytes = (project / params.paths.statistics / "statistics.safetensors").read_bytes()
    for sparsity in (0.3, 0.7):
        manifest = masks.run(_params("statistics.mode=one_pass", f"masks.sparsity={sparsity}"), project)
        assert manifest["summary"]["overall_sparsity"] == pytest.approx(sparsity, abs=0.02)
    assert (project / params.paths.statistics / "statistics.safetensors").read_bytes() == stats_bytes


def test_two_four_pattern_exports_a_checkpoint(project):
    params = _params("statistics.mode=one_pass", "masks.pattern=2:4")
    by_stage = {m["stage"]: m for m in _run_chain(project, params)}
    assert by_stage["export_24"]["status"] == "completed"
    assert (project / params.paths.export_24 / "checkpoint" / "config.json").is_file()
    # No GPU/trtllm-build here: the engine stage says what is missing and where the checkpoint is.
    if by_stage["engine"]["status"] == "skipped":
        assert "checkpoint is at" in by_stage["engine"]["reason"] or "nvidia" in by_stage["engine"]["reason"].lower()


def test_masks_for_another_base_model_are_refused(project):
    params = _params("statistics.mode=one_pass")
    _run_chain(project, params, until=4)  # masks for tiny model A
    save_model(tiny_model(seed=1), tiny_tokenizer(), project / "fixtures" / "other-model")
    other = _params("statistics.mode=one_pass", "model.source=fixtures/other-model",
                    "paths.materialize=artifacts/other")
    materialize.run(other, project)
    with pytest.raises(ArtifactMismatchError, match="base_model_fingerprint"):
        prune.run(other, project)  # base B with masks computed for A
    assert not (project / params.paths.prune).exists()


def test_damaged_input_is_refused(project):
    params = _params("statistics.mode=one_pass")
    _run_chain(project, params, until=4)
    target = project / params.paths.masks / "masks.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError, match="bytes changed"):
        prune.run(params, project)


def test_missing_or_foreign_input_is_refused(project):
    params = _params()
    materialize.run(params, project)
    with pytest.raises(ArtifactMismatchError, match="run the calibration stage first"):
        statistics.run(params, project)
    calibration.run(params, project)
    wrong = _params("paths.calibration=artifacts/materialize", "paths.materialize=artifacts/base")
    shutil.copytree(project / params.paths.materialize, project / "artifacts" / "base")
    with pytest.raises(ArtifactMismatchError, match="expected 'calibration'"):
        statistics.run(wrong, project)


def test_interrupted_stage_leaves_nothing_that_looks_finished(project, monkeypatch):
    params = _params("statistics.mode=one_pass")
    _run_chain(project, params, until=3)
    folder = project / params.paths.masks

    def crash(path, *args, **kwargs):
        Path(path).write_bytes(b"half written")
        raise KeyboardInterrupt("killed mid-stage")

    monkeypatch.setattr("wanda.masks.save_masks", crash)
    with pytest.raises(KeyboardInterrupt):
        masks.run(params, project)
    assert not folder.exists()
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))  # removed on the way out
    # A leftover of a hard kill (no cleanup ran) is never read, and the next run removes it.
    leftover = folder.parent / f".{folder.name}.tmp-kill9"
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactMismatchError, match="no finished masks artifact"):
        prune.run(params, project)
    monkeypatch.undo()
    masks.run(params, project)
    assert not leftover.exists()
    restored, meta = load_masks(folder / "masks.safetensors")
    assert meta["base_model_fingerprint"] == common.load_artifact("materialize", project / params.paths.materialize
                                                                  ).lineage["base_model_fingerprint"]


def test_stage_entry_point_exit_codes(project, capsys):
    assert masks.main.__module__ == "tasks.masks"
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    from tasks.common import stage_main

    assert stage_main("materialize", materialize.run, ["--params", "params.yaml", "-S", "masks.sparsity=2"]) == 2
    assert stage_main("statistics", statistics.run, ["--params", "params.yaml"] +
                      [a for o in TINY_OVERRIDES for a in ("-S", o)]) == 1  # no materialized model yet
