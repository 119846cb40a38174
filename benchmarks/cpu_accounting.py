"""Where a benchmark's CPU time went, by kind of process (Linux /proc, no extra packages).

A thread samples every process's CPU time (utime + stime from ``/proc/PID/stat``) a few times a
second and keeps the last figure seen per process; :meth:`CpuAccounting.by_kind` sums them by
what the process is (its command line). A process that ends between two samples loses at most
one interval of CPU time, so the figures are a slight undercount; ``/proc/stat``'s machine-wide
total beside them shows how slight.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_ENDED = "ended"
_PF_KTHREAD = 0x00200000  # /proc/PID/stat flags: a kernel thread

# First match wins: (kind, words that must all appear in the command line).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prefect server", ("prefect", "server")),
    ("dask scheduler", ("dask", "scheduler")),
    ("dask workers", ("dask", "worker")),
    ("stage processes", ("-m", "tasks.")),
    ("dvc", ("dvc",)),
    ("git", ("git",)),
)


def kind_of(cmdline: str, driver: bool, name: str = "?") -> str:
    if driver:
        return "driver (flow, adoption)"
    for kind, words in KINDS:
        if all(word in cmdline for word in words):
            return kind
    words = [w.rsplit("/", 1)[-1] for w in cmdline.split()[:3]]
    return f"other ({' '.join(words) or name})"


def _cpu_seconds(stat: str) -> float:
    # Fields after the command name (which may hold spaces, inside parentheses).
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class CpuAccounting:
    """``with CpuAccounting() as acc: ...`` then ``acc.by_kind()``: CPU seconds each kind of
    process spent while the block ran (processes already running count from the start)."""

    def __init__(self, interval_s: float = 0.2, workspaces: Path | None = None):
        """``workspaces``: processes working under this folder count apart ("... in points")."""
        self.interval_s = interval_s
        self.workspaces = str(workspaces) if workspaces else None
        self.start: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuAccounting:
        self.start = {pid: seconds for pid, (_, seconds) in self._sample().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record(self._sample())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self._sample())

    def _record(self, sample: dict[int, tuple[str, float]]) -> None:
        for pid, (kind, seconds) in sample.items():
            if kind == _ENDED:  # an ended process not yet reaped: no command line left, keep its kind
                kind = self.last.get(pid, ("other (ended before it was seen)", 0.0))[0]
            self.last[pid] = (kind, seconds)

    def _sample(self) -> dict[int, tuple[str, float]]:
        me = os.getpid()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            pid = int(entry.name)
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[6]) & _PF_KTHREAD:
                kind = "kernel threads"
            elif not cmdline.strip():  # exiting or ended, not yet reaped: its memory (and cmdline) gone
                kind = _ENDED
            else:
                kind = kind_of(cmdline.strip(), pid == me, stat[stat.index("(") + 1:stat.rindex(")")])
            if self.workspaces and kind in ("dvc", "git"):
                try:
                    where = os.readlink(entry / "cwd")
                except OSError:
                    where = ""
                kind += " in points" if where.startswith(self.workspaces) else " in main workspace"
            found[pid] = (kind, _cpu_seconds(stat))
        return found

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, (kind, seconds) in self.last.items():
            totals[kind] = totals.get(kind, 0.0) + seconds - self.start.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
