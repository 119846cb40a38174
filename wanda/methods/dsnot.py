"""DSnoT: training-free refinement of a pruning mask (Zhang et al. 2024, "Dynamic Sparse No Training").

For output row r the expected output error of a mask is

    e_r = sum over pruned j of W_rj * E[X_j]

(the dense minus the sparse output, in expectation over the calibration tokens). Each cycle
swaps one pruned and one kept weight of the row to move e_r toward zero:

- regrow the pruned weight whose W_rj E[X_j] / Var(X_j)^power has the sign of e_r and the
  largest magnitude (removing it from the sum shrinks e_r most, preferring stable channels);
- prune a kept weight: unstructured, the least important (by the method's score) of those whose
  W_rk E[X_k] has the sign opposite to e_r; N:M, the least important kept weight of the regrown
  weight's own group of M (so every group keeps exactly N pruned).

A swap is accepted only while |e_r| exceeds ``threshold`` and it makes |e_r| strictly smaller; the
first refused swap, or running out of candidates, ends the row, and no row runs more than
``cycles`` cycles. Hence the row's |e_r| never grows, each row keeps its number of pruned weights,
and an N:M mask stays N:M. Candidates come from the initial mask (a weight regrown is never pruned
again, a weight pruned by a swap is never regrown), as in the reference.

Deliberate differences from the reference code: the acceptance test |e_new| < |e| (the reference
by default accepts any swap while |e| > threshold, which can overshoot past zero and grow |e| when
candidates of the right sign run out); E[X] and Var(X) are over all calibration tokens (the
reference averages per-sequence variances); ``threshold`` is per token (the reference's sums over
each sample's tokens scale e by the sequence length, so its 0.1 at 2048 tokens is 0.1/2048 here);
the pruning candidates of an unstructured row are ranked by the method's own score (the
reference always uses Wanda's, which is the same for Wanda).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..lazy import lazy_module, torch_no_grad

if TYPE_CHECKING:
    import torch
else:  # imported on first use: the method registry, read when parameters are validated, needs no torch
    torch = lazy_module("torch")

log = logging.getLogger(__name__)

_VAR_FLOOR = 1e-12


def expected_error(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_r = sum over pruned j of W_rj * E[X_j], float64, one per row."""
    contribution = weight.detach().double() * mean.double().reshape(1, -1).to(weight.device)
    return (contribution * mask).sum(dim=1)


def _sorted(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, order = torch.sort(key, dim=1, stable=True)
    return values, order


@torch_no_grad
def dsnot_refine(
    weight: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    importance: torch.Tensor,
    nm: tuple[int, int] | None = None,
    cycles: int = 50,
    threshold: float = 0.1 / 2048,
    var_power: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Refined mask (True = pruned) and a small report (swaps, rows improved, error before/after)."""
    device = weight.device
    rows, cols = mask.shape
    contribution = weight.detach().double() * mean.double().reshape(1, -1).to(device)
    initial = mask.to(device).bool()
    pruned = initial.clone()
    error = (contribution * pruned).sum(dim=1)
    before = error.abs().clone()
    regrow_key = contribution / variance.double().to(device).clamp_min(_VAR_FLOOR).pow(var_power).reshape(1, -1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)

    # Regrowth candidates: initially pruned weights, ascending by key. ``low`` walks up from the
    # most negative, ``high`` down from the most positive.
    low_values, low_order = _sorted(torch.where(initial, regrow_key, inf))
    high_values, high_order = _sorted(torch.where(initial, regrow_key, -inf))
    low_ptr = torch.zeros(rows, dtype=torch.int64, device=device)
    high_ptr = torch.full((rows,), cols - 1, dtype=torch.int64, device=device)

    score = importance.double().to(device)
    if nm is None:
        kept = ~initial
        neg_values, neg_order = _sorted(torch.where(kept & (contribution < 0), score, inf))
        pos_values, pos_order = _sorted(torch.where(kept & (contribution > 0), score, inf))
        neg_ptr = torch.zeros(rows, dtype=torch.int64, device=device)
        pos_ptr = torch.zeros(rows, dtype=torch.int64, device=device)
    else:
        m = nm[1]
        prunable = ~initial  # initially kept and not yet pruned by a swap
        offsets = torch.arange(m, device=device).reshape(1, m)

    active = torch.ones(rows, dtype=torch.bool, device=device)
    row_index = torch.arange(rows, device=device)
    swaps = 0
    for _ in range(cycles):
        if not bool(active.any()):
            break
        positive = error > 0
        # regrowth candidate
        lp = low_ptr.clamp(max=cols - 1).unsqueeze(1)
        hp = high_ptr.clamp(min=0).unsqueeze(1)
        low_ok = (low_ptr < cols) & (low_values.gather(1, lp).squeeze(1) < 0)
        high_ok = (high_ptr >= 0) & (high_values.gather(1, hp).squeeze(1) > 0)
        grow = torch.where(positive, high_order.gather(1, hp).squeeze(1), low_order.gather(1, lp).squeeze(1))
        grow_ok = torch.where(positive, high_ok, low_ok)
        # pruning candidate
        if nm is None:
            np_ = neg_ptr.clamp(max=cols - 1).unsqueeze(1)
            pp = pos_ptr.clamp(max=cols - 1).unsqueeze(1)
            neg_ok = (neg_ptr < cols) & torch.isfinite(neg_values.gather(1, np_).squeeze(1))
            pos_ok = (pos_ptr < cols) & torch.isfinite(pos_values.gather(1, pp).squeeze(1))
            cut = torch.where(positive, neg_order.gather(1, np_).squeeze(1), pos_order.gather(1, pp).squeeze(1))
            cut_ok = torch.where(positive, neg_ok, pos_ok)
        else:
            group = (grow - grow % m).unsqueeze(1) + offsets  # [rows, m]
            candidates = torch.where(prunable.gather(1, group), score.gather(1, group), inf)
            best = candidates.argmin(dim=1, keepdim=True)  # first of equal minima: lowest index
            cut = group.gather(1, best).squeeze(1)
            cut_ok = torch.isfinite(candidates.gather(1, best).squeeze(1))
        grown_value = contribution.gather(1, grow.unsqueeze(1)).squeeze(1)
        cut_value = contribution.gather(1, cut.unsqueeze(1)).squeeze(1)
        new_error = error - grown_value + cut_value
        accept = active & grow_ok & cut_ok & (error.abs() > threshold) & (new_error.abs() < error.abs())
        active = accept
        if not bool(accept.any()):
            break
        rows_ok = row_index[accept]
        pruned[rows_ok, grow[accept]] = False
        pruned[rows_ok, cut[accept]] = True
        error = torch.where(accept, new_error, error)
        swaps += int(accept.sum())
        step = accept.long()
        high_ptr -= step * positive.long()
        low_ptr += step * (~positive).long()
        if nm is None:
            neg_ptr += step * positive.long()
            pos_ptr += step * (~positive).long()
        else:
            prunable[rows_ok, cut[accept]] = False
    after = error.abs()
    report = {
        "swaps": swaps,
        "rows_improved": int((after < before).sum()),
        "error_before": float(before.sum()),
        "error_after": float(after.sum()),
    }
    return pruned.to(mask.device), report


class _Moments:
    """Mean and variance of permuted input channels (what ``refine_mask`` reads of statistics)."""

    def __init__(self, mean: torch.Tensor, variance: torch.Tensor):
        self._mean, self._variance = mean, variance

    def mean(self) -> torch.Tensor:
        return self._mean

    def variance(self) -> torch.Tensor:
        return self._variance


def permuted_stats(stats, perm: torch.Tensor):
    if stats is None:
        return None
    return _Moments(stats.mean()[perm.cpu()], stats.variance()[perm.cpu()])


def refine_mask(name: str, weight: torch.Tensor, mask: torch.Tensor, stats, scores: torch.Tensor, config) -> torch.Tensor:
    """The refinement recipe: DSnoT on any score method's mask, with the config's settings."""
    from ..errors import ConfigError

    if stats is None:
        raise ConfigError("statistics", "refine 'dsnot' needs activation statistics (mean and variance)")
    refined, report = dsnot_refine(
        weight, mask, stats.mean(), stats.variance(), scores, config.nm,
        cycles=config.dsnot_cycles, threshold=config.dsnot_threshold, var_power=config.dsnot_var_power,
    )
    log.debug("%s: dsnot %s", name, report)
    return refined
