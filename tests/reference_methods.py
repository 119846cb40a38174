"""Independent, straightforward implementations of the methods beyond Wanda, for tests.

Written from the papers and the reference repositories' loops, deliberately naive: samples go
through each block one at a time, every layer keeps its own statistics (no sharing), SparseGPT
works on the explicit inverse Hessian with one elimination step per column (no Cholesky, no lazy
batching), DSnoT and the channel reallocation are plain Python loops over rows and groups. The
library's batched implementations are compared against these.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.reference_wanda import first_block_inputs, reference_mask


# --------------------------------------------------------------------------- scores

def ref_score(method, weight, scaler, alpha=0.5):
    w = weight.detach().double().abs()
    if method == "magnitude":
        return w
    act = torch.sqrt(scaler.reshape(1, -1))
    if method in ("wanda", "sparsegpt"):
        return w * act
    if method == "ria":
        rel = torch.zeros_like(w)
        col = w.sum(0)
        row = w.sum(1)
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                a = w[i, j] / col[j] if col[j] > 0 else 0.0
                b = w[i, j] / row[i] if row[i] > 0 else 0.0
                rel[i, j] = a + b
        return rel * act ** alpha
    raise ValueError(method)


# --------------------------------------------------------------------------- OWL

def ref_owl_allocation(ratios, sparsity, lam):
    """The OWL reference's formula, in its own terms (ratios in percent, keep ratios)."""
    r = np.array(ratios, dtype=np.float64) * 100
    if r.max() == r.min():
        return [sparsity] * len(ratios)
    r = (r - r.min()) * (1 / (r.max() - r.min()) * lam * 2)
    r = r - np.mean(r) + (1 - sparsity)
    return [float(1 - x) for x in r]


def ref_outlier_ratio(scores, m):
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel()


# --------------------------------------------------------------------------- Wanda variant

def ref_variant_mask(metric, sparsity, tol=0.001):
    """The Wanda reference's ``use_variant`` loop (return_given_alpha and its bisection)."""
    sort_values, _ = torch.sort(metric, dim=-1, stable=True)
    cumsum = torch.cumsum(sort_values, dim=1)
    total = metric.sum(dim=1)

    def given(alpha):
        sort_mask = cumsum <= (total * alpha).reshape(-1, 1)
        counts = sort_mask.sum(dim=1, keepdim=True)
        thres = torch.gather(sort_values, 1, (counts - 1).clamp_min(0))
        mask = (metric <= thres) & (counts > 0)
        return mask, float(mask.sum()) / mask.numel()

    alpha, hist = 0.4, [0.0, 0.8]
    mask, cur = given(alpha)
    while abs(cur - sparsity) > tol and hist[1] - hist[0] >= 1e-9:
        if cur > sparsity:
            new = (alpha + hist[0]) / 2.0
            hist[1] = alpha
        else:
            new = (alpha + hist[1]) / 2.0
            hist[0] = alpha
        alpha = new
        mask, cur = given(alpha)
    return mask


# --------------------------------------------------------------------------- RIA permutation

def ref_nm_retained(metric, n, m):
    total = 0.0
    for r in range(metric.shape[0]):
        for g in range(0, metric.shape[1], m):
            values = sorted(metric[r, g:g + m].tolist())
            total += sum(values[n:])
    return total


def ref_reallocation(metric, m):
    cols = metric.shape[1]
    k = cols // m
    colsum = metric.sum(0)
    order = sorted(range(cols), key=lambda j: (colsum[j].item(), j))
    perm = [0] * cols
    for g in range(k):
        for p in range(m):
            within = g if p % 2 == 0 else k - 1 - g
            perm[g * m + p] = order[p * k + within]
    return torch.tensor(perm)


# --------------------------------------------------------------------------- DSnoT

def ref_dsnot(weight, mask, mean, var, importance, nm=None, cycles=50, threshold=0.1 / 2048, power=1.0):
    """Row by row, candidate lists built from the initial mask, as in DSnoT's description."""
    W = weight.detach().double()
    mask = mask.clone()
    D = W * mean.double().reshape(1, -1)
    key = D / var.double().clamp_min(1e-12).pow(power).reshape(1, -1)
    rows, cols = W.shape
    for r in range(rows):
        pruned0 = [j for j in range(cols) if mask[r, j]]
        kept0 = [j for j in range(cols) if not mask[r, j]]
        e = sum(D[r, j].item() for j in pruned0)
        grow_list = sorted(pruned0, key=lambda j: (key[r, j].item(), j))
        lo, hi = 0, len(grow_list) - 1
        neg = sorted([j for j in kept0 if D[r, j] < 0], key=lambda j: (importance[r, j].item(), j))
        pos = sorted([j for j in kept0 if D[r, j] > 0], key=lambda j: (importance[r, j].item(), j))
        prunable = set(kept0)
        for _ in range(cycles):
            if e > 0:
                if hi < lo or key[r, grow_list[hi]] <= 0:
                    break
                g = grow_list[hi]
            else:
                if lo > hi or key[r, grow_list[lo]] >= 0:
                    break
                g = grow_list[lo]
            if nm is None:
                pool = neg if e > 0 else pos
                if not pool:
                    break
                c = pool[0]
            else:
                m = nm[1]
                start = g - g % m
                options = [j for j in range(start, start + m) if j in prunable]
                if not options:
                    break
                c = min(options, key=lambda j: (importance[r, j].item(), j))
            new = e - D[r, g].item() + D[r, c].item()
            if not (abs(e) > threshold and abs(new) < abs(e)):
                break
            mask[r, g] = False
            mask[r, c] = True
            if e > 0:
                hi -= 1
            else:
                lo += 1
            if nm is None:
                pool.pop(0)
            else:
                prunable.discard(c)
            e = new
    return mask


# --------------------------------------------------------------------------- SparseGPT

def _eliminate(hinv, j):
    return hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]


def ref_sparsegpt(weight, hessian, sparsity, nm=None, blocksize=128, damp=0.01):
    """OBS column by column on the explicit inverse Hessian (the paper's Algorithm 1 without lazy batches)."""
    W = weight.detach().double().clone()
    H = hessian.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(H)
    mask = torch.zeros_like(W, dtype=torch.bool)

    def future_diagonals(start, stop):
        t = hinv.clone()
        out = []
        for j in range(start, stop):
            out.append(t[j, j].item())
            t = _eliminate(t, j)
        return out

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:
            d = future_diagonals(i1, i2)
            entries = []
            for r in range(W.shape[0]):
                for c in range(i1, i2):
                    entries.append((W[r, c].item() ** 2 / d[c - i1], r * (i2 - i1) + (c - i1), r, c))
            entries.sort()
            for _, _, r, c in entries[:int(W.shape[0] * (i2 - i1) * sparsity)]:
                mask[r, c] = True
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                n, m = nm
                d = future_diagonals(j, j + m)
                for r in range(W.shape[0]):
                    order = sorted(range(m), key=lambda t: (W[r, j + t].item() ** 2 / d[t], t))
                    for t in order[:n]:
                        mask[r, j + t] = True
            h = hinv[j, j]
            for r in range(W.shape[0]):
                w = W[r, j].item()
                q = 0.0 if mask[r, j] else w
                W[r, j:] -= (w - q) / h * hinv[j, j:]
                W[r, j] = q
            hinv = _eliminate(hinv, j)
    return W, mask


# --------------------------------------------------------------------------- the whole model

@torch.no_grad()
def reference_prune(model, tokens, method="wanda", sparsity=0.5, nm=None, sequential=True, scope="row",
                    owl=None, variant=False, dsnot=None, ria_alpha=0.5, permute=False, blocksize=128, damp=0.01,
                    only=None):
    """Prune a LLaMA-style ``model`` in place the naive way; return masks (and permutations).
    ``only``: names of the block's linear layers to prune (e.g. ``("self_attn.k_proj",)``); all by default."""
    layers = model.model.layers
    inputs, kwargs = first_block_inputs(model, tokens)

    def run(layer, source):
        outs = [layer(h, **kwargs) for h in source]
        return [o[0] if isinstance(o, tuple) else o for o in outs]

    def collect(layer, source):
        linears = {n: mod for n, mod in layer.named_modules()
                   if isinstance(mod, nn.Linear) and (only is None or n in only)}
        acc = {n: {"scaler": torch.zeros(mod.in_features, dtype=torch.float64), "seen": 0,
                   "sum": torch.zeros(mod.in_features, dtype=torch.float64),
                   "sumsq": torch.zeros(mod.in_features, dtype=torch.float64), "tokens": 0,
                   "H": torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64)}
               for n, mod in linears.items()}

        def make_hook(name):
            def hook(mod, args, out):
                x = args[0].reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
                a = acc[name]
                a["scaler"] *= a["seen"] / (a["seen"] + 1)
                a["seen"] += 1
                a["scaler"] += torch.norm(x.t(), p=2, dim=1) ** 2 / a["seen"]
                a["sum"] += x.sum(0)
                a["sumsq"] += (x ** 2).sum(0)
                a["tokens"] += x.shape[0]
                for t in range(x.shape[0]):
                    a["H"] += torch.outer(x[t], x[t])
            return hook

        handles = [mod.register_forward_hook(make_hook(n)) for n, mod in linears.items()]
        outs = run(layer, source)
        for h in handles:
            h.remove()
        return linears, acc, outs

    block_sparsity = None
    if owl is not None:
        owl_m, lam = owl
        ratios = []
        dense = list(inputs)
        for layer in layers:
            if method == "magnitude":
                linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
                scores = [ref_score("magnitude", mod.weight, None) for mod in linears.values()]
            else:
                linears, acc, dense = collect(layer, dense)
                score_method = "wanda" if method == "sparsegpt" else method
                scores = [ref_score(score_method, mod.weight, acc[n]["scaler"], ria_alpha) for n, mod in linears.items()]
            ratios.append(ref_outlier_ratio(scores, owl_m))
        block_sparsity = ref_owl_allocation(ratios, sparsity, lam)

    masks, perms = {}, {}
    dense_inputs = list(inputs)
    for index, layer in enumerate(layers):
        source = inputs if sequential else dense_inputs
        linears, acc, outs = collect(layer, source)
        s = sparsity if block_sparsity is None else block_sparsity[index]
        for name, mod in linears.items():
            full = f"model.layers.{index}.{name}"
            a = acc[name]
            if method == "sparsegpt":
                new_weight, mask = ref_sparsegpt(mod.weight, a["H"], s, nm, blocksize, damp)
                mod.weight.data.copy_(new_weight.to(mod.weight.dtype))
                masks[full] = mask
                continue
            metric = ref_score(method, mod.weight, a["scaler"], ria_alpha)
            perm = None
            if variant:
                mask = ref_variant_mask(metric, s)
            elif permute:
                candidate = ref_reallocation(metric, nm[1])
                if ref_nm_retained(metric[:, candidate], *nm) > ref_nm_retained(metric, *nm):
                    perm = candidate
                mask = reference_mask(metric if perm is None else metric[:, perm], s, nm)
            elif scope == "layer":
                flat = sorted(range(metric.numel()), key=lambda f: (metric.flatten()[f].item(), f))
                mask = torch.zeros(metric.numel(), dtype=torch.bool)
                mask[flat[:int(metric.numel() * s)]] = True
                mask = mask.reshape(metric.shape)
            else:
                mask = reference_mask(metric, s, nm)
            if dsnot is not None:
                mean = a["sum"] / a["tokens"]
                var = (a["sumsq"] / a["tokens"] - mean ** 2).clamp_min(0)
                w, imp = mod.weight, metric
                if perm is not None:
                    w, mean, var = w[:, perm], mean[perm], var[perm]
                mask = ref_dsnot(w, mask, mean, var, imp if perm is None else imp[:, perm], nm, **dsnot)
            if perm is not None:
                unpermuted = torch.zeros_like(mask)
                unpermuted[:, perm] = mask
                mask = unpermuted
                perms[full] = perm
            mod.weight.data[mask] = 0
            masks[full] = mask
        if sequential:
            inputs = run(layer, inputs)
        else:
            dense_inputs = outs
    return masks, perms
