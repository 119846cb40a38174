"""``sweep``: several sparsities, N:M patterns, methods or calibration sizes, from shared artifacts.

1. The shared stages (base model, calibration, statistics, dense evaluation) run once through
   the main pipeline, cached by DVC like any run.
2. The points' own stages are a generated DVC pipeline (``sweeps/<name>/dvc.yaml``, see
   :mod:`flows.sweep_plan`). With one local worker each runs through ``dvc repro`` in the main
   workspace (run cache and all). Otherwise every point is one Prefect task on the chosen task
   runner (``sweep.runner``: threads here, a Dask scheduler, a Ray cluster; :mod:`flows.runners`)
   and runs in its own workspace over the shared DVC cache (:mod:`flows.workspace`), so no point
   waits for another's DVC lock; as points finish, ``dvc repro`` in the main workspace restores
   their stages from the run cache (in plan order, while later points still run), leaving
   ``dvc.lock`` as a local run would.
3. The report stage writes the comparison table and the perplexity-vs-sparsity plot; the flow
   adds where each point ran and how long it took.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from tasks import graph
from tasks.params import read_yaml

from . import dvc, runners
from .execution import (StageOutcome, StagePlan, _outcome, _Sink, call_stage, default_workers, known_clean,
                        run_sequential)
from .pipeline import main_plans
from .points import PointJob, Progress, run_point_task
from .prepare import open_run
from .reporting import publish_sweep
from .sweep_plan import SweepPlan, plan_sweep, write_sweep_files
from .workspace import adopt, snapshot

log = logging.getLogger(__name__)


def point_plans(plan: SweepPlan) -> list[StagePlan]:
    plans = []
    for point in plan.points:
        for stage_name in point.stages:
            spec = graph.stage(stage_name)
            upstream = [plan.address(point, name) if name in point.stages else name for name in spec.inputs]
            plans.append(StagePlan(address=plan.address(point, stage_name), stage=stage_name,
                                   folder=getattr(point.params.paths, stage_name), upstream=upstream,
                                   command=spec.command(plan.params_file, point.name)))
    return plans


def report_plan(plan: SweepPlan) -> StagePlan:
    upstream = ["dense_eval"] + [plan.address(point, "evaluate") for point in plan.points]
    return StagePlan(address=plan.report_address, stage="report", folder=plan.report_folder, upstream=upstream)


def parse_axes(items: list[str]) -> dict[str, list[Any]]:
    from .sweep_plan import parse_axis

    axes: dict[str, list[Any]] = {}
    for item in items:
        key, values = parse_axis(item)
        axes[key] = values
    return axes


def settings_for(repo: str, params_file: str | None, overrides: list[str] | None,
                 runner: str | None) -> runners.SweepSettings:
    """The validated ``sweep:`` settings of the run's parameters (``runner`` wins): known before
    the flow starts, since the flow's task runner depends on them."""
    from .prepare import resolve_params_file
    from tasks.params import load_params

    root = dvc.find_root(repo)
    return runners.sweep_settings(load_params(resolve_params_file(root, params_file), overrides).sweep, runner)


def sweep(axes: list[str], name: str = "sweep", params_file: str | None = None, overrides: list[str] | None = None,
          repo: str = ".", workers: int | None = None, run_cache: bool = True, runner: str | None = None) -> dict:
    """``axes``: ``["masks.sparsity=0.3,0.4,0.5", "masks.method=wanda,magnitude", ...]``;
    ``runner``: ``local`` | ``dask://HOST:PORT`` | ``ray://HOST:PORT`` (default: params.yaml's
    ``sweep.runner``). Returns the per-point rows, the table, the plot path, what every stage did
    and where every point ran."""
    settings = settings_for(repo, params_file, overrides, runner)
    workers = workers or default_workers()
    with runners.connected(settings):
        if settings.kind != "local":  # before any work: a cluster that cannot take a point fails now
            _warn_without_api(settings)
            log.info("runner %s: workers able to take a point: %s", settings.runner,
                     ", ".join(runners.check_cluster(settings)))
        flow_run = sweep_flow.with_options(task_runner=runners.task_runner(settings, workers))
        return flow_run(axes=axes, name=name, params_file=params_file, overrides=overrides, repo=repo,
                        workers=workers, run_cache=run_cache, runner=settings.runner)


def _warn_without_api(settings: runners.SweepSettings) -> None:
    """Workers report a point's task run to the Prefect API they are configured with. With none
    here, this flow runs on a temporary server no worker can reach, so each worker would start a
    temporary one of its own for its first point (tens of seconds each) and the points' task
    runs and logs would be lost with it."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        log.warning("sweep.runner %s: PREFECT_API_URL is not set, so this sweep runs on a temporary Prefect "
                    "server the workers cannot reach: each worker starts its own for its first point and the "
                    "points' task runs and logs end there. Run a Prefect server and set PREFECT_API_URL here and "
                    "on every worker (docs/operations.md)", settings.runner)


@flow(name="sweep", log_prints=False)
def sweep_flow(axes: list[str], name: str = "sweep", params_file: str | None = None,
               overrides: list[str] | None = None, repo: str = ".", workers: int | None = None,
               run_cache: bool = True, runner: str | None = None) -> dict:
    """The sweep on the task runner :func:`sweep` chose (call that, not this)."""
    logger = get_run_logger()
    started = time.perf_counter()
    root, base = open_run(repo, params_file, overrides, logger)
    settings = runners.sweep_settings(base.sweep, runner)
    plan = plan_sweep(name, parse_axes(axes), base, read_yaml(root / "params.yaml"))
    workers = workers or default_workers()
    distributed = settings.kind != "local" or (workers > 1 and len(plan.points) > 1)
    write_sweep_files(root, plan)
    logger.info("sweep %s: %d points (%s); shared stages: %s", name, len(plan.points),
                ", ".join(p.name for p in plan.points), ", ".join(plan.shared_stages()))

    shared = [p for p in main_plans(base, root) if p.stage in plan.shared_stages()]
    stale = set(dvc.status(root))  # every dvc.yaml of the repository: the sweep's too
    outcomes = run_sequential(shared, root, run_cache, stale=stale)
    worked = {o.address for o in outcomes if o.did_work}

    points = point_plans(plan)
    if worked:  # asked again: points whose shared inputs just changed must show as stale
        stale = set(dvc.status(root, [plan.dvc_file]))
    placement: list[dict[str, Any]] = []
    if distributed:
        point_outcomes, placement = _run_points(plan, points, root, stale, settings, workers, run_cache, logger)
    else:
        point_outcomes = run_sequential(points, root, run_cache, stale=stale)
    outcomes += point_outcomes
    worked |= {o.address for o in point_outcomes if o.did_work}

    report = report_plan(plan)
    upstream_of = {p.address: p.upstream for p in points}
    clean = known_clean(report, stale, worked, upstream_of)
    outcomes.append(call_stage(report, root, clean, run_cache))

    results = json.loads((root / plan.report_folder / "results.json").read_text())
    table = (root / plan.report_folder / "table.md").read_text()
    plot = root / plan.report_folder / "perplexity_vs_sparsity.png"
    rows = [{k: v for k, v in row.items() if k != "overrides"} for row in results["points"]]
    if not placement:  # points run in turn here: where and how long, from their stages' outcomes
        placement = local_placement(plan, point_outcomes)
    placement_file = write_placement(root, plan, placement)
    publish_sweep(name, table + placement_table(placement), rows, plot, outcomes)
    seconds = round(time.perf_counter() - started, 3)
    logger.info("sweep %s done in %.1fs", name, seconds)
    return {"points": results["points"], "dense_perplexity": results["dense_perplexity"], "table": table,
            "plot": str(plot), "outcomes": [asdict(o) for o in outcomes], "seconds": seconds,
            "dvc_file": plan.dvc_file, "runner": settings.runner, "placement": placement,
            "placement_file": str(placement_file)}


def _run_points(plan: SweepPlan, points: list[StagePlan], root: Path, stale: set[str],
                settings: runners.SweepSettings, workers: int, run_cache: bool,
                logger) -> tuple[list[StageOutcome], list[dict[str, Any]]]:
    """Every point with a stale stage as one task on the task runner, each in its own workspace;
    finished points are adopted into this workspace while the others still run (:class:`_Adoption`)."""
    index = {s.address: s for s in points}
    by_point = {p.name: [index[plan.address(p, stage)] for stage in p.stages] for p in plan.points}
    todo = {name: stages for name, stages in by_point.items() if any(s.address in stale for s in stages)}
    done: dict[str, dict[str, Any]] = {}
    if todo:
        source = snapshot(root, plan.shared_stages())
        resources = settings.resources
        if settings.kind == "local" and resources.threads is None:
            # Threads here: the points share this host's cores.
            resources = resources.model_copy(update={"threads": runners.pinned_threads(workers)})
        task = run_point_task.with_options(retries=settings.retries, retry_delay_seconds=1)
        futures = []
        logger.info("running %d point(s) on %s", len(todo), settings.runner if settings.kind != "local"
                    else f"{workers} local workers")
        for name, stages in todo.items():
            job = PointJob(plan.name, name, stages, source, resources, settings.workspaces, run_cache)
            with runners.placement(settings):
                futures.append(task.submit(job))
        progress = Progress(plan.name, len(futures), logger)
        adoption = _Adoption(root, list(todo), _Sink(logger))
        try:
            for future in as_completed(futures):
                result = future.result()  # a point that failed after its retries fails the sweep
                done[result["point"]] = result
                progress.finished(result)
                adoption.finished(result)
        finally:
            progress.close()
    outcomes = []
    for name, stages in by_point.items():
        if name in done:
            worker = done[name]["worker"]
            outcomes += [StageOutcome(**{**o, "worker": worker}) for o in done[name]["outcomes"]]
        else:
            outcomes += [_outcome(s, root, "cached", 0.0) for s in stages]
    placement = [{"point": r["point"], "worker": r["worker"], "host": r["host"], "wall_s": r["seconds"]}
                 for r in (done[name] for name in by_point if name in done)]
    return outcomes, placement


class _Adoption:
    """Finished points into the main workspace (:func:`flows.workspace.adopt`), in plan order.

    A point is adopted as soon as it and every point before it in the plan have finished, while
    later points still run in their own workspaces (they never touch this one's DVC lock): the
    sweep's tail is then one point's adoption, not all of them. Plan order, not finishing order,
    because ``dvc.lock`` lists new stages in the order they were reproduced: its bytes must not
    depend on which worker was faster, and equal a local sweep's (which runs the points in turn).
    A point that fails the sweep stops adoption there; the points after it that finished are in
    DVC's run cache, so the next run restores them instead of computing them again."""

    def __init__(self, root: Path, order: list[str], sink):
        self.root, self.order, self.sink = root, order, sink
        self.results: dict[str, dict[str, Any]] = {}
        self.next = 0

    def finished(self, result: dict[str, Any]) -> None:
        self.results[result["point"]] = result
        ready = []
        while self.next < len(self.order) and self.order[self.next] in self.results:
            ready.append(self.results[self.order[self.next]])
            self.next += 1
        self._adopt(ready)

    def _adopt(self, results: list[dict[str, Any]]) -> None:
        ran = [o["address"] for r in results for o in r["outcomes"] if o["action"] in ("ran", "restored")]
        adopt(self.root, ran, sink=self.sink)


def local_placement(plan: SweepPlan, outcomes: list[StageOutcome]) -> list[dict[str, Any]]:
    """Rows for points whose stages ran in this process's turn (no point task): this host, and
    the sum of the point's stage times."""
    import platform

    by_address = {o.address: o for o in outcomes}
    rows = []
    for point in plan.points:
        mine = [by_address[a] for a in (plan.address(point, stage) for stage in point.stages) if a in by_address]
        if any(o.did_work for o in mine):
            rows.append({"point": point.name, "worker": "local", "host": platform.node(),
                         "wall_s": round(sum(o.seconds for o in mine), 3)})
    return rows


def write_placement(root: Path, plan: SweepPlan, placement: list[dict[str, Any]]) -> Path:
    """``artifacts/sweeps/NAME/placement.{json,md}``: the worker and wall time of every point this
    run computed (points restored from the cache are listed as cached). Beside the report, not in
    it: the report is a DVC output and must be the same bytes wherever and however fast the
    points ran."""
    from wanda.atomic import write_json

    ran = {p["point"] for p in placement}
    rows = placement + [{"point": p.name, "worker": "cached", "host": "", "wall_s": 0.0}
                        for p in plan.points if p.name not in ran]
    folder = root / plan.artifact_folder
    write_json(folder / "placement.json", {"sweep": plan.name, "points": rows})
    (folder / "placement.md").write_text(f"# Sweep {plan.name}: where the points ran\n\n{_placement_rows(rows)}")
    return folder / "placement.md"


def placement_table(placement: list[dict[str, Any]]) -> str:
    """Where each point ran and how long it took (worker wall time, workspace set-up included)."""
    if not placement:
        return ""
    return f"\n## Where the points ran\n\n{_placement_rows(placement)}"


def _placement_rows(placement: list[dict[str, Any]]) -> str:
    lines = ["| point | worker | host | wall s |", "|---|---|---|---:|"]
    lines += [f"| {p['point']} | {p['worker']} | {p['host']} | {p['wall_s']:.1f} |" for p in placement]
    return "\n".join(lines) + "\n"
