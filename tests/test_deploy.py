"""Deployment files against the code, the scheduled flows' parameters and DVC remote handling,
and ``wanda-pipeline rollback``. The servers themselves: tests/test_deploy_servers.py."""
from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from flows.deployments import check_parameters, read_specs
from flows.remote import RemoteParams, validated
from tests.pipeline_project import dvc, sh
from wanda.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _yaml(path: Path) -> dict:
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(path.read_text())


# ----------------------------------------------------------------------------- prefect.yaml

def test_prefect_yaml_deployments_resolve_to_flows_and_valid_parameters(monkeypatch):
    from prefect.client.schemas.schedules import CronSchedule

    from flows import scheduled

    monkeypatch.setenv("WANDA_REPO", str(REPO))
    specs = {s.name: s for s in read_specs(DEPLOY / "prefect.yaml")}
    assert set(specs) == {"nightly", "calibration-robustness-weekly"}
    flows = {"nightly": scheduled.nightly_prune, "calibration-robustness-weekly": scheduled.calibration_robustness}
    for name, spec in specs.items():
        check_parameters(spec)  # signature types and the flow's pydantic model
        assert spec.entrypoint == f"flows.scheduled.{flows[name].fn.__name__}"  # module path, see scheduled.py
        assert spec.schedules
        for schedule in spec.schedules:  # raises on a bad cron line or time zone
            CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        assert spec.work_pool.name == "wanda-gpu" and spec.work_pool.job_variables["working_dir"] == str(REPO)
        assert spec.work_pool.job_variables["env"]["HF_HUB_OFFLINE"] == "1"
        assert spec.concurrency_limit == 1
    assert specs["nightly"].parameters["release"] is True
    pools = _yaml(DEPLOY / "prefect.yaml")["definitions"]["work_pools"]
    assert {p["name"] for p in pools.values()} == {"wanda-gpu", "wanda-docker", "wanda-k8s"}


def test_bad_deployment_parameters_name_the_field(tmp_path):
    text = (DEPLOY / "prefect.yaml").read_text().replace("seeds: [0, 1, 2]", "seeds: [0, 1, 2]\n      workers: 0")
    (tmp_path / "prefect.yaml").write_text(text)
    spec = read_specs(tmp_path / "prefect.yaml", ["calibration-robustness-weekly"])[0]
    with pytest.raises(ConfigError, match=r"deployments\[calibration-robustness-weekly\]\.parameters\.workers"):
        check_parameters(spec)
    with pytest.raises(ConfigError, match="no deployment hourly"):
        read_specs(DEPLOY / "prefect.yaml", ["hourly"])


# ----------------------------------------------------------------------------- containers, compose

def test_compose_stack_is_consistent_and_holds_no_secret():
    compose = _yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "prefect-server", "worker"} <= set(services)
    command = services["mlflow"]["command"]
    backend = command[command.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql+psycopg2://") and "@postgres:" in backend and ":" not in backend.split("@")[0][len("postgresql+psycopg2://"):]
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert "asyncpg" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    example = dict(line.split("=", 1) for line in (DEPLOY / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    text = (DEPLOY / "compose.yaml").read_text()
    for name in set(re.findall(r"\$\{([A-Z0-9_]+)", text)):
        assert name in example, f"{name} is used by compose.yaml but missing from .env.example"
    for service in services.values():  # every secret is a reference to deploy/.env
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET", key):
                assert str(value).startswith("${"), (key, value)
    for service in services.values():  # build contexts and mounted files exist
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        for volume in service.get("volumes") or []:
            if volume.startswith("./"):
                assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    ignored = subprocess.run(["git", "check-ignore", "-q", "deploy/.env"], cwd=REPO)
    assert ignored.returncode == 0, "deploy/.env must be git-ignored"


def test_dockerfiles_base_images_and_inputs():
    gpu = (DEPLOY / "docker" / "Dockerfile.gpu").read_text()
    version = re.search(r"^ARG TRTLLM_VERSION=(\S+)$", gpu, re.M).group(1)
    assert re.fullmatch(r"1\.2\.\d+", version)  # the last release line with trtllm-build
    assert "FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_VERSION}" in gpu
    assert "trtllm-build" in gpu
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DEPLOY / "docker" / name).read_text()
        for source in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (REPO / source).exists(), f"{name}: COPY {source}"
        assert "HF_HUB_OFFLINE=1" in text


# ----------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("values, field, message", [
    ({"dvc_remote": "ftp://host/x"}, "dvc_remote", "unsupported scheme 'ftp'"),
    ({"dvc_remote": "ssh://me:hunter2@host/x"}, "dvc_remote", "holds a password"),
    ({"dvc_remote_options": {"secret_access_key": "x"}}, "dvc_remote_options", "hold secrets"),
    ({"dvc_remote_name": "../x"}, "dvc_remote_name", "pattern"),
    ({"pull": "sometimes"}, "pull", "boolean"),
])
def test_remote_parameters_name_the_field(values, field, message):
    with pytest.raises(ConfigError, match=re.escape(field) + ".*" + re.escape(message)):
        validated(RemoteParams, values)


def test_missing_remote_plugin_says_what_to_install():
    import importlib.util

    if importlib.util.find_spec("dvc_s3") is not None:
        pytest.skip("dvc-s3 is installed here")
    with pytest.raises(ConfigError, match=r"dvc_remote: s3:// remotes need the dvc_s3 package.*dvc\[s3\]"):
        validated(RemoteParams, {"dvc_remote": "s3://bucket/path"})


def test_flow_parameters_fail_before_any_dvc_work(tmp_path):
    from flows.scheduled import calibration_robustness, nightly_prune

    with pytest.raises(ConfigError, match=r"^nsamples: .*>= 1"):
        calibration_robustness.fn(nsamples=[0, 16], repo=str(tmp_path))
    with pytest.raises(ConfigError, match="dvc_remote"):
        nightly_prune.fn(dvc_remote="ftp://x", repo=str(tmp_path))


# ----------------------------------------------------------------------------- DVC remote

@pytest.fixture
def dvc_repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    (root / "data.txt").write_text("weights\n")
    dvc(root, "add", "data.txt")
    return root


def test_synced_pulls_tolerates_empty_remote_and_pushes_after_failure(dvc_repo, tmp_path, monkeypatch):
    from flows import remote

    store = tmp_path / "remote"
    monkeypatch.delenv(remote.REMOTE_ENV, raising=False)
    params = RemoteParams(dvc_remote=str(store))
    with pytest.raises(RuntimeError, match="gate said no"):
        with remote.synced(dvc_repo, params):  # first run: nothing there to pull
            raise RuntimeError("gate said no")
    md5 = hashlib.md5(b"weights\n").hexdigest()
    assert (store / "files" / "md5" / md5[:2] / md5[2:]).is_file()  # pushed although the body failed
    assert "url" in (dvc_repo / ".dvc" / "config.local").read_text()
    assert "url" not in (dvc_repo / ".dvc" / "config").read_text()  # never in the committed config

    # A fresh clone of the workspace (no cache) gets it back from the remote through the env var
    clone = tmp_path / "clone"
    sh(dvc_repo, "git", "add", "-A")
    sh(dvc_repo, "git", "commit", "-q", "-m", "data")
    sh(tmp_path, "git", "clone", "-q", str(dvc_repo), str(clone))
    monkeypatch.setenv(remote.REMOTE_ENV, str(store))
    with remote.synced(clone, RemoteParams(push=False)) as name:
        assert name == "wanda"
        assert (clone / "data.txt").read_text() == "weights\n"


# ----------------------------------------------------------------------------- rollback

def test_rollback_moves_champion_back_and_records_it(project):  # noqa: F811 (fixture)
    from flows.cli import main
    from flows.release import run_release
    from flows.rollback import run_rollback
    from tests.test_tracking import GATE, MODEL, _client, _config, _log

    gate = {**GATE, "champion_margin": None}
    versions = []
    for sparsity in (0.5, 0.6, 0.5):
        version = _log(project, sparsity=sparsity)
        assert run_release(f"{MODEL}/{version}", gate, _config(), project).passed
        versions.append(version)
    client = _client(project)
    alias = lambda name: str(client.get_model_version_by_alias(MODEL, name).version)  # noqa: E731
    assert (alias("champion"), alias("previous")) == (versions[2], versions[1])

    outcome = run_rollback(_config(), project, reason="bad outputs reported")
    assert (outcome.champion_before, outcome.champion_after, outcome.previous_after) == (versions[2], versions[1],
                                                                                          versions[0])
    assert (alias("champion"), alias("previous")) == (versions[1], versions[0])
    demoted = client.get_model_version(MODEL, versions[2])
    assert demoted.tags["wanda.gate"] == "rolled_back" and "bad outputs" in demoted.tags["wanda.gate.reasons"]
    with pytest.raises(ConfigError, match="did not pass the release gate"):
        run_rollback(_config(), project, to=versions[2])  # a rolled-back version is not restored

    code = main(["--repo", str(project), "rollback", "--registered-model", MODEL, "--experiment", "wanda-test"])
    assert code == 0 and alias("champion") == versions[0]
    assert not [a for a in client.get_registered_model(MODEL).aliases if a == "previous"]
    assert main(["--repo", str(project), "rollback", "--registered-model", MODEL]) == 1  # nothing left


from tests.test_tracking import project, template  # noqa: E402,F401 (fixtures)
