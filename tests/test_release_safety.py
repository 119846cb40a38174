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


# ----------------------------------------------------------------------------- release under signals


def _gate_lock_held(path: Path) -> bool:
    import fcntl

    if not path.exists():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False


def _release_process(project: Path, version: str) -> subprocess.Popen:
    values = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
              "WANDA_SHARED_DATA": str(shared_data_dir())}
    criteria = [f"--{k.replace('_', '-')}={v}" for k, v in GATE.items()]
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "--repo", str(project), "release",
                             f"{MODEL}/{version}", *NAMES, *criteria], cwd=project, env=values,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sigterm_after_lock(project: Path, version: str, lock: Path, delay: float | None):
    """Start ``release``; once it holds the gate lock, wait ``delay`` s and send SIGTERM (None:
    no signal). Returns (process result, seconds from the lock to the exit)."""
    import signal
    import time

    process = _release_process(project, version)
    while not _gate_lock_held(lock) and process.poll() is None:
        time.sleep(0.002)
    locked = time.monotonic()
    if delay is not None:
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err, time.monotonic() - locked


def test_release_is_atomic_under_sigterm(project):
    """Issue 25: SIGTERM at evenly spaced moments after the gate lock is taken leaves either the
    old champion and no trace of the new decision, or the new champion with its whole decision;
    one line says which; the next release and the audit agree with the state. (The issue asks
    for 20 moments; WANDA_SIGTERM_MOMENTS sets how many, 6 by default on this 2-core machine.)"""
    from flows.audit import audit
    from flows.mlflow_uris import resolve_tracking, safe_name

    moments = int(os.environ.get("WANDA_SIGTERM_MOMENTS", "6"))
    client = _client(project)
    lock = resolve_tracking(_config(), project).store_dir / f".gate-{safe_name(MODEL)}.lock"
    decision = project / "artifacts/gate/decision.json"
    first = _log(project)
    assert run_release(f"{MODEL}/{first}", GATE, _config(), project).passed
    # one undisturbed run measures the span from lock to exit
    version = _log(project)
    code, out, err, span = _sigterm_after_lock(project, version, lock, None)
    assert code == 0, err[-2000:]
    champion = version
    (decision.parent / ".decision.json.tmp-stray").write_text("{")  # a write cut short earlier
    seen = {"before": 0, "after": 0}
    for i in range(moments):
        version = _log(project)
        code, out, err, _ = _sigterm_after_lock(project, version, lock, span * i / max(moments - 1, 1))
        now = str(client.get_model_version_by_alias(MODEL, "champion").version)
        tags = client.get_model_version(MODEL, version).tags
        record = json.loads(decision.read_text())
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert not list(decision.parent.glob(".decision.json*")), "temporary or pending files left"
        if now == version:  # new champion with its whole decision
            assert tags["wanda.gate"] == "passed" and record["version"] == version
            assert record["champion_before"] == champion and record["champion_after"] == version
            assert code == 0 or (code == 130 and "after its commit" in last and f"champion is version {version}"
                                 in last), (code, err[-2000:])
            seen["after"] += 1
        else:  # old champion, no trace of the new decision
            assert now == champion and tags.get("wanda.gate") == "pending", tags
            assert record["version"] != version
            assert code == 130 and "before its commit" in last and f"(version {champion})" in last, err[-2000:]
            seen["before"] += 1
        assert len(err.strip().splitlines()) <= 1 or code == 0, err[-2000:]
        # the next release and the audit agree with what the registry now says
        assert run_release(f"{MODEL}/{version}", GATE, _config(), project).champion_after == version
        report = audit(f"{MODEL}@champion", project, _config())
        assert report.ok and report.version == version, report.problems
        champion = version
    assert seen["before"] and seen["after"], seen  # both outcomes were hit


def test_audit_fails_a_champion_whose_gate_tag_is_not_passed(project):
    from flows.audit import audit

    version = _log(project)
    client = _client(project)
    client.set_registered_model_alias(MODEL, "champion", version)  # moved by hand: never gated
    report = audit(f"{MODEL}@champion", project, _config())
    assert not report.ok
    assert any("is champion but its wanda.gate tag is 'pending'" in p for p in report.problems), report.problems
    assert run_release(f"{MODEL}/{version}", GATE, _config(), project).passed
    assert audit(f"{MODEL}@champion", project, _config()).ok
