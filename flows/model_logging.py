"""The pruned model as an MLflow ``transformers``-flavour model, so the registry serves it.

``register_source: artifact`` logs the model folder with MLflow's transformers flavour, built
offline from the local folder: a text-generation pipeline of the loaded model and tokenizer goes
to ``mlflow.transformers.save_model`` with a local model card and explicit pip requirements (so
MLflow asks neither the hub nor a subprocess). MLflow 3.17's path-only form (``save_model(<folder>,
task=...)``) fails under transformers 5 (``check_task`` returns the pipeline class by name), hence
the pipeline. MLflow re-serializes the weights; we put the pruned folder's own files back in their
place, so the registered checkpoint is the folder byte for byte. The run artifact ``model/`` holds

- ``MLmodel``, the environment files and ``model/``: the pruned folder byte for byte (same DVC
  md5 and fingerprint, which the audit checks); ``components/tokenizer/``;

so ``mlflow.transformers.load_model("models:/<name>@champion")`` returns a working
text-generation pipeline (``return_type="components"``: model and tokenizer) and ``mlflow models
serve -m models:/<name>@champion`` serves it (its pyfunc flavour). The flavour is saved to a
temporary folder and uploaded with the client API against an explicit run id (no fluent "active
run", which concurrent sweeps would share).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TASK = "text-generation"
HF_SUBDIR = "model"  # where the flavour keeps the checkpoint (mlflow.transformers' _MODEL_BINARY_FILE_NAME)
FLAVOUR_FILE = "MLmodel"


def _model_card(model_dir: Path):
    """A local card: without one MLflow would try to fetch the card of the 'repository' from the hub."""
    from huggingface_hub import ModelCard

    return ModelCard("---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [wanda, pruned]\n---\n"
                     f"Pruned with Wanda by the wanda pipeline from {model_dir.name}.\n")


def _torch_dtype(model_dir: Path):
    """The dtype the pipeline stored and evaluated the model in (``wanda_model.json``)."""
    import torch

    from wanda.model_io import read_materialized

    try:
        return getattr(torch, read_materialized(model_dir).dtype)
    except Exception:  # noqa: BLE001 - not a materialized folder: let transformers choose
        return None


def pip_requirements() -> list[str]:
    """What the served model needs (MLflow adds itself); public versions, without local tags."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("transformers", "torch", "tokenizers", "safetensors")]


def save_transformers_model(model_dir: str | Path, dst: str | Path) -> Path:
    """``dst``: the MLflow transformers-flavour model of the local HF folder ``model_dir``."""
    import shutil

    import mlflow.transformers
    import transformers

    from wanda.model_io import load_model

    model_dir, dst = Path(model_dir).resolve(), Path(dst)
    dtype = _torch_dtype(model_dir)
    model, tokenizer = load_model(str(model_dir), dtype=str(dtype).replace("torch.", "") if dtype else "float32")
    pipe = transformers.pipeline(TASK, model=model, tokenizer=tokenizer)
    mlflow.transformers.save_model(pipe, str(dst), torch_dtype=dtype, model_card=_model_card(model_dir),
                                   pip_requirements=pip_requirements())
    del pipe, model
    hf = dst / HF_SUBDIR
    shutil.rmtree(hf)
    shutil.copytree(model_dir, hf)  # the pruned folder's bytes, not MLflow's re-serialization
    return dst


def log_transformers_model(client: "MlflowClient", run_id: str, model_dir: str | Path, artifact_path: str) -> str:
    """Log ``model_dir`` as the flavour model ``runs:/<run_id>/<artifact_path>``; returns that URI."""
    with tempfile.TemporaryDirectory(prefix="wanda-flavour-") as tmp:
        flavour = save_transformers_model(model_dir, Path(tmp) / artifact_path)
        client.log_artifacts(run_id, str(flavour), artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}"
    log.info("logged %s as an MLflow transformers model (%s) at %s", model_dir, TASK, uri)
    return uri


def checkpoint_dir(folder: Path) -> Path:
    """The HF checkpoint inside a flavour model folder (the folder itself for a plain checkpoint)."""
    if (folder / FLAVOUR_FILE).is_file() and (folder / HF_SUBDIR).is_dir():
        return folder / HF_SUBDIR
    return folder
