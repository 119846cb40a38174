"""Wanda masks against an independent reference, on tiny float64 LLaMA models."""
from __future__ import annotations

import pytest
import torch

import wanda
from tests.reference_wanda import reference_wanda
from tests.tiny import tiny_model
from wanda.masks import is_nm, sparsity_report


def _tokens(n=6, seqlen=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (n, seqlen), generator=generator)


@pytest.mark.parametrize("mode", ["sequential", "one_pass"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5), ("4:8", 0.5)])
def test_masks_equal_reference(mode, pattern, sparsity):
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    masks = wanda.prune_model(ours, tokens, wanda.PruneConfig(sparsity=sparsity, pattern=pattern, mode=mode, batch_size=4))
    nm = wanda.PruneConfig(sparsity=sparsity, pattern=pattern).nm
    expected = reference_wanda(theirs, tokens, sparsity, nm, sequential=(mode == "sequential"))
    assert masks.keys() == expected.keys()
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    # The pruned models are then identical too.
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), name


def test_sequential_differs_from_one_pass_after_first_block():
    tokens = _tokens()
    seq = wanda.prune_model(tiny_model(dtype=torch.float64), tokens, wanda.PruneConfig(mode="sequential"))
    one = wanda.prune_model(tiny_model(dtype=torch.float64), tokens, wanda.PruneConfig(mode="one_pass"))
    first = [n for n in seq if n.startswith("model.layers.0.")]
    later = [n for n in seq if n.startswith("model.layers.1.")]
    assert all(torch.equal(seq[n], one[n]) for n in first)
    assert any(not torch.equal(seq[n], one[n]) for n in later)


def test_magnitude_needs_no_calibration_and_matches_reference():
    model = tiny_model(dtype=torch.float64)
    masks = wanda.prune_model(model, None, wanda.PruneConfig(method="magnitude", sparsity=0.5))
    theirs = tiny_model(dtype=torch.float64)
    expected = reference_wanda(theirs, _tokens(1), 0.5, None, method="magnitude")
    for name in masks:
        assert torch.equal(masks[name], expected[name])


def test_magnitude_layer_scope_prunes_exact_count():
    model = tiny_model()
    masks = wanda.prune_model(model, None, wanda.PruneConfig(method="magnitude", sparsity=0.37, scope="layer"))
    for name, mask in masks.items():
        assert int(mask.sum()) == int(mask.numel() * 0.37)
        weight = model.get_submodule(name).weight
        kept, pruned = weight[~mask].abs(), torch.tensor([0.0])
        assert kept.min() >= pruned.max()


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_exact_sparsity_per_row(sparsity):
    model = tiny_model()
    masks = wanda.prune_model(model, _tokens(4), wanda.PruneConfig(sparsity=sparsity, mode="one_pass"))
    for name, mask in masks.items():
        per_row = mask.sum(1)
        assert torch.all(per_row == int(mask.shape[1] * sparsity)), name
        assert torch.all(model.get_submodule(name).weight[mask] == 0)
    report = sparsity_report(masks)
    assert abs(report["overall"] - sum(int(m.shape[1] * sparsity) * m.shape[0] for m in masks.values()) / report["total"]) < 1e-6


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_validity(pattern):
    model = tiny_model()
    n, m = map(int, pattern.split(":"))
    masks = wanda.prune_model(model, _tokens(4), wanda.PruneConfig(pattern=pattern, sparsity=n / m))
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m).sum(-1)
        assert torch.all(groups == n), name
        assert is_nm(model.get_submodule(name).weight, n, m, is_mask=False)


def test_deterministic_masks_bit_for_bit():
    tokens = _tokens()
    first = wanda.prune_model(tiny_model(), tokens, wanda.PruneConfig())
    second = wanda.prune_model(tiny_model(), tokens, wanda.PruneConfig())
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_batch_size_does_not_change_masks():
    tokens = _tokens(7)
    a = wanda.prune_model(tiny_model(dtype=torch.float64), tokens, wanda.PruneConfig(batch_size=1))
    b = wanda.prune_model(tiny_model(dtype=torch.float64), tokens, wanda.PruneConfig(batch_size=3))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_staged_api_equals_prune_model():
    tokens = _tokens()
    config = wanda.PruneConfig(mode="one_pass", pattern="2:4")
    staged = tiny_model(dtype=torch.float64)
    stats = wanda.collect_statistics(staged, tokens, batch_size=4)
    masks = wanda.compute_masks(staged, stats, config)
    wanda.apply_masks(staged, masks)
    direct = tiny_model(dtype=torch.float64)
    expected = wanda.prune_model(direct, tokens, config)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)
    # compute_masks also takes plain weights (e.g. read from safetensors shards).
    weights = {n: tiny_model(dtype=torch.float64).get_submodule(n).weight.detach() for n in masks}
    assert all(torch.equal(wanda.compute_masks(weights, stats, config)[n], masks[n]) for n in masks)


def test_statistics_round_trip(tmp_path):
    model = tiny_model()
    stats = wanda.collect_statistics(model, _tokens(), batch_size=2)
    stats.save(tmp_path / "stats.safetensors", {"calibration_digest": "abc"})
    loaded = wanda.ActivationStatistics.load(tmp_path / "stats.safetensors")
    assert loaded.metadata["calibration_digest"] == "abc"
    for name, s in stats.layers.items():
        assert loaded[name].count == s.count == 6 * 32
        assert torch.allclose(loaded[name].mean_square(), s.mean_square())
        assert torch.all(loaded[name].variance() >= 0)


def test_statistics_match_direct_computation():
    model = tiny_model(dtype=torch.float64)
    tokens = _tokens(3)
    stats = wanda.collect_statistics(model, tokens, batch_size=2)
    captured = []
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    x = torch.cat(captured)
    entry = stats["model.layers.1.mlp.down_proj"]
    assert torch.allclose(entry.norm().double(), x.norm(dim=0), rtol=1e-6)
    assert torch.allclose(entry.mean().double(), x.mean(0), rtol=1e-5, atol=1e-7)


def test_lm_head_and_embeddings_never_pruned():
    model = tiny_model()
    masks = wanda.prune_model(model, _tokens(2), wanda.PruneConfig(targets=["*"]))
    assert not any("lm_head" in n or "embed" in n for n in masks)
    assert len(masks) == 2 * 7


def test_targets_and_ignore_patterns():
    model = tiny_model()
    masks = wanda.prune_model(model, _tokens(2), wanda.PruneConfig(targets=["*.mlp.*"], ignore=["*.down_proj"]))
    assert sorted({n.split(".")[-1] for n in masks}) == ["gate_proj", "up_proj"]
    untouched = model.model.layers[0].self_attn.q_proj.weight
    assert (untouched == 0).sum() == 0
