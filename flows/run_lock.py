"""One run, one set of parameters: the workspace lock and the guard on ``params.yaml``.

A run writes ``params.yaml`` (its file plus ``-S`` overrides), and DVC reads that file again
when each stage starts and when it writes ``dvc.lock`` and its run cache afterwards. So:

- :func:`workspace_lock` is taken before anything is written: a second run in the same
  workspace is refused at once with one line naming the holder, and ``params.yaml`` stays as
  the first run wrote it. ``fcntl.flock`` on the ``.dvc`` folder (no file written): the kernel drops it
  when the holder dies, so a killed run never leaves the workspace locked. Re-entrant within
  one process (the CLI takes it, then the flow it calls).
- :class:`ParamsGuard` remembers the bytes the run wrote; a stage that finished while the
  file held other bytes has its ``dvc.lock`` entry and its new run-cache entries taken back
  (flows/dvc.py) and the run fails with :class:`ParamsChanged`; nothing is logged to MLflow.
- A run that fails puts back the ``params.yaml`` it found, unless someone else changed the
  file meanwhile (their edit is kept, and said so).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_DIR = Path(".dvc")  # flock'ed as a folder: no lock file in the workspace

_held: dict[str, int] = {}  # root -> depth, for this process
_guard = threading.Lock()


class WorkspaceBusy(RuntimeError):
    """Another run holds this workspace."""


class ParamsChanged(RuntimeError):
    """``params.yaml`` changed under a running run: what DVC would record is not what ran."""


def _holder_text(path: Path) -> str:
    """Who holds the flock on ``path``: its pid and command line, from /proc/locks (Linux)."""
    try:
        stat = path.stat()
        wanted = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and len(fields) > 5 and fields[5] == wanted:
                pid = fields[4]
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                started = time.strftime("%H:%M:%S UTC", time.gmtime(Path(f"/proc/{pid}").stat().st_mtime))
                return f"pid {pid} since {started} (`{command.strip()[:200]}`)"
    except (OSError, ValueError):
        pass
    return "another process"


@contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """Hold ``root`` for one run; :class:`WorkspaceBusy` at once when another run holds it.

    The lock is a ``flock`` on the ``.dvc`` folder itself: nothing is created or written in the
    workspace, so a refused or failed run leaves every file as it was."""
    key = str(Path(root).resolve())
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    path = Path(root) / LOCK_DIR
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkspaceBusy(f"another run holds the workspace {root}: {_holder_text(path)}; wait for it to "
                                "finish (params.yaml and dvc.lock are untouched by this one)") from None
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def sha256_bytes(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@dataclass
class ParamsGuard:
    """``params.yaml`` before the run (``original``) and as the run wrote it (``written``)."""

    path: Path
    original: bytes | None
    written: bytes | None = None
    committed: bool = False  # every stage finished on these bytes: params.yaml is the run's record now

    @property
    def digest(self) -> str | None:
        return sha256_bytes(self.written)

    def changed(self) -> bool:
        return _read(self.path) != self.written

    def check(self, where: str) -> None:
        """:class:`ParamsChanged` when the file no longer holds what the run wrote."""
        if self.changed():
            raise ParamsChanged(params_changed_message(self.path, where))

    def restore(self, logger) -> None:
        """After a failure: the file as the run found it, unless someone else changed it since."""
        now = _read(self.path)
        if self.committed or self.written is None or now == self.original:
            return
        if now != self.written:
            logger.warning("params.yaml changed during the run; left as it is now (not restored)")
            return
        from wanda.atomic import atomic_file

        if self.original is None:
            self.path.unlink(missing_ok=True)
        else:
            with atomic_file(self.path, "wb") as handle:
                handle.write(self.original)
        logger.warning("the run failed: params.yaml restored to what it held before the run")


def params_changed_message(path: Path, where: str) -> str:
    return (f"{path.name} changed while the run was using it ({where}): the parameters the stages used are no "
            "longer the file's, so nothing was recorded for this stage (dvc.lock and DVC's run cache taken back, "
            "nothing logged to MLflow); run again once the file holds what you want")
