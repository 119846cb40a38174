"""Progress a person can watch: the library's ``progress(done, total)`` callbacks drawn as bars.

The library (``wanda``) only logs and calls the callback it is given; the stages pass one made
here. Each callback draws a tqdm bar on stderr (count, rate, ETA) when stderr is a terminal and
``WANDA_PROGRESS`` is not ``0``, and, when it runs inside a Prefect flow or task run, keeps a
Prefect progress artifact (percent done) up to date. A stage the flows run through ``dvc repro``
is a subprocess with no Prefect run of its own: there the flow sets ``WANDA_PROGRESS_LINES=1`` and
the callback writes machine-readable progress lines to stderr instead (:func:`format_line`,
throttled), which the flow's output reader (``flows.execution``) turns into artifacts of the
stage's task run (:func:`parse_line`). With none of these it is ``None``, so the library does no
extra work.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

LINES_ENV = "WANDA_PROGRESS_LINES"
# Starts every progress line; text no stage, library or DVC otherwise writes.
LINE_MARK = "@wanda-progress "
_LINE_EVERY_S = 1.0  # a line at least this far apart unless the percent advanced


def bars_enabled() -> bool:
    """tqdm bars: stderr is a terminal and ``WANDA_PROGRESS`` is not ``0``."""
    if os.environ.get("WANDA_PROGRESS", "1") == "0":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def lines_enabled() -> bool:
    """Progress lines on stderr: the flow asked for them (``WANDA_PROGRESS_LINES=1``) and
    ``WANDA_PROGRESS`` is not ``0``."""
    if os.environ.get("WANDA_PROGRESS", "1") == "0":
        return False
    return os.environ.get(LINES_ENV, "0") == "1"


@dataclass(frozen=True)
class ProgressLine:
    """One progress report as a line carries it: ``done`` of ``total`` ``unit``s of ``description``."""

    description: str
    unit: str
    done: int
    total: int

    @property
    def percent(self) -> float:
        """Percent done, at most 100 (Prefect's progress artifacts take 0 to 100)."""
        return min(100.0, round(100.0 * self.done / self.total, 1)) if self.total else 100.0


def format_line(description: str, unit: str, done: int, total: int) -> str:
    """The mark, then the report as one-line JSON (any description survives the trip)."""
    record = {"description": description, "unit": unit, "done": int(done), "total": int(total)}
    return LINE_MARK + json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def parse_line(line: str) -> tuple[str, ProgressLine] | None:
    """``(text before the mark, the report)`` of an output line carrying one, else None (no mark,
    or a malformed report: the caller logs such a line as it is). The mark may follow other text:
    a stage's block-buffered stdout can end a chunk mid-line just before a stderr line."""
    at = line.find(LINE_MARK)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(LINE_MARK):])
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    description, unit = record.get("description"), record.get("unit")
    done, total = record.get("done"), record.get("total")
    if not (isinstance(description, str) and isinstance(unit, str)):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (done, total)):
        return None
    return line[:at], ProgressLine(description, unit, done, total)


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
    """A ``progress(done, total)`` callback: a tqdm bar, a Prefect progress artifact and/or
    progress lines on stderr."""

    def __init__(self, description: str, unit: str, bar: bool, artifact: bool, lines: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.description, self.unit = description, unit
        self._bar_wanted, self._artifact_wanted, self._lines_wanted = bar, artifact, lines
        self._bar = None
        self._artifact_id = None
        self._last_percent = -1.0
        self._clock = clock
        self._line_sent: tuple[int, int] | None = None  # (done, total) of the last line written
        self._line_percent = -1
        self._line_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self._bar_wanted:
            self._draw(done, total)
        if self._artifact_wanted:
            self._report(done, total)
        if self._lines_wanted:
            self._line(done, total)

    def _line(self, done: int, total: int) -> None:
        """A line when the whole percent advanced or a second passed, and always the first and
        the last (``done`` reaching ``total``); never the same count twice in a row."""
        if (done, total) == self._line_sent:
            return
        now = self._clock()
        percent = (100 * done) // total if total else 100
        due = (self._line_sent is None or done >= total or percent > self._line_percent
               or now - self._line_at >= _LINE_EVERY_S)
        if not due:
            return
        self._line_sent, self._line_percent, self._line_at = (done, total), percent, now
        try:
            sys.stderr.write(format_line(self.description, self.unit, done, total) + "\n")
            sys.stderr.flush()  # the flow reads it as it comes, not when the stage ends
        except (OSError, ValueError) as exc:  # a closed stream: progress is a view, not the work
            log.warning("progress lines for %r stopped: %s", self.description, exc)
            self._lines_wanted = False

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
    bar, artifact, lines = bars_enabled(), _in_prefect_run(), lines_enabled()
    if not (bar or artifact or lines):
        return None
    return ProgressReporter(description, unit, bar, artifact, lines)


def block_progress(description: str) -> Progress | None:
    """Blocks pruned (or walked): block k of n."""
    return progress(description, "block")


def window_progress(description: str = "perplexity") -> Progress | None:
    """Perplexity windows evaluated."""
    return progress(description, "window")


def request_progress(description: str = "zero-shot") -> Progress | None:
    """Zero-shot (lm-eval) requests answered."""
    return progress(description, "request")
