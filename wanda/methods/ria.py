"""RIA (Zhang et al. 2024): its score, and its input-channel permutation for N:M masks.

An N:M mask keeps the ``M - N`` best of every ``M`` consecutive inputs of a row. When important
input channels sit next to each other they compete for the same few slots; permuting the input
channels first spreads them over the groups. Two steps, as in the reference:

1. heuristic channel reallocation: sort channels by their summed score (ascending), cut the order
   into ``M`` equal chunks, and give in-group position ``p`` the ``p``-th chunk, every second
   chunk reversed, so each group gets one channel of every importance level;
2. optionally (``lsa``) for each in-group position in turn, reassign the channels at that position
   among the groups by a linear sum assignment that maximizes the retained score (scipy).

The permutation is kept only when it retains more score than the identity (the reference always
applies it). ``perm[p]`` is the original channel placed at position ``p``: the permuted weight
is ``W[:, perm]``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..lazy import lazy_module
from .base import ScoreMethod, register

if TYPE_CHECKING:
    import torch
else:  # imported on first use: the method registry, read when parameters are validated, needs no torch
    torch = lazy_module("torch")

log = logging.getLogger(__name__)


def retained_score(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score kept by the N:M mask of ``scores`` (keeps the M - N largest of each group)."""
    rows, cols = scores.shape
    groups = scores.double().reshape(rows, cols // m, m)
    kept = torch.sort(groups, dim=2).values[:, :, n:]
    return float(kept.sum())


def heuristic_reallocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    cols = scores.shape[1]
    groups = cols // m
    order = torch.sort(scores.double().sum(0), stable=True).indices
    perm = torch.empty(cols, dtype=torch.int64)
    for position in range(m):
        chunk = order[position * groups:(position + 1) * groups]
        if position % 2 == 1:
            chunk = chunk.flip(0)
        perm[position::m] = chunk
    return perm


def _lsa_position(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, position: int, chunk: int = 64) -> torch.Tensor:
    """Reassign the channels at in-group ``position`` among the groups to maximize the retained score."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    groups = cols // m
    permuted = scores.double()[:, perm].reshape(rows, groups, m)
    others = torch.cat([permuted[:, :, :position], permuted[:, :, position + 1:]], dim=2)  # [rows, groups, m-1]
    keep = m - n
    ordered = torch.sort(others, dim=2, descending=True).values
    # With one candidate x added to a group's other m-1 values, the kept sum is the sum of the
    # best keep-1 others plus max(x, keep-th best other).
    base = ordered[:, :, :keep - 1].sum(dim=2)  # [rows, groups]
    floor = ordered[:, :, keep - 1]  # [rows, groups]
    candidates = permuted[:, :, position]  # [rows, groups]: channel of group a at this position
    value = torch.zeros(groups, groups, dtype=torch.float64)  # [candidate group a, target group b]
    for start in range(0, rows, chunk):
        x = candidates[start:start + chunk]
        f = floor[start:start + chunk]
        value += torch.maximum(x.unsqueeze(2), f.unsqueeze(1)).sum(0)
    value += base.sum(0).unsqueeze(0)
    sources, targets = linear_sum_assignment(value.numpy(), maximize=True)
    new_perm = perm.clone()
    slots = torch.arange(groups) * m + position
    new_perm[slots[torch.as_tensor(targets)]] = perm[slots[torch.as_tensor(sources)]]
    return new_perm


def channel_permutation(scores: torch.Tensor, n: int, m: int, lsa: bool = False) -> tuple[torch.Tensor | None, dict]:
    """(perm or None when the identity is as good, report with retained scores)."""
    cols = scores.shape[1]
    identity = retained_score(scores, n, m)
    perm = heuristic_reallocation(scores, m)
    permuted = retained_score(scores[:, perm], n, m)
    report = {"identity": identity, "reallocation": permuted}
    if lsa:
        for position in range(m):
            perm = _lsa_position(scores, perm, n, m, position)
        permuted = retained_score(scores[:, perm], n, m)
        report["lsa"] = permuted
    if permuted <= identity:
        report["kept"] = "identity"
        return None, report
    report["kept"] = "permutation"
    assert torch.equal(torch.sort(perm).values, torch.arange(cols))
    return perm, report


def ria_score(weight: torch.Tensor, stats, alpha: float = 0.5) -> torch.Tensor:
    """Relative importance and activations (Zhang et al. 2024).

    ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^alpha``: the weight relative to
    its input channel (column sum) plus relative to its output row (row sum), times the activation
    norm to the power ``alpha``. As for Wanda the norm is taken as sqrt(sum_sq / count), a
    per-layer constant factor that changes no ranking. An all-zero row or column contributes 0.
    """
    from .wanda import check_channels

    check_channels(weight, stats)
    magnitude = weight.detach().abs().float()
    column = magnitude.sum(0, keepdim=True)
    row = magnitude.sum(1, keepdim=True)
    relative = magnitude / torch.where(column > 0, column, torch.ones_like(column)) + \
        magnitude / torch.where(row > 0, row, torch.ones_like(row))
    activation = stats.mean_square().to(weight.device).sqrt().pow(alpha)
    return relative * activation.reshape(1, -1)


def permuted_mask(layer, scores: torch.Tensor, sparsity: float, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The permutation recipe (any score method, N:M): the mask chosen in permuted column order
    and returned in the layer's own order, with the permutation (None: the identity was kept)."""
    from ..masks import mask_from_scores
    from .dsnot import permuted_stats, refine_mask

    nm = config.nm
    perm, report = channel_permutation(scores, *nm, lsa=config.ria_lsa)
    log.debug("%s: channel permutation %s", layer.name, report)
    if perm is None:
        return mask_from_scores(scores, sparsity, nm, tie_break=config.tie_break), None
    perm = perm.to(scores.device)
    permuted = mask_from_scores(scores[:, perm], sparsity, nm, tie_break=config.tie_break)
    if config.refine == "dsnot":
        permuted = refine_mask(layer.name, layer.weight[:, perm], permuted, permuted_stats(layer.stats, perm),
                               scores[:, perm], config)
    mask = torch.empty_like(permuted)
    mask[:, perm] = permuted
    return mask, perm


@register
class RIA(ScoreMethod):
    name = "ria"
    recipes = ScoreMethod.recipes | {"layer_scope"}  # RIA's reference compares per layer

    def score(self, weight, stats, config):
        return ria_score(weight, self.needs_stats(stats), config.ria_alpha)
