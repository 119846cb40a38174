"""Expert pruning of mixture-of-experts models: saliency from real routing, then removal.

Saliency is measured on the model's own forward: a pre-hook on every experts container
(``wanda.experts``) sees the hidden rows, the chosen experts and the gate values the family's
router produced, so no routing is reimplemented. For each expert ``j`` and token ``x`` routed
to it, ``g_j(x)`` is its top-k gate value renormalised over the token's k slots and
``f_j(x)`` the expert's output (recomputed with the container's own weights, gate and biases):

- ``reap``: mean over routed tokens of ``g_j(x) * ||f_j(x)||_2`` (Lasby et al. 2026);
- ``frequency``: number of routed tokens;
- ``gate``: sum over routed tokens of ``g_j(x)``.

The lowest ``floor(experts_removed * E)`` experts of every MoE layer go (ties: lower index
first). Their slices of the fused expert parameters and the router's rows (weight, bias,
DeepSeek's ``e_score_correction_bias``) are dropped and the config's expert count updated, so
the result is a standard checkpoint of the family. DeepSeek-V3's group-limited routing keeps
its groups: with ``n_group > 1`` the same number is removed from every group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError
from ..experts import expert_containers, expert_intermediate, expert_param_names
from .config import StructureConfig
from .rebuild import select

log = logging.getLogger(__name__)

# Config key holding the routed expert count, per supported family. A family not listed keeps
# its count in a way we have not verified a resized checkpoint reloads with, so it is refused.
EXPERT_COUNT_KEYS = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "deepseek_v3": "n_routed_experts",
    "gpt_oss": "num_local_experts",
    "granitemoe": "num_local_experts",
}
TOP_K_KEY = "num_experts_per_tok"
# Per-expert router tensors (dim 0 indexes experts) that go with a removed expert.
ROUTER_EXPERT_TENSORS = ("weight", "bias", "e_score_correction_bias")
_ROUTER_NAMES = ("gate", "router")


@dataclass
class MoeLayer:
    """One experts container and the router beside it (names are full model paths)."""

    block: int
    container_name: str
    container: nn.Module
    router_name: str
    router: nn.Module
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    gate_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    reap_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]

    @property
    def num_experts(self) -> int:
        return int(getattr(self.container, expert_param_names(self.container)[1]).shape[0])

    def reset(self) -> None:
        e = self.num_experts
        self.count = torch.zeros(e, dtype=torch.float64)
        self.gate_sum = torch.zeros(e, dtype=torch.float64)
        self.reap_sum = torch.zeros(e, dtype=torch.float64)

    def saliency(self, kind: str) -> torch.Tensor:
        if kind == "frequency":
            return self.count.clone()
        if kind == "gate":
            return self.gate_sum.clone()
        return self.reap_sum / self.count.clamp_min(1)  # an expert no token reached scores 0


def check_family(model: nn.Module) -> str:
    """The config key of the expert count; refuses unsupported families by name."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in EXPERT_COUNT_KEYS:
        raise UnsupportedArchitectureError(
            f"structure.experts_removed: model type {model_type!r} is not supported for expert removal "
            f"(supported: {', '.join(sorted(EXPERT_COUNT_KEYS))}); its expert count may not be resizable "
            "in its config")
    return EXPERT_COUNT_KEYS[model_type]


def find_moe_layers(model: nn.Module, blocks_path: str, blocks: nn.ModuleList) -> list[MoeLayer]:
    """Every experts container and its router (a sibling named ``gate``/``router`` whose weight
    has one row per expert)."""
    layers = []
    for index, block in enumerate(blocks):
        for rel, container in expert_containers(block):
            parent_rel, _, _ = rel.rpartition(".")
            parent = block.get_submodule(parent_rel) if parent_rel else block
            experts = int(getattr(container, expert_param_names(container)[1]).shape[0])
            routers = [(name, m) for name, m in parent.named_children()
                       if name in _ROUTER_NAMES and isinstance(getattr(m, "weight", None), torch.Tensor)
                       and m.weight.dim() == 2 and m.weight.shape[0] == experts]
            prefix = f"{blocks_path}.{index}"
            if len(routers) != 1:
                raise UnsupportedArchitectureError(
                    f"{prefix}.{rel}: expected one router ('gate' or 'router') beside the experts with {experts} "
                    f"rows, found {[n for n, _ in routers]}")
            base = f"{prefix}.{parent_rel}" if parent_rel else prefix
            layers.append(MoeLayer(index, f"{prefix}.{rel}", container, f"{base}.{routers[0][0]}", routers[0][1]))
    return layers


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
    if index is None or weights is None:
        raise TypeError("experts container called without its routing (top_k_index, top_k_weights)")
    return hidden, index, weights


@torch.no_grad()
def expert_output(container: nn.Module, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """``f_j(rows)``: the expert's output before the gate weight, with the container's weights."""
    inter = expert_intermediate(container, expert, rows)
    down = container.down_proj[expert]
    down = down.t() if container.is_transposed else down
    bias = container.down_proj_bias[expert] if getattr(container, "has_bias", False) else None
    return nn.functional.linear(inter, down, bias)


class SaliencyObserver:
    """Pre-hooks on the experts containers accumulating count, gate sum and REAP sum per expert."""

    def __init__(self, layers: list[MoeLayer]):
        self.layers = layers
        self.handles: list = []

    @staticmethod
    def _hook(layer: MoeLayer):
        def hook(module, args, kwargs):
            hidden, index, weights = _routing(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            weights = weights.reshape(hidden.shape[0], -1).double()
            # Renormalised over the token's k slots: families that do not renormalise (Qwen2-MoE's
            # norm_topk_prob=False) or scale (DeepSeek's routed_scaling_factor) rank alike.
            gates = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            for expert in range(layer.num_experts):
                tokens, slots = torch.where(index == expert)
                if tokens.numel() == 0:
                    continue
                g = gates[tokens, slots]
                norms = expert_output(module, expert, hidden[tokens]).double().norm(dim=-1)
                # Python floats: the accumulators stay on CPU whatever device the model runs on.
                layer.count[expert] += tokens.numel()
                layer.gate_sum[expert] += float(g.sum())
                layer.reap_sum[expert] += float((g * norms).sum())

        return hook

    def __enter__(self) -> "SaliencyObserver":
        for layer in self.layers:
            layer.reset()
            self.handles.append(layer.container.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def lowest(saliency: torch.Tensor, n: int, groups: int = 1) -> list[int]:
    """Indices of the ``n`` lowest (ties: lower index first), ``n / groups`` from each equal group."""
    size = saliency.numel() // groups
    per = n // groups
    removed: list[int] = []
    for g in range(groups):
        values = saliency[g * size:(g + 1) * size].tolist()
        order = sorted(range(size), key=lambda j: (values[j], j))
        removed += [g * size + j for j in order[:per]]
    return sorted(removed)


def plan_count(model: nn.Module, config: StructureConfig, experts: int) -> tuple[int, int]:
    """(experts removed per layer, groups they are spread over), validated before any forward."""
    mc = model.config
    groups = int(getattr(mc, "n_group", 1) or 1) if mc.model_type == "deepseek_v3" else 1
    removed = int(config.experts_removed * experts + 1e-9)
    if groups > 1:
        removed -= removed % groups
    if removed == 0:
        log.warning("structure.experts_removed=%s removes no expert of %d per layer%s: nothing is removed",
                    config.experts_removed, experts, f" in {groups} equal groups" if groups > 1 else "")
        return 0, groups
    left = experts - removed
    if groups > 1 and left // groups < 2:
        # DeepSeek scores each group by its two best experts (topk(2)).
        raise ConfigError("structure.experts_removed", f"leaves {left // groups} experts per routing group "
                          f"(n_group={groups}); DeepSeek-V3 routing needs at least 2",
                          f"< {1 - 2 * groups / experts:.3f}")
    return removed, groups


def remove_experts(model: nn.Module, config: StructureConfig, layers: list[MoeLayer], removed_per_layer: int,
                   groups: int, state: dict[str, torch.Tensor], new_config) -> dict:
    """Slice ``state`` and update ``new_config`` in place; return the per-layer report."""
    count_key = check_family(model)
    experts = layers[0].num_experts
    report: dict[str, dict] = {}
    for layer in layers:
        saliency = layer.saliency(config.expert_saliency)
        removed = lowest(saliency, removed_per_layer, groups)
        kept = [e for e in range(layer.num_experts) if e not in removed]
        keep = torch.tensor(kept, dtype=torch.long)
        for param in list(expert_param_names(layer.container)) + (
                [f"{p}_bias" for p in expert_param_names(layer.container)]
                if getattr(layer.container, "has_bias", False) else []):
            key = f"{layer.container_name}.{param}"
            state[key] = select(state[key], 0, keep)
        for tensor in ROUTER_EXPERT_TENSORS:
            key = f"{layer.router_name}.{tensor}"
            if key in state:
                state[key] = select(state[key], 0, keep)
        report[layer.container_name] = {
            "removed": removed, "kept": kept,
            "saliency": [round(float(v), 8) for v in saliency],
            "tokens": [int(v) for v in layer.count],
        }
    left = experts - removed_per_layer
    setattr(new_config, count_key, left)
    top_k = getattr(new_config, TOP_K_KEY)
    # Group-limited routing (DeepSeek-V3) chooses among the experts of its topk_group groups only.
    reachable = left if groups == 1 else min(left, int(getattr(new_config, "topk_group", groups)) * (left // groups))
    if top_k > reachable:
        log.warning("structure.experts_removed: %d experts left per layer (%d reachable per token), fewer than "
                    "%s=%d: %s set to %d (every token then uses every expert it can reach)", left, reachable,
                    TOP_K_KEY, top_k, TOP_K_KEY, reachable)
        setattr(new_config, TOP_K_KEY, reachable)
    return {"config": {count_key: left, TOP_K_KEY: getattr(new_config, TOP_K_KEY)}, "layers": report}
