"""Importance scores of weights; higher means more important (pruned last)."""
from __future__ import annotations

import torch

from .errors import ConfigError
from .statistics import ChannelStats


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def _check_channels(weight: torch.Tensor, stats: ChannelStats) -> None:
    if stats.sumsq.numel() != weight.shape[1]:
        raise ConfigError(
            "statistics", f"statistics have {stats.sumsq.numel()} input channels, weight has {weight.shape[1]}"
        )


def wanda_score(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """|W_ij| * sqrt(sum_sq_j / count): the reference's scaling (a per-layer constant times ||X_j||_2)."""
    _check_channels(weight, stats)
    scale = stats.mean_square().to(weight.device).sqrt()
    # In place on the fresh |W| tensor: the same product without a second layer-sized temporary.
    return weight.detach().abs().float().mul_(scale.reshape(1, -1))


def ria_score(weight: torch.Tensor, stats: ChannelStats, alpha: float = 0.5) -> torch.Tensor:
    """Relative importance and activations (Zhang et al. 2024).

    ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^alpha``: the weight relative to
    its input channel (column sum) plus relative to its output row (row sum), times the activation
    norm to the power ``alpha``. As for Wanda the norm is taken as sqrt(sum_sq / count), a
    per-layer constant factor that changes no ranking. An all-zero row or column contributes 0.
    """
    _check_channels(weight, stats)
    magnitude = weight.detach().abs().float()
    column = magnitude.sum(0, keepdim=True)
    row = magnitude.sum(1, keepdim=True)
    relative = magnitude / torch.where(column > 0, column, torch.ones_like(column)) + \
        magnitude / torch.where(row > 0, row, torch.ones_like(row))
    activation = stats.mean_square().to(weight.device).sqrt().pow(alpha)
    return relative * activation.reshape(1, -1)


def score(method: str, weight: torch.Tensor, stats: ChannelStats | None, ria_alpha: float = 0.5) -> torch.Tensor:
    """The mask score of ``method``. SparseGPT ranks by its own OBS saliency inside its solver; where
    a SparseGPT config needs a plain score (OWL outlier ratios) it uses Wanda's."""
    if method == "magnitude":
        return magnitude_score(weight)
    if method in ("wanda", "sparsegpt"):
        if stats is None:
            raise ConfigError("statistics", f"method {method!r} needs activation statistics")
        return wanda_score(weight, stats)
    if method == "ria":
        if stats is None:
            raise ConfigError("statistics", "method 'ria' needs activation statistics")
        return ria_score(weight, stats, ria_alpha)
    raise ConfigError("method", f"unknown scoring method {method!r}", "wanda, magnitude, sparsegpt, ria")
