"""The model folder handed to ``trtllm-bench``: readable by the transformers TensorRT-LLM 1.2 pins.

``trtllm-bench --model_path DIR`` (TensorRT-LLM 1.2, ``latency`` and ``throughput``) first calls
``get_model_config(model, DIR)`` (``tensorrt_llm/bench/build/build.py``): ``AutoConfig`` on
``DIR/config.json`` and the parameter count from the safetensors headers in DIR
(:mod:`wanda.export.safetensors_header` says what it reads), then loads the tokenizer with
``AutoTokenizer.from_pretrained(DIR)`` under transformers 4.57.1 (TensorRT-LLM 1.2's
requirements.txt pins ``transformers==4.57.1``). So the folder holds:

- ``config.json`` with ``dtype`` (and ``torch_dtype``) set to the *engine's* dtype (float16 or
  bfloat16), not the float32 the pruned model was saved in;
- a header-only ``model.safetensors``: the pruned model's tensor names and shapes in that dtype,
  no data (the TensorRT backend runs the engine; without any safetensors file
  ``get_safetensors_metadata`` raises "is not a safetensors repo");
- a tokenizer 4.57 loads: a folder saved by transformers 5 says ``"tokenizer_class":
  "TokenizersBackend"``, a class 4.57 does not have; ours names ``PreTrainedTokenizerFast``, the
  class that loads ``tokenizer.json`` exactly as it is in every transformers version (a family
  class such as ``LlamaTokenizerFast`` would rebuild the post-processor and could add a BOS token
  ours does not), and drops the keys only transformers 5 writes.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import ConfigError, WandaError
from .safetensors_header import SINGLE_FILE, read_tensor_shapes, write_header_only

log = logging.getLogger(__name__)

LEGACY_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
COPIED = ("generation_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja")
# The dtypes a TensorRT-LLM 1.2 engine of ours is built in (export_24.dtype).
ENGINE_DTYPES = ("float16", "bfloat16")
# tokenizer_config.json keys of transformers 5 that 4.57 does not read or reads differently.
V5_ONLY_KEYS = ("backend",)
# Classes transformers 5 writes that do not exist in 4.57.
V5_ONLY_CLASSES = ("TokenizersBackend",)


class TokenizerExportError(WandaError, ValueError):
    """The model folder has no tokenizer that TensorRT-LLM's transformers can load."""


def legacy_tokenizer_config(config: dict) -> dict:
    """``tokenizer_config.json`` for transformers 4.57: same tokens and lengths, a class it knows."""
    out = {k: v for k, v in config.items() if k not in V5_ONLY_KEYS}
    cls = out.get("tokenizer_class")
    if cls is None or cls in V5_ONLY_CLASSES or not str(cls).endswith("Fast"):
        # A slow class would need its own vocabulary files; tokenizer.json serves the fast one.
        out["tokenizer_class"] = LEGACY_TOKENIZER_CLASS
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):  # transformers 5 writes a list; 4.57 wants a name -> token mapping
        out.pop("extra_special_tokens")
        out["additional_special_tokens"] = list(dict.fromkeys([*out.get("additional_special_tokens", []), *extra]))
    return out


def engine_model_config(config: dict, dtype: str) -> dict:
    """The model's ``config.json`` with the engine's dtype under both names TensorRT-LLM's
    ``ModelConfig`` reads (``AliasChoices("dtype", "torch_dtype")``)."""
    return {**config, "dtype": dtype, "torch_dtype": dtype}


def write_trtllm_model_dir(model_dir: str | Path, out_dir: str | Path, *, dtype: str) -> Path:
    """Write ``out_dir``: config (in the engine's ``dtype``), a header-only ``model.safetensors``,
    generation config and a 4.57-loadable tokenizer of ``model_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if dtype not in ENGINE_DTYPES:
        raise ConfigError("dtype", f"{dtype!r} is not an engine dtype", ", ".join(ENGINE_DTYPES))
    if not (model_dir / "tokenizer.json").is_file():
        raise TokenizerExportError(f"{model_dir} has no tokenizer.json: trtllm-bench needs a fast tokenizer "
                                   "(save the model with its tokenizer)")
    if not (model_dir / "config.json").is_file():
        raise TokenizerExportError(f"{model_dir} has no config.json: trtllm-bench reads the model's config")
    shapes = read_tensor_shapes(model_dir)  # before writing anything: a folder without weights fails here
    model_config = engine_model_config(json.loads((model_dir / "config.json").read_text()), dtype)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    legacy = legacy_tokenizer_config(config)
    with atomic_dir(out_dir) as tmp:
        for name in COPIED:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        params = write_header_only(tmp / SINGLE_FILE, shapes, dtype)
        (tmp / "tokenizer_config.json").write_text(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)  # read by trtllm-bench, possibly as another user inside a container
    log.info("trtllm-bench model folder %s: config dtype %s, header-only %s of %d tensors, %d parameters",
             out_dir, dtype, SINGLE_FILE, len(shapes), params)
    if legacy.get("tokenizer_class") != config.get("tokenizer_class"):
        log.info("trtllm-bench model folder %s: tokenizer_class %s -> %s (transformers 4.57 of TensorRT-LLM 1.2)",
                 out_dir, config.get("tokenizer_class"), legacy["tokenizer_class"])
    return out_dir
