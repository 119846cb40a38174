"""An independent, naive Wanda for mixture-of-experts blocks, written from the modeling files.

Deliberately separate from ``wanda.experts``: the input of each MoE block is captured, the
model's own router is run on it to get each token's experts, the tokens routed to expert ``e``
are gathered one by one in a Python loop, and the expert is rebuilt as its own ``nn.Linear``
layers from the fused parameters with each family's layout written out by hand (gpt-oss stores
[in, out] with biases and interleaves gate/up rows; the others store [out, in] with gate rows
then up rows). ``||X_j||`` is accumulated token by token in float64; masks come from the naive
per-row / N:M loops of ``tests.reference_wanda``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from tests.reference_wanda import reference_mask

# family -> (MoE block attribute under the decoder layer, router attribute under the MoE block)
MOE_BLOCK = {"mixtral": ("mlp", "gate"), "qwen2_moe": ("mlp", "gate"), "qwen3_moe": ("mlp", "gate"),
             "olmoe": ("mlp", "gate"), "deepseek_v3": ("mlp", "gate"), "gpt_oss": ("mlp", "router"),
             "granitemoe": ("block_sparse_moe", "router")}


def moe_blocks(model) -> list[tuple[str, nn.Module]]:
    """``(name of the experts module, MoE block)`` for every layer that has routed experts."""
    family = model.config.model_type
    attr, _ = MOE_BLOCK[family]
    found = []
    for index, layer in enumerate(model.model.layers):
        block = getattr(layer, attr)
        if hasattr(block, "experts"):
            found.append((f"model.layers.{index}.{attr}.experts", block))
    return found


def capture_moe_inputs(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The hidden states [tokens, H] entering every MoE block, over one forward per row."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, block in moe_blocks(model):
        def hook(module, args, name=name):
            captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(block.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in tokens:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def _linear(weight_out_in: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight_out_in.shape[1], weight_out_in.shape[0], bias=bias is not None, dtype=weight_out_in.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight_out_in)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def expert_as_linears(model, experts: nn.Module, e: int) -> tuple[nn.Linear, nn.Linear]:
    """(gate_up, down) of expert ``e`` as plain [out, in] linear layers."""
    if model.config.model_type == "gpt_oss":  # stored [in, out], with biases
        return (_linear(experts.gate_up_proj[e].detach().t(), experts.gate_up_proj_bias[e].detach()),
                _linear(experts.down_proj[e].detach().t(), experts.down_proj_bias[e].detach()))
    return _linear(experts.gate_up_proj[e].detach(), None), _linear(experts.down_proj[e].detach(), None)


def gated(model, gate_up_out: torch.Tensor) -> torch.Tensor:
    config = model.config
    if config.model_type == "gpt_oss":  # interleaved [g0, u0, g1, u1, ...], clamped SwiGLU
        gate, up = gate_up_out[:, 0::2], gate_up_out[:, 1::2]
        gate = gate.clamp(max=config.swiglu_limit)
        up = up.clamp(min=-config.swiglu_limit, max=config.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * config.swiglu_alpha))
    half = gate_up_out.shape[1] // 2
    return ACT2FN[config.hidden_act](gate_up_out[:, :half]) * gate_up_out[:, half:]


def route(model, block: nn.Module, hidden: torch.Tensor) -> list[list[int]]:
    """Each token's experts, from the model's own router (its last output is top_k_index)."""
    _, router_attr = MOE_BLOCK[model.config.model_type]
    with torch.no_grad():
        index = getattr(block, router_attr)(hidden)[-1]
    return [sorted(int(i) for i in row) for row in index]


def reference_expert_norms(model, tokens: torch.Tensor, all_experts: bool = False):
    """``{target name: ||X_j|| (float64)}`` and ``{experts module: routed tokens per expert}``."""
    norms, counts = {}, {}
    inputs = capture_moe_inputs(model, tokens)
    for name, block in moe_blocks(model):
        hidden = inputs[name]
        routing = route(model, block, hidden)
        experts = block.experts
        n_experts = experts.gate_up_proj.shape[0]
        counts[name] = [sum(e in r for r in routing) for e in range(n_experts)]
        for e in range(n_experts):
            gate_up, down = expert_as_linears(model, experts, e)
            sq_in = torch.zeros(gate_up.in_features, dtype=torch.float64)
            sq_mid = torch.zeros(down.in_features, dtype=torch.float64)
            for t in range(hidden.shape[0]):
                if not all_experts and e not in routing[t]:
                    continue
                x = hidden[t:t + 1]
                with torch.no_grad():
                    mid = gated(model, gate_up(x))
                sq_in += x[0].double() ** 2
                sq_mid += mid[0].double() ** 2
            norms[f"{name}.gate_up_proj[{e}]"] = sq_in.sqrt()
            norms[f"{name}.down_proj[{e}]"] = sq_mid.sqrt()
    return norms, counts


def reference_expert_masks(model, norms: dict, sparsity: float, nm: tuple[int, int] | None):
    """Wanda masks of every expert matrix ([out, in] layout) from ``norms``."""
    masks = {}
    for name, block in moe_blocks(model):
        for e in range(block.experts.gate_up_proj.shape[0]):
            gate_up, down = expert_as_linears(model, block.experts, e)
            for param, layer in (("gate_up_proj", gate_up), ("down_proj", down)):
                key = f"{name}.{param}[{e}]"
                metric = layer.weight.detach().abs().float() * norms[key].float().unsqueeze(0)
                masks[key] = reference_mask(metric, sparsity, nm)
    return masks
