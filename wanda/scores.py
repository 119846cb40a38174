"""Importance scores of weights; higher means more important (pruned last)."""
from __future__ import annotations

import torch

from .errors import ConfigError
from .statistics import ChannelStats


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """|W_ij| * sqrt(sum_sq_j / count): the reference's scaling (a per-layer constant times ||X_j||_2)."""
    if stats.sumsq.numel() != weight.shape[1]:
        raise ConfigError(
            "statistics", f"statistics have {stats.sumsq.numel()} input channels, weight has {weight.shape[1]}"
        )
    scale = stats.mean_square().to(weight.device).sqrt()
    return weight.detach().abs().float() * scale.reshape(1, -1)


def score(method: str, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
    if method == "magnitude":
        return magnitude_score(weight)
    if method == "wanda":
        if stats is None:
            raise ConfigError("statistics", "method 'wanda' needs activation statistics")
        return wanda_score(weight, stats)
    raise ConfigError("method", f"unknown scoring method {method!r}", "wanda, magnitude")
