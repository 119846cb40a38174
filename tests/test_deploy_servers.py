"""The scheduled pipeline as a team runs it, against real servers on loopback.

PostgreSQL (Debian's package, a cluster in a temporary folder) backs an ``mlflow server`` with
proxied artifacts; a ``prefect server`` with a ``process`` work pool and a worker runs the
nightly deployment, registered from deploy/prefect.yaml by ``wanda-pipeline deploy``; a DVC
remote is a temporary folder. The run is the tiny project's model (a random LLaMA). Checked:
the flow run completed, the MLflow run and its lineage are on the PostgreSQL-backed server, the
registry's ``champion`` names the run's version, the DVC remote holds the pushed outputs and run
cache, and ``prefect deploy`` accepts deploy/prefect.yaml as it stands. Every process started
is stopped at the end, by process id.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import servers as srv
from tests.pipeline_project import REPO, make_project

pytestmark = [pytest.mark.servers, pytest.mark.integration]

POOL = "wanda-gpu"  # the name deploy/prefect.yaml uses
# The tiny project of the pipeline tests (tests.pipeline_project): this test is about the
# deployment's machinery (servers, worker, registry, remote); the embedded model's pipeline is
# proven by the digests, the embedded integration tests and `make demo`. The gate's quality limit
# is loose (4 short windows say little), its sparsity limit is not.
PROJECT_OVERRIDES = [
    "export_24.enabled=false",
    "gate.max_ppl_increase_rel=50.0",
    "gate.min_sparsity=0.49",
]
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("psycopg2", reason="the deploy extra is not installed: pip install -e '.[deploy]'")
    try:
        srv.postgres_bin()
    except srv.Unavailable as exc:
        pytest.skip(str(exc))
    servers = srv.Servers(tmp_path_factory.mktemp("servers"))
    try:
        pg = srv.start_postgres(servers)
        mlflow_url = srv.start_mlflow(servers, pg)
        api = srv.start_prefect(servers)
        yield servers, pg, mlflow_url, api
    finally:
        servers.stop_all()


def _prefect(servers, api: str, *args: str, cwd: Path | None = None, env: dict | None = None):
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=cwd or servers.base,
                            env={**srv.prefect_env(servers, api), **(env or {})}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _run_and_wait(api: str, deployment: str, timeout_s: float):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        flow_run = run_deployment(deployment, timeout=timeout_s, poll_interval=3)
        logs = []
        if not flow_run.state.is_completed():  # this server holds only this test's runs
            with get_client(sync_client=True) as client:
                logs = [f"{entry.level} {entry.message}" for entry in client.read_logs(limit=200)]
        return flow_run, logs


def test_nightly_deployment_on_real_servers(stack, tmp_path):
    from mlflow import MlflowClient

    servers, pg, mlflow_url, api = stack
    project = make_project(tmp_path / "project", PROJECT_OVERRIDES)
    shutil.copytree(REPO / "deploy", project / "deploy")
    remote = tmp_path / "dvc-remote"

    _prefect(servers, api, "work-pool", "create", POOL, "--type", "process")
    registered = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--repo", str(project), "deploy", "--name", "nightly",
         "--paused", "--json"],
        cwd=project, env=srv.prefect_env(servers, api), capture_output=True, text=True, timeout=300)
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert list(json.loads(registered.stdout)) == ["nightly-prune/nightly"]

    # The worker's environment is where a team's configuration and secrets live; the flow runs
    # inherit it (the deployment itself holds only the offline settings).
    worker_env = {**srv.prefect_env(servers, api), "MLFLOW_TRACKING_URI": mlflow_url,
                  "WANDA_DVC_REMOTE": str(remote), "PREFECT_WORKER_QUERY_SECONDS": "2",
                  "PREFECT_WORKER_PREFETCH_SECONDS": "5", "OMP_NUM_THREADS": "2"}
    servers.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
                             "--limit", "1"], env=worker_env, cwd=servers.base)

    started = time.monotonic()
    flow_run, logs = _run_and_wait(api, "nightly-prune/nightly", RUN_TIMEOUT_S)
    seconds = time.monotonic() - started
    assert flow_run.state.is_completed(), (
        f"flow run {flow_run.state.type}: {flow_run.state.message}\n" + "\n".join(logs[-60:])
        + f"\n--- worker log ---\n{servers.tail('worker', 6000)}")
    print(f"nightly deployment run completed in {seconds:.0f} s")

    # MLflow: the run, its lineage and the registry, on the PostgreSQL-backed server
    client = MlflowClient(mlflow_url, mlflow_url)
    experiment = client.get_experiment_by_name("wanda-pruning")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["perplexity"] > 0 and run.data.metrics["dense.perplexity"] > 0
    tags = run.data.tags
    for key in ("wanda.lineage_digest", "wanda.base_model_fingerprint", "wanda.calibration_token_digest",
                "wanda.dvc_lock_sha256", "wanda.git_commit"):
        assert tags.get(key) not in (None, "", "unknown", "absent"), key
    assert tags["prefect.flow_run_id"] != "none"
    champion = client.get_model_version_by_alias("wanda-pruned", "champion")
    assert champion.run_id == run.info.run_id
    assert champion.tags["wanda.gate"] == "passed"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert any(p.name == "model.safetensors" for p in (servers.base / "mlflow-artifacts").rglob("*"))
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password,
                          dbname=pg.database) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_uuid FROM runs")
        assert [row[0] for row in cur.fetchall()] == [run.info.run_id]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = 'wanda-pruned'")
        assert ("champion", int(champion.version)) in cur.fetchall()

    # DVC: the remote holds every output of the run (and the run cache); the URL stayed local
    assert "url" not in (project / ".dvc" / "config").read_text()
    assert str(remote) in (project / ".dvc" / "config.local").read_text()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud", "--remote", "wanda", "--json"],
                            cwd=project, capture_output=True, text=True, env=srv.prefect_env(servers, api))
    assert status.returncode == 0 and json.loads(status.stdout[status.stdout.find("{"):] or "{}") == {}, status
    from tasks.params import read_yaml

    prune_out = read_yaml(project / "dvc.lock")["stages"]["prune"]["outs"][0]["md5"]
    assert (remote / "files" / "md5" / prune_out[:2] / prune_out[2:]).is_file()
    assert any((remote / "runs").rglob("*")), "the run cache was not pushed"

    # deploy/prefect.yaml as it stands is accepted by `prefect deploy` (schedules, parameters)
    _prefect(servers, api, "deploy", "--all", "--prefect-file", "deploy/prefect.yaml", cwd=project,
             env={"WANDA_REPO": str(project)})
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as pc:
        weekly = pc.read_deployment_by_name("calibration-robustness/calibration-robustness-weekly")
        nightly = pc.read_deployment_by_name("nightly-prune/nightly")
    assert [s.schedule.cron for s in weekly.schedules] == ["0 4 * * 6"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert weekly.parameters["seeds"] == [0, 1, 2] and weekly.work_pool_name == POOL
    assert nightly.entrypoint == "flows.scheduled.nightly_prune"
