"""Safetensors headers without the tensors: read a model folder's, write a header-only stand-in.

``trtllm-bench --model_path DIR`` counts the model's parameters from the safetensors *headers* in
DIR (TensorRT-LLM ``tensorrt_llm/bench/build/dataclasses.py``: ``ModelConfig.get_param_count`` ->
``get_safetensors_metadata`` -> ``parse_safetensors_file_metadata``, which reads the 8-byte
little-endian header length and the JSON header, and nothing after it) and raises when DIR has
neither ``model.safetensors`` nor ``model.safetensors.index.json``. With the TensorRT backend the
weights come from the engine, so the folder needs headers only: :func:`write_header_only` writes a
``model.safetensors`` whose header describes every tensor of the pruned model, in the engine's
dtype, with offsets laid out as a real file's would be, and no data section. It says so in its
``__metadata__``; a reader that wants the tensors themselves (``safetensors.safe_open``) refuses
it, loudly, as a truncated file, which is the point: it can never pass for the weights.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import WandaError

SINGLE_FILE = "model.safetensors"  # huggingface_hub.constants.SAFETENSORS_SINGLE_FILE
INDEX_FILE = "model.safetensors.index.json"  # huggingface_hub.constants.SAFETENSORS_INDEX_FILE
MAX_HEADER_BYTES = 25_000_000  # huggingface_hub.constants.SAFETENSORS_MAX_HEADER_LENGTH
# dtype name (HF config / TensorRT-LLM) -> safetensors dtype code and bytes per element.
ST_DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}
HEADER_ONLY_NOTE = ("header-only stand-in written by wanda-pipeline for trtllm-bench --model_path: tensor names, "
                    "shapes and dtype of the pruned model, no tensor data")


class SafetensorsHeaderError(WandaError, ValueError):
    """A model folder whose safetensors headers cannot be read."""


def read_header(path: str | Path) -> dict:
    """The JSON header of one safetensors file (reads only its first 8 + N bytes)."""
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise SafetensorsHeaderError(f"{path}: shorter than a safetensors header length (8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES:
            raise SafetensorsHeaderError(f"{path}: safetensors header of {size} bytes (at most {MAX_HEADER_BYTES})")
        text = handle.read(size)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SafetensorsHeaderError(f"{path}: safetensors header is not JSON ({exc})") from exc


def read_tensor_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    """Every tensor name -> shape of a model folder (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    if (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    elif (model_dir / INDEX_FILE).is_file():
        weight_map = json.loads((model_dir / INDEX_FILE).read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    else:
        raise SafetensorsHeaderError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    shapes: dict[str, list[int]] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name != "__metadata__":
                shapes[name] = [int(d) for d in info["shape"]]
    if not shapes:
        raise SafetensorsHeaderError(f"{model_dir}: its safetensors headers list no tensors")
    return shapes


def write_header_only(path: str | Path, shapes: dict[str, list[int]], dtype: str) -> int:
    """Write a header-only ``model.safetensors`` describing ``shapes`` in ``dtype``; returns the
    parameter count its header describes (what trtllm-bench will count)."""
    if dtype not in ST_DTYPES:
        raise SafetensorsHeaderError(f"dtype {dtype!r} is not one of {', '.join(ST_DTYPES)}")
    code, item = ST_DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt", "wanda_pipeline": HEADER_ONLY_NOTE}}
    offset = params = 0
    for name in sorted(shapes):  # sorted: the same header bytes for the same model, run after run
        count = 1
        for dim in shapes[name]:
            count *= dim
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + count * item]}
        offset += count * item
        params += count
    text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes with spaces
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text)
    return params
