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
from dataclasses import dataclass, field
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
    repaired: list[str] = field(default_factory=list)  # damaged outputs found after a checkout


def _action(lines: list[str]) -> str:
    text = "\n".join(lines)
    if "skipping run, checking out outputs" in text:
        return "restored"  # DVC's run cache had this exact stage state: outputs checked out
    if "Running stage" in text:
        return "ran"
    return "unchanged"


def repro(root: Path, target: str, sink: LineSink | None = None, force: bool = False,
          run_cache: bool = True, warn: LineSink | None = None,
          env: dict[str, str] | None = None, params_sha256: str | None = None) -> ReproOutcome:
    """Bring one stage up to date (``dvc repro --single-item``) and say what DVC did.

    DVC checks out cached outputs without re-hashing them, so a damaged cache object would be
    copied in and then reported up to date. Whatever DVC did not compute itself (restored or
    checked out) is verified here against ``dvc.lock``; on a mismatch the bad cache objects are
    removed and the stage re-runs, with a warning (``warn``, and this module's log). ``env`` adds variables
    for DVC and the stages it runs (a sweep point's threads and GPUs).

    Parameters (issue 25): the values ``dvc.lock`` records for the stage must be the ones its
    manifest says it used. When the stage ran while ``params.yaml`` changed (``params_sha256``:
    the bytes the run wrote; or the two disagree), its ``dvc.lock`` entry and the run-cache entries
    it made are taken back and :class:`flows.run_lock.ParamsChanged` is raised. A restored or
    up-to-date stage that disagrees came from a poisoned run-cache entry: that entry is deleted
    and the stage re-runs, with a warning.
    """
    args = ["repro", "--single-item", target]
    if force:
        args.append("--force")
    if not run_cache:
        args.append("--no-run-cache")
    lock_file = _lock_location(root, target)[0]
    lock_before = lock_file.read_bytes() if lock_file.is_file() else None
    _, lines = run(args, root, sink, env=env)
    action = _action(lines)
    disagreement = params_disagreement(root, target)
    moved = params_sha256 is not None and _file_sha256(root / "params.yaml") != params_sha256
    if action == "ran" and (moved or disagreement):
        _take_back(root, target, lock_file, lock_before)
        from .run_lock import ParamsChanged, params_changed_message

        where = f"stage {target}" + (f": it used {disagreement[0]}" if disagreement else "")
        raise ParamsChanged(params_changed_message(root / "params.yaml", where))
    if disagreement:
        message = (f"{target}: DVC restored outputs whose manifest disagrees with the parameters dvc.lock records "
                   f"({disagreement[0]}): a poisoned run-cache entry; removed {drop_run_cache_entries(root, target)} "
                   "run-cache entry(ies), re-running the stage")
        log.warning("%s", message)
        if warn is not None:
            warn(message)
        _, more = run(["repro", "--single-item", "--force", "--no-run-cache", target], root, sink, env=env)
        still = params_disagreement(root, target)
        if still:
            from .run_lock import ParamsChanged, params_changed_message

            _take_back(root, target, lock_file, lock_before)
            raise ParamsChanged(params_changed_message(root / "params.yaml", f"stage {target}: it used {still[0]}"))
        lines, action = lines + more, "ran"
    if moved:
        from .run_lock import ParamsChanged, params_changed_message

        raise ParamsChanged(params_changed_message(root / "params.yaml", f"after stage {target}"))
    if action == "ran":
        return ReproOutcome(action, lines)
    damaged = damaged_outputs(root, target)
    if not damaged:
        return ReproOutcome(action, lines)
    described = [d.describe() for d in damaged]
    message = (f"{target}: damaged output after checkout: {'; '.join(described[:3])}"
               f"{f' (and {len(described) - 3} more)' if len(described) > 3 else ''}; "
               f"removed {drop_damaged(root, damaged)} bad cache object(s), re-running the stage")
    log.warning("%s", message)
    if warn is not None:
        warn(message)
    _, more = run(["repro", "--single-item", "--force", "--no-run-cache", target], root, sink, env=env)
    still = damaged_outputs(root, target)
    if still:
        raise DvcError(f"{target}: outputs still differ from dvc.lock after re-running: {still[0].describe()}")
    return ReproOutcome("ran", lines + more, described)


# ----------------------------------------------------------------------------- partial cache files

# A partial write younger than this may still be going on (a sweep point sharing the cache).
PARTIAL_MIN_AGE_S = 600.0


def clean_partial_cache_files(root: Path, min_age_s: float = PARTIAL_MIN_AGE_S) -> list[tuple[Path, int]]:
    """Delete DVC's partial cache files (``<object>.<token>.tmp``, written then renamed) that an
    interrupted write left behind (a full disk, a kill): nothing ever reads or removes them, and
    one can be the size of a model. Returns ``(path, bytes)`` of each one removed."""
    import time

    from .dvc_places import dvc_caches

    caches = dvc_caches(root)[:1]  # the cache itself; remotes are not ours to clean
    removed: list[tuple[Path, int]] = []
    now = time.time()
    for cache in caches:
        for path in [*cache.glob("files/md5/*/*.tmp"), *cache.glob("[0-9a-f][0-9a-f]/*.tmp")]:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if now - stat.st_mtime < min_age_s or not path.is_file():
                continue
            path.unlink(missing_ok=True)
            removed.append((path, stat.st_size))
    return removed


# ----------------------------------------------------------------------------- parameter agreement


def _file_sha256(path: Path) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _lock_entry(root: Path, address: str) -> tuple[dict, Path]:
    lock, name, base = _lock_location(root, address)
    return (read_lock(lock).get("stages") or {}).get(name) or {}, base


def _agrees(recorded, used) -> bool:
    """``recorded`` (a dvc.lock value: only the keys the parameter file holds) within ``used`` (the
    manifest's full section, defaults included)."""
    if isinstance(recorded, dict):
        return isinstance(used, dict) and all(k in used and _agrees(v, used[k]) for k, v in recorded.items())
    if isinstance(recorded, (list, tuple)):
        return isinstance(used, (list, tuple)) and len(recorded) == len(used) and all(
            _agrees(a, b) for a, b in zip(recorded, used))
    if recorded == used:
        return True
    try:  # "0.5" in the file is 0.5 to the validated parameters
        return float(recorded) == float(used)
    except (TypeError, ValueError):
        return str(recorded) == str(used)


def params_disagreement(root: Path, address: str) -> list[str]:
    """Where the parameters ``dvc.lock`` records for a stage differ from those its manifest says
    the stage used, as ``section.key: V (dvc.lock R)`` lines; [] when they agree or either is absent."""
    from tasks.common import read_manifest

    if ":" in address:  # sweep points: their own parameter files and point workspaces
        return []
    entry, base = _lock_entry(root, address)
    outs = entry.get("outs") or []
    if not outs or not entry.get("params"):
        return []
    manifest = read_manifest(base / outs[0]["path"]) or {}
    used = manifest.get("params")
    if not isinstance(used, dict):
        return []
    problems = []
    for values in entry["params"].values():
        for key, recorded in (values or {}).items():
            parts = str(key).split(".")
            at = max((i for i, part in enumerate(parts) if part in used), default=None)
            if at is None:
                continue
            value = used[parts[at]]
            for part in parts[at + 1:]:
                value = value.get(part) if isinstance(value, dict) else None
            if not _agrees(recorded, value):
                problems.extend(_differences(".".join(parts[at:]), recorded, value))
    return problems


def _differences(name: str, recorded, used) -> list[str]:
    if isinstance(recorded, dict) and isinstance(used, dict):
        return [line for k, v in recorded.items() for line in _differences(f"{name}.{k}", v, used.get(k))
                if not _agrees(v, used.get(k))]
    return [f"{name}={used!r} (dvc.lock records {recorded!r})"]


def _take_back(root: Path, address: str, lock_file: Path, before: bytes | None) -> None:
    """Undo what DVC recorded for a stage that ran on other parameters than the run's: its
    run-cache entries and its ``dvc.lock`` (the file as it was before the stage)."""
    from wanda.atomic import atomic_file

    dropped = drop_run_cache_entries(root, address)
    if before is None:
        lock_file.unlink(missing_ok=True)
    else:
        with atomic_file(lock_file, "wb") as handle:
            handle.write(before)
    log.warning("%s: took back dvc.lock and %d run-cache entry(ies) recorded with parameters it did not use",
                address, dropped)


def drop_run_cache_entries(root: Path, address: str) -> int:
    """Delete DVC run-cache entries that record the stage's current ``dvc.lock`` entry (same
    command, parameters and outputs): entries that would restore these outputs for those
    parameters. Returns how many were deleted."""
    from tasks.params import _yaml

    entry, _ = _lock_entry(root, address)
    outs = {(o.get("path"), o.get("md5")) for o in entry.get("outs") or []}
    if not outs:
        return 0
    runs = cache_dir(root) / "runs"
    removed = 0
    for path in runs.glob("*/*/*") if runs.is_dir() else []:
        try:
            cached = _yaml().load(path.read_text(encoding="utf-8")) or {}
        except Exception:  # noqa: BLE001 - a damaged entry is not ours to judge here
            continue
        if (cached.get("cmd") == entry.get("cmd") and cached.get("params") == entry.get("params")
                and {(o.get("path"), o.get("md5")) for o in cached.get("outs") or []} == outs):
            path.unlink(missing_ok=True)
            removed += 1
            for folder in (path.parent, path.parent.parent):  # DVC fails on an empty key folder
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty: other entries remain
    return removed


# ----------------------------------------------------------------------------- output verification


@dataclass
class Damage:
    """A workspace output file whose bytes are not the ones ``dvc.lock`` records."""

    path: str  # relative to the repository root
    expected: str | None  # md5 recorded (None: a file the recorded directory does not have)
    actual: str | None  # md5 found (None: missing from a directory that should hold it)

    def describe(self) -> str:
        if self.actual is None:
            return f"{self.path} is missing (dvc.lock records md5 {self.expected})"
        if self.expected is None:
            return f"{self.path} is not part of the recorded output"
        return f"{self.path} has md5 {self.actual}, dvc.lock records {self.expected}"


def _lock_location(root: Path, address: str) -> tuple[Path, str, Path]:
    """(lock file, stage name in it, folder its output paths are relative to) of a stage address."""
    if ":" not in address:
        return root / "dvc.lock", address, root
    dvcfile, name = address.rsplit(":", 1)
    pipeline = root / dvcfile
    stage = ((read_lock(pipeline).get("stages") or {}).get(name) or {}) if pipeline.is_file() else {}
    return pipeline.with_suffix(".lock"), name, (pipeline.parent / (stage.get("wdir") or ".")).resolve()


def damaged_outputs(root: Path, address: str) -> list[Damage]:
    """Every output of the stage at ``address`` present in the workspace whose bytes differ from
    its ``dvc.lock`` record (hashed now, never taken from DVC's state database). Missing outputs
    are not listed: DVC reports those itself."""
    from tasks.lineage import dir_listing, listing_md5, md5_file

    lock, name, base = _lock_location(root, address)
    entry = (read_lock(lock).get("stages") or {}).get(name) or {}
    damages: list[Damage] = []
    for out in entry.get("outs") or []:
        path, md5 = base / out["path"], out.get("md5")
        if not md5 or not path.exists():
            continue
        rel = os.path.relpath(path, root)
        if not md5.endswith(".dir"):
            actual = md5_file(path)
            if actual != md5:
                damages.append(Damage(rel, md5, actual))
            continue
        listing = dir_listing(path)
        if listing_md5(listing) == md5:
            continue
        recorded = _dir_object(root, md5)
        if recorded is None:  # the listing itself is gone or damaged: the folder as a whole
            damages.append(Damage(rel + "/", md5, listing_md5(listing)))
            continue
        have = {e["relpath"]: e["md5"] for e in listing}
        want = {e["relpath"]: e["md5"] for e in recorded}
        for relpath in sorted(set(have) | set(want)):
            if have.get(relpath) != want.get(relpath):
                damages.append(Damage(f"{rel}/{relpath}", want.get(relpath), have.get(relpath)))
    return damages


def cache_dir(root: Path) -> Path:
    """The DVC cache folder of the repository (``dvc cache dir``: it may be shared, elsewhere)."""
    return Path(capture(["cache", "dir"], root).strip().splitlines()[-1])


def _dir_object(root: Path, md5: str) -> list[dict] | None:
    """The ``.dir`` listing in the cache, if present and intact (its own hash matches)."""
    from tasks.lineage import cache_object, listing_md5

    for path in cache_object(cache_dir(root), md5):
        try:
            listing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(listing, list) and listing_md5(listing) == md5:
            return listing
    return None


def drop_damaged(root: Path, damages: list[Damage]) -> int:
    """Remove the cache objects of ``damages`` whose bytes do not hash to their name (the
    damaged copies DVC would restore again); return how many were removed."""
    from tasks.lineage import cache_object, listing_md5, md5_file

    removed = 0
    folder = cache_dir(root)
    for damage in damages:
        if damage.expected is None:
            continue
        for obj in cache_object(folder, damage.expected):
            if not obj.is_file():
                continue
            if damage.expected.endswith(".dir"):
                try:
                    intact = listing_md5(json.loads(obj.read_text(encoding="utf-8"))) == damage.expected
                except (OSError, ValueError):
                    intact = False
            else:
                intact = md5_file(obj) == damage.expected
            if not intact:
                obj.unlink()
                removed += 1
    return removed


def dag(root: Path, fmt: str | None = None, target: str | None = None) -> str:
    args = ["dag"]
    if fmt:
        args.append(f"--{fmt}")
    if target:
        args.append(target)
    return capture(args, root)


_LOCKS: dict[tuple[str, str], dict] = {}


def read_lock(path: Path) -> dict:
    """A lock file's contents, parsed once per process for as long as its bytes are the same
    (a pure-Python YAML parse of a lock file takes a good part of a second; ``status`` reads
    it once per stage); callers get their own copy."""
    import copy
    import hashlib

    from tasks.params import _yaml

    if not path.is_file():
        return {}
    data = path.read_bytes()
    key = (str(path.resolve()), hashlib.sha256(data).hexdigest())
    if key not in _LOCKS:
        _LOCKS[key] = _yaml().load(data.decode("utf-8")) or {}
    return copy.deepcopy(_LOCKS[key])
