"""The registered champion is a model MLflow itself can load and serve.

On the tracking tests' tiny pipeline run (``tests/test_tracking.py``'s session template): log and
register, promote through the gate, then load ``models:/<name>@champion`` with
``mlflow.transformers.load_model`` only (no wanda loader), check its perplexity on the evaluated
windows equals the evaluated one, generate with the pipeline, and have ``mlflow models`` prepare
its serving (``generate-dockerfile`` resolves the registry URI, downloads the model and writes the
server's build context without starting anything). Offline: nothing from the hub.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_tracking import GATE, MODEL, _client, _config, _log, project, template  # noqa: F401
from flows.release import run_release
from flows.tracking import discover_run_inputs, resolve_tracking

pytestmark = pytest.mark.integration


def test_champion_loads_through_mlflow_with_the_evaluated_perplexity(project, tmp_path, monkeypatch):
    import mlflow
    import mlflow.transformers

    from tasks.params import read_yaml, validate_params
    from wanda.evaluation.perplexity import evaluate_perplexity
    from wanda.evaluation.results import load_result
    from tasks.lineage import dvc_md5

    version = _log(project)
    assert run_release(f"{MODEL}/{version}", GATE, _config(), project).passed
    resolved = resolve_tracking(_config(), project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", resolved.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", resolved.registry_uri)
    mlflow.set_tracking_uri(resolved.tracking_uri)
    mlflow.set_registry_uri(resolved.registry_uri)
    uri = f"models:/{MODEL}@champion"

    components = mlflow.transformers.load_model(uri, return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    inputs = discover_run_inputs(project)
    evaluated = load_result(inputs.candidate_eval).perplexity
    config, _ = validate_params(read_yaml(project / "params.yaml")).evaluate.perplexity.resolve()
    again = evaluate_perplexity(model.eval(), tokenizer, config)
    assert again.tokens_digest == evaluated.tokens_digest  # the same windows
    assert again.perplexity == evaluated.perplexity

    pipe = mlflow.transformers.load_model(uri)  # the default: a working text-generation pipeline
    out = pipe("w1 w2 w3", max_new_tokens=4, do_sample=False)
    assert out and isinstance(out[0]["generated_text"], str)

    # The registered bytes are the pruned folder, byte for byte (what the audit relies on).
    client = _client(project)
    mv = client.get_model_version(MODEL, version)
    assert mv.source == f"runs:/{mv.run_id}/model"
    assert dvc_md5(project / "artifacts" / "prune" / "model") == mv.tags["wanda.model_dvc_md5"]
    from flows.registry import registered_model_dir
    assert dvc_md5(registered_model_dir(client, mv)) == mv.tags["wanda.model_dvc_md5"]

    # `mlflow models` prepares serving the champion: pyfunc flavour present, server context written.
    assert {"transformers", "python_function"} <= set(mlflow.models.get_model_info(uri).flavors)
    env = {**os.environ, "MLFLOW_TRACKING_URI": resolved.tracking_uri, "MLFLOW_REGISTRY_URI": resolved.registry_uri}
    proc = subprocess.run([sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", uri,
                           "-d", str(tmp_path / "serve"), "--env-manager", "local"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dockerfile = (tmp_path / "serve" / "Dockerfile").read_text()
    assert "mlflow" in dockerfile and (tmp_path / "serve" / "model_dir").is_dir()
