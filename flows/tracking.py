"""MLflow run logging: one run per pipeline run, the pruned model as a registered version.

This module logs; its neighbours each do one job: :mod:`flows.mlflow_uris` (where MLflow is),
:mod:`flows.run_inputs` (what the run produced), :mod:`flows.run_metrics` (its figures),
:mod:`flows.mlflow_datasets` (its data digests), :mod:`flows.run_tags` (its lineage tags),
:mod:`flows.registry` (the registered version) and :mod:`flows.dvc_places` (DVC remote and
caches). The ``tracking`` section is :class:`tasks.params.TrackingConfig`.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from tasks.common import git_state
from tasks.lineage import LineageRecord, build_lineage, sha256_file
from tasks.params import TrackingConfig, cached_document, read_yaml

from .mlflow_datasets import log_datasets
from .redact import redact
from .mlflow_uris import TAG, ensure_experiment, get_client, resolve_tracking
from .registry import register_model_version
from .run_inputs import RunInputs, current_flow_run_id, discover_run_inputs
from .run_metrics import evaluation_metrics, flatten, latency_figures, load_eval, metric_name, savings_figures, \
    sparsity_metrics, stage_metrics
from .run_tags import lineage_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

LINEAGE_ARTIFACT = "lineage/lineage.json"


class LoggedRun(BaseModel):
    """What was logged; ``tracking_uri`` is redacted: this record is printed and returned to Prefect."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    artifact_uri: str
    lineage_digest: str
    evaluation_status: str
    model_name: str | None = None
    model_version: str | None = None
    model_source: str | None = None
    duplicate_of: str | None = None  # the version already registered with these exact model bytes


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
    skip_identical: bool = False,
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
    candidate, cand_status = load_eval(inputs.candidate_eval)
    dense, dense_status = load_eval(inputs.dense_eval)
    commit, dirty = git_state(inputs.root)
    flow_run_id = inputs.flow_run_id or current_flow_run_id()

    tags = {
        **lineage_tags(record, candidate, commit=commit or "unknown"),
        f"{TAG}git_dirty": str(dirty).lower() if dirty is not None else "unknown",
        f"{TAG}evaluation_status": cand_status,
        f"{TAG}dense_evaluation_status": dense_status,
        "prefect.flow_run_id": flow_run_id or "none",
        "mlflow.source.git.commit": commit or "",
    }
    if candidate is not None and candidate.perplexity:
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
    metrics.update(savings_figures(inputs.savings))

    run = client.create_run(experiment_id, run_name=inputs.run_name,
                            tags={k: v for k, v in tags.items() if v != ""})
    run_id = run.info.run_id
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(metric_name(k), float(v), _now_ms(), 0) for k, v in sorted(metrics.items())],
            params=[Param(k[:250], v[:6000]) for k, v in sorted(flatten(inputs.params).items())],
        )
        log_datasets(client, run_id, inputs, record, candidate, dense)
        _log_artifacts(client, run_id, inputs, record, candidate, dense)
        logged = LoggedRun(run_id=run_id, experiment_id=experiment_id, tracking_uri=redact(resolved.tracking_uri),
                           artifact_uri=run.info.artifact_uri, lineage_digest=record.digest,
                           evaluation_status=cand_status)
        same = None
        if register and inputs.model_dir is not None and skip_identical:
            from .registry import find_identical_version

            model_dir = Path(inputs.model_dir)
            same = find_identical_version(client, config.registered_model,
                                          model_dir if model_dir.is_absolute() else Path(inputs.root) / model_dir)
        if same is not None:  # one version per model bytes: this run is logged, no duplicate registered
            logged.model_name, logged.model_version, logged.model_source = same.name, str(same.version), same.source
            logged.duplicate_of = str(same.version)
            client.set_tag(run_id, f"{TAG}registered_as", f"{same.name}/{same.version}")
            log.warning("the pruned model is byte-identical to %s version %s (gate: %s): not registered again",
                        same.name, same.version, (same.tags or {}).get(f"{TAG}gate", "unknown"))
        elif register and inputs.model_dir is not None:
            version = register_model_version(client, config, run_id, inputs.root, Path(inputs.model_dir), record,
                                             candidate, resolved)
            logged.model_name, logged.model_version, logged.model_source = (
                version.name, str(version.version), version.source)
            note = savings_note(inputs)
            if note:  # what the version saves, on the version itself (the registry's card)
                client.set_model_version_tag(version.name, version.version, f"{TAG}savings", note[:4000])
        client.set_terminated(run_id, "FINISHED")
        return logged
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def savings_note(inputs: RunInputs) -> str:
    """One line for the registered version: the savings stage's headline ratios and its plain
    sentences (e.g. that unstructured sparsity saves nothing in dense runtimes)."""
    figures = inputs.savings or {}
    if not figures:
        return ""
    parts = [f"{key} {figures[key]:.3g}" for key in ("param_reduction", "bytes_reduction", "prefill_speedup",
                                                    "decode_speedup", "peak_memory_ratio") if key in figures]
    sentences = ((inputs.manifests.get("savings") or {}).get("summary") or {}).get("sentences") or []
    return "; ".join(parts + list(sentences))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


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


def params_section(root: str | Path, params_file: str | Path, section: str, model: type[BaseModel]):
    """Section ``section`` of the parameter file as ``model`` (defaults when absent); a
    validation error becomes a ConfigError naming the field, e.g. ``gate.min_sparsity``."""
    from pydantic import ValidationError

    from wanda.errors import ConfigError

    path = Path(params_file)
    path = path if path.is_absolute() else Path(root) / path
    values = (cached_document(path).get(section) if path.is_file() else None) or {}
    try:
        return model(**values)
    except ValidationError as exc:
        from tasks.params import error_location

        err = exc.errors()[0]
        raise ConfigError(".".join([section, *error_location(err)]),
                          err["msg"].removeprefix("Value error, ")) from None


def tracking_config_from_params(root: str | Path, params_file: str | Path = "params.yaml") -> TrackingConfig:
    """The ``tracking`` section of the parameter file; its own credential query names are
    redacted from now on in this process."""
    from .redact import add_query_keys

    config = params_section(root, params_file, "tracking", TrackingConfig)
    add_query_keys(config.secret_query_params)
    return config


def track_pipeline_run(root: str | Path, params_file: str = "params.yaml", flow_run_id: str | None = None,
                       register: bool = True, config: TrackingConfig | None = None) -> LoggedRun:
    """What ``prune_pipeline`` calls after its stages: log the run and register the pruned model,
    configured by the ``tracking`` section of params.yaml."""
    root = Path(root).resolve()
    config = config or tracking_config_from_params(root, params_file)
    inputs = discover_run_inputs(root, params_file=params_file, flow_run_id=flow_run_id)
    return log_pipeline_run(inputs, config, register=register, skip_identical=True)
