"""Running DVC stages as Prefect tasks.

Caching decision (why DVC, not Prefect's result cache): DVC already keys every stage by content
(command, parameter values, the md5 of every input and code file) and keeps a content-addressed
run cache of outputs, and ``dvc.lock`` is the lineage record. A second cache in Prefect would
have to track the same bytes and could disagree with it (a deleted artifact, a ``git checkout``
of other parameters). So each Prefect task's cache key *is* DVC's stage state: one
``dvc status`` at the start of a flow says which stages are up to date; those finish at once in
Prefect's ``Cached`` state without starting DVC, and every other stage runs through
``dvc repro --single-item``, which either finds it unchanged, restores its outputs from the run
cache, or runs it. A stage whose upstream ran in this flow is always handed to DVC (its inputs
may have new bytes).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from tasks.common import read_stage_record
from tasks.progress import LINES_ENV, ProgressLine, parse_line

from . import dvc

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    address: str  # DVC stage address: "masks", or "sweeps/NAME/dvc.yaml:POINT-masks"
    stage: str  # stage kind (tasks/graph.py name)
    folder: str  # artifact folder, relative to the root
    upstream: list[str] = field(default_factory=list)  # addresses this one reads
    command: str = ""  # the stage command as dvc.yaml declares it
    force: bool = False  # re-run even if DVC says up to date (e.g. a GPU appeared)
    force_reason: str | None = None
    params_sha256: str | None = None  # params.yaml as the run wrote it; a stage that ends on other bytes fails


@dataclass
class StageOutcome:
    address: str
    stage: str
    action: str  # "cached" | "unchanged" | "restored" | "ran"
    seconds: float
    status: str | None = None  # manifest status: "completed" | "skipped"
    reason: str | None = None
    wall_s: float | None = None  # the stage's own wall time, as its manifest recorded it
    peak_memory_mb: float | None = None
    folder: str = ""
    worker: str | None = None  # where a sweep point's stage ran (flows.points)

    @property
    def did_work(self) -> bool:
        return self.action in ("ran", "restored")


def _outcome(plan: StagePlan, root: Path, action: str, seconds: float) -> StageOutcome:
    manifest = read_stage_record(root / plan.folder) or {}  # with its run's facts (wall time, memory)
    return StageOutcome(plan.address, plan.stage, action, round(seconds, 3), manifest.get("status"),
                        manifest.get("reason"), manifest.get("wall_s"), manifest.get("peak_memory_mb"), plan.folder)


# DVC's advice to humans at a terminal; noise in a flow's log.
_DVC_HINTS = ("Use `dvc push`", "To track the changes with git", "git add ", "To enable auto staging",
              "dvc config core.autostage", "Data and pipelines are up to date")


# Asks the stage process for progress lines on stderr (DVC passes its environment on to it).
PROGRESS_ENV = {LINES_ENV: "1"}


class _Sink:
    """Forward DVC/stage output lines to the task's logger. A stage's progress lines
    (tasks.progress) instead keep one Prefect progress artifact per description up to date in
    the task run, with a log line only at each tenth of the way (the rest at debug level)."""

    def __init__(self, logger, stage: str | None = None):
        self.logger, self.stage = logger, stage
        self._progress: dict[str, _StageProgress] = {}

    def __call__(self, line: str) -> None:
        parsed = parse_line(line)
        if parsed is None:
            if not line.strip().startswith(_DVC_HINTS):
                self.logger.info("%s", line)
            return
        before, report = parsed
        if before.strip():  # another stream's unfinished line the progress line was glued to
            self(before)
        tracker = self._progress.get(report.description)
        if tracker is None:
            tracker = self._progress[report.description] = _StageProgress(self.stage, report.description, self.logger)
        tracker.update(report)


def _artifact_key(stage: str | None, description: str) -> str:
    """Prefect's artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{stage or ''} {description}".lower()).strip("-")
    return f"wanda-progress-{slug}"[:200].rstrip("-")


class _StageProgress:
    """One stage's count of one thing (blocks, windows, requests) as a Prefect progress artifact
    of the current task run; an artifact API that fails is warned about once, never fatal."""

    def __init__(self, stage: str | None, description: str, logger):
        self.stage, self.description, self.logger = stage, description, logger
        self.artifact_id = None
        self.broken = False
        self.logged_tenth = -1

    def update(self, report: ProgressLine) -> None:
        text = f"{report.description} ({report.unit}: {report.done} of {report.total})"
        tenth = int(report.percent // 10)
        if tenth != self.logged_tenth or report.done >= report.total:
            self.logged_tenth = tenth
            # The description names the stage kind ("masks: ...") and the log is the stage's task run's.
            self.logger.info("%s: %s %d of %d (%.0f%%)", report.description, report.unit, report.done,
                             report.total, report.percent)
        else:
            self.logger.debug("%s", text)
        if self.broken:
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    report.percent, key=_artifact_key(self.stage, report.description), description=text)
            else:
                update_progress_artifact(self.artifact_id, report.percent, description=text)
        except Exception as exc:  # the artifact is a view; a failing API must not fail the stage
            self.broken = True
            self.logger.warning("progress artifact for %r not updated: %s", report.description, exc)


@task(name="stage", task_run_name="{plan.address}", cache_policy=NO_CACHE)
def run_stage_task(plan: StagePlan, root: str, known_clean: bool, run_cache: bool = True):
    """One stage: ``Cached`` when DVC said up to date, else through DVC. (Parallel sweep points
    run in their own workspaces: flows.points.)"""
    logger = get_run_logger()
    started = time.perf_counter()
    root_path = Path(root)
    if plan.params_sha256 is not None and dvc._file_sha256(root_path / "params.yaml") != plan.params_sha256:
        from .run_lock import ParamsChanged, params_changed_message

        raise ParamsChanged(params_changed_message(root_path / "params.yaml", f"before stage {plan.address}"))
    if known_clean and not plan.force:
        outcome = _outcome(plan, root_path, "cached", time.perf_counter() - started)
        return Completed(name="Cached", data=asdict(outcome),
                         message="up to date in DVC: parameters, input bytes and code unchanged")
    if plan.force_reason:
        logger.info("%s: re-running: %s", plan.address, plan.force_reason)
    action = dvc.repro(root_path, plan.address, sink=_Sink(logger, plan.address), force=plan.force,
                       run_cache=run_cache, warn=logger.warning, env=PROGRESS_ENV,
                       params_sha256=plan.params_sha256).action
    outcome = _outcome(plan, root_path, action, time.perf_counter() - started)
    if outcome.status == "skipped":
        logger.info("%s skipped: %s", plan.address, outcome.reason)
    return asdict(outcome)


def stale_from_status(status: dict[str, list]) -> set[str]:
    return set(status)


def known_clean(plan: StagePlan, stale: set[str], worked: set[str], upstream_of: dict[str, list[str]]) -> bool:
    """Up to date per the flow's initial ``dvc status`` and no ancestor did work in this run."""
    if plan.address in stale:
        return False
    stack, seen = list(plan.upstream), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in worked:
            return False
        stack.extend(upstream_of.get(current, []))
    return True


def run_sequential(plans: list[StagePlan], root: Path, run_cache: bool = True,
                   stale: set[str] | None = None) -> list[StageOutcome]:
    """Run stages in order (a topological order), each a Prefect task."""
    if stale is None:
        stale = stale_from_status(dvc.status(root))
    upstream_of = {plan.address: plan.upstream for plan in plans}
    worked: set[str] = set()
    outcomes = []
    for plan in plans:
        clean = known_clean(plan, stale, worked, upstream_of)
        outcome = call_stage(plan, root, clean, run_cache)
        if outcome.did_work:
            worked.add(plan.address)
        outcomes.append(outcome)
    return outcomes


def call_stage(plan: StagePlan, root: Path, clean: bool, run_cache: bool = True) -> StageOutcome:
    """Run the stage task in this thread; its data whether it finished Cached or Completed."""
    state = run_stage_task(plan, str(root), clean, run_cache, return_state=True)
    return StageOutcome(**state.result())


def default_workers() -> int:
    """Parallel sweep points only where each gets real cores: torch already uses every core of
    one process, so two stages on two cores run no faster than one after the other."""
    cores = os.cpu_count() or 1
    return max(1, cores // 4)


def outcomes_table(outcomes: list[StageOutcome]) -> list[dict[str, Any]]:
    return [
        {"stage": o.address, "action": o.action, "status": o.status or "", "stage wall s": o.wall_s,
         "task s": o.seconds, "peak MiB": o.peak_memory_mb, "worker": o.worker or "", "reason": o.reason or ""}
        for o in outcomes
    ]
