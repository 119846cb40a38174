"""Wall time and peak resident memory of a piece of work, for manifests and benchmarks."""
from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass


def _rss_bytes() -> int:
    # /proc is the cheapest accurate source on Linux; ru_maxrss is only a process-lifetime peak.
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_peak_rss_bytes() -> int:
    """Peak RSS of this process since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    start_rss_bytes: int = 0

    @property
    def peak_extra_mib(self) -> float:
        """Memory the measured work added on top of what the process held when it started."""
        return (self.peak_rss_bytes - self.start_rss_bytes) / 2**20


class measure:
    """``with measure() as m: ...`` -> ``m.seconds``, ``m.peak_rss_bytes`` (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> Measurement:
        self.result.start_rss_bytes = self.result.peak_rss_bytes = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self.result

    def __exit__(self, *exc) -> None:
        self.result.seconds = time.perf_counter() - self._started
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, _rss_bytes())
