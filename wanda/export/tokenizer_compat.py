"""The model folder handed to ``trtllm-bench``: readable by the transformers TensorRT-LLM 1.2 pins.

``trtllm-bench --model_path DIR`` reads ``DIR/config.json`` and loads the tokenizer with
``AutoTokenizer.from_pretrained(DIR)`` under transformers 4.57.1 (TensorRT-LLM 1.2's
requirements.txt pins ``transformers==4.57.1``). A folder saved by transformers 5 says
``"tokenizer_class": "TokenizersBackend"``, a class 4.57 does not have, so the benchmark would fail
before it starts. We write a small folder (no weights: the TensorRT backend runs the engine)
whose ``tokenizer_config.json`` names ``PreTrainedTokenizerFast``, the class that loads
``tokenizer.json`` exactly as it is in every transformers version (a family class such as
``LlamaTokenizerFast`` would rebuild the post-processor and could add a BOS token ours does not),
and which drops the keys only transformers 5 writes.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import WandaError

log = logging.getLogger(__name__)

LEGACY_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "special_tokens_map.json",
          "chat_template.jinja")
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


def write_trtllm_model_dir(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir``: config, generation config and a 4.57-loadable tokenizer of ``model_dir``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise TokenizerExportError(f"{model_dir} has no tokenizer.json: trtllm-bench needs a fast tokenizer "
                                   "(save the model with its tokenizer)")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    legacy = legacy_tokenizer_config(config)
    with atomic_dir(out_dir) as tmp:
        for name in COPIED:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        (tmp / "tokenizer_config.json").write_text(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)  # read by trtllm-bench, possibly as another user inside a container
    if legacy.get("tokenizer_class") != config.get("tokenizer_class"):
        log.info("trtllm-bench model folder %s: tokenizer_class %s -> %s (transformers 4.57 of TensorRT-LLM 1.2)",
                 out_dir, config.get("tokenizer_class"), legacy["tokenizer_class"])
    return out_dir
