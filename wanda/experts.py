"""Mixture-of-experts containers and GPT-2 ``Conv1D`` layers as pruning targets.

In transformers 5.x the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
gpt-oss and GraniteMoE are one module holding fused 3-D parameters, decorated with
``@use_experts_implementation`` and called as ``experts(hidden_states, top_k_index,
top_k_weights)``. The decorator records the layout on the instance, and we read it from there
rather than per family:

- ``has_gate``: ``gate_up_proj [E, 2I, H]`` (else ``up_proj [E, I, H]``), then ``down_proj [E, H, I]``;
- ``is_transposed``: stored [in, out] per expert (gpt-oss: ``gate_up_proj [E, H, 2I]``);
- ``is_concatenated``: gate rows then up rows; ``False`` (gpt-oss) interleaves them, which the
  module's own ``_apply_gate`` undoes, so we call it instead of re-implementing the split;
- ``has_bias``: ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]`` (gpt-oss).

Every expert matrix is a ``Target`` of kind "expert" named ``<container>.<param>[<e>]``, viewed
[out, in]. Its inputs are observed by a forward pre-hook on the container, which sees the
routing whatever implementation (eager, batched_mm, grouped_mm, ...) transformers dispatches
to: the routed tokens' hidden rows feed gate_up/up, and that expert's intermediate activations
of the same tokens (recomputed with the container's own weights and gate) feed down_proj.
Shared experts and dense MLPs are ordinary linear layers; routers are not targets by default.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch
from torch import nn

from .config import ExpertPolicy  # a parameter (torch-free module); still importable from here
from .statistics import ActivationStatistics, ChannelStats
from .targets import Target, register_discoverer, register_kind, register_observer, target_matches as matches

log = logging.getLogger(__name__)

# Names under which a container's call receives the routing (generic experts, then gpt-oss's
# original forward signature); positional calls are the common case.
_INDEX_KWARGS = ("top_k_index", "router_indices")
_WEIGHT_KWARGS = ("top_k_weights", "routing_weights")


def is_experts_container(module: nn.Module) -> bool:
    """A ``@use_experts_implementation`` experts module with fused 3-D expert parameters."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    params = [getattr(module, name, None) for name in (first, "down_proj")]
    return all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in params)


def expert_param_names(container: nn.Module) -> tuple[str, str]:
    """(input-side, output-side) fused parameter names, in forward order."""
    return ("gate_up_proj" if container.has_gate else "up_proj"), "down_proj"


def num_experts(container: nn.Module) -> int:
    return int(getattr(container, expert_param_names(container)[1]).shape[0])


def expert_target_name(container_name: str, param: str, expert: int) -> str:
    return f"{container_name}.{param}[{expert}]"


def container_parameter_names(container: nn.Module) -> set[str]:
    """The parameters a supported container owns (fused weights and their biases)."""
    names = set(expert_param_names(container))
    if getattr(container, "has_bias", False):
        names |= {f"{name}_bias" for name in expert_param_names(container)}
    return names


def expert_containers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(relative name, module)`` of every experts container in a block, in module order."""
    return [(rel, m) for rel, m in block.named_modules() if rel and is_experts_container(m)]


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix else rel


def discover_expert_targets(block: nn.Module, prefix: str, targets_glob: list[str],
                            ignore_glob: list[str]) -> list[Target]:
    """One "expert" target per expert matrix: ``<container>.gate_up_proj[e]``, ``...down_proj[e]``."""
    found = []
    for rel, container in expert_containers(block):
        name = _join(prefix, rel)
        for expert in range(num_experts(container)):
            for param in expert_param_names(container):
                target = Target(expert_target_name(name, param, expert), "expert", name, param, expert)
                if matches(target, targets_glob) and not matches(target, ignore_glob):
                    found.append(target)
    return found


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2-style ``Conv1D``: a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2 and hasattr(module, "nf")


def discover_conv1d_targets(block: nn.Module, prefix: str, targets_glob: list[str],
                            ignore_glob: list[str]) -> list[Target]:
    found = []
    for rel, module in block.named_modules():
        if rel and is_conv1d(module):
            target = Target(_join(prefix, rel), "conv1d", _join(prefix, rel), "weight", None)
            if matches(target, targets_glob) and not matches(target, ignore_glob):
                found.append(target)
    return found


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = args[0] if args else kwargs["hidden_states"]
    if len(args) >= 2:
        return hidden, args[1]
    for key in _INDEX_KWARGS:
        if key in kwargs:
            return hidden, kwargs[key]
    raise TypeError("experts container called without top_k_index: cannot see the routing")


def routed_tokens(top_k_index: torch.Tensor, expert: int) -> torch.Tensor:
    """Indices (ascending) of the tokens routed to ``expert``; sentinel slots (>= E) never match."""
    return (top_k_index == expert).any(dim=-1).nonzero().flatten()


def _weight_view(container: nn.Module, param: str, expert: int) -> torch.Tensor:
    view = getattr(container, param)[expert]
    return view.t() if container.is_transposed else view


@torch.no_grad()
def expert_intermediate(container: nn.Module, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """The input of ``down_proj[expert]`` for hidden ``rows`` [tokens, H]: the container's own
    up projection (+bias), then its own gate (``_apply_gate``, interleaved for gpt-oss) or act."""
    first, _ = expert_param_names(container)
    weight = _weight_view(container, first, expert)
    bias = getattr(container, f"{first}_bias")[expert] if getattr(container, "has_bias", False) else None
    out = nn.functional.linear(rows.to(weight.dtype), weight, bias)
    return container._apply_gate(out) if container.has_gate else container.act_fn(out)


@torch.no_grad()
def expert_input_rows(container: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      all_experts: bool = False, counts: list[int] | None = None):
    """Yield ``(param, expert, rows)``: the 2-D input rows each expert matrix sees, one expert at a
    time so only one expert's rows are alive. ``counts`` (if given) receives the routed token
    count per expert; ``all_experts`` feeds every token to every expert (statistics only)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = top_k_index.reshape(hidden.shape[0], -1)
    first, second = expert_param_names(container)
    for expert in range(num_experts(container)):
        tokens = routed_tokens(index, expert)
        if counts is not None:
            counts.append(int(tokens.numel()))
        x = hidden if all_experts else hidden[tokens]
        yield first, expert, x
        yield second, expert, expert_intermediate(container, expert, x)


class ExpertObserver:
    """Forward pre-hooks on experts containers; while entered, every container call reports

    ``sink(target_name, rows)`` for each observed expert target and adds the routed token counts
    to ``tokens[container_name]`` (a list per expert; pass a dict to accumulate over blocks). The
    hook changes nothing in the call, so the block output is the normally routed one under
    either policy. ``root`` is the model or the targets' block (``Target.module`` resolves both).
    """

    def __init__(self, targets: list[Target], root: nn.Module, sink: Callable[[str, torch.Tensor], None],
                 expert_policy: ExpertPolicy | None = None, tokens: dict[str, list[int]] | None = None,
                 **_options):
        self.root = root
        self.policy = expert_policy or ExpertPolicy()
        self.sink = sink
        self.wanted: dict[str, set[tuple[str, int]]] = {}
        self.containers: dict[str, nn.Module] = {}
        for target in targets:
            if target.kind == "expert":
                self.wanted.setdefault(target.module_name, set()).add((target.param_name, target.expert))
                self.containers.setdefault(target.module_name, target.module(root))
        self.tokens: dict[str, list[int]] = tokens if tokens is not None else {}
        self.handles: list = []

    def _hook(self, name: str):
        wanted = self.wanted[name]

        def hook(module, args, kwargs):
            hidden, index = _routing(args, kwargs)
            counts: list[int] = []
            for param, expert, x in expert_input_rows(module, hidden, index, counts=counts,
                                                      all_experts=self.policy.mode == "calibrate_all_experts"):
                if (param, expert) in wanted:
                    self.sink(expert_target_name(name, param, expert), x)
            acc = self.tokens.setdefault(name, [0] * len(counts))
            for expert, count in enumerate(counts):
                acc[expert] += count

        return hook

    def __enter__(self) -> "ExpertObserver":
        for name, container in self.containers.items():
            self.handles.append(container.register_forward_pre_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class ExpertStatisticsCollector(ExpertObserver):
    """Per-expert-target ``ChannelStats`` (the same accumulation as linear layers' statistics)."""

    def __init__(self, targets: list[Target], root: nn.Module, into: ActivationStatistics,
                 policy: ExpertPolicy | None = None):
        self.into = into
        super().__init__(targets, root, self._add, policy)

    def _add(self, name: str, rows: torch.Tensor) -> None:
        stats = self.into.layers.get(name)
        if stats is None:
            stats = self.into.layers[name] = ChannelStats.zeros(rows.shape[-1])
        stats.add(rows)


def apply_expert_policy(stats: ActivationStatistics, targets: list[Target], tokens: dict[str, list[int]],
                        policy: ExpertPolicy) -> dict[str, str]:
    """Replace the statistics of under-calibrated experts by the policy's fallback, in place.

    Returns ``{target name: fallback used}`` (also logged as a warning) for the masks artifact.
    Under ``calibrate_all_experts`` every expert saw every token and nothing falls back.
    """
    if policy.mode == "calibrate_all_experts":
        return {}
    fallbacks: dict[str, str] = {}
    groups: dict[str, list[Target]] = {}
    for target in targets:
        if target.kind == "expert":
            groups.setdefault(target.numel_key, []).append(target)
    for key, members in groups.items():
        counts = tokens.get(members[0].module_name)
        if counts is None:
            raise KeyError(f"no token counts for experts container {members[0].module_name!r} (was it observed?)")
        starved = [t for t in members if counts[t.expert] < policy.min_tokens_per_expert]
        if not starved:
            continue
        channels = stats[members[0].name].sumsq.numel()
        pooled = ChannelStats.zeros(channels)
        for t in members:
            if t in starved:
                continue
            pooled.add_partial(stats[t.name].sumsq.double(), stats[t.name].sum.double(), stats[t.name].count)
        for t in starved:
            how = policy.fallback
            if how == "pooled" and pooled.count == 0:
                how = "magnitude"  # no expert of the container is calibrated: nothing to pool
            if how == "pooled":
                stats.layers[t.name] = ChannelStats(pooled.sumsq.clone(), pooled.sum.clone(), pooled.count)
            else:
                # Unit norms make the Wanda score |W|: magnitude within each row.
                stats.layers[t.name] = ChannelStats(torch.ones(channels, dtype=torch.float64),
                                                    torch.zeros(channels, dtype=torch.float64), 0)
            fallbacks[t.name] = f"{how} ({counts[t.expert]} tokens < {policy.min_tokens_per_expert})"
    if fallbacks:
        log.warning("%d expert matrices had fewer than %d routed calibration tokens and use fallback statistics: %s",
                    len(fallbacks), policy.min_tokens_per_expert, ", ".join(f"{k}: {v}" for k, v in fallbacks.items()))
    return fallbacks


def expert_metadata(policy: ExpertPolicy, tokens: dict[str, list[int]], fallbacks: dict[str, str]) -> dict[str, str]:
    """String-valued facts for the masks artifact (``MaskDict.metadata``)."""
    return {"expert_policy": policy.describe(),
            "expert_tokens": json.dumps(tokens, sort_keys=True),
            "expert_fallbacks": json.dumps(fallbacks, sort_keys=True)}


def tokens_per_expert_table(tokens: dict[str, list[int]]) -> list[dict[str, object]]:
    """Rows ``{container, expert, tokens, share}`` in container then expert order."""
    rows = []
    for container in sorted(tokens, key=_natural_key):
        counts = tokens[container]
        total = sum(counts)
        for expert, count in enumerate(counts):
            rows.append({"container": container, "expert": expert, "tokens": count,
                         "share": round(count / total, 6) if total else 0.0})
    return rows


def usable_experts_implementation(model: nn.Module) -> str | None:
    """Switch a float64 MoE model off ``grouped_mm`` (transformers' CPU default, which has no
    float64 kernel and fails mid-forward) to ``batched_mm``; returns the implementation in use.
    The observer sees the routing under either, so statistics do not depend on the choice."""
    containers = expert_containers(model)
    if not containers:
        return None
    config = model.config
    current = getattr(config, "_experts_implementation", None)
    if current == "grouped_mm" and getattr(containers[0][1], "down_proj").dtype == torch.float64:
        log.info("float64 experts: using experts_implementation 'batched_mm' (grouped_mm has no float64 kernel)")
        model.set_experts_implementation("batched_mm")
        current = "batched_mm"
    return current


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _expert_view(target: Target, container: nn.Module, param: torch.Tensor) -> torch.Tensor:
    view = param.data[target.expert]
    return view.t() if getattr(container, "is_transposed", False) else view


register_kind("expert", _expert_view)
register_discoverer("expert", discover_expert_targets)
register_discoverer("conv1d", discover_conv1d_targets)
register_observer("expert", ExpertObserver)
