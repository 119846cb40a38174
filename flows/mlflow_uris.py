"""Where MLflow is: the tracking and registry URIs, the artifact location, the client.

- Tracking URI: ``TrackingConfig.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
  default ``sqlite:///<project>/.mlflow/mlflow.db``. The registry URI follows the tracking URI
  unless set (``MLFLOW_REGISTRY_URI``): MLflow 3 would otherwise fall back to ``./mlflow.db`` in
  the current directory for registry calls.
- Artifacts: with a local backend (sqlite/file) experiments are created with the explicit
  artifact location ``<project>/.mlflow/artifacts/<experiment>``; MLflow's own default would be
  ``./mlruns`` relative to wherever the process happens to run. With a server, the server's
  artifact root (usually ``mlflow-artifacts:`` proxying) applies.
- Telemetry is off: ``MLFLOW_DISABLE_TELEMETRY`` and ``DO_NOT_TRACK`` are set before MLflow loads.
"""
from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.params import TrackingConfig

# Telemetry off before MLflow loads; no progress bars in logs of scheduled runs.
for _key, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_key, _value)

if TYPE_CHECKING:  # mlflow is imported lazily: ~1 s
    from mlflow import MlflowClient

DEFAULT_DIR = ".mlflow"
# Prefix of the tags and metrics this project owns, so they never collide with MLflow's.
TAG = "wanda."


@dataclass(frozen=True)
class ResolvedTracking:
    tracking_uri: str
    registry_uri: str
    artifact_location: str | None  # for new experiments; None lets a server decide
    local: bool  # sqlite/file backend on this machine: file locks work, artifacts are paths
    store_dir: Path | None  # where the local backend lives (lock files go there)


def _is_local_uri(uri: str) -> bool:
    """sqlite, file, or a bare path: a store on this machine (file locks and paths work)."""
    scheme = urllib.parse.urlparse(uri).scheme
    return scheme in ("sqlite", "file") or (scheme == "" and not uri.startswith("databricks"))


def _local_store_dir(uri: str) -> Path:
    """The folder of a local backend: the sqlite file's folder, or the file store itself."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path).resolve()
    return Path(uri).resolve()


def resolve_tracking(config: TrackingConfig | None = None, project_root: str | Path = ".") -> ResolvedTracking:
    """Decide the URIs once; precedence: parameter, environment, embedded default."""
    config = config or TrackingConfig()
    root = Path(project_root).resolve()
    default = f"sqlite:///{root / DEFAULT_DIR / 'mlflow.db'}"
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
    registry = config.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or uri
    local = _is_local_uri(uri)
    store_dir: Path | None = None
    artifact_location: str | None = None
    if local:
        store_dir = _local_store_dir(uri)
        store_dir.mkdir(parents=True, exist_ok=True)
        base = Path(config.artifact_root) if config.artifact_root else root / DEFAULT_DIR / "artifacts"
        artifact_location = (base.resolve() / safe_name(config.experiment)).as_uri()
    elif config.artifact_root:
        artifact_location = f"{config.artifact_root.rstrip('/')}/{safe_name(config.experiment)}"
    return ResolvedTracking(uri, registry, artifact_location, local, store_dir)


def safe_name(name: str) -> str:
    """``name`` usable as one file or folder name (experiment folders, lock files)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def get_client(resolved: ResolvedTracking) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolved.tracking_uri, registry_uri=resolved.registry_uri)


def ensure_experiment(client: "MlflowClient", name: str, artifact_location: str | None) -> str:
    """The experiment's id, created with an explicit artifact location when missing."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id



def local_path(uri: str) -> Path | None:
    """The filesystem path of a ``file:`` or scheme-less URI; None for anything remote."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


class TrackingUnreachable(RuntimeError):
    """The tracking (or registry) server does not answer: said before any stage runs, instead of
    MLflow's minutes of silent retries after the work is done."""


REACH_TIMEOUT_S = 8.0  # one connection attempt; with the interpreter start-up the command fails within 15 s


def check_reachable(resolved: ResolvedTracking, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Open a TCP connection to each HTTP(S) server of ``resolved`` (tracking, registry); raise
    :class:`TrackingUnreachable` naming the redacted URI when one does not accept it. Local
    backends (sqlite, file) need no check. A connection is what MLflow's retries wait for; an
    answer with an error (401, 404) still proves the server is there, and MLflow reports it."""
    import socket
    import time

    from .redact import redact

    for what, uri in (("tracking", resolved.tracking_uri), ("registry", resolved.registry_uri)):
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise TrackingUnreachable(f"MLflow {what} URI {redact(uri)} has an invalid port") from None
        started = time.monotonic()
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout_s):
                pass
        except OSError as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
            raise TrackingUnreachable(
                f"MLflow {what} server {redact(uri)} is unreachable ({reason} after "
                f"{time.monotonic() - started:.1f} s): start it, or point tracking.tracking_uri / "
                f"$MLFLOW_TRACKING_URI at a running one (or run with --no-track)") from None
        if uri == resolved.registry_uri and resolved.registry_uri == resolved.tracking_uri:
            break
