"""Where sweep points run: ``local`` (threads of this process), a Dask scheduler or a Ray cluster.

The engines are existing ones, driven through Prefect's own task runners: ``prefect-dask``'s
``DaskTaskRunner`` against ``dask://HOST:PORT`` (a running ``dask scheduler``) and
``prefect-ray``'s ``RayTaskRunner`` against ``ray://HOST:PORT`` (a Ray cluster's client port).
Nothing here schedules by hand: a point declares what it needs (:class:`Resources`), the engine
places it (Dask worker resources ``GPU=1``, Ray ``num_gpus``), and Prefect retries a point whose
worker died.

The settings come from the ``sweep:`` section of params.yaml, the CLI's ``--runner`` or a
deployment's parameters, and are validated here (:func:`sweep_settings`): a bad value is a
:class:`~wanda.errors.ConfigError` naming the field and the allowed forms.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wanda.errors import ConfigError

RUNNER_FORMS = "local, dask://HOST:PORT, ray://HOST:PORT"
_ADDRESS = re.compile(r"^(?P<kind>dask|ray)://(?P<host>[A-Za-z0-9][A-Za-z0-9.\-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
WORKSPACES_ENV = "WANDA_WORKSPACES"


class Resources(BaseModel):
    """What one point needs on its worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: int = Field(0, ge=0, description="GPUs (Dask resource GPU, Ray num_gpus); 0: CPU only")
    threads: int | None = Field(None, ge=1, description="OMP_NUM_THREADS of the point's stages; None: the "
                                "worker's cores divided by the points it runs at once")
    memory_gb: float | None = Field(None, gt=0, description="memory (Dask resource MEMORY in GB, Ray memory)")


class SweepSettings(BaseModel):
    """The ``sweep:`` section of params.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runner: str = Field("local", description=RUNNER_FORMS)
    resources: Resources = Field(default_factory=Resources)
    retries: int = Field(2, ge=0, le=10, description="Prefect retries of a point (e.g. its worker died)")
    workspaces: str | None = Field(None, description=f"folder on the worker for the points' workspaces; None: "
                                   f"${WORKSPACES_ENV}, else the worker's temporary folder")

    @field_validator("runner")
    @classmethod
    def _runner(cls, value: str) -> str:
        value = value.strip()
        if value != "local" and not _ADDRESS.match(value):
            raise ValueError(f"{value!r} is not a runner")
        if value != "local" and not 0 < int(_ADDRESS.match(value)["port"]) < 65536:
            raise ValueError(f"{value!r}: port out of range")
        return value

    @property
    def kind(self) -> Literal["local", "dask", "ray"]:
        return "local" if self.runner == "local" else _ADDRESS.match(self.runner)["kind"]  # type: ignore[return-value]

    @property
    def address(self) -> str | None:
        """The engine's own address form: ``tcp://HOST:PORT`` for Dask, ``ray://HOST:PORT`` for Ray."""
        if self.kind == "local":
            return None
        match = _ADDRESS.match(self.runner)
        return f"{'tcp' if self.kind == 'dask' else 'ray'}://{match['host']}:{match['port']}"


def sweep_settings(section: dict[str, Any] | None, runner: str | None = None) -> SweepSettings:
    """The validated settings: params.yaml's ``sweep:`` section, ``runner`` (CLI/deployment) first."""
    values = dict(section or {})
    if runner is not None:
        values["runner"] = runner
    try:
        return SweepSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(["sweep", *map(str, err["loc"])])
        allowed = RUNNER_FORMS if err["loc"][:1] == ("runner",) else None
        raise ConfigError(field, str(err["msg"]).removeprefix("Value error, "), allowed) from None


def task_runner(settings: SweepSettings, workers: int):
    """Prefect's task runner for the points: threads here, or the Dask/Ray cluster."""
    if settings.kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=settings.address)
    if settings.kind == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=settings.address)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max(1, workers))


@contextlib.contextmanager
def placement(settings: SweepSettings) -> Iterator[None]:
    """Around ``task.submit``: tell the engine what the point needs, so it places it only where
    that is free (a GPU point never lands on a worker without a GPU)."""
    resources = settings.resources
    if settings.kind == "dask":
        import dask

        wanted: dict[str, float] = {}
        if resources.gpus:
            wanted["GPU"] = resources.gpus
        if resources.memory_gb:
            wanted["MEMORY"] = resources.memory_gb
        with dask.annotate(resources=wanted) if wanted else contextlib.nullcontext():
            yield
    elif settings.kind == "ray":
        from prefect_ray.context import remote_options

        options: dict[str, Any] = {"num_gpus": resources.gpus, "num_cpus": resources.threads or 1}
        if resources.memory_gb:
            options["memory"] = int(resources.memory_gb * 2**30)
        with remote_options(**options):
            yield
    else:
        yield


RAY_CONNECT_ATTEMPTS = 3


@contextlib.contextmanager
def ray_connection(settings: SweepSettings) -> Iterator[None]:
    """One Ray client connection for the whole sweep (the cluster check and prefect-ray's task
    runner, which reuses an initialised Ray instead of connecting again), shut down at the end.

    The Ray client's head starts one "specific server" process per connection, and that start
    intermittently fails upstream (ray-project/ray#63202: the forked server dies, the client gets
    ConnectionAbortedError "Initialization failure from server"). Connecting once, and retrying a
    failed start a bounded number of times with a warning, keeps a sweep from failing on it."""
    import logging
    import time

    import ray

    if ray.is_initialized():  # the caller's connection: theirs to shut down
        yield
        return
    log = logging.getLogger(__name__)
    for attempt in range(1, RAY_CONNECT_ATTEMPTS + 1):
        try:
            ray.init(address=settings.address, ignore_reinit_error=True, logging_level="WARNING")
            break
        except ConnectionAbortedError as exc:
            ray.shutdown()
            if attempt == RAY_CONNECT_ATTEMPTS:
                raise RuntimeError(f"sweep.runner {settings.runner}: the Ray cluster at {settings.address} failed "
                                   f"to start a client server {attempt} times ({_first_line(exc)})") from None
            log.warning("sweep.runner %s: the Ray head failed to start a client server (attempt %d of %d: %s); "
                        "retrying", settings.runner, attempt, RAY_CONNECT_ATTEMPTS, _first_line(exc))
            time.sleep(2 * attempt)
        except Exception as exc:  # noqa: BLE001 - ConnectionError and Ray's own
            ray.shutdown()
            raise RuntimeError(f"sweep.runner {settings.runner}: no Ray cluster answers at {settings.address} "
                               f"({type(exc).__name__}: {_first_line(exc)}); start one: ray start --head") from None
    try:
        yield
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def connected(settings: SweepSettings) -> Iterator[None]:
    """The engine's connection held around the sweep: Ray's client (see :func:`ray_connection`);
    Dask's task runner opens its own client."""
    if settings.kind == "ray":
        with ray_connection(settings):
            yield
    else:
        yield


def check_cluster(settings: SweepSettings) -> list[str]:
    """Before any point is submitted: the cluster answers and has a worker that can take a point
    (else the engine would hold a GPU point forever). Returns the workers' names."""
    resources = settings.resources
    if settings.kind == "dask":
        from distributed import Client

        try:
            with Client(settings.address, timeout="20s") as client:
                workers = client.scheduler_info(n_workers=-1)["workers"].values()
                # Workers import the point code now, while this process plans the sweep, instead
                # of inside their first point (seconds of imports there, the event loop blocked).
                client.run(import_point_code, wait=False)
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(f"sweep.runner {settings.runner}: no Dask scheduler answers at {settings.address} "
                               f"({exc}); start one: dask scheduler --host HOST --port PORT") from None
        able = [w for w in workers if all(w.get("resources", {}).get(k, 0) >= v for k, v in _dask_needs(resources))]
        names = sorted(str(w.get("name") or w.get("id")) for w in able)
    elif settings.kind == "ray":
        import ray

        with ray_connection(settings):
            nodes = [n for n in ray.nodes() if n.get("Alive")]
        able = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) >= resources.gpus]
        names = sorted(n.get("NodeManagerAddress", "?") for n in able)
    else:
        return ["local"]
    if not names:
        need = f"{resources.gpus} GPU(s)" if resources.gpus else "points"
        hint = "dask worker ... --resources GPU=1" if settings.kind == "dask" else "ray start --num-gpus 1"
        raise RuntimeError(f"sweep.runner {settings.runner}: no worker can take a point needing {need} "
                           f"(sweep.resources {resources.model_dump(exclude_none=True)}); start one with: {hint}")
    return names


def _dask_needs(resources: Resources) -> list[tuple[str, float]]:
    needs: list[tuple[str, float]] = []
    if resources.gpus:
        needs.append(("GPU", resources.gpus))
    if resources.memory_gb:
        needs.append(("MEMORY", resources.memory_gb))
    return needs


# ----------------------------------------------------------------------------- on the worker


async def import_point_code() -> None:
    """What a worker needs to run a point (Prefect's task engine, the point task), imported
    ahead of the first point, on a thread: the worker's event loop stays free. (A coroutine,
    since Dask runs only those without the caller waiting.)"""
    import asyncio
    import importlib

    await asyncio.to_thread(importlib.import_module, "flows.points")


def worker_name() -> str:
    """The Dask worker's name, the Ray node, or this host."""
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        pass
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            return f"ray:{context.get_node_id()[:8]}"
    except ImportError:
        pass
    import platform

    return f"local:{platform.node()}"


def slots_here() -> int:
    """How many points this worker runs at once (Dask ``--nthreads``); 1 elsewhere."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return 1


def pinned_environment(resources: Resources, concurrent: int) -> dict[str, str]:
    """Environment of the point's stage processes: its threads, and its GPUs only.

    A GPU point keeps the devices the engine gave this worker (Ray sets CUDA_VISIBLE_DEVICES per
    task; a Dask GPU worker is started with its own); a CPU point sees none, so it never takes a
    GPU another point reserved."""
    threads = resources.threads or pinned_threads(concurrent)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if resources.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        visible = _gpu_ids()
        if len(visible) < resources.gpus:
            raise RuntimeError(f"point needs {resources.gpus} GPU(s) but worker {worker_name()} sees "
                               f"{len(visible)} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[: resources.gpus])
    return env


def pinned_threads(concurrent: int) -> int:
    """This host's cores shared by the points it runs at once."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrent))


def _gpu_ids() -> list[str]:
    try:
        import ray

        if ray.is_initialized():
            return [str(i) for i in ray.get_gpu_ids()]
    except ImportError:
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
