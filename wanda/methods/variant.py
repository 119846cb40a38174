"""The Wanda variant (reference code, ``--use_variant``): per-row adaptive sparsity.

Each output row prunes its lowest-scoring weights whose cumulative score stays within a share
``alpha`` of the row's total score, so rows with many near-zero scores prune more. One ``alpha``
serves the whole layer; it is found by bisection so that the layer's sparsity lands within
``tolerance`` of the target.

Deliberate differences from the reference: a row prunes exactly the weights whose cumulative
share fits (the reference's ``score <= threshold`` also prunes ties of the last one, and a row
where not even the smallest score fits is pruned entirely through an index of -1; here it prunes
nothing); the bisection runs until the tolerance is met (the reference also stops once the alpha
interval is narrower than 0.001, possibly outside the tolerance), and when the target exceeds
what ``alpha <= 0.8`` reaches, the interval extends to 1. Where the reference meets the tolerance,
the alpha sequence and the result are the same.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:  # imported on first use: the method registry, read when parameters are validated, needs no torch
    torch = lazy_module("torch")

log = logging.getLogger(__name__)

_MAX_STEPS = 64


def _prepare(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, order = torch.sort(scores.double(), dim=1, stable=True)
    cumulative = values.cumsum(dim=1)
    total = scores.double().sum(dim=1, keepdim=True)
    return order, cumulative, total


def _counts(cumulative: torch.Tensor, total: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weights pruned per row at ``alpha``: the sorted prefix whose cumulative score <= alpha * total."""
    return (cumulative <= total * alpha).sum(dim=1)


def variant_row_mask(scores: torch.Tensor, sparsity: float, tolerance: float = 0.001) -> tuple[torch.Tensor, float, float]:
    """(mask, alpha, achieved sparsity) for one layer; True = pruned."""
    rows, cols = scores.shape
    numel = rows * cols
    order, cumulative, total = _prepare(scores)

    def sparsity_at(a: float) -> tuple[torch.Tensor, float]:
        counts = _counts(cumulative, total, a)
        return counts, float(counts.sum()) / numel

    low, high, alpha = 0.0, 0.8, 0.4
    if sparsity_at(high)[1] < sparsity - tolerance:
        low, high, alpha = 0.8, 1.0, 0.9
    counts, achieved = sparsity_at(alpha)
    steps = 0
    while abs(achieved - sparsity) > tolerance and steps < _MAX_STEPS:
        if achieved > sparsity:
            high = alpha
        else:
            low = alpha
        alpha = (low + high) / 2.0
        counts, achieved = sparsity_at(alpha)
        steps += 1
    if abs(achieved - sparsity) > tolerance:
        log.warning("variant: layer %dx%d reached sparsity %.6f, target %.6f +/- %g (ties or too few weights)",
                    rows, cols, achieved, sparsity, tolerance)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=order.device).expand(rows, cols))
    mask = ranks < counts.reshape(-1, 1)
    return mask, alpha, achieved
