"""OWL layer-wise sparsity: allocation formula, bounds, average, and masks against a naive reference."""
from __future__ import annotations

import json

import pytest
import torch

import wanda
from tests.reference_methods import ref_owl_allocation, ref_outlier_ratio, reference_prune
from tests.tiny import tiny_model
from wanda.methods.owl import allocate_owl, outlier_ratio


def _tokens(n=6, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2), (0.3, 0.1)])
def test_allocation_average_bounds_and_reference(sparsity, lam):
    ratios = torch.rand(30, generator=torch.Generator().manual_seed(0)).tolist()
    allocation = allocate_owl(ratios, sparsity, lam)
    assert abs(sum(allocation) / len(allocation) - sparsity) < 1e-12
    assert abs((max(allocation) - min(allocation)) - 2 * lam) < 1e-12
    assert all(sparsity - 2 * lam - 1e-12 <= s <= sparsity + 2 * lam + 1e-12 for s in allocation)
    assert all(0 <= s < 1 for s in allocation)
    assert allocation == pytest.approx(ref_owl_allocation(ratios, sparsity, lam), abs=1e-12)
    # More outliers, lower sparsity.
    order = sorted(range(30), key=lambda i: ratios[i])
    assert all(allocation[a] >= allocation[b] for a, b in zip(order, order[1:]))


def test_equal_ratios_give_uniform_allocation():
    assert allocate_owl([0.01] * 4, 0.6, 0.08) == [0.6] * 4


def test_outlier_ratio_pools_the_block():
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=generator) ** 4, torch.rand(4, 32, generator=generator) * 9]
    assert outlier_ratio(scores, 5) == pytest.approx(ref_outlier_ratio([s.double() for s in scores], 5))


@pytest.mark.parametrize("method,mode", [("wanda", "sequential"), ("wanda", "one_pass"), ("ria", "sequential"),
                                         ("magnitude", "one_pass")])
def test_model_masks_equal_reference(method, mode):
    tokens = _tokens()
    ours = tiny_model("llama", layers=3, dtype=torch.float64)
    theirs = tiny_model("llama", layers=3, dtype=torch.float64)
    config = wanda.PruneConfig(method=method, sparsity=0.6, allocation="owl", owl_m=3, owl_lambda=0.1, mode=mode,
                               batch_size=4)
    masks = wanda.prune_model(ours, tokens, config)
    expected, _ = reference_prune(theirs, tokens, method, 0.6, owl=(3, 0.1), sequential=(mode == "sequential"))
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    record = json.loads(masks.metadata["owl"])
    assert len(record["sparsities"]) == 3
    assert abs(sum(record["sparsities"]) / 3 - 0.6) < 1e-9
    if method != "magnitude":
        assert max(record["sparsities"]) - min(record["sparsities"]) == pytest.approx(0.2)
    report = wanda.sparsity_report(masks)
    assert abs(report["overall"] - 0.6) < 0.01  # rows round down to whole weights


def test_staged_owl_equals_one_pass_prune():
    tokens = _tokens()
    config = wanda.PruneConfig(sparsity=0.7, allocation="owl", mode="one_pass")
    model = tiny_model(dtype=torch.float64)
    stats = wanda.collect_statistics(model, tokens)
    staged = wanda.compute_masks(model, stats, config)
    weights = {n: model.get_submodule(n).weight.detach() for n in staged}
    from_weights = wanda.compute_masks(weights, stats, config)  # blocks recovered from the names
    direct = wanda.prune_model(tiny_model(dtype=torch.float64), tokens, config)
    assert all(torch.equal(staged[n], direct[n]) and torch.equal(from_weights[n], direct[n]) for n in direct)


def test_sequential_owl_records_allocation_in_statistics():
    stats = wanda.ActivationStatistics()
    wanda.prune_model(tiny_model(), _tokens(2), wanda.PruneConfig(sparsity=0.6, allocation="owl"), statistics_out=stats)
    assert json.loads(stats.metadata["owl"])["sparsities"]
