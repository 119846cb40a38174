"""DSnoT mask refinement: against a naive reference; never increases the error it minimizes; counts kept."""
from __future__ import annotations

import pytest
import torch

import wanda
from tests.reference_methods import ref_dsnot, reference_prune
from tests.tiny import tiny_model
from wanda.masks import nm_mask, unstructured_row_mask
from wanda.methods.dsnot import dsnot_refine, expected_error


def _tokens(n=6, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _case(seed=0, rows=32, cols=64):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    mean = torch.randn(cols, generator=generator, dtype=torch.float64) * 0.5 + 0.2
    var = torch.rand(cols, generator=generator, dtype=torch.float64) + 0.1
    importance = weight.abs() * (mean.pow(2) + var).sqrt().reshape(1, -1)
    return weight, mean, var, importance


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), (None, 0.7), ((2, 4), 0.5), ((4, 8), 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_equals_reference_and_keeps_invariants(nm, sparsity, seed):
    weight, mean, var, importance = _case(seed)
    initial = nm_mask(importance, *nm) if nm else unstructured_row_mask(importance, sparsity)
    refined, report = dsnot_refine(weight, initial, mean, var, importance, nm, cycles=20, threshold=1e-3)
    expected = ref_dsnot(weight, initial, mean, var, importance, nm, cycles=20, threshold=1e-3)
    assert torch.equal(refined, expected)
    assert report["swaps"] > 0
    # The error it minimizes never grows, row by row.
    before = expected_error(weight, initial, mean).abs()
    after = expected_error(weight, refined, mean).abs()
    assert torch.all(after <= before)
    assert report["error_after"] < report["error_before"]
    # Exact sparsity per row; N:M validity per group.
    assert torch.equal(refined.sum(1), initial.sum(1))
    if nm is not None:
        assert torch.all(refined.reshape(32, -1, nm[1]).sum(-1) == nm[0])


def test_variable_rows_and_bounded_cycles():
    weight, mean, var, importance = _case(3)
    initial = importance < importance.median(dim=1, keepdim=True).values * torch.linspace(0.5, 1.5, 32).reshape(-1, 1)
    refined, report = dsnot_refine(weight, initial, mean, var, importance, cycles=3)
    assert torch.equal(refined.sum(1), initial.sum(1))
    assert int((refined != initial).sum(1).max()) <= 2 * 3  # at most one swap per cycle
    assert torch.equal(refined, ref_dsnot(weight, initial, mean, var, importance, None, cycles=3))
    unchanged, report = dsnot_refine(weight, initial, mean, var, importance, cycles=0)
    assert torch.equal(unchanged, initial) and report["swaps"] == 0


def test_threshold_stops_rows():
    weight, mean, var, importance = _case(4)
    initial = unstructured_row_mask(importance, 0.5)
    refined, report = dsnot_refine(weight, initial, mean, var, importance, threshold=1e9)
    assert torch.equal(refined, initial) and report["swaps"] == 0


@pytest.mark.parametrize("method,pattern,mode", [("wanda", "unstructured", "sequential"), ("wanda", "2:4", "one_pass"),
                                                 ("magnitude", "unstructured", "one_pass"), ("ria", "4:8", "sequential")])
def test_model_masks_equal_reference(method, pattern, mode):
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    sparsity = 0.5 if pattern != "unstructured" else 0.6
    config = wanda.PruneConfig(method=method, sparsity=sparsity, pattern=pattern, mode=mode, refine="dsnot",
                               dsnot_cycles=10, batch_size=4)
    masks = wanda.prune_model(ours, tokens, config)
    expected, _ = reference_prune(theirs, tokens, method, sparsity, config.nm, sequential=(mode == "sequential"),
                                  dsnot={"cycles": 10})
    plain = wanda.prune_model(tiny_model("llama", dtype=torch.float64), tokens, config.model_copy(update={"refine": "none"}))
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    assert any(not torch.equal(masks[n], plain[n]) for n in masks)  # it did refine


def test_permuted_nm_refinement_equals_reference():
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    config = wanda.PruneConfig(method="ria", pattern="2:4", ria_permute=True, refine="dsnot", batch_size=4)
    masks = wanda.prune_model(ours, tokens, config)
    expected, perms = reference_prune(theirs, tokens, "ria", 0.5, (2, 4), permute=True, dsnot={})
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    for name, perm in masks.permutations.items():
        assert torch.all(masks[name][:, perm].reshape(masks[name].shape[0], -1, 4).sum(-1) == 2)
