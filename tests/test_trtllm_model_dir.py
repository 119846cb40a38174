"""The folder handed to ``trtllm-bench --model_path``: what TensorRT-LLM reads from it, it finds.

TensorRT-LLM 1.2 (``tensorrt_llm/bench/build/dataclasses.py``, ``parse_safetensors_file_metadata``)
builds huggingface_hub's ``SafetensorsFileMetadata``/``TensorInfo`` from the header alone and sums
their ``parameter_count``; here the same classes read our header-only file.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo
from safetensors.torch import save_file

from tests.tiny import tiny_model, tiny_tokenizer
from wanda.errors import ConfigError
from wanda.export.safetensors_header import SafetensorsHeaderError, read_header, read_tensor_shapes
from wanda.export.tokenizer_compat import write_trtllm_model_dir
from wanda.model_io import save_model


def _as_trtllm_reads(path) -> SafetensorsFileMetadata:
    """parse_safetensors_file_metadata of TensorRT-LLM 1.2, on our file."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size).decode(errors="ignore"))
    return SafetensorsFileMetadata(
        metadata=header.get("__metadata__", {}),
        tensors={k: TensorInfo(dtype=t["dtype"], shape=t["shape"], data_offsets=tuple(t["data_offsets"]))
                 for k, t in header.items() if k != "__metadata__"})


@pytest.mark.parametrize("dtype,code", [("float16", "F16"), ("bfloat16", "BF16")])
def test_header_only_safetensors_counts_the_pruned_models_parameters(tmp_path, dtype, code):
    model = tiny_model()
    save_model(model, tiny_tokenizer(), tmp_path / "pruned")
    out = write_trtllm_model_dir(tmp_path / "pruned", tmp_path / "bench", dtype=dtype)
    meta = _as_trtllm_reads(out / "model.safetensors")
    assert meta.parameter_count == {code: model.num_parameters()}  # tied lm_head counted once, as HF stores it
    assert "header-only" in meta.metadata["wanda_pipeline"]
    ends = sorted(t.data_offsets for t in meta.tensors.values())
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # laid out as a real file
    assert ends[-1][1] == 2 * model.num_parameters()
    size = struct.unpack("<Q", (out / "model.safetensors").read_bytes()[:8])[0]
    assert (out / "model.safetensors").stat().st_size == 8 + size and size % 8 == 0  # no data section
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == dtype
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(Exception):  # never mistaken for the weights: safetensors refuses the truncated file
        from safetensors import safe_open
        with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
            handle.get_tensor(next(iter(meta.tensors)))


def test_sharded_model_and_refusals(tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.zeros(2, 3)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(5)}, str(sharded / "model-00002-of-00002.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert read_tensor_shapes(sharded) == {"a": [2, 3], "b": [5]}
    assert read_header(sharded / "model-00002-of-00002.safetensors")["b"]["dtype"] == "F32"
    with pytest.raises(SafetensorsHeaderError, match="neither model.safetensors nor"):
        read_tensor_shapes(tmp_path)
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "pruned")
    with pytest.raises(ConfigError, match=r"dtype: 'float32' is not an engine dtype \(allowed: float16, bfloat16\)"):
        write_trtllm_model_dir(tmp_path / "pruned", tmp_path / "bench", dtype="float32")
    assert not (tmp_path / "bench").exists()
