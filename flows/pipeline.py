"""``prune_pipeline``: the whole chain, every stage a Prefect task cached by DVC's stage state.

materialize -> calibration -> statistics -> masks -> prune -> dense_eval -> evaluate
-> export_24 -> engine -> benchmark; evaluate -> savings
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger

from tasks import graph
from tasks.params import PipelineParams

from . import dvc
from .execution import StagePlan, StageOutcome, run_sequential
from .redact import install_logging, redact_value
from .reporting import publish_pipeline
from .prepare import content_force_reasons, locked_run

log = logging.getLogger(__name__)


def main_plans(params: PipelineParams, root: Path, force: bool = False,
               params_sha256: str | None = None) -> list[StagePlan]:
    plans = []
    reasons = content_force_reasons(root, params)
    for spec in graph.STAGES:
        plan = StagePlan(address=spec.name, stage=spec.name, folder=getattr(params.paths, spec.name),
                         upstream=list(spec.inputs), command=spec.command(), force=force,
                         params_sha256=params_sha256)
        if spec.name in reasons:
            plan.force, plan.force_reason = True, reasons[spec.name]
        plans.append(plan)
    return plans


def select(plans: list[StagePlan], targets: list[str] | None) -> list[StagePlan]:
    """The stages needed for ``targets`` (with their ancestors), in pipeline order."""
    if not targets:
        return plans
    wanted: set[str] = set()
    for target in targets:
        graph.stage(target)  # KeyError names the known stages
        wanted |= {target, *graph.ancestors(target)}
    return [plan for plan in plans if plan.stage in wanted]


@flow(name="prune_pipeline", log_prints=False)
def prune_pipeline(params_file: str | None = None, overrides: list[str] | None = None, repo: str = ".",
                   force: bool = False, run_cache: bool = True, targets: list[str] | None = None,
                   track: bool = True, release: bool = False) -> dict:
    """Run the pipeline (or the part ``targets`` needs) on ``params_file`` with ``overrides``,
    then (whole pipeline only) log it as one MLflow run and register the pruned model
    (``track``), then judge that version with the release gate (``release``).

    Returns ``{"outcomes": [...], "metrics": {...}, "seconds": ..., "tracking": ..., "release": ...}``;
    raises on the first failing stage (DVC keeps every stage that finished before it) and
    with ``GateRejected`` when the gate rejects the candidate.
    """
    install_logging()  # a worker runs this flow without the CLI: its records are redacted too
    logger = get_run_logger()
    started = time.perf_counter()
    # One run, one set of parameters: the workspace is held from before params.yaml is written
    # until the run is recorded; a failure puts back the params.yaml the run found.
    with locked_run(repo, params_file, overrides, logger) as (root, params, guard):
        plans = select(main_plans(params, root, force, guard.digest), targets)
        status = dvc.status(root, [plan.address for plan in plans])
        logger.info("DVC: %d of %d stages need work (%s)", len(status), len(plans), ", ".join(status) or "none")
        outcomes: list[StageOutcome] = run_sequential(plans, root, run_cache, stale=set(status))
        guard.check("after the last stage")
        guard.committed = True  # the stages are recorded: a tracking or gate failure keeps params.yaml
        publish_pipeline(root, params.paths, outcomes)
        metrics = _read_metrics(root / params.paths.evaluate / "metrics.json")
        worked = [o.address for o in outcomes if o.did_work]
        result = {"outcomes": [asdict(o) for o in outcomes], "metrics": metrics, "root": str(root),
                  "tracking": None, "release": None}
        whole = not targets or "evaluate" in {p.stage for p in plans}
        if (track or release) and whole:
            result["tracking"], result["release"] = _track_and_release(root, release, logger)
    result["seconds"] = round(time.perf_counter() - started, 3)
    logger.info("pipeline done in %.1fs; stages that did work: %s", result["seconds"], ", ".join(worked) or "none")
    return redact_value(result)  # Prefect stores the flow's result


def _track_and_release(root: Path, release: bool, logger) -> tuple[dict, dict | None]:
    """One MLflow run per pipeline run, the pruned model registered as a new version; the gate
    judges exactly that version (not "the newest", which a concurrent run may have added)."""
    from .run_inputs import current_flow_run_id
    from .tracking import track_pipeline_run

    logged = track_pipeline_run(root, flow_run_id=current_flow_run_id())
    logger.info("MLflow run %s in %s; registered %s version %s", logged.run_id, logged.tracking_uri,
                logged.model_name, logged.model_version)
    if not release:
        return logged.model_dump(mode="json"), None
    if not logged.model_version:
        raise RuntimeError("release gate: the run registered no model version (see the tracking log)")
    from .release import release_gate

    decision = release_gate(candidate=f"{logged.model_name}/{logged.model_version}", root=str(root))
    return logged.model_dump(mode="json"), decision


def _read_metrics(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
