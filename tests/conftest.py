"""Shared fixtures: offline settings, tiny random models, the embedded model and shared data."""
from __future__ import annotations

from tasks.offline import apply_offline_env

apply_offline_env()  # before torch, transformers and datasets are imported

from pathlib import Path  # noqa: E402

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
    """The embedded SmolLM2-135M, materialized once per test session."""
    from wanda.model_io import EMBEDDED_DEFAULT, materialize

    try:
        from wanda.model_io import embedded_gguf

        embedded_gguf(EMBEDDED_DEFAULT.split(":", 1)[1])
    except Exception as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"embedded model unavailable: {exc}")
    out = tmp_path_factory.mktemp("embedded") / "model"
    return materialize(EMBEDDED_DEFAULT, out).path


@pytest.fixture
def llama64():
    """A tiny float64 LLaMA: float64 makes score ties from rounding practically impossible."""
    torch.manual_seed(0)
    return tiny_model("llama", dtype=torch.float64)
