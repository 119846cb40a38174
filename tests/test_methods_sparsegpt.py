"""SparseGPT: the blocked Cholesky solver against a naive OBS, Hessian statistics, fallbacks, quality."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import wanda
from tests.reference_methods import ref_sparsegpt, reference_prune
from tests.tiny import tiny_model
from wanda.masks import is_nm, nm_mask, unstructured_row_mask
from wanda.methods.sparsegpt import HessianCollector, sparsegpt_prune
from wanda.targets import Target, observe


def _tokens(n=6, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _layer(rows=24, cols=40, tokens=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    mixing = torch.randn(cols, cols, generator=generator, dtype=torch.float64) * 0.3 + torch.eye(cols, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ mixing  # correlated inputs
    x[:, 3] *= 8  # an outlier channel
    return weight, x


def _error(weight, new_weight, x):
    return float(((x @ (weight - new_weight).t()) ** 2).sum())


@pytest.mark.parametrize("nm,sparsity,blocksize", [(None, 0.5, 128), (None, 0.6, 16), (None, 0.3, 7),
                                                   ((2, 4), 0.5, 128), ((2, 4), 0.5, 8), ((4, 8), 0.5, 16)])
def test_solver_equals_naive_obs(nm, sparsity, blocksize):
    weight, x = _layer()
    hessian = x.t() @ x
    ours_w, ours_mask, report = sparsegpt_prune(weight, hessian, sparsity, nm, blocksize, 0.01)
    ref_w, ref_mask = ref_sparsegpt(weight, hessian, sparsity, nm, blocksize, 0.01)
    assert torch.equal(ours_mask, ref_mask)
    assert torch.allclose(ours_w, ref_w, atol=1e-9)
    assert torch.all(ours_w[ours_mask] == 0) and not torch.signbit(ours_w[ours_mask]).any()
    assert report["fallback"] is None
    if nm is not None:
        assert is_nm(ours_mask, *nm) and torch.all(ours_mask.reshape(24, -1, nm[1]).sum(-1) == nm[0])
    else:  # exactly int(numel * s) per column block
        for start in range(0, 40, blocksize):
            block = ours_mask[:, start:start + blocksize]
            assert int(block.sum()) == int(block.numel() * sparsity)


def _layer_inputs(model, tokens):
    captured = {}
    modules = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: captured.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]))) for n, m in modules.items()]
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    return modules, {n: torch.cat(c) for n, c in captured.items()}


@pytest.mark.parametrize("nm,sparsity", [(None, 0.5), (None, 0.7), ((2, 4), 0.5)])
def test_reconstruction_error_below_wanda(nm, sparsity):
    """On every layer of a model, from the same inputs: ||X (W - W')^T||^2 of SparseGPT < Wanda's."""
    modules, inputs = _layer_inputs(tiny_model(dtype=torch.float64), _tokens(8))
    for name, module in modules.items():
        weight, x = module.weight.detach(), inputs[name]
        new_weight, mask, _ = sparsegpt_prune(weight, x.t() @ x, sparsity, nm)
        scores = weight.abs() * x.norm(dim=0).reshape(1, -1)
        wanda_mask = nm_mask(scores, *nm) if nm else unstructured_row_mask(scores, sparsity)
        assert int(mask.sum()) >= int(wanda_mask.sum())  # per-block rounding prunes at least as many
        assert _error(weight, new_weight, x) < _error(weight, weight.masked_fill(wanda_mask, 0), x), name


def test_float32_layer_close_to_float64():
    weight, x = _layer()
    hessian = x.t() @ x
    w64, m64, _ = sparsegpt_prune(weight, hessian, 0.5)
    w32, m32, _ = sparsegpt_prune(weight.float(), hessian.float(), 0.5)
    assert w32.dtype == torch.float32
    assert (m32 != m64).float().mean() < 0.02
    assert _error(weight, w32.double(), x) < 1.05 * _error(weight, w64, x)


def test_dead_channels_are_decoupled_not_updated():
    weight, x = _layer()
    x[:, [5, 17]] = 0.0
    hessian = x.t() @ x
    new_weight, mask, report = sparsegpt_prune(weight, hessian, 0.5)
    assert report["dead_channels"] == 2
    for column in (5, 17):
        kept = ~mask[:, column]
        assert torch.equal(new_weight[kept, column], weight[kept, column])  # never updated
    ref_w, ref_mask = ref_sparsegpt(weight, hessian, 0.5)
    assert torch.equal(mask, ref_mask)


def test_failed_cholesky_raises_damping_then_falls_back_to_diagonal():
    weight, x = _layer()
    hessian = x.t() @ x
    indefinite = hessian.clone()
    indefinite[0, 0] = -1e6  # no damping of the mean diagonal repairs this
    new_weight, mask, report = sparsegpt_prune(weight, indefinite.abs().neg(), 0.5)
    assert report["fallback"] == "diagonal Hessian (no weight update)"
    kept = ~mask
    assert torch.equal(new_weight[kept], weight[kept])  # no update
    assert int(mask.sum()) == int(mask.numel() * 0.5)
    # A matrix that only needs more damping: small negative eigenvalue.
    eigen = torch.linalg.eigh(hessian)
    values = eigen.eigenvalues.clone()
    values[0] = -0.05 * float(hessian.diagonal().mean())
    shifted = eigen.eigenvectors @ torch.diag(values) @ eigen.eigenvectors.t()
    _, _, report = sparsegpt_prune(weight, shifted, 0.5)
    assert report["fallback"] is not None and report["fallback"].startswith("damping raised")


def test_non_finite_hessian_is_refused():
    weight, x = _layer()
    hessian = x.t() @ x
    hessian[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(weight, hessian, 0.5, name="layer")


def test_hessians_shared_per_input_and_exact():
    model = tiny_model(dtype=torch.float64)
    block = model.model.layers[0]
    modules = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    captured = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: captured.setdefault(n, []).append(a[0]))
               for n, m in modules.items()]
    targets = [Target(n, "linear", n) for n in modules]
    collector = HessianCollector({t.name: t.weight(block) for t in targets})
    tokens = _tokens(3)
    with observe(targets, block, collector), torch.no_grad():
        model(input_ids=tokens[:2], use_cache=False)
        model(input_ids=tokens[2:], use_cache=False)
    for h in handles:
        h.remove()
    groups = sorted(sorted(g) for g in collector.groups())
    assert ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"] in groups
    assert ["mlp.gate_proj", "mlp.up_proj"] in groups
    assert len(groups) == 4
    for name in modules:
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[name]])
        assert torch.allclose(collector.hessian(name), x.t() @ x, rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", 0.5)])
def test_model_equals_reference(pattern, sparsity):
    tokens = _tokens()
    ours = tiny_model("llama", dtype=torch.float64)
    theirs = tiny_model("llama", dtype=torch.float64)
    config = wanda.PruneConfig(method="sparsegpt", sparsity=sparsity, pattern=pattern, batch_size=4,
                               sparsegpt_blocksize=32)
    masks = wanda.prune_model(ours, tokens, config)
    expected, _ = reference_prune(theirs, tokens, "sparsegpt", sparsity, config.nm, blocksize=32)
    assert masks.keys() == expected.keys()
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(p, q, atol=1e-8), name


def test_offload_gives_the_same_result():
    tokens = _tokens(4)
    a = tiny_model(dtype=torch.float64)
    b = tiny_model(dtype=torch.float64)
    ma = wanda.prune_model(a, tokens, wanda.PruneConfig(method="sparsegpt"))
    mb = wanda.prune_model(b, tokens, wanda.PruneConfig(method="sparsegpt", sparsegpt_offload=True))
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sparsegpt_improves_model_output_over_wanda():
    tokens = _tokens(8)
    dense = tiny_model(dtype=torch.float64)
    with torch.no_grad():
        reference = dense(input_ids=tokens, use_cache=False).logits
    errors = {}
    for method in ("wanda", "sparsegpt"):
        model = tiny_model(dtype=torch.float64)
        wanda.prune_model(model, tokens, wanda.PruneConfig(method=method, sparsity=0.6))
        with torch.no_grad():
            errors[method] = float((model(input_ids=tokens, use_cache=False).logits - reference).pow(2).mean())
    assert errors["sparsegpt"] < errors["wanda"]
