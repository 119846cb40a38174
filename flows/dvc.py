"""DVC as the pipeline's cache and lineage: thin, typed wrappers around its command line.

DVC runs as a subprocess (``python -m dvc`` of this interpreter) rather than through its Python
API: its output streams line by line into the caller's logger (Prefect shows it), its repository
lock and its exit codes behave exactly as for a user typing ``dvc repro``, and a crash inside a
stage cannot take the orchestrating process with it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.common import OFFLINE_ENV

log = logging.getLogger(__name__)

LineSink = Callable[[str], None]


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its last output lines."""


def find_root(start: str | Path = ".") -> Path:
    """The repository root: the nearest folder upwards holding ``dvc.yaml`` and ``.dvc/``."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / ".dvc").is_dir():
            return folder
    raise DvcError(f"no DVC pipeline at or above {here} (need dvc.yaml and .dvc/; run `dvc init` in the repository)")


def environment() -> dict[str, str]:
    """Offline settings, the shared data folder, and this interpreter's folder first on PATH:
    stage commands say ``python -m tasks.<stage>`` and must get the interpreter that has the
    project installed."""
    from wanda.data import shared_data_dir

    env = dict(os.environ)
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    # Stages must resolve `shared:` paths as this process's checks did (content_force_reasons).
    env.setdefault("WANDA_SHARED_DATA", str(shared_data_dir()))
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def run(args: list[str], root: Path, sink: LineSink | None = None, check: bool = True,
        env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``dvc ARGS`` in ``root``; every output line goes to ``sink`` as it arrives. ``env``:
    extra variables for DVC and the stages it runs (a sweep point's threads and GPUs)."""
    argv = [sys.executable, "-m", "dvc", *args]
    lines: list[str] = []
    with subprocess.Popen(argv, cwd=root, env={**environment(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if sink is not None and line.strip():
                sink(line)
        code = process.wait()
    if check and code != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {code}): {failure_reason(lines)}")
    return code, lines


def failure_reason(lines: list[str]) -> str:
    """The most telling line of a failed run: the stage's own error log line, else the last
    exception line of a traceback, else DVC's error."""
    stage_errors = [line for line in lines if " ERROR " in line]
    if stage_errors:
        return stage_errors[0].split(" ERROR ", 1)[1].strip()
    exceptions = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception|Interrupt)\b", line)]
    if exceptions:
        return exceptions[-1].strip()
    dvc_errors = [line for line in lines if line.startswith("ERROR")]
    if dvc_errors:
        return dvc_errors[-1].strip()
    tail = [line for line in lines if line.strip()][-3:]
    return " | ".join(tail) or "no output"


def capture(args: list[str], root: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=environment(),
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def status(root: Path, targets: list[str] | None = None) -> dict[str, list]:
    """``dvc status --json``: ``{stage address: [changes]}`` for every stage that is not up to date."""
    text = capture(["status", "--json", *(targets or [])], root)
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else {}


@dataclass
class ReproOutcome:
    action: str  # "ran" | "restored" | "unchanged"
    lines: list[str]


def repro(root: Path, target: str, sink: LineSink | None = None, force: bool = False,
          run_cache: bool = True, env: dict[str, str] | None = None) -> ReproOutcome:
    """Bring one stage up to date (``dvc repro --single-item``) and say what DVC did."""
    args = ["repro", "--single-item", target]
    if force:
        args.append("--force")
    if not run_cache:
        args.append("--no-run-cache")
    _, lines = run(args, root, sink, env=env)
    text = "\n".join(lines)
    if "skipping run, checking out outputs" in text:
        action = "restored"  # DVC's run cache had this exact stage state: outputs checked out
    elif "Running stage" in text:
        action = "ran"
    else:
        action = "unchanged"
    return ReproOutcome(action, lines)


def commit(root: Path, targets: list[str], sink: LineSink | None = None) -> None:
    """Record stages that ran outside ``dvc repro`` (parallel sweeps): lock entries, cache and
    run cache, as if DVC had run them."""
    if targets:
        run(["commit", "--force", *targets], root, sink)


def dag(root: Path, fmt: str | None = None, target: str | None = None) -> str:
    args = ["dag"]
    if fmt:
        args.append(f"--{fmt}")
    if target:
        args.append(target)
    return capture(args, root)


def read_lock(path: Path) -> dict:
    from tasks.params import _yaml

    if not path.is_file():
        return {}
    return _yaml().load(path.read_text(encoding="utf-8")) or {}
