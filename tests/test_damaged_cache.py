"""A damaged DVC cache object is never restored silently (issue 14, item 2): ``run`` verifies what
DVC checked out against dvc.lock, drops the bad object, re-runs the stage and says so; ``status``
reports a damaged output as damaged."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tasks.params import read_yaml
from tests.pipeline_project import copy_project, dvc, sh

pytestmark = pytest.mark.integration

MASKS = "artifacts/masks/masks.safetensors"


def _cli(root: Path, *args: str):
    return sh(root, sys.executable, "-m", "flows.cli", *args, check=False)


def _cache_object(root: Path, md5: str) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _damage_cached_masks(root: Path) -> tuple[Path, bytes]:
    """Flip one byte of the cached copy of the masks file; returns (object, original bytes)."""
    (out,) = read_yaml(root / "dvc.lock")["stages"]["masks"]["outs"]
    listing = json.loads(_cache_object(root, out["md5"]).read_text())
    (entry,) = [e for e in listing if e["relpath"] == "masks.safetensors"]
    obj = _cache_object(root, entry["md5"])
    original = obj.read_bytes()
    stat = obj.stat()
    os.chmod(obj, 0o644)  # DVC keeps cache objects read-only
    with open(obj, "r+b") as handle:  # in place, as bit rot would: same inode, size and mtime
        handle.seek(len(original) // 2)
        handle.write(bytes([original[len(original) // 2] ^ 0x01]))
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.chmod(obj, stat.st_mode)
    return obj, original


def test_status_reports_a_damaged_checkout(tmp_path):
    root = copy_project(tmp_path / "p")
    _damage_cached_masks(root)
    (root / MASKS).unlink()
    dvc(root, "checkout", "masks")  # plain DVC copies the damaged object in without a word
    out = _cli(root, "status", "--exit-code")
    assert out.returncode == 1
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert " damaged " in rows["masks"] and f"{MASKS} has md5" in rows["masks"], out.stdout
    assert " cached " in rows["statistics"]


def test_run_drops_the_damaged_object_and_rebuilds(tmp_path):
    root = copy_project(tmp_path / "p")
    obj, original = _damage_cached_masks(root)
    (root / MASKS).unlink()
    result = _cli(root, "run", "--no-track")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert f"masks: damaged output after checkout: {MASKS} has md5" in text
    assert "re-running the stage" in text
    assert (root / MASKS).read_bytes() == original  # rebuilt, bit for bit the recorded artifact
    assert obj.read_bytes() == original  # the cache holds the good object again
    assert _cli(root, "status", "--exit-code").returncode == 0
