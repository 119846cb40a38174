"""Every process a ``wanda-pipeline`` command starts dies with it.

The command starts ``dvc repro``, which starts the stage, and Prefect starts its temporary API
server (a uvicorn subprocess, ``prefect.server.api.server.SubprocessASGIServer``); none of them
would notice a ``kill -9`` of the command, and an orphaned stage would go on to write a finished
looking artifact that ``dvc.lock`` does not record.

How they are found: :func:`guard` puts a run token into this process's environment before any
child starts, so every descendant inherits it (DVC passes the environment to stage commands,
Prefect to its server), however deep and whichever process group or parent it ends up with
after its parent died. How they are stopped: a small watchdog process, started first and in a
session of its own (a Ctrl-C at the terminal does not reach it), polls its parent pid; the
moment the command is gone, however it ended (exit, exception, SIGKILL), it sends SIGTERM to
every process carrying the token, then SIGKILL to those still alive after a grace period. A
parent-death signal (``PR_SET_PDEATHSIG``) alone would not do: it reaches direct children only,
and fires when the *thread* that started the child exits, which in a Prefect task runner is
not the process. SIGTERM of the command itself raises ``KeyboardInterrupt`` (as SIGINT does),
so it stops like a Ctrl-C: the one-line message, exit 130, then the watchdog ends the children.
Stage outputs are written to a temporary folder and renamed, so a killed stage leaves nothing
that looks finished. Linux (``/proc``); elsewhere the guard is a no-op.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_ENV = "WANDA_PIPELINE_RUN"
POLL_S = 0.2
GRACE_S = 3.0


def guard() -> str | None:
    """Make this process's descendants die with it (once per process); returns the token."""
    if TOKEN_ENV in os.environ and os.environ.get(f"{TOKEN_ENV}_OWNER") == str(os.getpid()):
        return os.environ[TOKEN_ENV]
    if not Path("/proc/self/environ").exists():
        return None
    token = uuid.uuid4().hex
    os.environ[TOKEN_ENV] = token
    os.environ[f"{TOKEN_ENV}_OWNER"] = str(os.getpid())
    # Own session, no inherited pipes: it must outlive us, and must not hold our stdout open
    # (a caller reading our output to its end would wait for the watchdog too).
    subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), token],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True, env=_watchdog_env())  # -I: stdlib only
    signal.signal(signal.SIGTERM, _terminate)
    return token


def _watchdog_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(TOKEN_ENV)}  # not one of its own targets


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def carriers(token: str) -> list[int]:
    """Pids of the processes whose environment holds ``token`` (this one excluded)."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_carriers(token: str, grace_s: float = GRACE_S) -> None:
    """SIGTERM every process carrying ``token``; SIGKILL those alive after ``grace_s``."""
    pids = carriers(token)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [pid for pid in carriers(token) if not _zombie(pid)]
    _signal_all(carriers(token), signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def watch(parent: int, token: str) -> None:
    """The watchdog: wait for ``parent`` to go (we are re-parented), then stop its descendants."""
    while os.getppid() == parent:
        time.sleep(POLL_S)
    stop_carriers(token)


if __name__ == "__main__":  # python -I flows/processes.py PARENT_PID TOKEN (started by guard)
    watch(int(sys.argv[1]), sys.argv[2])
