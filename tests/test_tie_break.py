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


# ----------------------------------------------------------------------------- the reference's arithmetic
# Sequential ``topk`` must select what locuslab/wanda's ``prune_wanda`` selects, which needs its
# score arithmetic as well as its topk calls: checked against an independent transcription
# (tests/reference_wanda.py: WrappedGPT's float32 scaler_row, one sample per forward, one
# torch.topk per [rows, M] slice).


def _zero_tied_model(layers: int = 2):
    """Weights on a coarse grid with about 40% exact zeros: many M-groups hold 3 or 4 zero scores,
    so which zeros are pruned is decided by the tie break alone."""
    model = tiny_model(layers=layers)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                keep = torch.rand(module.weight.shape, generator=generator) > 0.4
                module.weight.copy_((module.weight * 8).round() / 8 * keep)
    return model


@pytest.mark.parametrize("pattern,sparsity,nm", [("2:4", 0.5, (2, 4)), ("4:8", 0.5, (4, 8)),
                                                 ("unstructured", 0.5, None)])
def test_sequential_topk_equals_the_reference_transcription(pattern, sparsity, nm):
    import copy

    from tests.reference_wanda import reference_wanda_topk
    from wanda.masks import nm_mask
    from wanda.methods.wanda import reference_wanda_score
    from wanda.statistics import ActivationStatistics

    model = _zero_tied_model()
    dense = copy.deepcopy(model)
    tokens = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(pattern=pattern, sparsity=sparsity, mode="sequential", tie_break="topk", batch_size=4)
    stats = ActivationStatistics()
    masks = wanda.prune_model(model, tokens, config, statistics_out=stats)  # batches of 4 and 2 samples

    reference = copy.deepcopy(dense)
    expected, metrics = reference_wanda_topk(reference, tokens, sparsity, nm, keep_metrics=True)
    assert sorted(masks) == sorted(expected)
    decided_by_ties = arithmetic_matters = 0
    for name, metric in metrics.items():
        assert stats[name].samples == tokens.shape[0]
        # The score arithmetic, bit for bit (block k's dense weights; its inputs from pruned blocks).
        ours = reference_wanda_score(dense.get_submodule(name).weight, stats[name])
        assert torch.equal(ours, metric), name
        assert torch.equal(masks[name], expected[name]), name
        arithmetic_matters += not torch.equal(wanda_score(dense.get_submodule(name).weight, stats[name]), metric)
        if nm is not None:
            decided_by_ties += int((nm_mask(metric, *nm) != expected[name]).sum())
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)
    if nm is not None:
        assert decided_by_ties > 0  # the stable tie break selects otherwise on these scores
    assert arithmetic_matters > 0  # the pipeline's default arithmetic rounds differently


def test_reference_scaler_only_with_topk_and_kept_in_the_artifact(tmp_path, caplog):
    from wanda.methods.wanda import reference_wanda_score
    from wanda.statistics import ActivationStatistics

    model = tiny_model(layers=1)
    tokens = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    plain = wanda.collect_statistics(model, tokens)
    assert all(s.scaler_row is None for s in plain.layers.values())  # default artifacts unchanged
    plain.save(tmp_path / "plain.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as handle:
        assert not [k for k in handle.keys() if "scaler_row" in k]

    stats = wanda.collect_statistics(model, tokens, batch_size=2, reference_scaler=True)
    stats.save(tmp_path / "ref.safetensors")
    loaded = ActivationStatistics.load(tmp_path / "ref.safetensors")
    name = "model.layers.0.mlp.up_proj"
    assert loaded[name].samples == 3 and torch.equal(loaded[name].scaler_row, stats[name].scaler_row)
    weight = model.get_submodule(name).weight
    with caplog.at_level("WARNING"):
        fallback = reference_wanda_score(weight, plain[name], name)
    assert "no reference scaler_row" in caplog.text and torch.equal(fallback, wanda_score(weight, plain[name]))
