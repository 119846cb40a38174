"""Width pruning of dense decoders: whole MLP channels and whole attention head groups.

Both are ranked on the inputs of the output projection (``down_proj``/``o_proj``; GPT-2
``mlp.c_proj``/``attn.c_proj``), observed by pre-hooks during one forward of the dense model over
the calibration tokens. For input channel ``j`` of the output projection ``W [out, in]``:

- ``wanda`` (FLAP's structured Wanda baseline): ``mean_i |W_ij| * ||X_j||_2``;
- ``flap`` (FLAP's fluctuation metric): ``Var(X_j) * sum_i W_ij^2`` (population variance over
  calibration tokens; the ``n-1`` of FLAP's code is a per-layer constant and ranks alike).

A head's channels are its ``head_dim`` inputs of ``o_proj``; a key/value group (the KV head and
the query heads sharing it) scores the sum over its query heads' channels and goes as one. The
lowest-scoring channels/groups are removed, the same count in every layer so one config size
fits all. FLAP's bias compensation adds the removed channels' mean contribution
``W[:, removed] @ mean(X[removed])`` to the output projection's bias.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..experts import expert_containers, is_conv1d
from ..statistics import ChannelStats
from .config import StructureConfig
from .rebuild import select

log = logging.getLogger(__name__)

_LLAMA_LIKE = dict(mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
                   attn=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                   intermediate_key="intermediate_size")


@dataclass(frozen=True)
class WidthFamily:
    mlp_in: tuple[str, ...]  # input-side MLP projections (rows = intermediate channels)
    mlp_out: str
    attn: tuple[str, str, str, str] | None  # q, k, v, o; None: heads cannot be removed (why below)
    intermediate_key: str
    no_attn_reason: str = ""


# Dense families verified to reload with a smaller intermediate size and fewer heads at an
# explicit head_dim. Others (fused qkv/gate_up projections, norms across all heads such as
# OLMo-2's q_norm, derived head sizes) are refused by name.
WIDTH_FAMILIES = {
    name: WidthFamily(**_LLAMA_LIKE)
    for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
}
WIDTH_FAMILIES["gpt2"] = WidthFamily(mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", attn=None, intermediate_key="n_inner",
                                     no_attn_reason="GPT-2 derives head_dim from n_embd / n_head, so fewer heads "
                                                    "would change every head's size")
# Config switches that give the output projections a bias (for compensation), tried in turn;
# whether a switch really adds one is checked on the rebuilt model.
MLP_BIAS_KEY = "mlp_bias"
ATTN_BIAS_KEY = "attention_bias"


def width_family(model: nn.Module, config: StructureConfig) -> WidthFamily:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    family = WIDTH_FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitectureError(
            f"structure.mlp_channels_removed/kv_groups_removed: model type {model_type!r} is not supported for "
            f"width pruning (supported: {', '.join(sorted(WIDTH_FAMILIES))})")
    if expert_containers(model):
        raise UnsupportedArchitectureError(f"structure: width pruning is for dense models; {model_type!r} has "
                                           "experts (use structure.experts_removed)")
    if config.kv_groups_removed and family.attn is None:
        raise UnsupportedArchitectureError(f"structure.kv_groups_removed: not supported for {model_type!r}: "
                                           f"{family.no_attn_reason}")
    return family


@dataclass(frozen=True)
class HeadLayout:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_width(self) -> int:  # o_proj input channels per KV group
        return self.heads // self.kv_heads * self.head_dim


def head_layout(model: nn.Module, config: StructureConfig) -> HeadLayout:
    mc = model.config
    heads = mc.num_attention_heads
    kv = getattr(mc, "num_key_value_heads", None) or heads
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
    if config.kv_groups_removed >= kv:
        raise ConfigError("structure.kv_groups_removed", f"{config.kv_groups_removed} would remove all {kv} key/value "
                          "groups of every layer", f"0 to {kv - 1}")
    return HeadLayout(heads, kv, head_dim)


def out_weight(module: nn.Module) -> torch.Tensor:
    """The output projection's weight viewed [out, in] (GPT-2 ``Conv1D`` stores [in, out])."""
    return module.weight.t() if is_conv1d(module) else module.weight


class InputStatistics:
    """Pre-hooks on the output projections: per-channel sum, sum of squares and count."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.stats = {name: ChannelStats.zeros(out_weight(m).shape[1]) for name, m in modules.items()}
        self.handles: list = []

    def __enter__(self) -> "InputStatistics":
        for name, module in self.modules.items():
            stats = self.stats[name]
            self.handles.append(module.register_forward_pre_hook(lambda _m, args, s=stats: s.add(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def channel_scores(weight: torch.Tensor, stats: ChannelStats, score: str) -> torch.Tensor:
    """Per input channel of ``weight [out, in]`` (float64)."""
    w = weight.detach().to("cpu", torch.float64)
    if score == "flap":
        return stats.variance().double() * w.pow(2).sum(0)
    return (w.abs() * stats.norm().double()[None, :]).mean(0)


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    values = scores.tolist()
    return sorted(sorted(range(len(values)), key=lambda j: (values[j], j))[:n])


def compensation(weight: torch.Tensor, stats: ChannelStats, removed_channels: list[int]) -> torch.Tensor:
    """``W[:, removed] @ mean(X[removed])``: the removed channels' mean contribution to the output."""
    idx = torch.tensor(removed_channels, dtype=torch.long)
    return weight.detach().to("cpu", torch.float64)[:, idx] @ stats.mean().double()[idx]


def _channels_of_groups(groups: list[int], layout: HeadLayout) -> list[int]:
    width = layout.group_width
    return [g * width + c for g in groups for c in range(width)]


def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + c for u in units for c in range(size)], dtype=torch.long)


def mlp_channels_to_remove(blocks: nn.ModuleList, family: WidthFamily, config: StructureConfig) -> int:
    """Channels removed from every MLP: the fraction of the intermediate size, rounded down."""
    intermediate = out_weight(blocks[0].get_submodule(family.mlp_out)).shape[1]
    n_channels = int(config.mlp_channels_removed * intermediate + 1e-9)
    if config.mlp_channels_removed and n_channels == 0:
        log.warning("structure.mlp_channels_removed=%s removes no channel of %d: MLPs unchanged",
                    config.mlp_channels_removed, intermediate)
    return n_channels


def plan_and_slice(model: nn.Module, blocks_path: str, blocks: nn.ModuleList, family: WidthFamily,
                   config: StructureConfig, stats: dict[str, ChannelStats], state: dict[str, torch.Tensor],
                   new_config) -> dict:
    """Choose what goes in every block, slice ``state``, fold compensation, update ``new_config``."""
    report: dict[str, dict] = {}
    conv = is_conv1d(blocks[0].get_submodule(family.mlp_out))
    intermediate = out_weight(blocks[0].get_submodule(family.mlp_out)).shape[1]
    n_channels = mlp_channels_to_remove(blocks, family, config)
    layout = head_layout(model, config) if config.kv_groups_removed else None
    for index, block in enumerate(blocks):
        prefix = f"{blocks_path}.{index}"
        entry: dict[str, object] = {}
        if n_channels:
            name = f"{prefix}.{family.mlp_out}"
            weight = out_weight(block.get_submodule(family.mlp_out))
            scores = channel_scores(weight, stats[name], config.width_score)
            removed = lowest(scores, n_channels)
            gone = set(removed)
            keep = torch.tensor([j for j in range(intermediate) if j not in gone], dtype=torch.long)
            for rel in family.mlp_in:
                key = f"{prefix}.{rel}"
                # Conv1D stores [in, out]: intermediate channels are its columns.
                state[f"{key}.weight"] = select(state[f"{key}.weight"], 1 if conv else 0, keep)
                if f"{key}.bias" in state:
                    state[f"{key}.bias"] = select(state[f"{key}.bias"], 0, keep)
            state[f"{name}.weight"] = select(state[f"{name}.weight"], 0 if conv else 1, keep)
            if config.compensates:
                _add_bias(state, name, compensation(weight, stats[name], removed))
            entry["mlp_channels_removed"] = removed
        if layout is not None:
            q, k, v, o = family.attn  # type: ignore[misc]
            name = f"{prefix}.{o}"
            weight = out_weight(block.get_submodule(o))
            channel = channel_scores(weight, stats[name], config.width_score)
            group_scores = channel.reshape(layout.kv_heads, layout.group_width).sum(-1)
            removed = lowest(group_scores, config.kv_groups_removed)
            kept = [g for g in range(layout.kv_heads) if g not in removed]
            per_group = layout.heads // layout.kv_heads
            kept_q = [g * per_group + h for g in kept for h in range(per_group)]
            q_rows = _rows(kept_q, layout.head_dim)
            kv_rows = _rows(kept, layout.head_dim)
            for rel, rows in ((q, q_rows), (k, kv_rows), (v, kv_rows)):
                key = f"{prefix}.{rel}"
                state[f"{key}.weight"] = select(state[f"{key}.weight"], 0, rows)
                if f"{key}.bias" in state:
                    state[f"{key}.bias"] = select(state[f"{key}.bias"], 0, rows)
            state[f"{name}.weight"] = select(state[f"{name}.weight"], 1, q_rows)
            if config.compensates:
                _add_bias(state, name, compensation(weight, stats[name], _channels_of_groups(removed, layout)))
            entry["kv_groups_removed"] = removed
        report[prefix] = entry
    changes: dict[str, object] = {}
    if n_channels:
        changes[family.intermediate_key] = intermediate - n_channels
    if layout is not None:
        left = layout.kv_heads - config.kv_groups_removed
        # head_dim written explicitly: families that default it to hidden_size // heads would
        # otherwise derive a different size from the new head count on reload.
        changes.update(num_attention_heads=left * (layout.heads // layout.kv_heads), num_key_value_heads=left,
                       head_dim=layout.head_dim)
    for key, value in changes.items():
        setattr(new_config, key, value)
    return {"config": changes, "layers": report}


def _add_bias(state: dict[str, torch.Tensor], name: str, delta: torch.Tensor) -> None:
    key = f"{name}.bias"
    dtype = state[f"{name}.weight"].dtype
    device = state[f"{name}.weight"].device
    current = state[key].to("cpu", torch.float64) if key in state else torch.zeros(delta.shape, dtype=torch.float64)
    state[key] = (current + delta).to(device, dtype)


def enable_bias(model: nn.Module, family: WidthFamily, config: StructureConfig, new_config) -> tuple[str, ...]:
    """Switch on the output projections' biases compensation needs; returns the config keys set.

    Refuses (by name) a family whose config cannot give the projection a bias."""
    if not config.compensates:
        return ()
    block = _first_block(model)
    needed = []
    if mlp_channels_to_remove(_blocks(model), family, config) and \
            getattr(block.get_submodule(family.mlp_out), "bias", None) is None:
        needed.append((MLP_BIAS_KEY, family.mlp_out))
    if config.kv_groups_removed and getattr(block.get_submodule(family.attn[3]), "bias", None) is None:  # type: ignore[index]
        needed.append((ATTN_BIAS_KEY, family.attn[3]))  # type: ignore[index]
    keys = []
    for key, module in needed:
        if not hasattr(new_config, key):
            _refuse(model, module, key)
        setattr(new_config, key, True)
        keys.append(key)
    if keys:
        # Check the switch really adds the bias in this family's code (Qwen2's o_proj never has one).
        with torch.device("meta"):
            probe = type(model)(new_config)
        probe_block = _first_block(probe)
        for key, module in needed:
            if getattr(probe_block.get_submodule(module), "bias", None) is None:
                _refuse(model, module, key)
        log.info("structure: bias compensation switches on %s in the config (new biases of other projections "
                 "start at zero)", ", ".join(f"{k}=True" for k in keys))
    return tuple(keys)


def _refuse(model: nn.Module, module: str, key: str) -> None:
    raise UnsupportedArchitectureError(
        f"structure.bias_compensation: {model.config.model_type!r} has no bias on {module} and its config cannot "
        f"add one ({key!r} does not); use width_score 'wanda' or bias_compensation false")


def _blocks(model: nn.Module) -> nn.ModuleList:
    from ..architecture import find_blocks

    return find_blocks(model)[1]


def _first_block(model: nn.Module) -> nn.Module:
    return _blocks(model)[0]
