"""Materialization and fingerprints."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_model, tiny_tokenizer
from wanda.errors import ArtifactMismatchError, ConfigError
from wanda.model_io import fingerprint, load_model, materialize, read_materialized, resolve_source, save_model


def test_save_and_reload_tiny_model(tmp_path):
    model = tiny_model()
    record = save_model(model, tiny_tokenizer(), tmp_path / "m")
    assert record.fingerprint == fingerprint(tmp_path / "m") == read_materialized(tmp_path / "m", verify=True).fingerprint
    loaded, tok = load_model(str(tmp_path / "m"))
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    # Materializing a local directory again gives the same bytes, hence the same fingerprint.
    again = materialize(str(tmp_path / "m"), tmp_path / "m2")
    assert again.fingerprint == record.fingerprint


def test_tampered_weights_are_detected(tmp_path):
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError):
        read_materialized(tmp_path / "m", verify=True)


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.source"):
        resolve_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ConfigError, match="path not found"):
        resolve_source("./no/such/dir")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_source("meta-llama/Llama-2-7b-hf")
    with pytest.raises(ConfigError, match="unknown embedded"):
        resolve_source("embedded:gpt-5")
