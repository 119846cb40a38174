"""Bad input fails before any stage runs: exit 2, the parameter named with its allowed values,
params.yaml, dvc.lock and every artifact as they were (issue 14, item 5)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.pipeline_project import copy_project, sh

pytestmark = pytest.mark.integration


def _write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _calibration_file(data: bytes):
    def setup(root: Path) -> list[str]:
        _write(root, "fixtures/bad.txt", data)
        return ["-S", "calibration.source={path: fixtures/bad.txt}"]
    return setup


def _corrupt_model_config(root: Path) -> list[str]:
    _write(root, "fixtures/tiny-model/config.json", b'{"model_type": "llama", "hidden_size": ')
    return []


def _missing_shard(root: Path) -> list[str]:
    """A sharded checkpoint whose index names a shard the folder lacks (issue 25)."""
    import json

    _write(root, "fixtures/tiny-model/model.safetensors.index.json", json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}).encode())
    _write(root, "fixtures/tiny-model/model-00001-of-00002.safetensors", b"x" * 64)
    return []


def _symlinked_folder(root: Path) -> list[str]:
    """artifacts/masks replaced by a link to a folder outside the workspace (issue 25): DVC
    changed the target's mode to 777 before failing with its raw message."""
    import os
    import shutil

    outside = root.parent / "outside-masks"
    shutil.copytree(root / "artifacts/masks", outside)
    os.chmod(outside, 0o755)
    shutil.rmtree(root / "artifacts/masks")
    (root / "artifacts/masks").symlink_to(outside, target_is_directory=True)
    return ["-S", "masks.sparsity=0.6"]


CASES = {
    "missing-shard": (_missing_shard, "model.source: model.safetensors.index.json in "),
    "huge-seqlen": (lambda root: ["-S", "calibration.seqlen=100000"],
                    "calibration.seqlen: 100000 exceeds the model's context of 256 tokens"),
    "symlinked-folder": (_symlinked_folder, "paths.masks: artifacts/masks is a symbolic link to "),
    "calibration-seqlen": (lambda root: ["-S", "calibration.seqlen=4096"],
                           "calibration.seqlen: 4096 exceeds the model's context of 256 tokens (allowed: 2..256)"),
    "evaluation-seqlen": (lambda root: ["-S", "evaluate.perplexity.seqlen=300"],
                          "evaluate.perplexity.seqlen: 300 exceeds the model's context of 256 tokens (allowed: 2..256)"),
    "empty-text": (_calibration_file(b""), "calibration.source.path: "),
    "ten-bytes": (_calibration_file(b"w1 w2 w3 w"), "calibration.source: too little calibration text"),
    "binary": (_calibration_file(bytes(range(256)) * 4), "is not UTF-8 text (byte 0x80 at offset 128 of 1024)"),
    "one-word": (_calibration_file(b"w7\n"), "calibration.source: too little calibration text"),
    "corrupt-config": (_corrupt_model_config, "model.source: "),
    "unknown-target": (lambda root: ["--target", "maks"], "--target: unknown stage 'maks' (allowed: materialize, "),
    "tracking-typo": (lambda root: ["-S", "tracking.experimnt=x"],
                      "tracking.experimnt: unknown parameter (allowed: tracking_uri, "),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the workspace but the fixtures the case itself wrote: size and mtime."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith((".git/", "fixtures/")):
            stat = path.stat()
            files[rel] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_any_stage_and_changes_nothing(tmp_path, case):
    root = copy_project(tmp_path / "p")
    setup, expected = CASES[case]
    args = setup(root)
    before = _snapshot(root)
    params = (root / "params.yaml").read_bytes()
    result = sh(root, sys.executable, "-m", "flows.cli", "run", "--no-track", *args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanda-pipeline: invalid parameters: "), result.stderr[-2000:]
    assert expected in lines[0] and "(allowed: " in lines[0]
    assert "Traceback" not in result.stderr
    assert "Starting temporary server" not in result.stdout + result.stderr  # before Prefect started
    assert (root / "params.yaml").read_bytes() == params
    assert _snapshot(root) == before  # dvc.lock, artifacts, the DVC cache: untouched
    outside = root.parent / "outside-masks"
    if outside.exists():  # nothing outside the workspace changed either
        assert oct(outside.stat().st_mode & 0o777) == oct(0o755)
        assert all(oct(p.stat().st_mode & 0o777) != oct(0o777) for p in outside.rglob("*"))
