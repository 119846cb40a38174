"""An independent, straightforward Wanda written from the paper and the reference code's loop.

Deliberately naive: samples go through each block one at a time, statistics use the reference's
running average (``scaler_row``), masks come from plain Python loops over rows and groups. Tests
compare the library's batched implementation against this.
"""
from __future__ import annotations

import torch
from torch import nn


class _Catcher(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.inputs: list[tuple[torch.Tensor, dict]] = []

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append((hidden_states, kwargs))
        raise ValueError("caught")


def first_block_inputs(model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """The hidden states entering block 0 for each calibration row (one at a time, as the
    reference code does) and the keyword arguments the block receives."""
    layers = model.model.layers
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    for row in tokens:
        try:
            model(input_ids=row.unsqueeze(0), use_cache=False)
        except ValueError:
            pass
    layers[0] = catcher.block
    return [h for h, _ in catcher.inputs], catcher.inputs[0][1]


def _row_mask(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    mask = torch.zeros_like(metric, dtype=torch.bool)
    k = int(metric.shape[1] * sparsity)
    for r in range(metric.shape[0]):
        order = sorted(range(metric.shape[1]), key=lambda j: (metric[r, j].item(), j))
        for j in order[:k]:
            mask[r, j] = True
    return mask


def _nm_mask(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    mask = torch.zeros_like(metric, dtype=torch.bool)
    for r in range(metric.shape[0]):
        for g in range(0, metric.shape[1], m):
            order = sorted(range(g, g + m), key=lambda j: (metric[r, j].item(), j))
            for j in order[:n]:
                mask[r, j] = True
    return mask


def reference_mask(metric, sparsity, nm):
    return _nm_mask(metric, *nm) if nm else _row_mask(metric, sparsity)


@torch.no_grad()
def reference_wanda(model, tokens: torch.Tensor, sparsity: float, nm=None, sequential=True, method="wanda"):
    """Prune a LLaMA-style ``model`` (blocks at model.model.layers) in place; return masks."""
    layers = model.model.layers
    inputs, kwargs = first_block_inputs(model, tokens)

    masks = {}
    dense_inputs = list(inputs)
    for index, layer in enumerate(layers):
        linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        scaler = {n: torch.zeros(mod.in_features, dtype=torch.float64) for n, mod in linears.items()}
        seen = {n: 0 for n in linears}

        def make_hook(name):
            def hook(mod, args, out):
                inp = args[0].reshape(-1, args[0].shape[-1]).t().double()  # [in, tokens]
                tmp = 1  # one sample per call, as in the reference
                scaler[name] *= seen[name] / (seen[name] + tmp)
                seen[name] += tmp
                scaler[name] += torch.norm(inp, p=2, dim=1) ** 2 / seen[name]
            return hook

        handles = [mod.register_forward_hook(make_hook(n)) for n, mod in linears.items()]
        source = inputs if sequential else dense_inputs
        outs = [layer(h, **kwargs) for h in source]
        outs = [o[0] if isinstance(o, tuple) else o for o in outs]
        for h in handles:
            h.remove()
        for name, mod in linears.items():
            if method == "magnitude":
                metric = mod.weight.abs()
            else:
                metric = mod.weight.abs() * torch.sqrt(scaler[name].reshape(1, -1))
            mask = reference_mask(metric, sparsity, nm)
            mod.weight.data[mask] = 0
            masks[f"model.layers.{index}.{name}"] = mask
        if sequential:
            outs = [layer(h, **kwargs) for h in inputs]
            inputs = [o[0] if isinstance(o, tuple) else o for o in outs]
        else:
            dense_inputs = outs
    return masks
