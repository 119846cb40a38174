"""deploy/kubernetes/gpu-job-template.json against prefect-kubernetes' own job-template schema
(no cluster): the work pool would accept it, the deployment's job variables validate against it,
and the worker renders it into a Job that requests a GPU, mounts the DVC cache and takes its
secrets from a Kubernetes secret."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "kubernetes" / "gpu-job-template.json"

pytest.importorskip("prefect_kubernetes", reason="the `distributed` extra (prefect-kubernetes) is not installed")


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _deployment_job_variables() -> dict:
    """The kubernetes_cluster pool's job variables in deploy/prefect.yaml, ``{{ $VAR }}`` filled
    as ``prefect deploy`` fills it from its environment."""
    from ruamel.yaml import YAML

    document = YAML(typ="safe", pure=True).load((REPO / "deploy" / "prefect.yaml").read_text())
    pool = document["definitions"]["work_pools"]["kubernetes_cluster"]
    assert pool["name"] == "wanda-k8s"
    text = json.dumps(pool["job_variables"]).replace("{{ $WANDA_IMAGE_GPU }}", "registry.example/wanda:gpu")
    assert "{{" not in text
    return json.loads(text)


def test_template_is_a_valid_kubernetes_work_pool_template():
    from prefect.client.schemas.actions import DeploymentCreate
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect_kubernetes.worker import KubernetesWorker

    template = _template()
    default = KubernetesWorker.get_default_base_job_template()
    # The worker's own configuration fields, and every variable the worker defines, kept.
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    validate_base_job_template(template)  # the server's check: every placeholder is a declared variable
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    values = _deployment_job_variables()
    DeploymentCreate.model_construct(job_variables=values).check_valid_configuration(template)
    with pytest.raises(jsonschema.ValidationError):
        DeploymentCreate.model_construct(job_variables={**values, "gpu_count": -1}).check_valid_configuration(template)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """The worker resolves blocks and variables in job variables through the API."""
    import os

    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.integration
def test_worker_renders_a_gpu_job_with_cache_and_secrets(prefect_api):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    values = {**_deployment_job_variables(), "gpu_count": 2}
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(_template(), values))
    pod = config.job_manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/wanda:gpu"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 2
    assert int(container["resources"]["requests"]["nvidia.com/gpu"]) == 2
    assert container["envFrom"] == [{"secretRef": {"name": "wanda-secrets", "optional": False}}]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"dvc-cache": "/var/cache/wanda-dvc", "repo": "/workspace/repo"}
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == \
        {"dvc-cache": "wanda-dvc-cache", "repo": "wanda-repo"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    env = container["env"]  # a mapping here; the worker turns it into name/value pairs per flow run
    assert env["HF_HUB_OFFLINE"] == "1"
    # Secrets reach the pod from the Kubernetes secret only, never as plain values.
    assert not any("SECRET" in name or "PASSWORD" in name for name in env)
