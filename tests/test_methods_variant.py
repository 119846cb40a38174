"""The Wanda variant: per-row adaptive sparsity hitting the layer's target."""
from __future__ import annotations

import pytest
import torch

import wanda
from tests.reference_methods import ref_variant_mask, reference_prune
from tests.tiny import tiny_model
from wanda.methods.variant import variant_row_mask


def _tokens(n=6, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_hits_target_and_equals_reference(sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(64, 256, generator=generator, dtype=torch.float64) ** 3  # skewed rows
    scores *= torch.rand(64, 1, generator=generator, dtype=torch.float64) * 10
    mask, alpha, achieved = variant_row_mask(scores, sparsity)
    assert abs(achieved - sparsity) <= 0.001
    assert abs(float(mask.float().mean()) - sparsity) <= 0.001
    assert torch.equal(mask, ref_variant_mask(scores, sparsity))
    # Rows differ in sparsity (adaptive), yet each row prunes a prefix of its own ranking.
    per_row = mask.sum(1)
    assert per_row.min() < per_row.max()
    for r in range(0, 64, 7):
        pruned = scores[r][mask[r]]
        kept = scores[r][~mask[r]]
        if pruned.numel() and kept.numel():
            assert pruned.max() <= kept.min()


def test_tolerance_is_respected():
    scores = torch.rand(128, 512, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask, _, achieved = variant_row_mask(scores, 0.55, tolerance=1e-4)
    assert abs(achieved - 0.55) <= 1e-4


@pytest.mark.parametrize("mode", ["sequential", "one_pass"])
def test_model_masks_equal_reference(mode):
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    masks = wanda.prune_model(ours, tokens, wanda.PruneConfig(sparsity=0.6, variant=True, mode=mode, batch_size=4))
    expected, _ = reference_prune(theirs, tokens, "wanda", 0.6, variant=True, sequential=(mode == "sequential"))
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
        assert abs(float(masks[name].float().mean()) - 0.6) <= 0.001, name
