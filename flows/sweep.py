"""``sweep``: several sparsities, N:M patterns, methods or calibration sizes, from shared artifacts.

1. The shared stages (base model, calibration, statistics, dense evaluation) run once through
   the main pipeline, cached by DVC like any run.
2. The points' own stages are a generated DVC pipeline (``sweeps/<name>/dvc.yaml``, see
   :mod:`flows.sweep_plan`). With one worker each runs through ``dvc repro`` (run cache and all).
   With more workers the points run in parallel (DVC holds one repository lock, so it cannot run
   two stages at once): stale stages run their command directly, then one ``dvc commit`` records
   them exactly as ``dvc repro`` would have (lock entries, cache, run cache).
3. The report stage writes the comparison table and the perplexity-vs-sparsity plot.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import wait

from tasks import graph
from tasks.params import read_yaml

from . import dvc
from .execution import (StageOutcome, StagePlan, call_stage, default_workers, known_clean, run_sequential,
                        run_stage_task)
from .pipeline import main_plans
from .prepare import open_run
from .reporting import publish_sweep
from .sweep_plan import SweepPlan, plan_sweep, write_sweep_files

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


def _run_parallel(plans: list[StagePlan], root: Path, stale: set[str], workers: int) -> list[StageOutcome]:
    """Point chains in parallel: each stage waits for its upstream tasks only."""
    futures: dict[str, Any] = {}
    for plan in plans:
        clean = plan.address not in stale and not any(up in stale for up in _closure(plan, plans))
        waits = [futures[up] for up in plan.upstream if up in futures]
        futures[plan.address] = run_stage_task.submit(plan, str(root), clean, True, True, workers, wait_for=waits)
    wait(list(futures.values()))
    return [StageOutcome(**futures[plan.address].result()) for plan in plans]


def _closure(plan: StagePlan, plans: list[StagePlan]) -> set[str]:
    index = {p.address: p for p in plans}
    found, stack = set(), list(plan.upstream)
    while stack:
        current = stack.pop()
        if current in index and current not in found:
            found.add(current)
            stack.extend(index[current].upstream)
    return found


def parse_axes(items: list[str]) -> dict[str, list[Any]]:
    from .sweep_plan import parse_axis

    axes: dict[str, list[Any]] = {}
    for item in items:
        key, values = parse_axis(item)
        axes[key] = values
    return axes


@flow(name="sweep", log_prints=False)
def sweep(axes: list[str], name: str = "sweep", params_file: str | None = None, overrides: list[str] | None = None,
          repo: str = ".", workers: int | None = None, run_cache: bool = True) -> dict:
    """``axes``: ``["masks.sparsity=0.3,0.4,0.5", "masks.method=wanda,magnitude", ...]``.

    Returns the per-point rows, the table, the plot path and what every stage did.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    root, base = open_run(repo, params_file, overrides, logger)
    plan = plan_sweep(name, parse_axes(axes), base, read_yaml(root / "params.yaml"))
    write_sweep_files(root, plan)
    logger.info("sweep %s: %d points (%s); shared stages: %s", name, len(plan.points),
                ", ".join(p.name for p in plan.points), ", ".join(plan.shared_stages()))

    shared = [p for p in main_plans(base, root) if p.stage in plan.shared_stages()]
    outcomes = run_sequential(shared, root, run_cache)
    worked = {o.address for o in outcomes if o.did_work}

    points = point_plans(plan)
    # Asked after the shared stages ran, so points whose shared inputs changed show as stale.
    stale = set(dvc.status(root, [plan.dvc_file]))
    workers = workers or default_workers()
    if workers > 1 and len(plan.points) > 1:
        logger.info("running %d points on %d workers", len(plan.points), workers)
        point_outcomes = _run_parallel(points, root, stale, workers)
        dvc.commit(root, [o.address for o in point_outcomes if o.did_work], sink=logger.info)
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
    publish_sweep(name, table, rows, plot, outcomes)
    seconds = round(time.perf_counter() - started, 3)
    logger.info("sweep %s done in %.1fs", name, seconds)
    return {"points": results["points"], "dense_perplexity": results["dense_perplexity"], "table": table,
            "plot": str(plot), "outcomes": [asdict(o) for o in outcomes], "seconds": seconds,
            "dvc_file": plan.dvc_file}
