"""One sweep point as one Prefect task: its stages, in its own workspace, on whatever worker the
task runner (threads, Dask, Ray) placed it, pinned to its threads and GPUs.

The flow then adopts the point's stages into the main workspace (:func:`flows.workspace.adopt`)
and reports progress as points finish (:class:`Progress`: a tqdm bar on the terminal, a line in
the flow's log and a Prefect progress artifact).
"""
from __future__ import annotations

import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common import run_facts_path
from wanda.atomic import atomic_file

from . import dvc
from .execution import PROGRESS_ENV, StagePlan, _outcome, _Sink
from .runners import Resources, pinned_environment, slots_here, worker_name
from .workspace import Snapshot, workspace, workspaces_root

log = logging.getLogger(__name__)


@dataclass
class PointJob:
    sweep: str
    point: str
    stages: list[StagePlan]  # the point's own stages, in pipeline order
    source: Snapshot
    resources: Resources
    workspaces: str | None = None
    run_cache: bool = True


@task(name="point", task_run_name="{job.point}", cache_policy=NO_CACHE)
def run_point_task(job: PointJob) -> dict[str, Any]:
    """Every stage of one point through ``dvc repro`` in a fresh workspace; the outputs reach
    the shared DVC cache (and its run cache) only when DVC committed them. Returns the worker,
    the wall time and each stage's outcome."""
    logger = get_run_logger()
    started = time.perf_counter()
    worker = worker_name()
    env = pinned_environment(job.resources, slots_here())
    logger.info("point %s on worker %s (OMP_NUM_THREADS=%s, CUDA_VISIBLE_DEVICES=%r)", job.point, worker,
                env["OMP_NUM_THREADS"], env.get("CUDA_VISIBLE_DEVICES"))
    outcomes = []
    with workspace(job.source, f"{job.sweep}-{job.point}-{worker}", workspaces_root(job.workspaces)) as path:
        for plan in job.stages:
            t0 = time.perf_counter()
            action = dvc.repro(path, plan.address, sink=_Sink(logger, plan.address), force=plan.force,
                               run_cache=job.run_cache, warn=logger.warning, env={**env, **PROGRESS_ENV}).action
            outcomes.append(asdict(_outcome(plan, path, action, time.perf_counter() - t0)))
            _keep_run_facts(path, Path(job.source.root), plan.folder)
    return {"point": job.point, "worker": worker, "host": platform.node(),
            "seconds": round(time.perf_counter() - started, 3), "outcomes": outcomes}


def _keep_run_facts(workspace: Path, main: Path, folder: str) -> None:
    """The point's run facts (``<folder>.run.json``) into the main workspace: adoption restores the
    outputs from DVC's cache there, and the cache holds no run facts. They name the manifest they
    belong to, so they only count once the adopted folder holds that same manifest."""
    source = run_facts_path(workspace / folder)
    if source.is_file():
        dest = run_facts_path(main / folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest) as handle:
            handle.write(source.read_bytes())


class Progress:
    """Point k of n finished, and where: terminal (tqdm, on stderr), flow log, Prefect artifact."""

    def __init__(self, sweep: str, total: int, logger):
        from prefect.artifacts import create_progress_artifact
        from tqdm import tqdm

        self.total, self.done, self.logger = total, 0, logger
        key = "wanda-sweep-" + "".join(c if c.isalnum() else "-" for c in sweep.lower()).strip("-") + "-progress"
        self.artifact = create_progress_artifact(0.0, key=key, description=f"Sweep {sweep}: points finished")
        self.bar = tqdm(total=total, desc=f"sweep {sweep}", unit="point", file=sys.stderr, dynamic_ncols=True)

    def finished(self, result: dict[str, Any]) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += 1
        line = f"point {self.done} of {self.total} finished: {result['point']} on {result['worker']} " \
               f"in {result['seconds']:.1f}s"
        self.logger.info("%s", line)
        self.bar.set_postfix_str(f"{result['point']} on {result['worker']}", refresh=False)
        self.bar.update(1)
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total, description=line)

    def close(self) -> None:
        self.bar.close()
