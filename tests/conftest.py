"""Shared fixtures: offline settings, tiny random models, the embedded model and shared data."""
from __future__ import annotations

from tasks.offline import apply_offline_env

apply_offline_env()  # before torch, transformers and datasets are imported

import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# Temporary Prefect servers keep their database in PREFECT_HOME: one per test process, so two
# pytest-xdist workers never migrate or write one SQLite file at once (nor the user's ~/.prefect).
if "PREFECT_HOME" not in os.environ:
    import atexit
    import shutil

    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="wanda-test-prefect-home-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import tiny_model, tiny_tokenizer  # noqa: E402,F401
from wanda.data import shared_data_dir  # noqa: E402

SHARED = shared_data_dir()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder absent: {SHARED} (set WANDA_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M, materialized once per test run: under pytest-xdist the
    workers share one copy (the first to take the lock writes it, into a folder renamed into
    place when complete, so no worker ever reads half a model)."""
    import shutil

    from filelock import FileLock

    from wanda.model_io import EMBEDDED_DEFAULT, materialize

    try:
        from wanda.model_io import embedded_gguf

        embedded_gguf(EMBEDDED_DEFAULT.split(":", 1)[1])
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"embedded model unavailable: {exc}")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is a folder of the run's one
        base = base.parent
    out = base / "embedded" / "model"
    with FileLock(str(base / "embedded.lock")):
        if not out.is_dir():
            partial = base / "embedded" / "model.partial"
            shutil.rmtree(partial, ignore_errors=True)
            materialize(EMBEDDED_DEFAULT, partial)
            partial.rename(out)
    return out


@pytest.fixture
def llama64():
    """A tiny float64 LLaMA: float64 makes score ties from rounding practically impossible."""
    torch.manual_seed(0)
    return tiny_model("llama", dtype=torch.float64)


# The longest test files (minutes each on a 2-core machine, measured under `make test`), longest
# first. pytest-xdist hands whole files to whichever worker is free in collection order (with
# --no-loadscope-reorder; its own default puts files with many tests first, which leaves the few
# long integration files for the end, run by one worker while the other idles).
SLOW_FILES = (
    "test_sweep_distributed.py", "test_one_run_params.py", "test_regression_figures.py", "test_deploy_servers.py",
    "test_release_safety.py", "test_regression_oracles.py", "test_savings.py", "test_early_cutoff.py",
    "test_pipeline_prefect.py", "test_preflight_cli.py", "test_progress.py", "test_pipeline_dvc.py",
    "test_serving_stages.py", "test_processes.py", "test_damaged_cache.py", "test_tracking.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: file order kept otherwise
