"""Magnitude pruning: score |W_ij|, no calibration (the paper's baseline, also per whole layer)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ScoreMethod, register

if TYPE_CHECKING:  # annotations only: registering the method imports no torch
    import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


@register
class Magnitude(ScoreMethod):
    name = "magnitude"
    calibration = "none"
    recipes = ScoreMethod.recipes | {"layer_scope"}

    def score(self, weight, stats, config):
        return magnitude_score(weight)
