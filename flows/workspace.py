"""Isolated point workspaces: each sweep point runs in its own checkout, sharing the DVC cache.

DVC holds one lock per repository, so two points in one working tree would wait for each other.
A point's workspace is a ``git clone --shared`` of the main workspace at its commit, with the main
workspace's uncommitted files (params.yaml, dvc.lock, the generated ``sweeps/NAME/`` files) laid
over it, and the main workspace's DVC cache as its cache (``dvc cache dir --local``). There the
point's stages run through ``dvc repro`` like anywhere else: DVC writes their outputs and its run
cache entries into the shared cache. Back in the main workspace one ``dvc repro`` of the same
stages then finds each in the run cache and checks its outputs out: ``dvc.lock``, cache and run
cache end exactly as a local ``dvc repro`` would leave them, without a hand-made commit.

A worker reaches the main checkout and the cache by path: same host, or a shared filesystem
mounted at the same path on every worker (docs/operations.md). A workspace is deleted when its
point finishes or fails; one left behind by a killed worker holds nothing the main workspace
reads (outputs only count once DVC committed them to the cache, atomically).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import dvc

log = logging.getLogger(__name__)

_RAN = re.compile(r"Running stage '([^']+)'")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")
# Uncommitted files travel with the point; more than this is someone's data in the wrong place.
_OVERLAY_LIMIT = 64 * 2**20


@dataclass
class Snapshot:
    """What a point's workspace is made from: the main workspace at this moment."""

    root: str  # the main workspace, absolute
    commit: str
    cache: str  # the main workspace's DVC cache folder, absolute
    shared: list[str]  # shared stage addresses whose outputs the points read
    overlay: dict[str, bytes] = field(default_factory=dict)  # uncommitted files: their bytes now
    deleted: list[str] = field(default_factory=list)


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=dvc.environment())
    if result.returncode != 0:
        raise RuntimeError(f"`git {' '.join(args)}` in {root} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def snapshot(root: Path, shared: list[str]) -> Snapshot:
    """The main workspace as points must see it; fails if it is not a git checkout with a commit."""
    try:
        commit = _git(root, "rev-parse", "--verify", "HEAD").strip()
    except RuntimeError as exc:
        raise RuntimeError(f"remote sweep points clone the main workspace's git commit, but {root} has none: "
                           f"commit the project first ({exc})") from None
    changed = [p for p in _git(root, "ls-files", "-z", "-m", "-o", "--exclude-standard").split("\0") if p]
    overlay, deleted = {}, []
    for rel in dict.fromkeys(changed):
        path = root / rel
        if path.is_file():
            overlay[rel] = path.read_bytes()
        elif not path.exists():
            deleted.append(rel)
    size = sum(len(b) for b in overlay.values())
    if size > _OVERLAY_LIMIT:
        raise RuntimeError(f"{size / 2**20:.0f} MiB of uncommitted, not ignored files in {root} would travel to "
                           f"every point: commit them, track them with DVC or ignore them")
    cache = dvc.capture(["cache", "dir"], root).strip().splitlines()[-1].strip()
    return Snapshot(str(root), commit, str((root / cache).resolve()), shared, overlay, deleted)


def workspaces_root(configured: str | None) -> Path:
    from .runners import WORKSPACES_ENV

    return Path(configured or os.environ.get(WORKSPACES_ENV) or Path(tempfile.gettempdir()) / "wanda-workspaces")


@contextmanager
def workspace(source: Snapshot, label: str, base: Path) -> Iterator[Path]:
    """A fresh workspace for one point, deleted afterwards whatever happens."""
    for needed, what in ((source.root, "main workspace"), (source.cache, "DVC cache")):
        if not Path(needed).is_dir():
            raise RuntimeError(f"the {what} {needed} is not reachable from this worker: run workers on the same "
                               "host or mount it at the same path (docs/operations.md)")
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{_safe(label)}-{uuid.uuid4().hex[:8]}"
    try:
        _git(base, "clone", "--quiet", "--shared", "--no-checkout", source.root, str(path))
        _git(path, "checkout", "--quiet", "--detach", source.commit)
        for rel, data in source.overlay.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(data)
        for rel in source.deleted:
            (path / rel).unlink(missing_ok=True)
        dvc.run(["cache", "dir", "--local", source.cache], path)
        # Links instead of copies where the filesystem allows: a 7B base model is not copied per point.
        dvc.run(["config", "--local", "cache.type", "reflink,hardlink,copy"], path)
        if source.shared:
            dvc.run(["checkout", *source.shared], path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:150]


def adopt(root: Path, addresses: list[str], sink=None) -> dict[str, str]:
    """Bring stages that ran in point workspaces into the main workspace through DVC itself:
    ``dvc repro`` finds each in the (shared) run cache and checks its outputs out, writing
    ``dvc.lock`` as a local run would. Returns ``{address: "restored" | "ran" | "unchanged"}``;
    "ran" means the run cache had no entry (the stage was computed again here) and is logged loudly."""
    if not addresses:
        return {}
    started = time.perf_counter()
    _, lines = dvc.run(["repro", "--single-item", *addresses], root, sink)
    text = "\n".join(lines)
    ran, restored = set(_RAN.findall(text)), set(_RESTORED.findall(text))
    actions = {a: "ran" if a in ran else "restored" if a in restored else "unchanged" for a in addresses}
    again = [a for a, act in actions.items() if act == "ran"]
    if again:
        log.warning("%d stage(s) computed in a point workspace were not in DVC's run cache and ran again in the "
                    "main workspace: %s", len(again), ", ".join(again))
    log.info("adopted %d point stage(s) into %s in %.1fs", len(addresses), root, time.perf_counter() - started)
    return actions
