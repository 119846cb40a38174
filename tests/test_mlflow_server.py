"""The pipeline against a real ``mlflow server`` on loopback (sqlite backend, proxied artifacts).

Exercises what only a server has: ``mlflow-artifacts:`` artifact URIs (the model is uploaded and
downloaded over HTTP), the server's validation of model version sources, the registry-model
lock the gate uses when there is no shared filesystem, and ``MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("mlflow")

from flows.audit import audit, format_report  # noqa: E402
from flows.release import run_release  # noqa: E402
from flows.mlflow_uris import resolve_tracking  # noqa: E402
from tasks.params import TrackingConfig  # noqa: E402
from tests.servers import free_port, wait_http  # noqa: E402
from tests.test_tracking import GATE, MODEL, _log, project, template  # noqa: E402,F401,F811 (fixtures)

pytestmark = pytest.mark.integration


def _tail(data) -> str:
    return (data / "server.log").read_text()[-2000:]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` in its own process group, stopped by that group's id afterwards."""
    port = free_port()
    data = tmp_path / "server"
    data.mkdir()
    log = open(data / "server.log", "w")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}", "--artifacts-destination", str(data / "artifacts")],
        cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, f"{url}/health", 120, lambda: _tail(data))
        yield url, data
    finally:
        # The server's group holds uvicorn's worker too; the group id is the pid we started.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_pipeline_against_mlflow_server(project, mlflow_server, monkeypatch):  # noqa: F811 (fixture)
    from mlflow import MlflowClient

    url, data = mlflow_server
    config = TrackingConfig(tracking_uri=url, registered_model=MODEL, experiment="wanda-server")
    resolved = resolve_tracking(config, project)
    assert not resolved.local and resolved.artifact_location is None  # the server decides

    v1 = _log(project, config=config)
    v2 = _log(project, sparsity=0.2, config=config)
    client = MlflowClient(url, url)
    run = client.get_run(client.get_model_version(MODEL, v1).run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "calibration" in {d.dataset.name for d in run.inputs.dataset_inputs}
    assert any(p.name == "model.safetensors" for p in (data / "artifacts").rglob("*"))  # uploaded to the server

    first = run_release(f"{MODEL}/{v1}", GATE, config, project)
    assert first.passed, first.decision.summary()
    second = run_release(f"{MODEL}/{v2}", GATE, config, project)
    assert not second.passed and {c.criterion for c in second.decision.failures} == {"min_sparsity"}
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == v1
    assert client.get_model_version(MODEL, v2).tags["wanda.gate"] == "rejected"
    # the registry lock was taken and released
    assert not [m for m in client.search_registered_models() if m.name.endswith(".gate-lock")]

    # MLFLOW_TRACKING_URI points an unconfigured run at the server; the audit downloads over HTTP
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    report = audit(f"{MODEL}@champion", project, TrackingConfig(registered_model=MODEL))
    assert report.ok, format_report(report)
    assert report.tracking_uri == url
    assert any(c.kind == "registered" and c.status == "ok" for c in report.checks)
    assert json.loads(report.model_dump_json())["version"] == v1
    # nothing went to the embedded default store
    assert not (project / ".mlflow" / "artifacts").exists()
