"""Deployments from ``deploy/prefect.yaml``, registered through Prefect's Python API.

``prefect deploy --prefect-file deploy/prefect.yaml`` and ``wanda-pipeline deploy`` register the
same deployments from the same file; the latter also validates every deployment's parameters
against its flow's signature and its pydantic model before anything reaches the server, and
takes the work pool and the checkout from options instead of ``{{ $WANDA_REPO }}``.
``wanda-pipeline serve`` runs the deployments in the calling process instead (no work pool and
no worker: one box, one long-running process).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import OFFLINE_ENV
from wanda.errors import ConfigError

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

log = logging.getLogger(__name__)

DEFAULT_PREFECT_FILE = Path("deploy") / "prefect.yaml"


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str
    timezone: str = "UTC"
    active: bool = True


class WorkPoolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    work_queue_name: str | None = None
    job_variables: dict[str, Any] = Field(default_factory=dict)


class DeploymentSpec(BaseModel):
    """One entry of ``deployments:`` in prefect.yaml (the keys this project uses)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    entrypoint: str
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    concurrency_limit: int | None = Field(None, ge=1)
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    work_pool: WorkPoolSpec


def read_specs(path: str | Path, names: list[str] | None = None) -> list[DeploymentSpec]:
    """The deployments of a prefect.yaml (``names``: only these), ``{{ $VAR }}`` filled in from
    the environment as ``prefect deploy`` does; errors name the deployment and the field."""
    from pydantic import ValidationError
    from ruamel.yaml import YAML

    path = Path(path)
    if not path.is_file():
        raise ConfigError("prefect_file", f"{path} does not exist")
    entries = (YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8")) or {}).get("deployments") or []
    specs = []
    for index, entry in enumerate(entries):
        where = f"deployments[{entry.get('name', index)}]"
        try:
            specs.append(DeploymentSpec(**_fill_env(entry)))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(".".join([where, *map(str, err["loc"])]), err["msg"]) from None
    known = [s.name for s in specs]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ConfigError("name", f"no deployment {', '.join(unknown)} in {path}", ", ".join(known))
    return [s for s in specs if not names or s.name in names]


def _fill_env(entry: dict) -> dict:
    from prefect.utilities.templating import apply_values

    return apply_values(entry, dict(os.environ), remove_notset=False)


def load_flow(entrypoint: str) -> "Flow":
    """The flow an entry point names, imported as a worker would."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    try:
        found = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    except Exception as exc:  # noqa: BLE001 - any import failure is a bad entry point
        raise ConfigError("entrypoint", f"{entrypoint!r} does not load: {type(exc).__name__}: {exc}") from None
    if not isinstance(found, Flow):
        raise ConfigError("entrypoint", f"{entrypoint!r} is not a Prefect flow")
    return found


def check_parameters(spec: DeploymentSpec, flow: "Flow | None" = None) -> dict[str, Any]:
    """The spec's parameters, validated against the flow's signature (types and names) and
    against the flow's own pydantic model (``flows.scheduled``), so a bad deployment fails
    here and not at 2 a.m."""
    flow = flow or load_flow(spec.entrypoint)
    try:
        flow.validate_parameters(dict(spec.parameters))
    except Exception as exc:  # noqa: BLE001 - Prefect's ParameterTypeError and friends
        raise ConfigError(f"deployments[{spec.name}].parameters", " ".join(str(exc).split())) from None
    from flows import scheduled
    from flows.remote import validated

    model = {scheduled.nightly_prune.name: scheduled.NightlyParams,
             scheduled.calibration_robustness.name: scheduled.RobustnessParams}.get(flow.name)
    if model is not None:
        try:
            validated(model, spec.parameters)
        except ConfigError as exc:
            raise ConfigError(f"deployments[{spec.name}].parameters.{exc.field}",
                              str(exc).split(": ", 1)[-1]) from None
    return spec.parameters


def runner_deployment(spec: DeploymentSpec, repo: str | Path | None = None, pool: str | None = None,
                      env: dict[str, str] | None = None, paused: bool = False) -> "RunnerDeployment":
    """A :class:`RunnerDeployment` for ``spec``: module-path entry point (the installed package),
    the checkout ``repo`` as the working directory, offline settings plus ``env`` in the job."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    flow = load_flow(spec.entrypoint)
    check_parameters(spec, flow)
    job = dict(spec.work_pool.job_variables)
    if repo is not None:
        job["working_dir"] = str(Path(repo).resolve())
    unresolved = [k for k, v in job.items() if isinstance(v, str) and "{{" in v]
    if unresolved:
        raise ConfigError(f"deployments[{spec.name}].work_pool.job_variables.{unresolved[0]}",
                          f"{job[unresolved[0]]!r} is unresolved: set the variable or pass --repo")
    job["env"] = {**OFFLINE_ENV, **(job.get("env") or {}), **(env or {})}
    schedules = [Cron(s.cron, timezone=s.timezone, active=s.active and not paused) for s in spec.schedules]
    return flow.to_deployment(
        name=spec.name, schedules=schedules, parameters=spec.parameters, description=spec.description,
        tags=spec.tags, concurrency_limit=spec.concurrency_limit, work_pool_name=pool or spec.work_pool.name,
        work_queue_name=spec.work_pool.work_queue_name, job_variables=job,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def register(specs: list[DeploymentSpec], repo: str | Path, pool: str | None = None,
             env: dict[str, str] | None = None, paused: bool = False) -> dict[str, str]:
    """Create or update the deployments on the Prefect server (``PREFECT_API_URL``).
    Returns ``{"<flow>/<deployment>": deployment id}``. The work pool must exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deployments = [(spec, runner_deployment(spec, repo, pool, env, paused)) for spec in specs]
    with get_client(sync_client=True) as client:
        for pool_name in {d.work_pool_name for _, d in deployments}:
            try:
                client.read_work_pool(pool_name)
            except ObjectNotFound:
                raise ConfigError("pool", f"work pool {pool_name!r} does not exist on {client.api_url}; "
                                  f"create it: prefect work-pool create {pool_name} --type process") from None
    ids = {}
    for spec, deployment in deployments:
        ids[f"{deployment.flow_name}/{spec.name}"] = str(deployment.apply())
        log.info("registered deployment %s/%s on pool %s", deployment.flow_name, spec.name,
                 deployment.work_pool_name)
    return ids


def serve(specs: list[DeploymentSpec], repo: str | Path, paused: bool = False) -> None:
    """Run the deployments' schedules in this process until it is stopped (no work pool).
    Flow runs happen in this process's working directory, so it changes to ``repo`` first."""
    from prefect import serve as prefect_serve

    os.chdir(Path(repo).resolve())
    deployments = []
    for spec in specs:
        deployment = runner_deployment(spec, repo, None, None, paused)
        deployment.work_pool_name = None  # served deployments run here, not through a pool
        deployment.job_variables = {}
        deployments.append(deployment)
    prefect_serve(*deployments, print_starting_message=False)
