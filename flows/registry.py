"""The model registry: a registered version for a pruned model, and its bytes back.

Registered model source (decision)
The default ``register_source: artifact`` logs the pruned model directory once as the run
artifact ``model/``, in MLflow's transformers flavour (``flows/model_logging.py``: the folder byte
for byte under ``model/model/``, plus ``MLmodel``), and registers ``runs:/<run_id>/model``, which
``mlflow.transformers.load_model`` and ``mlflow models serve`` consume. Reasons: the DVC workspace folder is
mutable (the next pipeline run overwrites ``artifacts/prune/...``), so a ``file://`` source would
silently point at other weights; a DVC cache holds files by md5, not a loadable folder, and may be
garbage-collected; an MLflow server refuses local sources outside the run's artifact folder; and
``models:/NAME@champion`` must be downloadable with the MLflow client alone. The weights are
written exactly once more than DVC's copy (make DVC's own copy free with
``dvc config cache.type reflink,hardlink,copy``); the flavour is staged in a temporary folder first.
``register_source: dvc`` copies nothing: the source is the ``.dir`` object, in the DVC remote, of
the DVC output holding the model (``<remote url>/files/md5/xx/yyyy.dir``, the folder inside it in
the tag ``wanda.model_subpath``), for teams whose consumers fetch with DVC; it must be pushed.
Either way the version tags carry the lineage digests and the model's DVC md5.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from tasks.lineage import LineageRecord, dvc_md5
from tasks.params import TrackingConfig
from wanda.model_io import fingerprint as model_fingerprint

from .dvc_places import dvc_remote_url
from .model_logging import checkpoint_dir  # the HF folder inside a flavour model
from .mlflow_uris import TAG, ResolvedTracking, local_path
from .run_tags import lineage_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


def model_digests(model_dir: Path) -> dict[str, str]:
    return {"model_dvc_md5": dvc_md5(model_dir), "model_fingerprint": model_fingerprint(model_dir)}


def find_identical_version(client: "MlflowClient", name: str, model_dir: Path):
    """The oldest registered version of ``name`` whose model has the same bytes as ``model_dir``
    (DVC md5 of the folder and weight fingerprint, as registration tags them), else None."""
    from mlflow.exceptions import MlflowException

    digests = model_digests(model_dir)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None  # no such registered model yet
    for version in sorted(versions, key=lambda v: int(v.version)):
        tags = version.tags or {}
        if (tags.get(f"{TAG}model_dvc_md5") == digests["model_dvc_md5"]
                and tags.get(f"{TAG}model_fingerprint") == digests["model_fingerprint"]):
            return version
    return None


def register_model_version(
    client: "MlflowClient",
    config: TrackingConfig,
    run_id: str,
    root: Path,
    model_dir: Path,
    record: LineageRecord,
    candidate=None,
    resolved: ResolvedTracking | None = None,
):
    """A new version of ``config.registered_model`` for the pruned model, tagged with lineage."""
    from mlflow.exceptions import MlflowException

    model_dir = model_dir if model_dir.is_absolute() else root / model_dir
    digests = model_digests(model_dir)
    if config.register_source == "artifact":
        from .model_logging import log_transformers_model  # transformers flavour: loadable and servable

        source = log_transformers_model(client, run_id, model_dir, MODEL_ARTIFACT)  # the copy the registry owns
    else:
        source, subpath = _dvc_source(config, root, model_dir, record)
        digests["model_subpath"] = subpath
    try:
        client.create_registered_model(config.registered_model, tags={f"{TAG}managed": "true"})
    except MlflowException:
        pass  # exists already (or created concurrently): versions are what matter
    tags = {
        **lineage_tags(record, candidate),
        f"{TAG}register_source": config.register_source,
        f"{TAG}gate": "pending",
        **{f"{TAG}{k}": v for k, v in digests.items()},
    }
    version = client.create_model_version(config.registered_model, source, run_id=run_id, tags=tags,
                                          description=f"pruned model of run {run_id}")
    log.info("registered %s version %s from %s", config.registered_model, version.version, source)
    return version


def _dvc_source(config: TrackingConfig, root: Path, model_dir: Path, record: LineageRecord) -> tuple[str, str]:
    """``(remote URL of the DVC output holding the model, the model's path inside it)``.

    The output must be pushed (``dvc push``) for consumers and audits to find it there."""
    from wanda.errors import ConfigError

    remote = config.dvc_remote_url or dvc_remote_url(root)
    if not remote:
        raise ConfigError("tracking.register_source", "'dvc' needs a default DVC remote (dvc remote add -d NAME URL) "
                          "or tracking.dvc_remote_url", "artifact, dvc")
    rel = model_dir.resolve().relative_to(root.resolve()).as_posix()
    out = record.out_for(rel)
    if out is None:
        raise ConfigError("tracking.register_source", f"'dvc' registers a DVC output, and {rel} is in none "
                          "(see dvc.lock); use 'artifact'", "artifact, dvc")
    if "://" not in remote:
        remote = Path(remote if Path(remote).is_absolute() else root / ".dvc" / remote).resolve().as_uri()
    subpath = PurePosixPath(rel).relative_to(out.path).as_posix()
    return f"{remote.rstrip('/')}/files/md5/{out.md5[:2]}/{out.md5[2:]}", subpath


def registered_model_dir(client: "MlflowClient", version, dst: Path | None = None) -> Path | None:
    """A local folder holding the registered bytes of ``version``: in place for a local artifact
    store, else downloaded into ``dst`` (a temporary folder by default)."""
    source = version.source
    if source.startswith("runs:/"):
        run_id, _, rel = source[len("runs:/"):].partition("/")
        base = client.get_run(run_id).info.artifact_uri
        local = local_path(base)
        if local is not None:
            path = local / rel
            return checkpoint_dir(path) if path.exists() else None
        target = dst or Path(tempfile.mkdtemp(prefix="wanda-model-"))
        target.mkdir(parents=True, exist_ok=True)
        try:
            return checkpoint_dir(Path(client.download_artifacts(run_id, rel, str(target))))
        except Exception as exc:  # noqa: BLE001 - absent on the server: reported as missing
            log.warning("could not download %s: %s", source, exc)
            return None
    local = local_path(source)
    return local if local is not None and local.exists() else None
