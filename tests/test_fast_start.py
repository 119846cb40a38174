"""Fast start: what needs no tensor imports no torch (issue 20, item 4).

Each check runs in a fresh interpreter (this test process has torch already), so it sees exactly
what an import or a stage process pulls in.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers")


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    return env


def _loaded_after(code: str) -> set[str]:
    """Top-level modules imported by ``code`` in a fresh interpreter started in the repository."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import wanda",
    "import wanda.errors",
    "import wanda.config, wanda.calibration_config, wanda.evaluation.perplexity_config, wanda.export.engine",
    "import tasks.params",
    "from tasks.params import load_params; load_params('params.yaml')",  # validation too (method registry)
    "import flows.cli",
    "import tasks.common, tasks.export_24, tasks.engine, tasks.benchmark",
])
def test_no_torch_until_a_tensor_is_needed(code):
    loaded = _loaded_after(code)
    assert not loaded & set(HEAVY), f"{code!r} imported {sorted(loaded & set(HEAVY))}"


def test_a_tensor_still_brings_torch():
    """The probe can fail: using a name that needs torch imports it."""
    assert "torch" in _loaded_after("import wanda; wanda.sparsity_report")


def test_parameter_error_names_the_method_registry_without_torch():
    code = ("from tasks.params import load_params\nfrom wanda.errors import ConfigError\n"
            "try:\n    load_params('params.yaml', ['masks.method=nope'])\nexcept ConfigError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code + "import sys; print('torch' in sys.modules)"], cwd=REPO,
                         env=_env(), capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "masks.method: Input should be 'wanda', 'magnitude', 'sparsegpt' or 'ria'", out
    assert out[1] == "False"


@pytest.mark.parametrize("package", ["wanda", "wanda.evaluation", "wanda.export"])
def test_lazy_exports_match_their_declared_imports(package):
    """Each lazily re-exported name resolves, to the object its module defines, and the runtime
    table equals the ``TYPE_CHECKING`` imports (what type checkers and the code closure read)."""
    import importlib

    module = importlib.import_module(package)
    declared: dict[str, set[str]] = {}
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.level == 1
                declared["." + stmt.module] = {alias.name for alias in stmt.names}
    assert declared == {name: set(names) for name, names in module._EXPORTS.items()}
    assert {name for names in declared.values() for name in names} == set(module.__all__)
    for source, names in declared.items():
        owner = importlib.import_module(source, package)
        for name in names:
            assert getattr(module, name) is getattr(owner, name)
    with pytest.raises(AttributeError):
        getattr(module, "no_such_name")


def _finished_prune(root: Path, pattern: str) -> None:
    """A workspace whose prune stage finished (its manifest is all a skipping stage reads)."""
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    folder = root / "artifacts" / "prune"
    folder.mkdir(parents=True)
    manifest = {"schema": "wanda-stage-manifest/1", "stage": "prune", "status": "completed", "reason": None,
                "outputs": {}, "lineage": {}, "summary": {"recipe": {"pattern": pattern}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_skipped_stages_import_no_torch(tmp_path):
    """export_24, engine and benchmark decide from their upstream manifests; when pruning is not
    2:4 (and there is no GPU) each process writes "skipped" without importing torch or transformers."""
    _finished_prune(tmp_path, "unstructured")
    for stage in ("export_24", "engine", "benchmark"):
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", f"tasks.{stage}", "--root", str(tmp_path)],
                             cwd=REPO, env=_env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                    if line.startswith("import time:")}
        assert imported, "no -X importtime lines: the check would pass vacuously"
        assert not imported & set(HEAVY), f"{stage} imported {sorted(imported & set(HEAVY))}"
        manifest = json.loads((tmp_path / "artifacts" / stage / "manifest.json").read_text())
        assert manifest["status"] == "skipped", manifest


def test_preflight_remembers_passed_model_checks_by_content(tmp_path):
    """A cached run's pre-flight skips the tokenizer and model-config checks (transformers, torch)
    it passed before on the same bytes, and runs them again when a text they read changes."""
    from tests.pipeline_project import make_project

    root = make_project(tmp_path / "p")
    probe = ("import sys\nfrom pathlib import Path\nfrom flows.prepare import preflight\n"
             "from tasks.params import load_params\nroot = Path('.').resolve()\n"
             "preflight(load_params(root / 'params.yaml'), root)\nprint('transformers' in sys.modules)")

    def checked() -> bool:  # whether this pre-flight loaded the tokenizer
        out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=_env(), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.strip().splitlines()[-1] == "True"

    assert checked()  # first time: the checks run
    assert (root / ".cache" / "wanda-preflight.json").is_file()
    assert not checked()  # same bytes: remembered
    text = root / "fixtures" / "calib.txt"
    text.write_text(text.read_text() + " w1 w2")
    assert checked()  # the calibration text changed: checked again
    assert not checked()
