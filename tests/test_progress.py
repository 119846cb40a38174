"""Stage progress: tqdm bars on a terminal, nothing when not watched, Prefect artifacts in a flow run."""
from __future__ import annotations

import io
import json
import logging

import pytest
import torch

import wanda
from tasks import progress
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os

    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_callback_when_nobody_watches(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal, no Prefect run
    assert progress.block_progress("masks") is None
    monkeypatch.setattr("sys.stderr", _Terminal())
    monkeypatch.setenv("WANDA_PROGRESS", "0")
    assert progress.block_progress("masks") is None


def test_bar_counts_blocks_pruned(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("WANDA_PROGRESS", raising=False)
    callback = progress.block_progress("masks: wanda")
    assert callback is not None
    wanda.prune_model(tiny_model(layers=3), torch.randint(3, 128, (2, 8)), wanda.PruneConfig(), progress=callback)
    drawn = terminal.getvalue()
    assert "masks: wanda" in drawn and "3/3" in drawn and "block" in drawn


def test_progress_lines_round_trip_and_reject_malformed_ones():
    line = progress.format_line('masks: wanda "2:4" \u00e9', "block", 3, 12)
    assert line.startswith(progress.LINE_MARK) and "\n" not in line
    assert progress.parse_line(line) == ("", progress.ProgressLine('masks: wanda "2:4" \u00e9', "block", 3, 12))
    assert progress.parse_line(line)[1].percent == 25.0
    assert progress.ProgressLine("x", "request", 5, 4).percent == 100.0  # never over Prefect's 100
    # glued behind another stream's unfinished line: that text comes back to be logged as it is
    assert progress.parse_line("partial stdout" + line)[0] == "partial stdout"
    mark = progress.LINE_MARK
    for bad in ("2026-01-01 INFO masks: block 3 of 12", mark, mark + "{not json", mark + "[1, 2]",
                mark + json.dumps({"description": "x", "unit": "block", "done": 1}),
                mark + json.dumps({"description": "x", "unit": "block", "done": -1, "total": 2}),
                mark + json.dumps({"description": "x", "unit": "block", "done": True, "total": 2}),
                mark + json.dumps({"description": 5, "unit": "block", "done": 1, "total": 2})):
        assert progress.parse_line(bad) is None, bad


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_throttled_but_keep_first_and_last(monkeypatch):
    stderr = io.StringIO()  # not a terminal: lines only, no bar
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setenv(progress.LINES_ENV, "1")
    monkeypatch.delenv("WANDA_PROGRESS", raising=False)
    clock = _Clock()
    callback = progress.window_progress("perplexity: dense")
    assert isinstance(callback, progress.ProgressReporter)
    callback._clock = clock
    for done in range(1, 1001):  # 1000 windows in no time: a line per whole percent
        callback(done, 1000)
    reports = [progress.parse_line(line)[1] for line in stderr.getvalue().splitlines()]
    assert reports[0] == progress.ProgressLine("perplexity: dense", "window", 1, 1000)
    assert reports[-1].done == 1000 and len(reports) == 101
    assert all(r.unit == "window" for r in reports)

    stderr.seek(0), stderr.truncate()
    slow = progress.ProgressReporter("zero-shot: dense", "request", bar=False, artifact=False, lines=True,
                                     clock=clock)
    slow(1, 10_000)
    slow(2, 10_000)  # same percent, no time passed: no line
    clock.now += 1.5
    slow(3, 10_000)  # a second passed: a line
    slow(3, 10_000)  # the same count again: no line
    slow(10_000, 10_000)
    assert [progress.parse_line(l)[1].done for l in stderr.getvalue().splitlines()] == [1, 3, 10_000]

    monkeypatch.setenv("WANDA_PROGRESS", "0")
    assert progress.window_progress("perplexity: dense") is None


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_flow_output_reader_logs_malformed_progress_lines_as_they_are():
    from flows.execution import _Sink

    logger, collect = logging.getLogger("test-progress-sink"), _Collect()
    logger.addHandler(collect)
    logger.setLevel(logging.DEBUG)
    try:
        sink = _Sink(logger, "masks")
        bad = progress.LINE_MARK + "{broken"
        sink(bad)
        sink("Running stage 'masks':")
        sink("Use `dvc push` to send your updates to remote storage.")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == [bad, "Running stage 'masks':"]


def test_flow_output_reader_logs_a_count_at_each_tenth_only():
    from flows.execution import _StageProgress

    logger, collect = logging.getLogger("test-progress-tenths"), _Collect()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        tracker = _StageProgress("masks", "masks: wanda", logger)
        tracker.broken = True  # no Prefect run here: the log side only (artifacts: the flow test below)
        for done in range(1, 101):
            tracker.update(progress.ProgressLine("masks: wanda", "block", done, 100))
    finally:
        logger.removeHandler(collect)
    assert collect.messages[0] == "masks: wanda: block 1 of 100 (1%)"
    assert collect.messages[-1] == "masks: wanda: block 100 of 100 (100%)"
    assert len(collect.messages) == 11  # 1%, then 10%, 20%, ... 100%


@pytest.mark.integration
def test_progress_artifact_inside_a_flow_run(harness, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client

    monkeypatch.setattr("sys.stderr", io.StringIO())  # no bar: only the artifact

    @flow
    def prune_flow():
        callback = progress.block_progress("masks: wanda")
        assert callback is not None
        wanda.prune_model(tiny_model(layers=2), torch.randint(3, 128, (2, 8)), wanda.PruneConfig(), progress=callback)

    prune_flow()
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.type == "progress" and not a.key]
    assert artifacts and max(float(a.data) for a in artifacts) == 100.0
    assert any("block: 2 of 2" in (a.description or "") for a in artifacts)


@pytest.mark.integration
def test_stage_progress_reaches_artifacts_of_the_stage_task_runs(harness, tmp_path):
    """The stages run as ``dvc repro`` subprocesses: their progress lines become artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    from flows.pipeline import prune_pipeline
    from tests.pipeline_project import copy_project

    root = copy_project(tmp_path / "p")
    result = prune_pipeline(repo=str(root), overrides=["masks.sparsity=0.6"], targets=["evaluate"],
                            track=False)
    actions = {o["address"]: o["action"] for o in result["outcomes"]}
    assert actions["masks"] == "ran" and actions["evaluate"] == "ran"
    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        runs = {run.name: run.id for run in client.read_task_runs()}
        artifacts = [a for a in client.read_artifacts() if a.type == "progress" and (a.key or "").startswith(
            "wanda-progress-")]
        logs = [entry.message for entry in client.read_logs()]

    def of(stage: str, unit: str):
        found = [a for a in artifacts if a.task_run_id == runs[stage] and f"({unit}: " in (a.description or "")]
        assert len(found) == 1, (stage, unit, [(a.key, a.description) for a in artifacts])
        return found[0]

    masks, windows = of("masks", "block"), of("evaluate", "window")
    assert float(masks.data) == 100.0 and masks.key.startswith("wanda-progress-masks-masks-")
    assert "block: 2 of 2" in masks.description  # tests.tiny's model has two blocks
    assert float(windows.data) == 100.0 and "window: 4 of 4" in windows.description
    assert masks.flow_run_id == windows.flow_run_id is not None
    assert not any(progress.LINE_MARK.strip() in m for m in logs)  # the lines themselves are not logged
    assert any(m.startswith("masks: ") and "block 2 of 2 (100%)" in m for m in logs)
