"""Progress a person can watch: the library's ``progress(done, total)`` callbacks drawn as bars.

The library (``wanda``) only logs and calls the callback it is given; the stages pass one made
here. Each callback draws a tqdm bar on stderr (count, rate, ETA) when stderr is a terminal and
``WANDA_PROGRESS`` is not ``0``, and, when it runs inside a Prefect flow or task run, keeps a
Prefect progress artifact (percent done) up to date. With neither it is ``None``, so the library
does no extra work.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def bars_enabled() -> bool:
    """tqdm bars: stderr is a terminal and ``WANDA_PROGRESS`` is not ``0``."""
    if os.environ.get("WANDA_PROGRESS", "1") == "0":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _in_prefect_run() -> bool:
    if os.environ.get("WANDA_PROGRESS", "1") == "0":
        return False
    # A run context exists only where Prefect is already imported; importing it just to ask costs
    # every stage process (a DVC subprocess) over a second of start-up.
    if "prefect.context" not in sys.modules:
        return False
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency of the pipeline
        return False
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


class ProgressReporter:
    """A ``progress(done, total)`` callback: a tqdm bar and/or a Prefect progress artifact."""

    def __init__(self, description: str, unit: str, bar: bool, artifact: bool):
        self.description, self.unit = description, unit
        self._bar_wanted, self._artifact_wanted = bar, artifact
        self._bar = None
        self._artifact_id = None
        self._last_percent = -1.0

    def __call__(self, done: int, total: int) -> None:
        if self._bar_wanted:
            self._draw(done, total)
        if self._artifact_wanted:
            self._report(done, total)

    def _draw(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.description, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        if total != self._bar.total:  # a count that learns its total as it goes (lm-eval's requests)
            self._bar.total = total
            self._bar.refresh()
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None

    def _report(self, done: int, total: int) -> None:
        percent = round(100.0 * done / total, 1) if total else 100.0
        if percent == self._last_percent:
            return
        self._last_percent = percent
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(
                    progress=percent, description=f"{self.description} ({self.unit}: {done} of {total})")
            else:
                update_progress_artifact(self._artifact_id, progress=percent,
                                         description=f"{self.description} ({self.unit}: {done} of {total})")
        except Exception as exc:  # the artifact is a view; a failing API must not fail the stage
            log.warning("progress artifact for %r not updated: %s", self.description, exc)
            self._artifact_wanted = False


def progress(description: str, unit: str) -> Progress | None:
    """A callback for ``description`` counted in ``unit``, or None when nobody can watch it."""
    bar, artifact = bars_enabled(), _in_prefect_run()
    if not (bar or artifact):
        return None
    return ProgressReporter(description, unit, bar, artifact)


def block_progress(description: str) -> Progress | None:
    """Blocks pruned (or walked): block k of n."""
    return progress(description, "block")


def window_progress(description: str = "perplexity") -> Progress | None:
    """Perplexity windows evaluated."""
    return progress(description, "window")


def request_progress(description: str = "zero-shot") -> Progress | None:
    """Zero-shot (lm-eval) requests answered."""
    return progress(description, "request")
