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


# ----------------------------------------------------------------------------- the reference's own calls
# ``tie_break: topk`` promises the reference's masks bit for bit, which needs its exact arithmetic,
# not only its selection: the float32 running ``scaler_row`` of WrappedGPT.add_batch, the metric
# ``torch.abs(W) * torch.sqrt(scaler_row.reshape((1, -1)))`` and, for N:M, one ``torch.topk`` per
# group of M columns (a strided [rows, M] slice). Written from locuslab/wanda lib/prune.py and
# lib/layerwrapper.py, independently of the library's code.


def reference_nm_topk_loop(metric: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """locuslab/wanda ``prune_wanda``'s N:M selection: a loop over the columns calling
    ``torch.topk`` on each [rows, m] slice of the metric (True = pruned)."""
    W_mask = (torch.zeros_like(metric) == 1)
    for ii in range(metric.shape[1]):
        if ii % m == 0:
            tmp = metric[:, ii:(ii + m)].float()
            W_mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    return W_mask


def reference_sort_selection(metric: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's unstructured selection: the first int(in * sparsity) of a stable sort."""
    W_mask = (torch.zeros_like(metric) == 1)
    indices = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
    return W_mask.scatter_(1, indices, True)


class _ScalerRow:
    """WrappedGPT's statistics, transcribed: float32, updated once per forward call."""

    def __init__(self, columns: int):
        self.scaler_row = torch.zeros(columns)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


@torch.no_grad()
def reference_wanda_topk(model, tokens: torch.Tensor, sparsity: float, nm=None, on_block=None,
                         keep_metrics: bool = False):
    """``prune_wanda`` (sequential, one sample per forward) on a LLaMA-style model, in place;
    returns ``(masks, metrics)`` keyed by full module name (``metrics`` empty unless
    ``keep_metrics``). ``on_block(index)`` runs after each block (progress)."""
    layers = model.model.layers
    inps, kwargs = first_block_inputs(model, tokens)
    inps = [h[0] for h in inps]  # [seqlen, hidden] each, as the reference's inps[j]
    masks, metrics = {}, {}
    for index, layer in enumerate(layers):
        subset = {n: mod for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        wrapped = {n: _ScalerRow(mod.in_features) for n, mod in subset.items()}

        def add_batch(name):
            def hook(_, inp, out):
                wrapped[name].add_batch(inp[0].data)
            return hook

        handles = [subset[n].register_forward_hook(add_batch(n)) for n in subset]
        for h in inps:
            layer(h.unsqueeze(0), **kwargs)
        for h in handles:
            h.remove()
        for name, mod in subset.items():
            W_metric = torch.abs(mod.weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
            mask = reference_nm_topk_loop(W_metric, *nm) if nm else reference_sort_selection(W_metric, sparsity)
            mod.weight.data[mask] = 0
            masks[f"model.layers.{index}.{name}"] = mask
            if keep_metrics:
                metrics[f"model.layers.{index}.{name}"] = W_metric
        outs = []
        for h in inps:
            out = layer(h.unsqueeze(0), **kwargs)
            outs.append((out[0] if isinstance(out, tuple) else out)[0])
        inps = outs
        if on_block is not None:
            on_block(index)
    return masks, metrics
