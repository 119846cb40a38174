"""Independent, naive references for structured pruning, written from the papers.

Expert saliency: the MoE block's input is captured, then every token is routed by hand with the
family's routing written out (Mixtral, Qwen2-MoE, DeepSeek-V3) and every expert's output is
recomputed token by token from the fused weights. Width: the output projection's inputs are
captured and per-channel scores and means computed in plain loops. Nothing here calls
``wanda.structure``; the tests compare the library against these.

``masked_router`` and ``masked_width`` make the *original* model behave as the pruned one should:
removed experts' router logits set to -inf, removed channels' inputs of the output projection
zeroed (plus the compensation bias).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


def _moe_blocks(model):
    """(layer index, MoE block) for the blocks whose MLP is sparse."""
    blocks = [(i, getattr(layer, "block_sparse_moe", None) or layer.mlp) for i, layer in enumerate(model.model.layers)]
    return [(i, b) for i, b in blocks if hasattr(b, "experts")]


def _capture(model, tokens, modules):
    seen = {id(m): [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0].detach()))
               for m in modules]
    with torch.no_grad():
        for row in tokens:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for k, v in seen.items()}


def _route(family, block, config, x):
    """(experts, gate values) of one token, by hand."""
    w = block.gate.weight.double()
    logits = [sum(float(w[e, c]) * float(x[c]) for c in range(x.numel())) for e in range(w.shape[0])]
    k = config.num_experts_per_tok
    if family == "deepseek_v3":
        scores = [1 / (1 + math.exp(-v)) for v in logits]
        bias = block.gate.e_score_correction_bias.double().tolist()
        choice = sorted(range(len(scores)), key=lambda e: -(scores[e] + bias[e]))[:k]
        values = [scores[e] for e in choice]
        if config.norm_topk_prob:
            total = sum(values)
            values = [v / total for v in values]
        return choice, [v * config.routed_scaling_factor for v in values]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    probs = [v / sum(exps) for v in exps]
    choice = sorted(range(len(probs)), key=lambda e: -probs[e])[:k]
    values = [probs[e] for e in choice]
    if family == "mixtral" or getattr(config, "norm_topk_prob", False):
        values = [v / sum(values) for v in values]
    return choice, values


def _expert_out(experts, e, x, act):
    gate_up = experts.gate_up_proj[e].double() @ x
    half = gate_up.numel() // 2
    return experts.down_proj[e].double() @ (act(gate_up[:half]) * gate_up[half:])


@torch.no_grad()
def reference_expert_saliency(model, tokens, family: str) -> dict[int, dict[str, list[float]]]:
    """{layer: {"reap": [...], "frequency": [...], "gate": [...]}} per expert."""
    config = model.config
    blocks = _moe_blocks(model)
    inputs = _capture(model, tokens, [b for _, b in blocks])
    out = {}
    for index, block in blocks:
        experts = block.experts
        n = experts.down_proj.shape[0]
        count, gate, reap = [0.0] * n, [0.0] * n, [0.0] * n
        for x in inputs[id(block)].double():
            choice, values = _route(family, block, config, x)
            total = sum(values)
            for e, v in zip(choice, values):
                g = v / total
                count[e] += 1
                gate[e] += g
                reap[e] += g * float(_expert_out(experts, e, x, experts.act_fn).norm())
        out[index] = {"frequency": count, "gate": gate, "reap": [r / c if c else 0.0 for r, c in zip(reap, count)]}
    return out


def lowest(values: list[float], n: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=lambda j: (values[j], j))[:n])


class _MaskLogits(TorchFunctionMode):
    def __init__(self, removed):
        super().__init__()
        self.removed = removed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is nn.functional.linear:
            out = out.clone()
            out[..., self.removed] = float("-inf")
        return out


@contextlib.contextmanager
def masked_router(model, removed: dict[int, list[int]]):
    """The original model with the ``removed`` experts' router logits at -inf (per layer index).

    The router's own forward runs (its linear output is masked by a torch function mode active
    only inside it); DeepSeek-V3 chooses on ``sigmoid(logit) + correction bias``, so its removed
    experts' correction bias is set to -inf too."""
    handles, saved = [], []
    for index, block in _moe_blocks(model):
        router = getattr(block, "gate", None) or block.router
        mode = _MaskLogits(removed[index])
        # Hooks return None so the router's inputs and outputs pass unchanged.
        handles.append(router.register_forward_pre_hook(lambda *_a, m=mode: [m.__enter__(), None][1]))
        handles.append(router.register_forward_hook(lambda *_a, m=mode: [m.__exit__(None, None, None), None][1]))
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            saved.append((bias, bias.clone()))
            bias[removed[index]] = float("-inf")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for bias, value in saved:
            bias.copy_(value)


# -- width -------------------------------------------------------------------------------------

def out_projections(model, part: str):
    """[(layer index, output projection module, is_conv1d)] of "mlp" or "attn" per block."""
    if model.config.model_type == "gpt2":
        return [(i, getattr(b, part).c_proj, True) for i, b in enumerate(model.transformer.h)]
    return [(i, b.mlp.down_proj if part == "mlp" else b.self_attn.o_proj, False)
            for i, b in enumerate(model.model.layers)]


@torch.no_grad()
def reference_width(model, tokens, part: str, score: str, n_remove: int, group: int = 1):
    """{layer: (removed units, compensation [out] float64)}: ``group`` input channels per unit."""
    result = {}
    projections = out_projections(model, part)
    inputs = _capture(model, tokens, [m for _, m, _ in projections])
    for index, module, conv in projections:
        w = (module.weight.t() if conv else module.weight).double()
        x = inputs[id(module)].double()
        channel_scores, means = [], []
        for j in range(w.shape[1]):
            col = x[:, j]
            mean = sum(col.tolist()) / col.numel()
            sq = sum(v * v for v in col.tolist())
            means.append(mean)
            if score == "wanda":
                channel_scores.append(sum(abs(float(w[i, j])) * math.sqrt(sq) for i in range(w.shape[0])) / w.shape[0])
            else:
                var = sq / col.numel() - mean * mean
                channel_scores.append(var * sum(float(w[i, j]) ** 2 for i in range(w.shape[0])))
        units = [sum(channel_scores[u * group:(u + 1) * group]) for u in range(w.shape[1] // group)]
        removed = lowest(units, n_remove)
        comp = torch.zeros(w.shape[0], dtype=torch.float64)
        for u in removed:
            for j in range(u * group, (u + 1) * group):
                comp += w[:, j] * means[j]
        result[index] = (removed, comp)
    return result


@contextlib.contextmanager
def masked_width(model, part: str, plan: dict, group: int = 1, compensate: bool = False):
    """The original model with the removed units' inputs of the output projection zeroed and (if
    ``compensate``) their mean contribution added to its output."""
    handles = []
    for index, module, _ in out_projections(model, part):
        removed, comp = plan[index]
        channels = [j for u in removed for j in range(u * group, (u + 1) * group)]

        def pre(mod, args, channels=channels):
            x = args[0].clone()
            x[..., channels] = 0
            return (x,) + tuple(args[1:])

        handles.append(module.register_forward_pre_hook(pre))
        if compensate:
            handles.append(module.register_forward_hook(lambda mod, args, out, c=comp: out + c.to(out.dtype)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
