"""Flows that deployments run on a schedule: the nightly prune-evaluate-gate and the weekly
calibration-robustness sweep, each between a ``dvc pull`` and a ``dvc push`` (:mod:`flows.remote`).

Entry points for deployments are module paths (``flows.scheduled.nightly_prune``): a worker
imports the installed package, and Prefect does not put ``flows/`` itself on ``sys.path`` (where
``flows/dvc.py`` would shadow the ``dvc`` package).

Parameters are validated with pydantic before anything is pulled; errors name the parameter.
MLflow is configured by the ``tracking`` section of params.yaml or the worker's
``MLFLOW_TRACKING_URI``; credentials live in the worker's environment only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import Field, field_validator

from flows import dvc, remote
from flows.remote import RemoteParams, validated

log = logging.getLogger(__name__)


class _RunParams(RemoteParams):
    params_file: str | None = None
    overrides: list[str] = Field(default_factory=list)
    repo: str = "."


class NightlyParams(_RunParams):
    release: bool = Field(True, description="judge the registered version with the release gate")
    force: bool = False


class RobustnessParams(_RunParams):
    nsamples: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    name: str = Field("calibration-robustness", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    workers: int | None = Field(None, ge=1)
    runner: str | None = Field(None, description="local, dask://HOST:PORT or ray://HOST:PORT; None: the "
                               "parameters' sweep.runner")

    @field_validator("runner")
    @classmethod
    def _runner(cls, value: str | None) -> str | None:
        from flows.runners import sweep_settings

        return None if value is None else sweep_settings({}, value).runner

    @field_validator("nsamples")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value):
            raise ValueError(f"calibration sizes must be >= 1, got {value}")
        return value

    def axes(self) -> list[str]:
        return [f"calibration.nsamples={','.join(map(str, self.nsamples))}",
                f"calibration.seed={','.join(map(str, self.seeds))}"]


def _prepare(model: type[_RunParams], values: dict[str, Any]) -> tuple[_RunParams, Path]:
    """Validate the flow's parameters and the pipeline parameters they select, before any DVC work."""
    from flows.prepare import resolve_params_file
    from tasks.params import load_params

    params = validated(model, {k: v for k, v in values.items() if v is not None})
    root = dvc.find_root(params.repo)
    load_params(resolve_params_file(root, params.params_file), params.overrides)
    return params, root


def _synced(root: Path, params: RemoteParams):
    logger = get_run_logger()
    return remote.synced(root, params, sink=logger.info, on_push_failure=logger.error)


@flow(name="nightly-prune", log_prints=False)
def nightly_prune(params_file: str | None = None, overrides: list[str] | None = None, repo: str = ".",
                  release: bool = True, force: bool = False, dvc_remote: str | None = None,
                  dvc_remote_name: str = "wanda", dvc_remote_options: dict[str, str] | None = None,
                  pull: bool = True, push: bool = True, run_cache: bool = True) -> dict:
    """``dvc pull``, the whole pipeline with MLflow tracking and (``release``) the release gate,
    ``dvc push``. A gate rejection pushes the candidate's artifacts, then fails the run."""
    params, root = _prepare(NightlyParams, dict(locals()))  # first: locals() are the parameters
    from flows.pipeline import prune_pipeline

    with _synced(root, params) as name:
        result = prune_pipeline(params_file=params.params_file, overrides=params.overrides, repo=str(root),
                                force=params.force, track=True, release=params.release)
    get_run_logger().info("pushed to DVC remote %s", name)
    return {"metrics": result["metrics"], "tracking": result["tracking"], "release": result["release"],
            "seconds": result["seconds"], "dvc_remote": name}


@flow(name="calibration-robustness", log_prints=False)
def calibration_robustness(nsamples: list[int] | None = None, seeds: list[int] | None = None,
                           name: str = "calibration-robustness", params_file: str | None = None,
                           overrides: list[str] | None = None, repo: str = ".", workers: int | None = None,
                           runner: str | None = None, dvc_remote: str | None = None, dvc_remote_name: str = "wanda",
                           dvc_remote_options: dict[str, str] | None = None, pull: bool = True,
                           push: bool = True, run_cache: bool = True) -> dict:
    """How much the pruned model depends on the calibration sample: a sweep over calibration
    sizes x sampling seeds (one mask per point, the same evaluation windows), between a
    ``dvc pull`` and a ``dvc push``; ``runner`` places the points (local, Dask or Ray)."""
    params, root = _prepare(RobustnessParams, dict(locals()))  # first: locals() are the parameters
    from flows.sweep import sweep

    with _synced(root, params) as remote_name:
        result = sweep(axes=params.axes(), name=params.name, params_file=params.params_file,
                       overrides=params.overrides, repo=str(root), workers=params.workers, runner=params.runner)
    get_run_logger().info("pushed to DVC remote %s", remote_name)
    return {"points": result["points"], "dense_perplexity": result["dense_perplexity"], "table": result["table"],
            "seconds": result["seconds"], "dvc_remote": remote_name}
