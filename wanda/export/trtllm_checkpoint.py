"""Write a TensorRT-LLM checkpoint (TensorRT-LLM 1.2 "unified checkpoint" format) for
LLaMA-family models from pruned weights, without importing TensorRT-LLM.

A checkpoint directory is ``config.json`` plus one ``rank{N}.safetensors`` per rank (here tensor
and pipeline parallel 1, so only ``rank0.safetensors``), as documented in TensorRT-LLM's
``docs/source/architecture/checkpoint.md``. Weight names and the HF -> TRT-LLM mapping follow
``tensorrt_llm/models/llama/convert.py`` (and ``qwen/convert.py`` for Qwen2):

=============================================  ============================================
TRT-LLM tensor                                  HF source
=============================================  ============================================
transformer.vocab_embedding.weight              model.embed_tokens.weight
transformer.layers.N.input_layernorm.weight     model.layers.N.input_layernorm.weight
transformer.layers.N.attention.qkv.{weight,bias} cat(q_proj, k_proj, v_proj) along outputs
transformer.layers.N.attention.dense.weight     model.layers.N.self_attn.o_proj.weight
transformer.layers.N.post_layernorm.weight      model.layers.N.post_attention_layernorm.weight
transformer.layers.N.mlp.fc.weight              model.layers.N.mlp.gate_proj.weight  (sic)
transformer.layers.N.mlp.gate.weight            model.layers.N.mlp.up_proj.weight    (sic)
transformer.layers.N.mlp.proj.weight            model.layers.N.mlp.down_proj.weight
transformer.ln_f.weight                         model.norm.weight
lm_head.weight                                  lm_head.weight (the embedding when tied)
=============================================  ============================================

TRT-LLM's ``fc`` is the SiLU-gated branch (HF ``gate_proj``) and its ``gate`` the multiplied
branch (HF ``up_proj``): the names look swapped but are what its loader expects.

Next to the checkpoint we write ``sparse24.safetensors`` (the 2:4 compressed form of every
sparse tensor, keyed by its TRT-LLM name) and ``compliance.json``. TensorRT-LLM ignores both.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..architecture import discover, find_blocks, model_type
from ..atomic import atomic_dir, write_json
from ..errors import ArtifactMismatchError, ConfigError, UnsupportedArchitectureError, WandaError
from ..hashing import sha256_file
from .sparse24 import (
    FORMAT,
    ComplianceReport,
    bitwise_equal,
    canonicalize_zeros,
    compliance_report,
    compress_24,
    decompress_24,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RANK0_FILE = "rank0.safetensors"
SPARSE_FILE = "sparse24.safetensors"
COMPLIANCE_FILE = "compliance.json"

# HF model_type -> TRT-LLM architecture (its MODEL_MAP key). Mistral reuses the LLaMA model;
# Qwen2 goes to QWenForCausalLM, which needs ``qwen_type`` and always has a QKV bias.
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

# TRT-LLM module inside a decoder layer -> HF modules concatenated (along outputs) into it.
LINEAR_MAP: dict[str, tuple[str, ...]] = {
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention.dense": ("self_attn.o_proj",),
    "mlp.fc": ("mlp.gate_proj",),
    "mlp.gate": ("mlp.up_proj",),
    "mlp.proj": ("mlp.down_proj",),
}
NORM_MAP: dict[str, str] = {
    "input_layernorm": "input_layernorm",
    "post_layernorm": "post_attention_layernorm",
}

# PositionEmbeddingType / RotaryScalingType names accepted by tensorrt_llm.functional (1.2).
POSITION_EMBEDDING_TYPES = (
    "learned_absolute", "rope_gptj", "rope_gpt_neox", "long_rope", "alibi", "alibi_with_scale",
    "relative", "chatglm", "yarn", "mrope", "deferred",
)
ROTARY_SCALING_TYPES = ("linear", "dynamic", "longrope", "llama3", "yarn", "mrope")


class CheckpointError(WandaError, ValueError):
    """A TensorRT-LLM checkpoint does not match the documented format or its own config."""


# --------------------------------------------------------------------------- config schema


class MappingConfig(BaseModel):
    """``mapping``: parallelism. TRT-LLM's ``Mapping(**mapping)`` accepts more keys (cp_size,
    moe_tp_size, ...), hence ``extra="allow"``."""

    model_config = ConfigDict(extra="allow")

    world_size: int = Field(1, ge=1)
    tp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _world(self) -> "MappingConfig":
        cp = int(getattr(self, "cp_size", 1) or 1)
        if self.world_size != self.tp_size * self.pp_size * cp:
            raise ValueError(f"mapping.world_size {self.world_size} != tp_size*pp_size*cp_size "
                             f"({self.tp_size}*{self.pp_size}*{cp})")
        return self


class QuantizationConfig(BaseModel):
    """``quantization``: TRT-LLM builds ``QuantConfig(**quantization)``, a dataclass that rejects
    unknown keys, hence ``extra="forbid"``."""

    model_config = ConfigDict(extra="forbid")

    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    smoothquant_val: float = 0.5
    clamp_val: list[float] | None = None
    use_meta_recipe: bool = False
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None


class RotaryScaling(BaseModel):
    """``rotary_scaling``: HF's rope parameters with ``type`` set; extra keys (factor,
    low_freq_factor, original_max_position_embeddings, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    type: Literal[ROTARY_SCALING_TYPES]  # type: ignore[valid-type]
    factor: float | None = None


class TrtllmCheckpointConfig(BaseModel):
    """``config.json`` of a TensorRT-LLM checkpoint (documented fields; the format is extensible,
    model-specific fields are allowed as extras, as TRT-LLM sets unknown keys as attributes)."""

    model_config = ConfigDict(extra="allow")

    architecture: str
    dtype: Literal["float16", "bfloat16", "float32"]
    logits_dtype: Literal["float16", "float32"] = "float32"
    vocab_size: int = Field(..., ge=1)
    max_position_embeddings: int | None = Field(None, ge=1)
    hidden_size: int = Field(..., ge=1)
    num_hidden_layers: int = Field(..., ge=1)
    num_attention_heads: int = Field(..., ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    head_size: int | None = Field(None, ge=1)
    hidden_act: str
    intermediate_size: int | None = Field(None, ge=1)
    norm_epsilon: float = Field(1e-5, gt=0)
    position_embedding_type: Literal[POSITION_EMBEDDING_TYPES] = "learned_absolute"  # type: ignore[valid-type]
    rotary_base: float | None = Field(None, gt=0)
    rotary_scaling: RotaryScaling | None = None
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    use_parallel_embedding: bool = False
    embedding_sharding_dim: Literal[0, 1] = 0
    tie_word_embeddings: bool = False
    share_embedding_table: bool = False  # lm_head is always written, so never shared
    attn_bias: bool = False
    mlp_bias: bool = False

    @field_validator("hidden_act")
    @classmethod
    def _act(cls, value: str) -> str:
        if not value:
            raise ValueError("hidden_act is mandatory")
        return value

    @model_validator(mode="after")
    def _heads(self) -> "TrtllmCheckpointConfig":
        if self.head_size is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads} and no head_size is given")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.kv_heads}")
        if self.position_embedding_type.startswith("rope") and self.rotary_base is None:
            raise ValueError("a rope position_embedding_type needs rotary_base")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_attention_heads

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def read_checkpoint_config(checkpoint_dir: str | Path) -> TrtllmCheckpointConfig:
    """Parse and validate ``config.json`` of an existing checkpoint."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {CONFIG_FILE}")
    try:
        return TrtllmCheckpointConfig.model_validate(json.loads(path.read_text()))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid TensorRT-LLM checkpoint config: {exc}") from exc


def expected_tensors(config: TrtllmCheckpointConfig, qkv_bias: bool | None = None,
                     dense_bias: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor ``rank0.safetensors`` must hold (tp=pp=1).

    Qwen2 carries a QKV bias but no dense bias; LLaMA's ``attn_bias`` covers both.
    """
    qwen = config.architecture.startswith("Qwen")
    if qkv_bias is None:
        qkv_bias = config.attn_bias
    if dense_bias is None:
        dense_bias = config.attn_bias and not qwen
    hidden, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.kv_heads * hd
    inter = config.intermediate_size or 4 * hidden
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.vocab_embedding.weight": (config.vocab_size, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_hidden_layers):
        p = f"transformer.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_layernorm.weight"] = (hidden,)
        shapes[p + "attention.qkv.weight"] = (q_out + 2 * kv_out, hidden)
        if qkv_bias:
            shapes[p + "attention.qkv.bias"] = (q_out + 2 * kv_out,)
        shapes[p + "attention.dense.weight"] = (hidden, q_out)
        if dense_bias:
            shapes[p + "attention.dense.bias"] = (hidden,)
        for name, out_f, in_f in (("mlp.fc", inter, hidden), ("mlp.gate", inter, hidden), ("mlp.proj", hidden, inter)):
            shapes[p + name + ".weight"] = (out_f, in_f)
            if config.mlp_bias:
                shapes[p + name + ".bias"] = (out_f,)
    return shapes


# --------------------------------------------------------------------------- HF -> TRT-LLM


def _rope(hf_config) -> tuple[float, dict[str, Any] | None]:
    """(rotary_base, rotary_scaling) from transformers 5 ``rope_parameters`` or older fields."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form; LLaMA-family has one type
    if not isinstance(params, dict):
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    theta = float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return theta, None  # TRT-LLM 1.2 rejects "default": no scaling is spelled null
    if rope_type not in ROTARY_SCALING_TYPES:
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} has no TensorRT-LLM equivalent (supported: {', '.join(ROTARY_SCALING_TYPES)})")
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
    scaling["type"] = rope_type
    return theta, scaling


_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _refuse_moe(model) -> None:
    """Mixture-of-experts models have per-expert MLPs and a router this writer does not map
    (TRT-LLM wants ``moe_config`` and ``mlp.fc``/``mlp.proj`` stacked per expert)."""
    c = model.config
    experts = next((int(v) for f in _EXPERT_FIELDS if isinstance(v := getattr(c, f, None), int) and v > 1), None)
    if experts is not None or "moe" in str(getattr(c, "model_type", "")).lower():
        raise UnsupportedArchitectureError(
            f"TensorRT-LLM export does not support mixture-of-experts models ({type(model).__name__}, "
            f"model_type {getattr(c, 'model_type', '?')!r}, {experts or 'several'} experts): the checkpoint writer "
            "maps dense LLaMA-family MLPs only; export the dense safetensors folder instead")


def checkpoint_config_for(model, dtype: str = "float16") -> TrtllmCheckpointConfig:
    """The TRT-LLM config of a transformers LLaMA-family model (refuses other architectures)."""
    kind = model_type(model)
    from ..experts import expert_containers

    moe = expert_containers(model)
    if moe:  # named first: a Mixtral must not read as a mere unknown model type
        raise UnsupportedArchitectureError(
            f"TensorRT-LLM checkpoint export does not write mixture-of-experts models: model_type {kind!r} has "
            f"{len(moe)} experts containers ({moe[0][0]}, ...); export it with TensorRT-LLM's own MoE converter "
            f"from the pruned model folder (supported here: {', '.join(sorted(ARCHITECTURES))})")
    _refuse_moe(model)  # MoE configs whose experts are not a fused container (named by config fields)
    if kind not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"TensorRT-LLM export supports model_type {', '.join(sorted(ARCHITECTURES))}; "
            f"got model_type {kind!r} ({type(model).__name__})")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError("export.dtype", f"unsupported dtype {dtype!r}", ", ".join(EXPORT_DTYPES))
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    theta, scaling = _rope(c)
    blocks_path, _ = find_blocks(model)
    qkv_bias = getattr(model.get_submodule(f"{blocks_path}.0.self_attn.q_proj"), "bias", None) is not None
    fields: dict[str, Any] = dict(
        architecture=ARCHITECTURES[kind],
        dtype=dtype,
        logits_dtype="float32",
        vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_size=head_dim,
        hidden_act=c.hidden_act,
        intermediate_size=c.intermediate_size,
        norm_epsilon=c.rms_norm_eps,
        position_embedding_type="rope_gpt_neox",  # HF LLaMA rotates halves, as GPT-NeoX does
        rotary_base=theta,
        rotary_scaling=scaling,
        mapping={"world_size": 1, "tp_size": 1, "pp_size": 1},
        quantization={"quant_algo": None, "kv_cache_quant_algo": None},
        use_parallel_embedding=False,
        embedding_sharding_dim=0,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        attn_bias=qkv_bias,
        mlp_bias=bool(getattr(c, "mlp_bias", False)),
    )
    if kind == "qwen2":
        # QWenDecoderLayer reads config.seq_length (max_seqlen_for_logn_scaling) even with
        # use_logn_attn off; TRT-LLM's own Qwen converter sets it to max_position_embeddings.
        fields.update(qwen_type="qwen2", attn_bias=True, use_logn_attn=False, seq_length=c.max_position_embeddings)
    return TrtllmCheckpointConfig.model_validate(fields)


class TensorRecord(BaseModel):
    name: str  # TRT-LLM tensor name
    sources: list[str]  # HF parameter names, in concatenation order
    shape: tuple[int, ...]
    compressed: bool = False


def _param(model, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    tensor = getattr(model.get_submodule(module_name), attr)
    return tensor.detach().to("cpu")


def _optional(model, name: str) -> torch.Tensor | None:
    module_name, _, attr = name.rpartition(".")
    tensor = getattr(model.get_submodule(module_name), attr, None)
    return None if tensor is None else tensor.detach().to("cpu")


def convert_weights(model, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[TensorRecord]]:
    """All checkpoint tensors (cast to ``dtype``, contiguous, unshared) and where each came from."""
    blocks_path, blocks = find_blocks(model)
    tensors: dict[str, torch.Tensor] = {}
    records: list[TensorRecord] = []

    def put(name: str, sources: list[str], parts: list[torch.Tensor]) -> None:
        value = torch.cat([p.to(dtype) for p in parts], dim=0) if len(parts) > 1 else parts[0].to(dtype)
        tensors[name] = value.contiguous().clone()  # clone: tied/shared storage breaks safetensors
        records.append(TensorRecord(name=name, sources=sources, shape=tuple(value.shape)))

    embed = "model.embed_tokens.weight"
    put("transformer.vocab_embedding.weight", [embed], [_param(model, embed)])
    for i in range(len(blocks)):
        hf = f"{blocks_path}.{i}."
        trt = f"transformer.layers.{i}."
        for trt_norm, hf_norm in NORM_MAP.items():
            put(trt + trt_norm + ".weight", [hf + hf_norm + ".weight"], [_param(model, hf + hf_norm + ".weight")])
        for trt_linear, hf_linears in LINEAR_MAP.items():
            names = [hf + m + ".weight" for m in hf_linears]
            put(trt + trt_linear + ".weight", names, [_param(model, n) for n in names])
            biases = [_optional(model, hf + m + ".bias") for m in hf_linears]
            if any(b is not None for b in biases):
                if not all(b is not None for b in biases):
                    raise UnsupportedArchitectureError(f"{hf}{hf_linears}: only some of the fused linears have a bias")
                bias_names = [hf + m + ".bias" for m in hf_linears]
                put(trt + trt_linear + ".bias", bias_names, biases)  # type: ignore[arg-type]
    put("transformer.ln_f.weight", ["model.norm.weight"], [_param(model, "model.norm.weight")])
    # Written explicitly even when tied, as TRT-LLM's own converter does.
    put("lm_head.weight", ["lm_head.weight"], [_param(model, "lm_head.weight")])
    return tensors, records


def unfuse_checkpoint_weights(tensors: dict[str, torch.Tensor], config: TrtllmCheckpointConfig,
                              blocks_path: str = "model.layers") -> dict[str, torch.Tensor]:
    """Inverse mapping: checkpoint tensors -> HF parameter names (for audits and tests)."""
    hd = config.head_dim
    split = {"attention.qkv": [config.num_attention_heads * hd, config.kv_heads * hd, config.kv_heads * hd]}
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": tensors["transformer.vocab_embedding.weight"],
        "model.norm.weight": tensors["transformer.ln_f.weight"],
        "lm_head.weight": tensors["lm_head.weight"],
    }
    for i in range(config.num_hidden_layers):
        hf, trt = f"{blocks_path}.{i}.", f"transformer.layers.{i}."
        for trt_norm, hf_norm in NORM_MAP.items():
            out[hf + hf_norm + ".weight"] = tensors[trt + trt_norm + ".weight"]
        for trt_linear, hf_linears in LINEAR_MAP.items():
            for suffix in ("weight", "bias"):
                key = f"{trt}{trt_linear}.{suffix}"
                if key not in tensors:
                    continue
                parts = torch.split(tensors[key], split[trt_linear], dim=0) if trt_linear in split else (tensors[key],)
                for module, part in zip(hf_linears, parts):
                    out[f"{hf}{module}.{suffix}"] = part
    return out


# --------------------------------------------------------------------------- export


class ExportResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    out_dir: Path
    config: TrtllmCheckpointConfig
    compliance: ComplianceReport
    tensors: list[TensorRecord]
    sparse_tensors: list[str]  # TRT-LLM names with a compressed form in sparse24.safetensors
    files: dict[str, str]  # file name -> sha256
    dense_sparse_bytes: int  # bytes of the sparse tensors stored dense in rank0
    compressed_bytes: int  # bytes of their values + metadata
    warnings: list[str] = Field(default_factory=list)


def _sparse_sources(records: list[TensorRecord], targets: set[str]) -> list[TensorRecord]:
    """Weights whose every HF source is a 2:4 target: only those are 2:4 as a whole."""
    return [r for r in records if r.name.endswith(".weight") and len(r.shape) == 2
            and r.sources and all(s.removesuffix(".weight") in targets for s in r.sources)]


def export_trtllm_checkpoint(model, out_dir: str | Path, dtype: str = "float16", *,
                             targets: list[str] | None = None, ignore: list[str] | None = None) -> ExportResult:
    """Export a 2:4-pruned LLaMA-family model as a TensorRT-LLM checkpoint (tp=pp=1).

    ``targets``/``ignore`` are the pruning stage's glob patterns: every target weight must be
    2:4 along its input dimension, else :class:`~wanda.export.sparse24.Not24SparseError` names
    the first offending layer before anything is written. The directory is written atomically
    and validated (schema, tensor names/shapes/dtypes, exact compressed round trip) before it
    replaces ``out_dir``.
    """
    out_dir = Path(out_dir)
    config = checkpoint_config_for(model, dtype)  # refuses unsupported archs and dtypes first
    layout = discover(model, targets, ignore)
    target_names = layout.all_targets()
    compliance = compliance_report((name + ".weight", _param(model, name + ".weight")) for name in target_names)
    compliance.require()

    torch_dtype = EXPORT_DTYPES[dtype]
    tensors, records = convert_weights(model, torch_dtype)
    sparse_records = _sparse_sources(records, set(target_names))
    packed: dict[str, torch.Tensor] = {}
    for record in sparse_records:
        # Canonical zeros in rank0 so that it equals the decompressed form bit for bit.
        tensors[record.name] = canonicalize_zeros(tensors[record.name])
        values, metadata = compress_24(tensors[record.name], record.name)
        packed[record.name + ".values"] = values
        packed[record.name + ".metadata"] = metadata
        record.compressed = True
    dense_bytes = sum(tensors[r.name].numel() * tensors[r.name].element_size() for r in sparse_records)
    compressed_bytes = sum(t.numel() * t.element_size() for t in packed.values())

    warnings: list[str] = []
    window = getattr(model.config, "sliding_window", None)
    if window and window < (model.config.max_position_embeddings or 0):
        warnings.append(f"sliding_window={window} is not part of the checkpoint: TensorRT-LLM applies it only "
                        "through the runtime max_attention_window_size")
    uncovered = sorted(set(target_names) - {s.removesuffix(".weight") for r in sparse_records for s in r.sources})
    if uncovered:
        warnings.append(f"{len(uncovered)} target layers are fused with non-target layers and stay dense in the "
                        f"compressed form, e.g. {uncovered[0]}")
    for text in warnings:
        log.warning("export: %s", text)

    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json_dict(), indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / RANK0_FILE), metadata={"format": "pt"})
        save_file(packed, str(tmp / SPARSE_FILE), metadata={
            "format": FORMAT,
            "layout": "values [out, in/2]; metadata uint8 [out, ceil(in/8)], per group of 4 inputs a nibble "
                      "i0 | i1 << 2 (kept positions, ascending), even groups in the low nibble",
            "dtype": dtype,
        })
        write_json(tmp / COMPLIANCE_FILE, {
            "pattern": "2:4",
            "along": "input dimension (groups of 4 consecutive inputs, at most 2 nonzeros)",
            "all_compliant": compliance.all_compliant,
            "layers": [layer.model_dump(mode="json") for layer in compliance.layers],
            "tensors": [r.model_dump(mode="json") for r in records],
            "dense_sparse_bytes": dense_bytes,
            "compressed_bytes": compressed_bytes,
            "warnings": warnings,
        })
        validate_checkpoint(tmp, verify_sparse=True)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        for path in tmp.iterdir():
            path.chmod(0o644)  # temp files are 0600; a container user must be able to read them
    log.info("exported TensorRT-LLM checkpoint %s (%s, %d tensors, %d compressed 2:4)",
             out_dir, config.architecture, len(records), len(sparse_records))
    return ExportResult(out_dir=out_dir, config=config, compliance=compliance, tensors=records,
                        sparse_tensors=[r.name for r in sparse_records], files=files,
                        dense_sparse_bytes=dense_bytes, compressed_bytes=compressed_bytes, warnings=warnings)


# --------------------------------------------------------------------------- validation


class CheckpointValidation(BaseModel):
    checkpoint_dir: Path
    config: TrtllmCheckpointConfig
    tensors: int
    sparse_tensors: list[str]
    sparse_verified: bool


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as handle:
        slices = {k: handle.get_slice(k) for k in handle.keys()}
        return {k: (str(s.get_dtype()), tuple(s.get_shape())) for k, s in slices.items()}


_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def validate_checkpoint(checkpoint_dir: str | Path, verify_sparse: bool = True) -> CheckpointValidation:
    """Check a checkpoint against the documented format and its own config.

    Config schema; ``rank0.safetensors`` holds exactly the expected tensor names, shapes and
    dtype; when present, every compressed tensor in ``sparse24.safetensors`` matches its rank0
    tensor's shape and (``verify_sparse``) decompresses to it bit for bit.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = read_checkpoint_config(checkpoint_dir)
    if config.mapping.world_size != 1:
        raise CheckpointError(f"{checkpoint_dir}: only world_size 1 is supported here, config says "
                              f"{config.mapping.world_size}")
    rank0 = checkpoint_dir / RANK0_FILE
    if not rank0.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {RANK0_FILE}")
    header = _header(rank0)
    expected = expected_tensors(config)
    problems: list[str] = []
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    want_dtype = _ST_DTYPES[config.dtype]
    for name, shape in expected.items():
        if name in header:
            got_dtype, got_shape = header[name]
            if got_shape != shape:
                problems.append(f"{name}: shape {got_shape} != expected {shape}")
            if got_dtype != want_dtype:
                problems.append(f"{name}: dtype {got_dtype} != config dtype {config.dtype}")
    if problems:
        raise CheckpointError(f"{checkpoint_dir} does not match its config: " + "; ".join(problems))

    sparse_names: list[str] = []
    sparse_path = checkpoint_dir / SPARSE_FILE
    if sparse_path.is_file():
        packed = load_file(str(sparse_path)) if verify_sparse else None
        sparse_header = _header(sparse_path)
        sparse_names = sorted(k.removesuffix(".values") for k in sparse_header if k.endswith(".values"))
        dense = load_file(str(rank0)) if verify_sparse else None
        for name in sparse_names:
            if name not in header or name + ".metadata" not in sparse_header:
                raise CheckpointError(f"{sparse_path}: {name} has no metadata or no rank0 tensor")
            rows, cols = header[name][1]
            if sparse_header[name + ".values"][1] != (rows, cols // 2):
                raise CheckpointError(f"{sparse_path}: {name}.values shape does not match rank0 {header[name][1]}")
            if verify_sparse:
                restored = decompress_24(packed[name + ".values"], packed[name + ".metadata"], cols)
                if not bitwise_equal(restored, dense[name]):
                    raise ArtifactMismatchError(f"{sparse_path}: {name} does not decompress to the rank0 tensor")
    return CheckpointValidation(checkpoint_dir=checkpoint_dir, config=config, tensors=len(header),
                                sparse_tensors=sparse_names, sparse_verified=bool(sparse_names) and verify_sparse)
