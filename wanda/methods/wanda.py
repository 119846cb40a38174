"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, the lowest of each row pruned."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .base import ScoreMethod, register

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from ..statistics import ChannelStats
else:  # imported on first use: the method registry, read when parameters are validated, needs no torch
    from ..lazy import lazy_module

    torch = lazy_module("torch")


def check_channels(weight: torch.Tensor, stats: ChannelStats) -> None:
    from ..errors import ConfigError

    if stats.sumsq.numel() != weight.shape[1]:
        raise ConfigError(
            "statistics", f"statistics have {stats.sumsq.numel()} input channels, weight has {weight.shape[1]}"
        )


def wanda_score(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """|W_ij| * sqrt(sum_sq_j / count): the reference's scaling (a per-layer constant times ||X_j||_2)."""
    check_channels(weight, stats)
    scale = stats.mean_square().to(weight.device).sqrt()
    # In place on the fresh |W| tensor: the same product without a second layer-sized temporary.
    return weight.detach().abs().float().mul_(scale.reshape(1, -1))


def reference_wanda_score(weight: torch.Tensor, stats: ChannelStats, name: str = "") -> torch.Tensor:
    """The reference's ``W_metric``, operation for operation: ``torch.abs(W) *
    torch.sqrt(scaler_row.reshape((1, -1)))`` on the reference's own running ``scaler_row``
    (``ChannelStats.scaler_row``), so scores, and hence every near-tie, round as the reference's do.

    Statistics collected without it (one-pass statistics from an earlier run, expert fallbacks)
    fall back to ``wanda_score``, loudly: the masks may then differ from the reference's where
    two scores of a group are within float32 rounding of each other.
    """
    check_channels(weight, stats)
    if stats.scaler_row is None:
        log.warning("%s: the statistics carry no reference scaler_row (collected without tie_break 'topk'); "
                    "tie_break 'topk' scores use the pipeline's arithmetic (sum of squares / tokens), which can "
                    "order near-equal scores differently from the reference; collect the statistics again with "
                    "tie_break 'topk' for the reference's masks", name or "layer")
        return wanda_score(weight, stats)
    return torch.abs(weight.detach()).float() * torch.sqrt(stats.scaler_row.to(weight.device).reshape((1, -1)))


@register
class Wanda(ScoreMethod):
    name = "wanda"

    def score(self, weight, stats, config):
        stats = self.needs_stats(stats)
        if config.tie_break == "topk":
            return reference_wanda_score(weight, stats)
        return wanda_score(weight, stats)
