"""RIA: score, masks and the N:M channel permutation against a naive reference; the permutation artifact."""
from __future__ import annotations

import pytest
import torch

import wanda
from tests.reference_methods import ref_nm_retained, ref_reallocation, ref_score, reference_prune
from tests.tiny import tiny_model
from wanda.masks import is_nm, load_masks, save_masks
from wanda.methods.ria import channel_permutation, heuristic_reallocation, retained_score
from wanda.methods.ria import ria_score
from wanda.statistics import ChannelStats


def _tokens(n=6, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_score_equals_formula():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 20, generator=generator, dtype=torch.float64)
    weight[3] = 0.0  # an all-zero row
    weight[:, 5] = 0.0  # an all-zero column
    stats = ChannelStats(torch.rand(20, generator=generator, dtype=torch.float64) * 50,
                         torch.zeros(20, dtype=torch.float64), 10)
    for alpha in (0.5, 1.0, 0.0):
        ours = ria_score(weight, stats, alpha)
        expected = ref_score("ria", weight, stats.sumsq / 10, alpha)
        assert torch.allclose(ours.double(), expected, rtol=1e-6), alpha
        assert torch.isfinite(ours).all()


@pytest.mark.parametrize("mode", ["sequential", "one_pass"])
@pytest.mark.parametrize("pattern,sparsity,scope", [("unstructured", 0.5, "row"), ("unstructured", 0.6, "layer"),
                                                    ("2:4", 0.5, "row")])
def test_masks_equal_reference(mode, pattern, sparsity, scope):
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    config = wanda.PruneConfig(method="ria", sparsity=sparsity, pattern=pattern, scope=scope, mode=mode, batch_size=4)
    masks = wanda.prune_model(ours, tokens, config)
    expected, _ = reference_prune(theirs, tokens, "ria", sparsity, config.nm, sequential=(mode == "sequential"),
                                  scope=scope)
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(p, q), name


def test_ria_differs_from_wanda():
    tokens = _tokens()
    ria = wanda.prune_model(tiny_model(), tokens, wanda.PruneConfig(method="ria"))
    plain = wanda.prune_model(tiny_model(), tokens, wanda.PruneConfig())
    assert any(not torch.equal(ria[n], plain[n]) for n in ria)


def test_heuristic_reallocation_equals_reference():
    scores = torch.rand(16, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for m in (4, 8):
        assert torch.equal(heuristic_reallocation(scores, m), ref_reallocation(scores, m))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_permutation_is_valid_and_never_worse(n, m):
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(32, 64, generator=generator, dtype=torch.float64)
    scores[:, :8] *= 20  # important channels next to each other: permuting helps
    perm, report = channel_permutation(scores, n, m)
    assert perm is not None and torch.equal(torch.sort(perm).values, torch.arange(64))
    assert retained_score(scores[:, perm], n, m) > retained_score(scores, n, m)
    assert retained_score(scores, n, m) == pytest.approx(ref_nm_retained(scores, n, m))
    lsa, lsa_report = channel_permutation(scores, n, m, lsa=True)
    assert lsa_report["lsa"] >= lsa_report["reallocation"] - 1e-9
    assert retained_score(scores[:, lsa], n, m) >= retained_score(scores[:, perm], n, m) - 1e-9
    # Already well spread: the identity is kept.
    spread = torch.zeros(4, 8, dtype=torch.float64)
    spread[:, [0, 4]] = 1.0
    assert channel_permutation(spread, 2, 4)[0] is None


@pytest.mark.parametrize("mode", ["sequential", "one_pass"])
def test_permuted_masks_equal_reference_and_are_nm_after_permuting(mode):
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    config = wanda.PruneConfig(method="ria", pattern="2:4", ria_permute=True, mode=mode, batch_size=4)
    masks = wanda.prune_model(ours, tokens, config)
    expected, perms = reference_prune(theirs, tokens, "ria", 0.5, (2, 4), sequential=(mode == "sequential"),
                                      permute=True)
    assert masks.permutations.keys() == perms.keys() and perms
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
        if name in perms:
            assert torch.equal(masks.permutations[name], perms[name])
            assert is_nm(masks[name][:, masks.permutations[name]], 2, 4)
        else:
            assert is_nm(masks[name], 2, 4)
    # The pruned model in its own column order computes the same function as the permuted one.
    name = next(iter(perms))
    layer = ours.get_submodule(name)
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    perm = masks.permutations[name]
    assert torch.allclose(layer(x), torch.nn.functional.linear(x[:, perm], layer.weight[:, perm], layer.bias))


def test_permutations_survive_the_masks_artifact(tmp_path):
    masks = wanda.prune_model(tiny_model(), _tokens(), wanda.PruneConfig(method="ria", pattern="2:4",
                                                                          ria_permute=True))
    assert masks.permutations
    save_masks(tmp_path / "m.safetensors", masks, {"stage": "masks"})
    loaded, meta = load_masks(tmp_path / "m.safetensors")
    assert meta["stage"] == "masks"
    assert loaded.keys() == masks.keys() and loaded.permutations.keys() == masks.permutations.keys()
    assert all(torch.equal(loaded.permutations[n], masks.permutations[n]) for n in masks.permutations)
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    # Re-saving a loaded artifact keeps the permutations; a plain dict has none.
    save_masks(tmp_path / "again.safetensors", loaded)
    assert load_masks(tmp_path / "again.safetensors")[0].permutations.keys() == masks.permutations.keys()
    save_masks(tmp_path / "plain.safetensors", dict(masks))
    assert not load_masks(tmp_path / "plain.safetensors")[0].permutations


def test_bad_permutation_is_refused(tmp_path):
    masks = wanda.masks.MaskDict({"a": torch.zeros(2, 8, dtype=torch.bool)}, permutations={"a": torch.arange(4)})
    with pytest.raises(wanda.ArtifactMismatchError, match="permutation"):
        save_masks(tmp_path / "x.safetensors", masks)
