"""``tie_break: topk`` reproduces the reference's selection calls on forced ties; ``stable`` is today's."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import wanda
from tests.tiny import tiny_model
from wanda.config import PruneConfig
from wanda.methods.wanda import wanda_score


def _reference_mask(metric: torch.Tensor, sparsity: float, prune_n: int, prune_m: int) -> torch.Tensor:
    """locuslab/wanda ``prune_wanda`` mask selection, transcribed."""
    W_mask = (torch.zeros_like(metric) == 1)
    if prune_n != 0:
        for ii in range(metric.shape[1]):
            if ii % prune_m == 0:
                tmp = metric[:, ii:(ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        sort_res = torch.sort(metric, dim=-1, stable=True)
        indices = sort_res[1][:, :int(metric.shape[1] * sparsity)]
        W_mask.scatter_(1, indices, True)
    return W_mask


def _tied_model():
    """Weights rounded to a coarse grid, so many scores of a row are exactly equal."""
    model = tiny_model(layers=1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_((module.weight * 4).round() / 4)
    return model


@pytest.mark.parametrize("pattern,sparsity,n,m", [("2:4", 0.5, 2, 4), ("4:8", 0.5, 4, 8),
                                                  ("unstructured", 0.5, 0, 0)])
def test_topk_masks_equal_the_reference_selection(pattern, sparsity, n, m):
    model = _tied_model()
    tokens = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = wanda.collect_statistics(model, tokens)
    config = PruneConfig(pattern=pattern, sparsity=sparsity, mode="one_pass", tie_break="topk")
    masks = wanda.compute_masks(model, stats, config)
    ties = 0
    for name, mask in masks.items():
        metric = wanda_score(model.get_submodule(name).weight, stats[name])
        ties += int(metric.numel() - torch.unique(metric).numel())
        assert torch.equal(mask, _reference_mask(metric, sparsity, n, m)), name
    assert ties > 0  # the test forces ties, else both tie breaks would agree trivially


def test_stable_is_the_default_and_prunes_the_lower_index_first():
    assert PruneConfig().tie_break == "stable"
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    from wanda.masks import mask_from_scores

    assert mask_from_scores(scores, 0.5, (2, 4)).tolist() == [[True, True, False, False]]


def test_tie_break_is_validated():
    with pytest.raises(ValidationError, match="tie_break"):
        PruneConfig(tie_break="random")
    with pytest.raises(ValidationError, match="tie_break"):
        PruneConfig(method="sparsegpt", tie_break="topk")
