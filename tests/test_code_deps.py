"""Stage code dependencies are the import closure of each stage's entry module (issue 14, item 1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tasks import graph
from tasks.imports import closure

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_depends_on_exactly_the_code_it_imports():
    pipeline = graph.main_pipeline()["stages"]
    for spec in graph.STAGES:
        files = [d for d in pipeline[spec.name]["deps"] if not d.startswith("${")]
        assert files == list(closure(spec.entry)), spec.name
    masks = graph.stage("masks").code_files
    # tasks/masks.py imports these (one inside a function); the hand-made list had neither.
    assert "wanda/plots.py" in masks and "wanda/calibration.py" in masks
    assert "wanda/export/bench_trtllm.py" not in masks  # nothing the masks stage imports reaches it


def test_closure_follows_function_local_relative_and_package_imports(tmp_path):
    files = {
        "tasks/__init__.py": "",
        "tasks/entry.py": "import os\nfrom . import helper\n\ndef run():\n    from wanda.deep import thing\n",
        "tasks/helper.py": "from wanda import exported\n",
        "wanda/__init__.py": "from .reexported import exported\n",
        "wanda/reexported.py": "exported = 1\n",
        "wanda/deep/__init__.py": "from ..unused_by_entry import x\n",
        "wanda/deep/thing.py": "from ..leaf import y\n",
        "wanda/leaf.py": "y = 2\n",
        "wanda/unused_by_entry.py": "x = 3\n",
        "wanda/never.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert closure("tasks.entry", tmp_path) == (
        "tasks/entry.py", "tasks/helper.py", "wanda/__init__.py", "wanda/deep/thing.py", "wanda/leaf.py",
        "wanda/reexported.py")


def test_dvc_yaml_check_names_the_stage_and_the_missing_file(tmp_path):
    text = (REPO / "dvc.yaml").read_text()
    assert text == graph.main_dvc_yaml(), "run `python -m flows.cli dvc-yaml`"
    (tmp_path / "dvc.yaml").write_text(text.replace("      - wanda/plots.py\n", "", 1))
    result = subprocess.run([sys.executable, "-m", "flows.cli", "--repo", str(tmp_path), "dvc-yaml", "--check"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "stage masks: deps lack wanda/plots.py (imported by tasks.masks or its imports)" in result.stderr


def _copy_code(dest: Path) -> None:
    import shutil

    for package in ("wanda", "tasks", "flows"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", dest / "dvc.yaml")


def test_a_method_dropped_into_the_methods_package_is_a_dependency_of_the_masks_stage(tmp_path):
    """wanda/methods/__init__.py imports every module of its folder (pkgutil): a new method file is
    a code dependency of tasks.masks the moment it exists, and the generated dvc.yaml goes stale."""
    _copy_code(tmp_path)
    assert "wanda/methods/zz_probe.py" not in closure("tasks.masks", tmp_path)
    (tmp_path / "wanda" / "methods" / "zz_probe.py").write_text("PROBE = 1\n")
    closure.cache_clear()
    try:
        deps = closure("tasks.masks", tmp_path)
    finally:
        closure.cache_clear()
    assert "wanda/methods/zz_probe.py" in deps
    # the stage in the copy's own dvc.yaml is now stale, and the check says which file it lacks
    result = subprocess.run([sys.executable, "-m", "flows.cli", "dvc-yaml", "--check"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "stage masks: deps lack wanda/methods/zz_probe.py" in result.stderr


def test_a_computed_import_is_refused_by_name(tmp_path):
    from tasks.imports import DynamicImportError

    files = {
        "tasks/__init__.py": "",
        "tasks/entry.py": "import importlib\n\ndef load(name):\n    return importlib.import_module(name)\n",
        "wanda/__init__.py": "",
        "wanda/plugins/__init__.py": ("import importlib, pkgutil\nfor m in pkgutil.iter_modules(__path__):\n"
                                      "    importlib.import_module(f'{__name__}.{m.name}')\n"),
        "wanda/plugins/one.py": "", "wanda/plugins/sub/__init__.py": "", "wanda/plugins/sub/deep.py": "",
        "tasks/uses.py": "import wanda.plugins\nimport importlib\nimportlib.import_module('wanda.leaf')\n",
        "wanda/leaf.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    import pytest

    with pytest.raises(DynamicImportError, match=r"tasks/entry.py:4: importlib.import_module\(name\)"):
        closure("tasks.entry", tmp_path)
    # a folder walk covers its own modules (one level for iter_modules); a constant name resolves
    assert closure("tasks.uses", tmp_path) == (
        "tasks/uses.py", "wanda/leaf.py", "wanda/plugins/__init__.py", "wanda/plugins/one.py",
        "wanda/plugins/sub/__init__.py")
