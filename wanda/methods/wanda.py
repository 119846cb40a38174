"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, the lowest of each row pruned."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ScoreMethod, register

if TYPE_CHECKING:  # annotations only: registering the method imports no torch
    import torch

    from ..statistics import ChannelStats


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


@register
class Wanda(ScoreMethod):
    name = "wanda"

    def score(self, weight, stats, config):
        return wanda_score(weight, self.needs_stats(stats))
