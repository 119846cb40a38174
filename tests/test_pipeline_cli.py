"""The ``wanda-pipeline`` command line: exit codes, one-line errors, status and dag."""
from __future__ import annotations

import sys

import pytest

from tests.pipeline_project import copy_project, dvc, sh

pytestmark = pytest.mark.integration


def _cli(root, *args):
    return sh(root, sys.executable, "-m", "flows.cli", *args, check=False)


def test_invalid_parameter_fails_fast_with_one_line(tmp_path):
    root = copy_project(tmp_path / "p")
    result = _cli(root, "run", "-S", "masks.sparsity=1.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["wanda-pipeline: invalid parameters: masks.sparsity: Input should be less than 1"]
    assert "Starting temporary server" not in result.stdout + result.stderr  # failed before Prefect started
    sweep = _cli(root, "sweep", "-A", "model.dtype=float16,float32")
    assert sweep.returncode == 2 and "cannot be swept" in sweep.stderr


def test_status_says_cached_stale_or_missing_and_why(tmp_path):
    root = copy_project(tmp_path / "p")
    clean = _cli(root, "status", "--exit-code")
    assert clean.returncode == 0 and all(" cached " in line for line in clean.stdout.splitlines()[1:])
    from tests.pipeline_project import set_params

    set_params(root, "masks.sparsity=0.6")
    import shutil

    shutil.rmtree(root / "artifacts/calibration")
    out = _cli(root, "status", "--exit-code")
    assert out.returncode == 1
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "missing" in rows["calibration"] and "output deleted: artifacts/calibration" in rows["calibration"]
    assert "parameter masks.sparsity: 0.5 -> 0.6" in rows["masks"]
    assert "stale (upstream)" in rows["prune"]
    assert " cached " in rows["materialize"]


def test_dag_shows_the_graph(tmp_path):
    root = copy_project(tmp_path / "p")
    out = _cli(root, "dag", "--mermaid")
    assert out.returncode == 0 and "materialize" in out.stdout and "benchmark" in out.stdout
    assert _cli(root, "dvc-yaml", "--check").returncode == 0
    assert dvc(root, "dag").returncode == 0
