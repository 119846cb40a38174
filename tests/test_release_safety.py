"""Through the command line: ``track`` refuses stale state, ``audit`` speaks JSON and markdown,
and a password in the tracking URI reaches no output, no Prefect database, no MLflow database.

Every command runs as its own ``python -m flows.cli`` process on the finished tiny pipeline of
tests/test_tracking.py (its session template, copied per test).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wanda.data import shared_data_dir

pytest.importorskip("mlflow")
pytest.importorskip("dvc")

from flows.release import run_release  # noqa: E402
from tests.test_mlflow_server import mlflow_server  # noqa: E402,F401 (fixture)
from tests.test_tracking import (GATE, MODEL, REPO, _client, _config, _log, project, switch,  # noqa: E402,F401
                                 template)

pytestmark = pytest.mark.integration

NAMES = ["--registered-model", MODEL, "--experiment", "wanda-test"]


def _cli(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # the project lives in a temporary folder: name the shared data explicitly (its zero-shot tasks)
    values = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
              "WANDA_SHARED_DATA": str(shared_data_dir()), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", "--repo", str(root), *args], cwd=root, env=values,
                          capture_output=True, text=True, timeout=600)


def _runs(root: Path) -> int:
    experiment = _client(root).get_experiment_by_name("wanda-test")
    return 0 if experiment is None else len(_client(root).search_runs([experiment.experiment_id]))


# ----------------------------------------------------------------------------- track


def test_track_refuses_stale_state(project):
    # 1. a parameter changed since the last run: masks (and what follows) are stale
    params = json.loads((project / "params.yaml").read_text())  # written as JSON, which is YAML
    params["masks"]["sparsity"] = 0.7
    (project / "params.yaml").write_text(json.dumps(params))
    refused = _cli(project, "track", *NAMES)
    assert refused.returncode == 1, refused.stderr
    assert "track refused" in refused.stderr and "stage masks is stale" in refused.stderr
    assert "masks.sparsity: 0.5 -> 0.7" in refused.stderr
    assert _runs(project) == 0  # nothing was logged

    # 2. a failed run on another model left its evaluation behind: the evaluated model is not
    #    the pruned model dvc.lock records
    switch(project, 0.5)
    shutil.rmtree(project / "artifacts/evaluate")
    shutil.copytree(project.parent / "variants" / "0.2" / "artifacts/evaluate", project / "artifacts/evaluate")
    refused = _cli(project, "track", *NAMES)
    assert refused.returncode == 1, refused.stderr
    assert "stage evaluate is" in refused.stderr
    assert "evaluate was made from pruned_model_fingerprint" in refused.stderr
    assert "the evaluation result is of model" in refused.stderr
    assert _runs(project) == 0

    # 3. the recorded state again: tracked and registered
    switch(project, 0.5)
    tracked = _cli(project, "track", *NAMES, "--json")
    assert tracked.returncode == 0, tracked.stderr
    logged = json.loads(tracked.stdout[tracked.stdout.index("{"):])
    assert logged["evaluation_status"] == "ok" and logged["model_version"] == "1"
    assert _runs(project) == 1


# ----------------------------------------------------------------------------- audit


def test_audit_json_and_markdown_with_exit_codes(project):
    version = _log(project)
    assert run_release(f"{MODEL}/{version}", GATE, _config(), project).passed

    ok = _cli(project, "audit", f"{MODEL}@champion", "--json", *NAMES)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True and report["version"] == version and report["problems"] == []
    stages = report["lineage"]["stages"]
    assert {"materialize", "calibration", "masks", "prune", "evaluate"} <= set(stages)
    assert stages["prune"]["lineage"]["pruned_model_fingerprint"] == report["lineage"]["pruned_model_fingerprint"]
    kinds = {c["kind"] for c in report["checks"]}
    assert {"record", "dvc_md5", "sha256", "recomputed", "registered"} <= kinds
    assert all(c["status"] in ("ok", "unchecked") for c in report["checks"])

    md = _cli(project, "audit", f"{MODEL}@champion", "--markdown", *NAMES)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith(f"# Audit of `{MODEL}` version {version}") and "**AUDIT OK**" in md.stdout
    assert "| prune | completed |" in md.stdout and "## Verification" in md.stdout
    rows = [line for line in md.stdout.splitlines() if line.startswith("| OK |")]
    assert len(rows) == sum(c["status"] == "ok" for c in report["checks"])  # one row per check

    tokens = project / "artifacts/calibration/tokens.safetensors"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = _cli(project, "audit", f"{MODEL}@champion", "--json", *NAMES)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [c["path"] for c in report["checks"] if c["status"] == "mismatch"] == ["artifacts/calibration"]
    md = _cli(project, "audit", f"{MODEL}@champion", "--markdown", *NAMES)
    assert md.returncode == 1 and "**AUDIT FAILED**: 1 problem(s)" in md.stdout
    assert "| MISMATCH | dvc_md5 | `artifacts/calibration` |" in md.stdout

    both = _cli(project, "audit", f"{MODEL}@champion", "--json", "--markdown", *NAMES)
    assert both.returncode == 2 and "--json and --markdown exclude each other" in both.stderr


# ----------------------------------------------------------------------------- secrets


def _holds(folder: Path, secret: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_password_in_tracking_uri_never_leaks(project, mlflow_server, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    url, server_data = mlflow_server
    secret = f"pw-{secrets.token_hex(8)}"
    uri = url.replace("http://", f"http://wanda:{secret}@")
    prefect_home = tmp_path / "prefect-home"
    # a fresh Prefect home migrates its database first: slow on a loaded machine
    env = {"MLFLOW_TRACKING_URI": uri, "PREFECT_HOME": str(prefect_home),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}

    run = _cli(project, "run", env=env)  # every stage cached; a Prefect flow run; tracked on the server
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "registered wanda-pruned version 1" in run.stdout
    audit = _cli(project, "audit", "wanda-pruned/1", env=env)
    assert "tracking:      http://***@127.0.0.1" in audit.stdout, audit.stdout + audit.stderr
    failed = _cli(project, "audit", "wanda-pruned/7", env=env)  # an error message on the way out
    assert failed.returncode == 1
    flag = _cli(project, "track", "--tracking-uri", uri)  # credentials in a flag: refused, not echoed
    assert flag.returncode == 2 and "user:password@ is refused" in flag.stderr

    # MLflow's own "View run ... at: <uri>" line went through the redaction
    assert "View run" in run.stdout and "http://***@127.0.0.1" in run.stdout
    assert MlflowClient(url, registry_uri=url).get_model_version("wanda-pruned", "1").tags["wanda.gate"] == "pending"
    for result in (run, audit, failed, flag):
        assert secret not in result.stdout and secret not in result.stderr
    assert any(prefect_home.rglob("*.db")), "the Prefect database was not created"
    assert _holds(prefect_home, secret.encode()) == []
    assert (server_data / "mlflow.db").is_file()
    assert _holds(server_data, secret.encode()) == []
    assert _holds(project / "artifacts", secret.encode()) == [] and secret not in (project / "params.yaml").read_text()


def test_query_string_secrets_refused_in_params_and_flags_never_stored(project, tmp_path):
    """Issue 25: ``?token=``, ``?password=`` and a name the tracking section adds are credentials
    like ``user:password@``: refused in params.yaml and on the command line (exit 2, the
    parameter named), accepted from the environment and found nowhere after a run."""
    token, extra = f"tk-{secrets.token_hex(8)}", f"xk-{secrets.token_hex(8)}"
    params = json.loads((project / "params.yaml").read_text())
    params["tracking"] = {"secret_query_params": ["wanda_key"]}
    (project / "params.yaml").write_text(json.dumps(params))
    store = tmp_path / "store"
    store.mkdir()
    prefect_home = tmp_path / "prefect-home"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}?token={token}&wanda_key={extra}",
           "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}

    run = _cli(project, "run", env=env)  # every stage cached; a Prefect flow run; tracked in the store
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "registered wanda-pruned version 1" in run.stdout

    written = (project / "params.yaml").read_bytes()
    refused = [
        _cli(project, "run", "-S", f"tracking.tracking_uri=sqlite:///{store}/x.db?password={token}"),
        _cli(project, "run", "-S", f"tracking.registry_uri=http://127.0.0.1:9/?WANDA_KEY={extra}"),
        _cli(project, "track", "--tracking-uri", f"http://127.0.0.1:9/?token={token}"),
        _cli(project, "release", "--tracking-uri", f"http://127.0.0.1:9/api?sig={token}"),
    ]
    for result, field in zip(refused, ("tracking.tracking_uri", "tracking.registry_uri", "tracking.tracking_uri",
                                        "tracking.tracking_uri")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"wanda-pipeline: invalid parameters: {field}: ?") and " is refused" in lines[0]
    assert (project / "params.yaml").read_bytes() == written
    params["tracking"]["tracking_uri"] = f"http://127.0.0.1:9/?wanda_key={extra}"
    (project / "params.yaml").write_text(json.dumps(params))
    in_file = _cli(project, "track")
    assert in_file.returncode == 2 and "tracking.tracking_uri: ?wanda_key= is refused" in in_file.stderr
    (project / "params.yaml").write_bytes(written)  # the file form was the test's own writing

    for result in (run, *refused, in_file):
        assert token not in result.stdout + result.stderr and extra not in result.stdout + result.stderr
    assert any(prefect_home.rglob("*.db")), "the Prefect database was not created"
    for folder in (project, store, prefect_home):  # the workspace (artifacts, .mlflow), MLflow, Prefect
        for secret in (token, extra):
            assert _holds(folder, secret.encode()) == [], (folder, secret)


def test_unreachable_tracking_server_fails_fast_before_any_stage(project):
    """Issue 25: one line within 15 s naming the redacted URI, instead of minutes of retries."""
    import time

    uri = "http://wanda:pw-hidden@127.0.0.1:9/?token=tok-hidden"
    for args in (("track", *NAMES), ("run", "--release", "-S", "masks.sparsity=0.6")):
        params = (project / "params.yaml").read_bytes()
        started = time.monotonic()
        result = _cli(project, *args, env={"MLFLOW_TRACKING_URI": uri})
        elapsed = time.monotonic() - started
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert "TrackingUnreachable: MLflow tracking server http://***@127.0.0.1:9/?token=*** is unreachable" \
            in lines[0]
        assert "pw-hidden" not in result.stderr and "tok-hidden" not in result.stderr
        assert elapsed < 15, elapsed  # interpreter start-up included
        assert "Starting temporary server" not in result.stdout + result.stderr  # no stage, no Prefect
        assert (project / "params.yaml").read_bytes() == params
