"""MLflow tracking, registry, release gate and lineage audit against a real SQLite backend.

A session fixture runs the real pipeline stages (``tasks/``) on a tiny random LLaMA in a
temporary DVC project (dvc.yaml from ``tasks/graph.py``, ``dvc.lock`` and cache objects made by
DVC's own ``commit``); each test works on a copy. New candidates re-run the stages from masks on
with other parameters, as a real ``dvc repro`` would.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("dvc")

from flows.audit import audit, format_report, parse_ref  # noqa: E402
from flows.release import GateRejected, run_release  # noqa: E402
from flows.mlflow_uris import resolve_tracking  # noqa: E402
from flows.run_inputs import discover_run_inputs  # noqa: E402
from flows.tracking import log_pipeline_run  # noqa: E402
from tasks.params import TrackingConfig, read_yaml  # noqa: E402
from wanda.data import shared_data_dir  # noqa: E402
from wanda.hashing import sha256_file  # noqa: E402
from tasks.lineage import dvc_md5  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-pruned"
# Loose on quality (a random model's perplexity barely moves), strict on sparsity: candidates
# fail by pruning too little. Perplexity/accuracy criteria are covered by tests/test_gate.py.
GATE = {"max_ppl_increase_rel": 0.5, "max_mean_acc_drop": 0.2, "min_sparsity": 0.4, "champion_margin": 0.05}
HAS_ZEROSHOT = (shared_data_dir() / "zeroshot" / "boolq").is_dir()
RERUN = ("masks", "prune", "evaluate", "export_24", "engine", "benchmark", "savings")  # what a masks change invalidates


def _client(root: Path):
    from mlflow import MlflowClient

    resolved = resolve_tracking(_config(), root)
    return MlflowClient(resolved.tracking_uri, resolved.registry_uri)


def _config(**kw) -> TrackingConfig:
    return TrackingConfig(registered_model=MODEL, experiment="wanda-test", **kw)


def run_stages(root: Path, stages, **masks) -> None:
    """Run stages in-process (as ``python -m tasks.<stage>`` would), then ``dvc commit``."""
    from dvc.repo import Repo

    from tasks import graph
    from tasks.params import params_dict, validate_params

    data = read_yaml(root / "params.yaml")
    data.setdefault("masks", {}).update(masks)
    params = validate_params(data)
    (root / "params.yaml").write_text(json.dumps(params_dict(params), indent=1))  # JSON is YAML 1.2
    for name in stages:
        spec = graph.stage(name)
        module = importlib.import_module(spec.entry)
        (module.run_dense if name == "dense_eval" else module.run)(params, root=root)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        repo.commit(force=True)


SPARSITIES = (0.5, 0.2, 0.6)  # the first is the template's; candidates switch to the others


_BUILT: dict[str, Path] = {}  # one template per session, also when another module imports the fixture


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """A finished pipeline run: every stage of tasks/graph.py on a tiny model, committed to DVC.

    The stages from masks on are also run for the other sparsities once per session and their
    outputs (artifacts, dvc.lock, DVC cache objects) kept, so a test "re-runs" a candidate by
    switching to them (what ``dvc checkout`` of that state would give) instead of recomputing.
    """
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = _build_template(tmp_path_factory)
    return _BUILT[key]


def _build_template(tmp_path_factory) -> Path:
    from dvc.repo import Repo
    from mlflow import MlflowClient

    from tasks import graph
    from tests.tiny import tiny_model, tiny_tokenizer
    from wanda.model_io import save_model

    base = tmp_path_factory.mktemp("template")
    root = base / "project"
    root.mkdir()
    for folder in ("wanda", "tasks"):  # stage code is a DVC dependency of every stage
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    inputs = base / "inputs"
    save_model(tiny_model("llama", layers=2), tiny_tokenizer(), inputs / "base")
    rng = random.Random(0)
    (inputs / "text.txt").write_text("\n".join(" ".join(f"w{rng.randrange(124)}" for _ in range(50))
                                               for _ in range(100)))
    evaluate = {"perplexity": {"source": {"path": str(inputs / "text.txt")}, "seqlen": 32, "max_windows": 4}}
    if HAS_ZEROSHOT:
        evaluate["zeroshot"] = {"tasks": ["boolq", "rte"], "limit": 4}
    data = {"model": {"source": str(inputs / "base")},
            "calibration": {"source": {"path": str(inputs / "text.txt")}, "nsamples": 4, "seqlen": 32},
            "masks": {"sparsity": SPARSITIES[0]}, "evaluate": evaluate}
    (root / "params.yaml").write_text(json.dumps(data))
    (root / "dvc.yaml").write_text(graph.main_dvc_yaml())
    (root / ".gitignore").write_text("/artifacts/\n/.mlflow/\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "pipeline code")  # stages and the tracker record this commit
    Repo.init(str(root), no_scm=True)
    run_stages(root, graph.order())
    _snapshot(root, root.parent / "variants" / str(SPARSITIES[0]))
    for sparsity in SPARSITIES[1:]:
        run_stages(root, RERUN, sparsity=sparsity)
        _snapshot(root, root.parent / "variants" / str(sparsity))
    switch(root, SPARSITIES[0])
    # An empty, migrated MLflow database: creating one costs seconds of schema migrations.
    (base / "mlflow").mkdir()
    MlflowClient(f"sqlite:///{base / 'mlflow' / 'mlflow.db'}").search_experiments()
    return root


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _folders(root: Path) -> list[str]:
    paths = read_yaml(root / "params.yaml")["paths"]
    return [paths[stage] for stage in RERUN]


def _snapshot(root: Path, target: Path) -> None:
    from tasks.common import run_facts_path

    for folder in _folders(root):
        shutil.copytree(root / folder, target / folder)
        if run_facts_path(root / folder).is_file():  # the run's facts live beside the folder
            shutil.copy2(run_facts_path(root / folder), run_facts_path(target / folder))
    for name in ("dvc.lock", "params.yaml"):
        shutil.copy2(root / name, target / name)


def switch(root: Path, sparsity: float) -> None:
    """Make the workspace hold the run with ``sparsity`` (outputs, params.yaml, dvc.lock)."""
    snapshot = root.parent / "variants" / str(sparsity)
    from tasks.common import run_facts_path

    for folder in _folders(root):
        shutil.rmtree(root / folder, ignore_errors=True)
        shutil.copytree(snapshot / folder, root / folder)
        if run_facts_path(snapshot / folder).is_file():
            shutil.copy2(run_facts_path(snapshot / folder), run_facts_path(root / folder))
    for name in ("dvc.lock", "params.yaml"):
        shutil.copy2(snapshot / name, root / name)


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    (tmp_path / "variants").symlink_to(template.parent / "variants")
    (root / ".mlflow").mkdir()
    shutil.copy2(template.parent / "mlflow" / "mlflow.db", root / ".mlflow" / "mlflow.db")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)  # anything landing in ./mlruns or ./mlflow.db would show here
    return root


def _log(root: Path, sparsity: float | None = None, config: TrackingConfig | None = None) -> str:
    if sparsity is not None:
        switch(root, sparsity)
    return log_pipeline_run(discover_run_inputs(root, flow_run_id="flow-run-123"), config or _config()).model_version


def _manifest(root: Path, stage: str) -> dict:
    """The stage's manifest with the facts of its run (wall time, memory) merged in."""
    from tasks.common import read_stage_record

    return read_stage_record(root / "artifacts" / stage)


# ----------------------------------------------------------------------------- logging


def test_full_run_logs_everything(project, tmp_path):
    logged = log_pipeline_run(discover_run_inputs(project, flow_run_id="flow-run-123"), _config())
    resolved = resolve_tracking(_config(), project)
    assert resolved.tracking_uri == f"sqlite:///{project / '.mlflow' / 'mlflow.db'}"
    client = _client(project)
    run = client.get_run(logged.run_id)
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    evaluation = json.loads((project / "artifacts/evaluate/result.json").read_text())
    dense = json.loads((project / "artifacts/dense_eval/result.json").read_text())

    # params: params.yaml, flattened, with defaults filled in
    assert p["masks.sparsity"] == "0.5" and p["calibration.nsamples"] == "4" and p["masks.pattern"] == "unstructured"
    assert p["paths.prune"] == "artifacts/prune"
    # metrics: perplexities, deltas to dense, sparsity overall and per layer, stage times and memory
    assert m["perplexity"] == pytest.approx(evaluation["perplexity"]["perplexity"])
    assert m["dense.perplexity"] == pytest.approx(dense["perplexity"]["perplexity"])
    assert m["delta.perplexity"] == pytest.approx(m["perplexity"] - m["dense.perplexity"])
    assert m["sparsity"] == pytest.approx(0.5)
    layers = [k for k in m if k.startswith("sparsity.layer.")]
    assert len(layers) == 2 * 7 and all(m[k] == pytest.approx(0.5) for k in layers)
    for stage in ("materialize", "calibration", "masks", "prune", "evaluate"):
        assert m[f"stage.{stage}.wall_s"] == pytest.approx(_manifest(project, stage)["wall_s"])
        assert m[f"stage.{stage}.peak_memory_mb"] > 0
    if HAS_ZEROSHOT:
        assert {"boolq.acc", "rte.acc", "zeroshot.mean_acc", "dense.zeroshot.mean_acc",
                "delta.zeroshot.mean_acc"} <= set(m)
    # tags: commit, dvc.lock digest, base model fingerprint, flow run id, skipped stages
    base_fp = _manifest(project, "materialize")["lineage"]["base_model_fingerprint"]
    calib_digest = _manifest(project, "calibration")["lineage"]["calibration_token_digest"]
    assert t["wanda.base_model_fingerprint"] == base_fp
    assert t["wanda.dvc_lock_sha256"] == sha256_file(project / "dvc.lock")
    commit = _git(project, "rev-parse", "HEAD")
    assert t["prefect.flow_run_id"] == "flow-run-123" and t["wanda.git_commit"] == commit
    assert t["mlflow.source.git.commit"] == commit
    assert t["wanda.stage.engine"] == "skipped" and "wanda.stage.engine.reason" in t
    # datasets: calibration and evaluation data with their digests
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert inputs["calibration"].dataset.digest == calib_digest[:32]
    assert {tag.key: tag.value for tag in inputs["calibration"].tags}["sha256"] == calib_digest
    assert json.loads(inputs["calibration"].dataset.profile)["token_digest"] == calib_digest
    tokens = evaluation["perplexity"]["tokens_digest"]
    assert inputs["evaluation.perplexity"].dataset.digest == tokens[:32]
    assert "dense_evaluation.perplexity" in inputs
    if HAS_ZEROSHOT:
        assert {"zeroshot.boolq", "zeroshot.rte"} <= set(inputs)
    # artifacts: dvc.lock, params.yaml, manifests, evaluation JSON, plots, the model once
    def listed(path=None):
        return {a.path for a in client.list_artifacts(logged.run_id, path)}

    assert {"lineage", "evaluation", "plots", "model"} <= listed()
    assert {"lineage/dvc.lock", "lineage/params.yaml", "lineage/lineage.json", "lineage/manifests"} <= listed("lineage")
    assert "lineage/manifests/prune.json" in listed("lineage/manifests")
    assert {"evaluation/candidate.json", "evaluation/dense.json", "evaluation/sparsity.json"} <= listed("evaluation")
    assert {"plots/comparison.png", "plots/sparsity.png"} <= listed("plots")
    # the registered version points at the run's model artifact, with lineage tags
    version = client.get_model_version(MODEL, logged.model_version)
    assert version.source == f"runs:/{logged.run_id}/model"
    assert version.tags["wanda.lineage_digest"] == logged.lineage_digest
    assert version.tags["wanda.model_dvc_md5"] == dvc_md5(project / "artifacts/prune/model")
    assert version.tags["wanda.model_fingerprint"] == _manifest(project, "prune")["lineage"]["pruned_model_fingerprint"]
    assert version.tags["wanda.calibration_token_digest"] == calib_digest
    assert version.tags["wanda.gate"] == "pending"
    # everything under the project-local folder, nothing in the working directory
    assert (project / ".mlflow" / "artifacts" / "wanda-test").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (project / "mlruns").exists() and not (project / "mlflow.db").exists()


# ----------------------------------------------------------------------------- gate + audit


def test_gate_moves_aliases_and_audit(project):
    client = _client(project)
    v1 = _log(project)  # sparsity 0.5
    v2 = _log(project, sparsity=0.2)  # prunes too little

    # v1 is judged while the workspace holds v2: its bytes are verified from the DVC cache
    first = run_release(f"{MODEL}/{v1}", GATE, _config(), project)
    assert first.passed, first.decision.summary()
    assert (first.champion_before, first.champion_after, first.previous_after) == (None, v1, None)
    assert any(c.where.startswith("cache:") for c in first.lineage_checks)

    second = run_release(f"{MODEL}/{v2}", GATE, _config(), project)
    assert not second.passed
    assert {c.criterion for c in second.decision.failures} == {"min_sparsity"}
    assert (second.champion_after, second.previous_after) == (v1, None)
    tags = client.get_model_version(MODEL, v2).tags
    assert tags["wanda.gate"] == "rejected" and "min_sparsity" in tags["rejected"]
    decision = json.loads((project / "artifacts/gate/decision.json").read_text())
    assert decision["decision"]["passed"] is False and decision["version"] == v2
    assert any(a.path == f"gate/decision-v{v2}.json" for a in client.list_artifacts(second.run_id, "gate"))

    v3 = _log(project, sparsity=0.6)
    third = run_release(None, GATE, _config(), project)  # None: the newest version
    assert third.passed and third.version == v3, third.decision.summary()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v3
    assert str(client.get_model_version_by_alias(MODEL, "previous").version) == v1
    assert "rejected" not in client.get_model_version(MODEL, v3).tags

    # audit of the previous champion: the workspace holds v3, so v1's bytes come from the DVC cache
    report = audit(f"{MODEL}@previous", project, _config())
    assert report.ok, format_report(report)
    rec = report.lineage
    assert rec.stages["masks"].params["masks"]["sparsity"] == 0.5
    calib = _manifest(project, "calibration")["lineage"]["calibration_token_digest"]
    assert rec.calibration_token_digest == calib
    recomputed = {c.path: c for c in report.checks if c.kind == "recomputed"}
    assert recomputed["calibration_token_digest"].actual == calib
    assert recomputed["base_model_fingerprint"].status == "ok"
    assert recomputed["pruned_model_fingerprint"].status == "ok"
    dvc_checks = {c.path: c for c in report.checks if c.kind == "dvc_md5"}
    lock = read_yaml(project / "dvc.lock")
    assert set(dvc_checks) == {o["path"] for s in lock["stages"].values() for o in s.get("outs", [])}
    assert all(c.status == "ok" for c in dvc_checks.values())
    assert dvc_checks["artifacts/prune"].where.startswith("cache:")  # v1's pruned model is only in the cache
    assert dvc_checks["artifacts/calibration"].where == "workspace"  # unchanged since v1
    sha = [c for c in report.checks if c.kind == "sha256"]
    assert sha and all(c.status == "ok" for c in sha)
    assert report.gate["wanda.gate"] == "passed"
    text = format_report(report)
    assert "AUDIT OK" in text and calib in text and "prune [completed]" in text

    # --json output of the CLI handler: machine-readable, same content
    from flows.cli_release import main as cli_main

    code, out = _cli(cli_main, ["--repo", str(project), "audit", f"{MODEL}@champion", "--json",
                                "--registered-model", MODEL, "--experiment", "wanda-test"])
    assert code == 0 and json.loads(out)["version"] == v3


def _cli(main, argv) -> tuple[int, str]:
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def test_audit_reports_tampering(project):
    client = _client(project)
    v1 = _log(project)
    assert run_release(f"{MODEL}/{v1}", GATE, _config(), project).passed
    assert audit(f"{MODEL}@champion", project, _config()).ok

    # 1. a workspace artifact edited while dvc.lock still names the original
    tokens = project / "artifacts/calibration/tokens.safetensors"
    original = tokens.read_bytes()
    tokens.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    report = audit(f"{MODEL}@champion", project, _config())
    assert not report.ok
    bad = [c for c in report.checks if c.status == "mismatch"]
    assert [c.path for c in bad] == ["artifacts/calibration"] and bad[0].where == "workspace"
    assert "AUDIT FAILED" in format_report(report)

    # 2. the same file damaged in the DVC cache as well: nothing intact is left to verify from
    md5 = next(e["md5"] for e in json.loads(_cache(project, _lock_md5(project, "artifacts/calibration")).read_text())
               if e["relpath"] == "tokens.safetensors")
    cached = _cache(project, md5)
    cached.chmod(0o644)
    cached.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    report = audit(f"{MODEL}@champion", project, _config())
    assert any(c.path == "artifacts/calibration" and c.status == "mismatch" for c in report.checks)
    tokens.write_bytes(original)
    cached.write_bytes(original)
    assert audit(f"{MODEL}@champion", project, _config()).ok

    # 3. the registered model bytes edited in the MLflow artifact store
    # (the transformers-flavour model keeps the checkpoint in its model/ folder)
    art = Path(client.get_run(report.run_id).info.artifact_uri.removeprefix("file://")) / "model" / "model"
    weights = next(art.glob("*.safetensors"))
    kept = weights.read_bytes()
    weights.write_bytes(kept + b"\0")
    report = audit(f"{MODEL}/{v1}", project, _config())
    assert not report.ok
    assert {c.path for c in report.checks if c.status == "mismatch"} == {
        f"runs:/{report.run_id}/model (dvc md5)", f"runs:/{report.run_id}/model (fingerprint)"}
    weights.write_bytes(kept)

    # 4. a candidate whose artifacts were tampered with is never promoted, and the gate says why
    v2 = _log(project, sparsity=0.6)
    tokens.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    outcome = run_release(f"{MODEL}/{v2}", GATE, _config(), project)
    assert not outcome.passed
    assert [c.criterion for c in outcome.decision.failures] == ["lineage"]
    assert "artifacts/calibration" in outcome.decision.failures[0].note
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v1


def _lock_md5(root: Path, path: str) -> str:
    lock = read_yaml(root / "dvc.lock")
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


def _cache(root: Path, md5: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def test_nan_or_missing_evaluation_never_promoted(project):
    # EvaluationResult refuses to seal NaN, so a NaN reaches the gate only through the run's
    # metrics (a later logged value, a latency figure); it must still never pass.
    client = _client(project)
    v1 = _log(project)
    client.log_metric(client.get_model_version(MODEL, v1).run_id, "perplexity", float("nan"), step=1)
    outcome = run_release(f"{MODEL}/{v1}", GATE, _config(), project)
    assert not outcome.passed and "finite_metrics" in {c.criterion for c in outcome.decision.failures}

    shutil.rmtree(project / "artifacts/evaluate")  # an evaluation that never finished
    inputs = discover_run_inputs(project)
    assert inputs.candidate_eval is None
    logged = log_pipeline_run(inputs, _config())
    assert logged.evaluation_status == "missing"
    outcome = run_release(f"{MODEL}/{logged.model_version}", GATE, _config(), project)
    failed = {c.criterion for c in outcome.decision.failures}
    assert not outcome.passed and "evaluation" in failed
    assert client.get_registered_model(MODEL).aliases == {}


def test_dvc_registered_source_copies_no_weights(project, tmp_path):
    """register_source=dvc: the source is the DVC remote object; nothing is logged as a model."""
    from dvc.repo import Repo

    remote = tmp_path / "remote"
    with contextlib.chdir(project), Repo(str(project)) as repo:
        with repo.config.edit() as conf:
            conf["remote"]["store"] = {"url": str(remote)}
            conf["core"]["remote"] = "store"
        repo.push()
    version = _log(project, config=_config(register_source="dvc"))
    client = _client(project)
    mv = client.get_model_version(MODEL, version)
    md5 = _lock_md5(project, "artifacts/prune")
    assert mv.source == f"{remote.as_uri()}/files/md5/{md5[:2]}/{md5[2:]}"
    assert mv.tags["wanda.model_subpath"] == "model"
    assert not any(a.path == "model" for a in client.list_artifacts(mv.run_id))
    report = audit(f"{MODEL}/{version}", project, _config())
    assert report.ok, format_report(report)
    registered = [c for c in report.checks if c.kind == "registered"]
    assert registered and all(c.status == "ok" for c in registered)


# ----------------------------------------------------------------------------- concurrency


def _gate_worker(root, version, barrier, results):
    """One gate process. ``decide`` is slowed down so that, without the lock, both processes
    would read the same champion before either moves it (the test fails that way)."""
    import flows.release as release

    real_decide = release.decide

    def slow_decide(*args, **kwargs):
        time.sleep(1.0)
        return real_decide(*args, **kwargs)

    release.decide = slow_decide
    os.chdir(root)
    barrier.wait(timeout=120)
    outcome = release.run_release(f"{MODEL}/{version}", GATE, _config(), root,
                                  decision_path=root / f"decision-{version}.json")
    results.put((outcome.version, outcome.passed, outcome.champion_before))


def test_concurrent_gates_keep_aliases_consistent(project):
    versions = [_log(project), _log(project, sparsity=0.6)]
    ctx = multiprocessing.get_context("spawn")  # real processes, each with its own sqlite connections
    barrier, results = ctx.Barrier(len(versions)), ctx.Queue()
    procs = [ctx.Process(target=_gate_worker, args=(project, v, barrier, results)) for v in versions]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=180) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=60)
    assert all(proc.exitcode == 0 for proc in procs)
    client = _client(project)
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    # Serialized gates: each saw the champion the one before it left, so the passed gates form
    # one chain None -> a -> b ending at the current champion, and "previous" is the link before.
    passed = {before: version for version, ok, before in outcomes if ok}
    assert len(passed) == sum(ok for _, ok, _ in outcomes) == 2, f"two gates saw the same champion: {outcomes}"
    chain, current = [], None
    while current in passed:
        current = passed.pop(current)
        chain.append(current)
    assert not passed and chain[-1] == champion, outcomes
    assert str(client.get_model_version_by_alias(MODEL, "previous").version) == chain[-2]


# ----------------------------------------------------------------------------- Prefect, CLI


@pytest.mark.integration
def test_prefect_flow_rejection_fails_run(project, tmp_path):
    """The flow writes the table artifact and ends Failed on a rejection (ephemeral Prefect API)."""
    pytest.importorskip("prefect")
    version = _log(project, sparsity=0.2)
    code = (
        "import sys, json, asyncio\n"
        "from flows.release import release_gate\n"
        "state = release_gate(candidate=sys.argv[1], criteria=json.loads(sys.argv[2]),\n"
        "    tracking={'registered_model': 'tiny-pruned', 'experiment': 'wanda-test'}, root=sys.argv[3],\n"
        "    return_state=True)\n"
        "print('STATE', state.type.value)\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey\n"
        "async def artifacts():\n"
        "    async with get_client() as client:\n"
        "        found = await client.read_artifacts(\n"
        "            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=['gate-tiny-pruned'])))\n"
        "        print('ARTIFACTS', len(found), found[0].type if found else None)\n"
        "asyncio.run(artifacts())\n"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-c", code, f"{MODEL}/{version}", json.dumps(GATE), str(project)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATE FAILED" in proc.stdout and "ARTIFACTS 1 table" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_release_cli_exit_codes(project):
    from flows.cli_release import main as cli_main

    switch(project, 0.2)
    code, out = _cli(cli_main, ["--repo", str(project), "track", "--registered-model", MODEL, "--experiment",
                                "wanda-test", "--flow-run-id", "f-1", "--json"])
    assert code == 0, out
    v1 = json.loads(out)["model_version"]
    params = json.loads((project / "params.yaml").read_text())  # JSON is YAML: the file is written as JSON
    params["gate"] = {"min_sparsity": 0.4, "max_ppl_increase_rel": 0.5}
    (project / "params.yaml").write_text(json.dumps(params))
    common = ["--registered-model", MODEL, "--experiment", "wanda-test"]
    code, out = _cli(cli_main, ["--repo", str(project), "release", f"{MODEL}/{v1}", *common])
    assert code == 1 and "REJECTED" in out and "min_sparsity" in out
    code, out = _cli(cli_main, ["--repo", str(project), "release", f"{MODEL}/{v1}", *common, "--min-sparsity",
                                "none", "--json"])
    assert code == 0 and json.loads(out)["decision"]["passed"] is True
    code, _ = _cli(cli_main, ["--repo", str(project), "release", *common, "--min-sparsity", "2"])
    assert code == 2  # invalid criterion: named, before anything is read


def test_parse_ref():
    assert parse_ref("m@champion").alias == "champion"
    assert parse_ref("models:/m/3").version == "3"
    assert parse_ref("m").alias == "champion"
    with pytest.raises(ValueError, match="version must be a number"):
        parse_ref("m/x")


def test_gate_rejected_exception_carries_outcome(project):
    version = _log(project, sparsity=0.2)
    outcome = run_release(f"{MODEL}/{version}", GATE, _config(), project)
    exc = GateRejected(outcome)
    assert "min_sparsity" in str(exc) and exc.outcome.version == version
