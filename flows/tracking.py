"""MLflow adapter: one run per pipeline run, the pruned model as a registered version.

Where things go
- Tracking URI: ``TrackingConfig.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
  default ``sqlite:///<project>/.mlflow/mlflow.db``. The registry URI follows the tracking URI
  unless set (``MLFLOW_REGISTRY_URI``): MLflow 3 would otherwise fall back to ``./mlflow.db`` in
  the current directory for registry calls.
- Artifacts: with a local backend (sqlite/file) experiments are created with the explicit
  artifact location ``<project>/.mlflow/artifacts/<experiment>``; MLflow's own default would be
  ``./mlruns`` relative to wherever the process happens to run. With a server, the server's
  artifact root (usually ``mlflow-artifacts:`` proxying) applies.
- Telemetry is off: ``MLFLOW_DISABLE_TELEMETRY`` and ``DO_NOT_TRACK`` are set before MLflow loads.

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

import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wanda.lineage import STAGE_ORDER, LineageRecord, build_lineage, dvc_md5, read_manifests, sha256_file
from wanda.model_io import fingerprint as model_fingerprint

# Telemetry off before MLflow loads; no progress bars in logs of scheduled runs.
for _key, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_key, _value)

if TYPE_CHECKING:  # mlflow is imported lazily: ~1 s, and the library stays usable without it
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_DIR = ".mlflow"
LINEAGE_ARTIFACT = "lineage/lineage.json"
MODEL_ARTIFACT = "model"
# Prefix of the tags and metrics this project owns, so they never collide with MLflow's.
TAG = "wanda."


class TrackingConfig(BaseModel):
    """The ``tracking`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else the local sqlite default")
    registry_uri: str | None = Field(None, description="None: $MLFLOW_REGISTRY_URI, else the tracking URI")
    experiment: str = "wanda-pruning"
    registered_model: str = "wanda-pruned"
    artifact_root: str | None = Field(None, description="local backends only; None: <project>/.mlflow/artifacts")
    register_source: Literal["artifact", "dvc"] = "artifact"
    dvc_remote_url: str | None = Field(None, description="register_source=dvc: None reads the default DVC remote")


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
        artifact_location = (base.resolve() / _safe(config.experiment)).as_uri()
    elif config.artifact_root:
        artifact_location = f"{config.artifact_root.rstrip('/')}/{_safe(config.experiment)}"
    return ResolvedTracking(uri, registry, artifact_location, local, store_dir)


def _safe(name: str) -> str:
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


# ----------------------------------------------------------------------------- datasets

def _digest_dataset(name: str, uri: str, sha256: str, profile: Mapping[str, Any]):
    """An MLflow dataset that is only metadata: where the data came from and its sha256.

    MLflow keeps at most 36 characters of a dataset digest, so the digest field holds the first
    32 hex digits and the full sha256 travels in the profile and the input tags.
    """
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class WandaDataSource(DatasetSource):
        def __init__(self, uri: str, sha: str):
            self.uri, self.sha256 = uri, sha

        @staticmethod
        def _get_source_type() -> str:
            return "wanda"

        def load(self) -> Any:  # the pipeline reads its data itself
            raise NotImplementedError

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> "WandaDataSource":
            raise NotImplementedError

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri, "sha256": self.sha256}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> "WandaDataSource":
            return cls(source_dict["uri"], source_dict["sha256"])

    class DigestDataset(MetaDataset):
        @property
        def profile(self) -> Any:
            return dict(profile)

        def to_dict(self) -> dict[str, str]:
            data = super().to_dict()
            data["profile"] = json.dumps(dict(profile), sort_keys=True, default=str)
            return data

    return DigestDataset(WandaDataSource(uri, sha256), name=name, digest=sha256[:32])


# ----------------------------------------------------------------------------- inputs

# Sections of params.yaml this module and the gate own; the pipeline's params ignore them.
OWN_SECTIONS = ("tracking", "gate")
DEFAULT_FOLDERS = {stage: f"artifacts/{stage}" for stage in STAGE_ORDER if stage != "gate"}


@dataclass
class RunInputs:
    """What one pipeline run produced, as the tracker needs it (paths absolute or relative to
    ``root``). :func:`discover_run_inputs` fills it from params.yaml and the stage folders."""

    root: Path
    params: dict[str, Any] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FOLDERS))
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest_sha256: dict[str, str] = field(default_factory=dict)
    dvc_lock: Path | None = None
    params_file: Path | None = None
    candidate_eval: Path | None = None
    dense_eval: Path | None = None
    sparsity: dict[str, Any] | None = None  # wanda.sparsity_report(...) as masks/sparsity.json holds it
    benchmark: dict[str, Any] | None = None  # BenchmarkReport dump, or flat figures
    model_dir: Path | None = None  # the pruned model folder
    plots: list[Path] = field(default_factory=list)
    flow_run_id: str | None = None
    run_name: str | None = None
    extra_artifacts: list[Path] = field(default_factory=list)


def read_yaml(path: Path) -> dict[str, Any]:
    """YAML 1.2, as DVC and tasks/params.py read it (YAML 1.1 would turn ``2:4`` into 124)."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8")) or {}


def resolved_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters the run used: params.yaml validated with its defaults filled in (through
    tasks/params.py when importable), plus this module's own sections as written."""
    own = {k: raw[k] for k in OWN_SECTIONS if k in raw}
    rest = {k: v for k, v in raw.items() if k not in OWN_SECTIONS}
    try:
        from tasks.params import params_dict, validate_params

        full = params_dict(validate_params(rest))
    except Exception as exc:  # noqa: BLE001 - log what was written rather than nothing
        log.debug("params not validated (%s); logging them as written", exc)
        full = dict(rest)
    return {**full, **own}


def _status(manifest: Mapping[str, Any] | None) -> str | None:
    return None if manifest is None else str(manifest.get("status") or "completed")


def discover_run_inputs(root: str | Path, params_file: str = "params.yaml", **overrides: Any) -> RunInputs:
    """Fill :class:`RunInputs` from ``params.yaml`` and the stage folders it names."""
    root = Path(root).resolve()
    found: dict[str, Any] = {"root": root}
    raw: dict[str, Any] = {}
    if (root / params_file).is_file():
        found["params_file"] = root / params_file
        raw = read_yaml(root / params_file)
    found["params"] = resolved_params(raw)
    folders = {**DEFAULT_FOLDERS, **{k: str(v) for k, v in (found["params"].get("paths") or {}).items()}}
    found["folders"] = folders
    found["manifests"], found["manifest_sha256"] = read_manifests(folders, root)
    manifests = found["manifests"]
    if (root / "dvc.lock").is_file():
        found["dvc_lock"] = root / "dvc.lock"
    # Only finished stages count: a skipped or absent evaluation is "missing" to the gate.
    for key, stage in (("candidate_eval", "evaluate"), ("dense_eval", "dense_eval")):
        path = root / folders[stage] / "result.json"
        if _status(manifests.get(stage)) == "completed" and path.is_file():
            found[key] = path
    sparsity = root / folders["masks"] / "sparsity.json"
    if sparsity.is_file():
        found["sparsity"] = json.loads(sparsity.read_text())
    bench = root / folders["benchmark"] / "benchmark.json"
    if _status(manifests.get("benchmark")) == "completed" and bench.is_file():
        found["benchmark"] = json.loads(bench.read_text())
    model = root / folders["prune"] / "model"
    if (model / "config.json").is_file():
        found["model_dir"] = model
    found["plots"] = sorted((root / folders["evaluate"]).glob("*.png"))
    found.update({k: v for k, v in overrides.items() if v is not None})
    return RunInputs(**found)


# ----------------------------------------------------------------------------- helpers

def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> ``a.b.c: value`` strings (lists as JSON), MLflow's param form."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value, sort_keys=True, default=str)
        else:
            flat[name] = str(value)
    return flat


def _metric_name(name: str) -> str:
    # MLflow allows alphanumerics, _ - . / and spaces in metric names.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the repository holding ``root``; ``(None, None)`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30, check=True).stdout
        return commit or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def current_flow_run_id() -> str | None:
    """The Prefect flow run id when called inside a flow; Prefect is not imported otherwise."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a flow run context
        return None


def latency_figures(benchmark: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat latency metrics, plus ``latency_ms``/``speedup`` where the benchmark has them.

    Reads a ``BenchmarkReport`` dump (``ratios[mode][baseline] = [MetricRatio...]``) or a flat
    dict of numbers. The gate's speedup is the mean request latency ratio in latency mode.
    """
    if not benchmark:
        return {}
    figures: dict[str, float] = {}
    ratios = benchmark.get("ratios")
    if isinstance(ratios, Mapping):
        for mode, by_base in ratios.items():
            for base, items in (by_base or {}).items():
                for item in items or []:
                    key = f"latency.{mode}.{base}.{item['metric']}"
                    figures[f"{key}.sparse"] = float(item["sparse"])
                    figures[f"{key}.dense"] = float(item["dense"])
                    figures[f"{key}.speedup"] = float(item["speedup"])
                    if mode == "latency" and item["metric"] == "request_latency_avg_ms" and "speedup" not in figures:
                        figures["speedup"] = float(item["speedup"])
                        figures["latency_ms"] = float(item["sparse"])
                        figures["dense.latency_ms"] = float(item["dense"])
    else:
        for key, value in benchmark.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                figures[key if key in ("speedup", "latency_ms") else f"latency.{key}"] = float(value)
    return figures


def _load_eval(path: Path | None):
    """``(EvaluationResult | None, status)``: status is ok, missing, or failed: <reason>."""
    if path is None or not Path(path).is_file():
        return None, "missing"
    from wanda.evaluation.results import load_result

    try:
        return load_result(path), "ok"
    except Exception as exc:  # noqa: BLE001 - a damaged record makes the run unreleasable, not a crash
        return None, f"failed: {exc}"[:480]


def evaluation_metrics(candidate, dense) -> dict[str, float]:
    """Candidate metrics, dense metrics under ``dense.``, and deltas to dense under ``delta.``."""
    metrics: dict[str, float] = {}
    cand = candidate.metrics() if candidate is not None else {}
    base = dense.metrics() if dense is not None else {}
    metrics.update(cand)
    metrics.update({f"dense.{k}": v for k, v in base.items()})
    for key in cand.keys() & base.keys():
        metrics[f"delta.{key}"] = cand[key] - base[key]
    if "perplexity" in cand and base.get("perplexity"):
        metrics["delta.perplexity_rel"] = cand["perplexity"] / base["perplexity"] - 1.0
    return metrics


def stage_metrics(record: LineageRecord) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, stage in record.stages.items():
        if stage.wall_s is not None:
            metrics[f"stage.{name}.wall_s"] = stage.wall_s
        if stage.peak_memory_mb is not None:
            metrics[f"stage.{name}.peak_memory_mb"] = stage.peak_memory_mb
    return metrics


def sparsity_metrics(report: Mapping[str, Any] | None) -> dict[str, float]:
    if not report:
        return {}
    metrics = {"sparsity": float(report["overall"])} if "overall" in report else {}
    for key, name in (("block_sparsity", "sparsity.block"), ("coverage", "sparsity.coverage"),
                      ("model_sparsity", "sparsity.model")):
        if key in report:  # whole-model accounting (wanda.accounting), when the masks stage recorded it
            metrics[name] = float(report[key])
    for layer, info in (report.get("layers") or {}).items():
        value = info["sparsity"] if isinstance(info, Mapping) else info
        metrics[f"sparsity.layer.{layer}"] = float(value)
    return metrics


# ----------------------------------------------------------------------------- logging

class LoggedRun(BaseModel):
    run_id: str
    experiment_id: str
    tracking_uri: str
    artifact_uri: str
    lineage_digest: str
    evaluation_status: str
    model_name: str | None = None
    model_version: str | None = None
    model_source: str | None = None


def build_run_lineage(inputs: RunInputs) -> LineageRecord:
    lock_data = read_yaml(Path(inputs.dvc_lock)) if inputs.dvc_lock else None
    commit, dirty = git_state(inputs.root)
    return build_lineage(
        inputs.manifests, inputs.folders, lock_data, sha256_file(inputs.dvc_lock) if inputs.dvc_lock else None,
        inputs.manifest_sha256, commit, dirty,
    )


def log_pipeline_run(
    inputs: RunInputs,
    config: TrackingConfig | None = None,
    register: bool = True,
    client: "MlflowClient | None" = None,
) -> LoggedRun:
    """Log one pipeline run (params, metrics, datasets, tags, artifacts) and register its model.

    Everything is logged through the client API against an explicit run id, so concurrent runs
    in one process (sweeps) never share MLflow's global "active run".
    """
    from mlflow.entities import Metric, Param

    config = config or TrackingConfig()
    resolved = resolve_tracking(config, inputs.root)
    client = client or get_client(resolved)
    experiment_id = ensure_experiment(client, config.experiment, resolved.artifact_location)
    record = build_run_lineage(inputs)
    candidate, cand_status = _load_eval(inputs.candidate_eval)
    dense, dense_status = _load_eval(inputs.dense_eval)
    commit, dirty = git_state(inputs.root)
    flow_run_id = inputs.flow_run_id or current_flow_run_id()

    tags = {
        f"{TAG}git_commit": commit or "unknown",
        f"{TAG}git_dirty": str(dirty).lower() if dirty is not None else "unknown",
        f"{TAG}dvc_lock_sha256": record.dvc_lock_sha256 or "absent",
        f"{TAG}base_model_fingerprint": record.base_model_fingerprint or "unknown",
        f"{TAG}calibration_token_digest": record.calibration_token_digest or "unknown",
        f"{TAG}lineage_digest": record.digest,
        f"{TAG}evaluation_status": cand_status,
        f"{TAG}dense_evaluation_status": dense_status,
        "prefect.flow_run_id": flow_run_id or "none",
        "mlflow.source.git.commit": commit or "",
    }
    if candidate is not None:
        tags[f"{TAG}eval_content_digest"] = candidate.content_digest
        if candidate.perplexity:
            tags[f"{TAG}eval_tokens_digest"] = candidate.perplexity.tokens_digest
    if dense is not None and dense.perplexity:
        tags[f"{TAG}dense_eval_tokens_digest"] = dense.perplexity.tokens_digest
    for name, stage in record.stages.items():  # skipped stages (no GPU: engine, benchmark) say why
        tags[f"{TAG}stage.{name}"] = stage.status
        if stage.reason:
            tags[f"{TAG}stage.{name}.reason"] = stage.reason[:4000]

    metrics = {}
    metrics.update(evaluation_metrics(candidate, dense))
    metrics.update(sparsity_metrics(inputs.sparsity))
    metrics.update(stage_metrics(record))
    metrics.update(latency_figures(inputs.benchmark))

    run = client.create_run(experiment_id, run_name=inputs.run_name,
                            tags={k: v for k, v in tags.items() if v != ""})
    run_id = run.info.run_id
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(_metric_name(k), float(v), _now_ms(), 0) for k, v in sorted(metrics.items())],
            params=[Param(k[:250], v[:6000]) for k, v in sorted(flatten(inputs.params).items())],
        )
        _log_datasets(client, run_id, inputs, record, candidate, dense)
        _log_artifacts(client, run_id, inputs, record, candidate, dense)
        logged = LoggedRun(run_id=run_id, experiment_id=experiment_id, tracking_uri=resolved.tracking_uri,
                           artifact_uri=run.info.artifact_uri, lineage_digest=record.digest,
                           evaluation_status=cand_status)
        if register and inputs.model_dir is not None:
            version = register_model_version(client, config, run_id, inputs.root, Path(inputs.model_dir), record,
                                             candidate, resolved)
            logged.model_name, logged.model_version, logged.model_source = (
                version.name, str(version.version), version.source)
        client.set_terminated(run_id, "FINISHED")
        return logged
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _log_datasets(client, run_id: str, inputs: RunInputs, record: LineageRecord, candidate, dense) -> None:
    from mlflow.entities import DatasetInput, InputTag

    datasets = []

    def add(name: str, context: str, uri: str, sha: str, profile: dict[str, Any]) -> None:
        ds = _digest_dataset(name, uri, sha, profile)._to_mlflow_entity()
        datasets.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context), InputTag("sha256", sha)]))

    if record.calibration_token_digest:
        calib = record.stages.get("calibration")
        summary = calib.summary if calib else {}
        add("calibration", "calibration", record.calibration_source or "unknown", record.calibration_token_digest,
            {"token_digest": record.calibration_token_digest, "text_digest": summary.get("source_digest"),
             "nsamples": summary.get("nsamples"), "seqlen": summary.get("seqlen"),
             "fallback_used": summary.get("fallback_used")})
    for label, result in (("evaluation", candidate), ("dense_evaluation", dense)):
        if result is None or result.perplexity is None:
            continue
        ppl = result.perplexity
        add(f"{label}.perplexity", "evaluation", ppl.source, ppl.tokens_digest,
            {"tokens_digest": ppl.tokens_digest, "text_digest": ppl.text_digest, "windows": ppl.windows,
             "seqlen": ppl.seqlen})
    if candidate is not None and candidate.zeroshot is not None:
        for task, score in candidate.zeroshot.tasks.items():
            sha = score.data_digest or score.definition_digest
            if sha:
                add(f"zeroshot.{task}", "evaluation", score.data_file or task, sha,
                    {"data_digest": score.data_digest, "definition_digest": score.definition_digest,
                     "samples": score.samples})
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


def _log_artifacts(client, run_id: str, inputs: RunInputs, record: LineageRecord, candidate, dense) -> None:
    with tempfile.TemporaryDirectory(prefix="wanda-mlflow-") as tmp:
        lineage_dir = Path(tmp) / "lineage"
        (lineage_dir / "manifests").mkdir(parents=True)
        (lineage_dir / "lineage.json").write_text(record.model_dump_json(indent=2) + "\n")
        for name in inputs.manifests:
            src = inputs.root / inputs.folders[name] / "manifest.json"
            if src.is_file():  # the bytes as written, so their sha256 matches the record
                (lineage_dir / "manifests" / f"{name}.json").write_bytes(src.read_bytes())
        for path in (inputs.dvc_lock, inputs.params_file):
            if path and Path(path).is_file():
                (lineage_dir / Path(path).name).write_bytes(Path(path).read_bytes())
        client.log_artifacts(run_id, str(lineage_dir), "lineage")
    for path, name in ((inputs.candidate_eval, "candidate.json"), (inputs.dense_eval, "dense.json")):
        if path and Path(path).is_file():
            _log_file_as(client, run_id, Path(path), "evaluation", name)
    for path in [*inputs.plots, *inputs.extra_artifacts]:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path), "plots" if Path(path).suffix == ".png" else "extra")
    if inputs.sparsity:
        client.log_dict(run_id, dict(inputs.sparsity), "evaluation/sparsity.json")
        with tempfile.TemporaryDirectory(prefix="wanda-mlflow-") as tmp:
            plot = sparsity_plot(inputs.sparsity, Path(tmp) / "sparsity.png")
            if plot is not None:
                client.log_artifact(run_id, str(plot), "plots")


def sparsity_plot(report: Mapping[str, Any], path: Path) -> Path | None:
    """PNG of the actual sparsity of every pruned layer (the library's plot)."""
    from wanda.plots import layer_sparsity_plot

    return layer_sparsity_plot(report, path)


def _log_file_as(client, run_id: str, path: Path, artifact_dir: str, name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="wanda-mlflow-") as tmp:
        target = Path(tmp) / name
        target.write_bytes(path.read_bytes())
        client.log_artifact(run_id, str(target), artifact_dir)


# ----------------------------------------------------------------------------- registry

def dvc_remote_url(root: Path) -> str | None:
    """URL of the repository's default DVC remote, read with DVC's own config loader."""
    try:
        from dvc.config import Config

        conf = Config(dvc_dir=str(root / ".dvc"))
        name = conf["core"].get("remote")
        return conf["remote"][name]["url"] if name else None
    except Exception:  # noqa: BLE001 - no DVC, no repo, or no remote
        return None


def dvc_caches(root: Path) -> list[Path]:
    """Local places holding DVC objects: the cache and every remote that is a local path."""
    places: list[Path] = []
    try:
        from dvc.config import Config

        conf = Config(dvc_dir=str(root / ".dvc"))
        cache_dir = conf["cache"].get("dir")
        places.append(Path(cache_dir) if cache_dir else root / ".dvc" / "cache")
        for remote in (conf.get("remote") or {}).values():
            url = str(remote.get("url", ""))
            if url and ("://" not in url or url.startswith("file://")):
                path = Path(url.removeprefix("file://"))
                places.append(path if path.is_absolute() else root / ".dvc" / path)
    except Exception:  # noqa: BLE001 - DVC absent or no repository: the default cache only
        places.append(root / ".dvc" / "cache")
    return [p for p in places if p.exists()]


def model_digests(model_dir: Path) -> dict[str, str]:
    return {"model_dvc_md5": dvc_md5(model_dir), "model_fingerprint": model_fingerprint(model_dir)}


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
        f"{TAG}lineage_digest": record.digest,
        f"{TAG}base_model_fingerprint": record.base_model_fingerprint or "unknown",
        f"{TAG}calibration_token_digest": record.calibration_token_digest or "unknown",
        f"{TAG}dvc_lock_sha256": record.dvc_lock_sha256 or "absent",
        f"{TAG}git_commit": record.code_commit or "unknown",
        f"{TAG}register_source": config.register_source,
        f"{TAG}gate": "pending",
        **{f"{TAG}{k}": v for k, v in digests.items()},
    }
    if candidate is not None:
        tags[f"{TAG}eval_content_digest"] = candidate.content_digest
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


def _local_path(uri: str) -> Path | None:
    """The filesystem path of a ``file:`` or scheme-less URI; None for anything remote."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


def registered_model_dir(client: "MlflowClient", version, dst: Path | None = None) -> Path | None:
    """A local folder holding the registered bytes of ``version``: in place for a local artifact
    store, else downloaded into ``dst`` (a temporary folder by default)."""
    source = version.source
    if source.startswith("runs:/"):
        run_id, _, rel = source[len("runs:/"):].partition("/")
        base = client.get_run(run_id).info.artifact_uri
        local = _local_path(base)
        from .model_logging import checkpoint_dir  # the HF folder inside a flavour model

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
    local = _local_path(source)
    return local if local is not None and local.exists() else None


# ----------------------------------------------------------------------------- pipeline hook

def params_section(root: str | Path, params_file: str | Path, section: str, model: type[BaseModel]):
    """Section ``section`` of the parameter file as ``model`` (defaults when absent); a
    validation error becomes a ConfigError naming the field, e.g. ``gate.min_sparsity``."""
    from pydantic import ValidationError

    from wanda.errors import ConfigError

    path = Path(params_file)
    path = path if path.is_absolute() else Path(root) / path
    values = (read_yaml(path).get(section) if path.is_file() else None) or {}
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(".".join([section, *map(str, err["loc"])]),
                          err["msg"].removeprefix("Value error, ")) from None


def tracking_config_from_params(root: str | Path, params_file: str | Path = "params.yaml") -> TrackingConfig:
    """The ``tracking`` section of the parameter file."""
    return params_section(root, params_file, "tracking", TrackingConfig)


def track_pipeline_run(root: str | Path, params_file: str = "params.yaml", flow_run_id: str | None = None,
                       register: bool = True, config: TrackingConfig | None = None) -> LoggedRun:
    """What ``prune_pipeline`` calls after its stages: log the run and register the pruned model,
    configured by the ``tracking`` section of params.yaml."""
    root = Path(root).resolve()
    config = config or tracking_config_from_params(root, params_file)
    inputs = discover_run_inputs(root, params_file=params_file, flow_run_id=flow_run_id)
    return log_pipeline_run(inputs, config, register=register)
