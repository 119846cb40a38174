"""Mask storage (one bit per weight), application and reports."""
from __future__ import annotations

import torch

import wanda
from tests.tiny import tiny_model
from wanda.masks import load_masks, nm_mask, save_masks, unstructured_row_mask


def test_packed_round_trip_is_exact_and_small(tmp_path):
    masks = wanda.prune_model(tiny_model(), None, wanda.PruneConfig(method="magnitude", sparsity=0.3))
    masks["odd"] = torch.rand(7, 13) > 0.5  # size not a multiple of 8
    save_masks(tmp_path / "masks.safetensors", masks, {"fingerprint": "f"})
    loaded, meta = load_masks(tmp_path / "masks.safetensors")
    assert meta["fingerprint"] == "f"
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    bits = sum(m.numel() for m in masks.values())
    assert (tmp_path / "masks.safetensors").stat().st_size < bits / 8 + 8192



def test_mask_dict_holds_bits_and_hands_out_bool_tensors():
    import pickle

    from wanda.masks import MaskDict

    mask = torch.rand(7, 13) > 0.5
    masks = MaskDict({"a": mask}, permutations={"a": torch.arange(13)})
    masks.update({"b": ~mask})
    stored = dict.__getitem__(masks, "a")  # the raw storage: one bit per weight, not one byte
    assert stored.bits.nbytes == (mask.numel() + 7) // 8
    views = [masks["a"], dict(masks)["a"], {**masks}["a"], dict(masks.items())["a"], next(iter(masks.values())),
             masks.get("a"), pickle.loads(pickle.dumps(masks))["a"], masks.copy()["a"]]
    assert all(v.dtype == torch.bool and torch.equal(v, mask) for v in views)
    assert torch.equal(masks.pop("b"), ~mask) and list(masks) == ["a"]
    assert pickle.loads(pickle.dumps(masks)).permutations.keys() == {"a"}

def test_ties_break_by_lower_index():
    scores = torch.ones(2, 8)
    assert unstructured_row_mask(scores, 0.5)[0].tolist() == [True] * 4 + [False] * 4
    assert nm_mask(scores, 2, 4)[0].tolist() == [True, True, False, False] * 2


def test_apply_masks_zeroes_exactly_the_mask():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = wanda.prune_model(tiny_model(), None, wanda.PruneConfig(method="magnitude"))
    wanda.apply_masks(model, masks)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.all(weight[mask] == 0)
        assert torch.equal(weight[~mask], before[f"{name}.weight"][~mask])
    report = wanda.sparsity_report(masks)
    assert report["overall"] == 0.5 and len(report["layers"]) == len(masks)


def test_selection_equals_stable_sort_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (64, 96), generator=generator).float()  # heavy ties
    for sparsity in (0.1, 0.5, 0.77):
        k = int(96 * sparsity)
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(unstructured_row_mask(scores, sparsity), expected)


def test_non_finite_scores_are_refused():
    import pytest

    from wanda.masks import mask_from_scores

    with pytest.raises(ValueError, match="NaN"):
        mask_from_scores(torch.tensor([[1.0, float("nan")]]), 0.5, None)


def test_pruned_weights_are_positive_zero_bitwise():
    model = tiny_model()
    masks = wanda.prune_model(model, None, wanda.PruneConfig(method="magnitude"))
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert not torch.signbit(weight[mask]).any()
