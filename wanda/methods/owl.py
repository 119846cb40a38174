"""OWL: outlier-weighed layer-wise sparsity (Yin et al. 2023), for any score.

A block's outlier ratio is the share of its weights whose score exceeds ``m`` times the mean
score over all target layers of the block (``check_outlier_mean`` of the reference, which pools
the block's layers). Blocks with more outliers keep more weights:

    r_b   = outlier ratio of block b
    d_b   = (r_b - min r) / (max r - min r) * 2 * lambda          (in [0, 2 lambda])
    s_b   = sparsity - (d_b - mean d)                              (mean over blocks = sparsity)

so block sparsities average exactly to the target (blocks are equal-sized in decoder-only
models, so the weight-count average does too, up to each row's rounding to whole weights) and
span exactly ``2 * lambda`` (max - min), each within ``sparsity +/- 2 lambda``. When all ratios
are equal every block gets ``sparsity`` (the reference divides by zero there).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

from ..lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:  # imported on first use: the method registry, read when parameters are validated, needs no torch
    torch = lazy_module("torch")

log = logging.getLogger(__name__)


def outlier_ratio(scores: Iterable[torch.Tensor], m: float) -> float:
    """Share of the pooled scores of one block above ``m`` times their mean (0..1, not percent)."""
    scores = list(scores)
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        raise ValueError("outlier_ratio of an empty block")
    threshold = m * total / count
    above = sum(int((s.double() > threshold).sum()) for s in scores)
    return above / count


def allocate_owl(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios; see the module docstring."""
    if not ratios:
        return []
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread <= 0.0 or lam == 0.0:
        return [float(sparsity)] * len(ratios)
    d = (r - r.min()) / spread * (2.0 * lam)
    allocation = sparsity - (d - d.mean())
    return [float(x) for x in allocation]


def owl_sparsities(weights, stats, config, groups: list[list[str]], blocks: list[str]) -> tuple[dict[str, float], dict]:
    """The allocation recipe: per-target sparsity from OWL block allocation, and its record.

    ``weights`` maps target names to objects with ``.weight`` (current, dense weights); ``groups``
    are the target names of each block, ``blocks`` the blocks' names. Scores are the method's own
    (or the one it names in ``allocation_score``: Wanda's for SparseGPT).
    """
    from .base import get_method

    method = get_method(config.method)
    scorer = get_method(method.allocation_score or method.name)
    ratios = []
    for group in groups:
        scores = [scorer.score(weights[n].weight, stats[n] if scorer.calibration != "none" else None, config)
                  for n in group]
        ratios.append(outlier_ratio(scores, config.owl_m))
    allocation = allocate_owl(ratios, config.sparsity, config.owl_lambda)
    sparsities = {n: s for group, s in zip(groups, allocation) for n in group}
    record = {"ratios": [round(r, 6) for r in ratios], "sparsities": list(allocation), "blocks": blocks}
    log.info("OWL allocation (M=%g, lambda=%g): block sparsities %s", config.owl_m, config.owl_lambda,
             ", ".join(f"{s:.3f}" for s in allocation))
    return sparsities, record
