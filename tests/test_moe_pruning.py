"""MoE experts and GPT-2 Conv1D layers pruned through the driver (``wanda.prune_model``).

Tiny random configs (``tests/tiny_moe.py``): block-wide zeros, per-expert masks against the
naive reference (``tests/reference_moe.py``), the expert policies, every method on experts,
sequential and one-pass, streamed equal to loaded (fused-expert checkpoints; the
converted ones are in ``tests/test_moe_streaming.py``), GPT-2 against a naive reference, and the
block-wide figures through the report into the release gate.
"""
from __future__ import annotations

import json

import pytest
import torch

import wanda
from flows.gate_policy import GateCriteria, decide
from flows.run_metrics import sparsity_metrics
from tests.reference_moe import reference_expert_masks, reference_expert_norms
from tests.reference_wanda import reference_mask
from tests.tiny_moe import MOE_FAMILIES, tiny_moe_model, tiny_other_config
from wanda.accounting import whole_model_accounting
from wanda.architecture import model_targets
from wanda.masks import apply_masks, sparsity_report

FAMILIES = sorted(MOE_FAMILIES)
TOKENS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
DENSE = {"perplexity": 10.0}


def _prune(model, **config):
    return wanda.prune_model(model, TOKENS, wanda.PruneConfig(batch_size=2, **config))


def _expert_masks(masks):
    return {k: v for k, v in masks.items() if k.endswith("]")}


@pytest.mark.parametrize("pattern", ["unstructured", "4:8", "2:4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_wide_zeros_equal_the_requested_sparsity(family, pattern):
    """Over the targets (every matrix of the blocks but the routers) exactly the requested
    sparsity, row by row; block-wide the routers' dense share (< 1.5%) is all that is missing."""
    model = tiny_moe_model(family)
    masks = _prune(model, sparsity=0.5, pattern=pattern)
    targets = model_targets(model)
    assert set(masks) == {t.name for t in targets}
    assert any(t.kind == "expert" for t in targets)
    for target in targets:
        weight, mask = target.weight(model), masks[target.name]
        assert mask.shape == weight.shape
        per_row = mask.sum(1)
        assert torch.all(per_row == weight.shape[1] // 2), target.name  # one weight per row at most apart
        assert torch.all(weight[mask] == 0)
    accounting = whole_model_accounting(model, masks)
    target_zeros = sum(int((t.weight(model) == 0).sum()) for t in targets)
    assert target_zeros == accounting.target_total // 2  # the targets: exactly 0.5
    assert accounting.coverage > 0.985  # the rest: routers (kept dense by default)
    assert abs(accounting.block_sparsity - 0.5 * accounting.coverage) < 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_masks_equal_the_naive_reference(family):
    reference_model = tiny_moe_model(family)
    norms, counts = reference_expert_norms(reference_model, TOKENS)
    expected = reference_expert_masks(reference_model, norms, 0.5, None)
    expected_nm = reference_expert_masks(reference_model, norms, 0.5, (2, 4))
    masks = _prune(tiny_moe_model(family), mode="one_pass")
    assert _expert_masks(masks).keys() == expected.keys()
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
    assert json.loads(masks.metadata["expert_tokens"]) == counts
    nm = _prune(tiny_moe_model(family), mode="one_pass", pattern="2:4")
    for name, mask in expected_nm.items():
        assert torch.equal(nm[name], mask), name
    # sequential: block 0 sees the dense inputs, so its experts match too (DeepSeek-V3's block 0
    # is dense: its first MoE block sees the pruned block 0's outputs)
    sequential = _prune(tiny_moe_model(family))
    for name in (n for n in expected if n.startswith("model.layers.0.")):
        assert torch.equal(sequential[name], expected[name]), name


def test_calibrate_all_experts_policy_equals_the_reference_with_every_token():
    reference_model = tiny_moe_model("mixtral")
    norms, _ = reference_expert_norms(reference_model, TOKENS, all_experts=True)
    expected = reference_expert_masks(reference_model, norms, 0.5, None)
    masks = _prune(tiny_moe_model("mixtral"), mode="one_pass", expert_policy={"mode": "calibrate_all_experts"})
    for name, mask in expected.items():
        assert torch.equal(masks[name], mask), name
    assert masks.metadata["expert_policy"] == "calibrate_all_experts"
    assert json.loads(masks.metadata["expert_fallbacks"]) == {}


def _starve_expert(model, expert: int):
    """Route expert ``expert``'s tokens to expert 0 instead (a pre-hook registered before the
    observer's, so the observer and the block see the changed routing)."""
    def hook(module, args, kwargs):
        index = args[1].clone()
        index[index == expert] = 0
        return (args[0], index, *args[2:]), kwargs

    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("fallback", ["magnitude", "pooled"])
def test_an_expert_without_tokens_uses_the_fallback(fallback, caplog):
    model = tiny_moe_model("mixtral")
    _starve_expert(model, 3)
    dense = {t.name: t.weight(model).clone() for t in model_targets(model)}
    masks = _prune(model, expert_policy={"min_tokens_per_expert": 1, "fallback": fallback})
    tokens = json.loads(masks.metadata["expert_tokens"])
    assert all(counts[3] == 0 and sum(counts) > 0 for counts in tokens.values())
    fallbacks = json.loads(masks.metadata["expert_fallbacks"])
    starved = {n for n in masks if n.endswith("[3]")}
    assert set(fallbacks) == starved and all(v.startswith(fallback) for v in fallbacks.values())
    assert "fewer than 1 routed calibration tokens" in caplog.text
    if fallback == "magnitude":
        for name in (n for n in starved if "gate_up" in n):  # down_proj's input is its own (zero-token) activations
            assert torch.equal(masks[name], reference_mask(dense[name].abs(), 0.5, None)), name


@pytest.mark.parametrize("config", [
    dict(method="magnitude"), dict(method="ria"), dict(method="sparsegpt"), dict(allocation="owl", owl_lambda=0.05),
    dict(variant=True), dict(refine="dsnot", dsnot_cycles=5), dict(method="ria", pattern="2:4", ria_permute=True),
    dict(method="sparsegpt", pattern="2:4"),
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_method_prunes_experts(config):
    model = tiny_moe_model("qwen2_moe")
    masks = _prune(model, **config)
    experts = _expert_masks(masks)
    assert len(experts) == 2 * 2 * 4  # 2 blocks x 4 experts x (gate_up, down)
    accounting = whole_model_accounting(model, masks)
    pruned = sum(int(m.sum()) for m in masks.values())
    assert abs(pruned / accounting.target_total - 0.5) < 0.02, pruned / accounting.target_total
    for name, mask in masks.items():  # the masks are applied (SparseGPT: its updated weights too)
        target = next(t for t in model_targets(model) if t.name == name)
        assert torch.all(target.weight(model)[mask] == 0), name
    if config.get("pattern") == "2:4":  # in the permuted column order where RIA chose one
        for name, mask in experts.items():
            perm = masks.permutations.get(name)
            assert wanda.masks.is_nm(mask if perm is None else mask[:, perm], 2, 4), name
        assert not config.get("ria_permute") or masks.permutations


@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe"])
def test_streamed_experts_equal_loaded(family, tmp_path):
    """Families whose checkpoints store the fused experts (no conversion on load) stream."""
    from wanda.streaming import prune_checkpoint

    base = tmp_path / "base"
    tiny_moe_model(family).save_pretrained(base)
    loaded = tiny_moe_model(family)
    config = wanda.PruneConfig(batch_size=2)
    expected = wanda.prune_model(loaded, TOKENS, config)
    prune_checkpoint(base, tmp_path / "out", TOKENS, config, masks_path=tmp_path / "m.safetensors")
    masks, _ = wanda.load_masks(tmp_path / "m.safetensors")
    assert masks.keys() == expected.keys() and _expert_masks(masks)
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    assert masks.metadata["expert_tokens"] == expected.metadata["expert_tokens"]
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, tensor in loaded.state_dict().items():
        if key in written:
            assert torch.equal(written[key], tensor), key


def test_masks_apply_by_expert_name_and_round_trip(tmp_path):
    model = tiny_moe_model("gpt_oss")  # stored [in, out] per expert: the view is a transpose
    masks = _prune(model)
    wanda.save_masks(tmp_path / "m.safetensors", masks, metadata=masks.metadata)
    loaded, metadata = wanda.load_masks(tmp_path / "m.safetensors")
    assert metadata["expert_policy"].startswith("routed")
    fresh = tiny_moe_model("gpt_oss")
    apply_masks(fresh, loaded)
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor) or "experts" not in key, key
    name = next(n for n in masks if n.endswith("down_proj[2]"))
    assert "model.layers.0.mlp.experts.down_proj[2]" in masks and name
    report = sparsity_report(loaded, whole_model_accounting(fresh, loaded))
    assert report["layers"][name]["sparsity"] == 0.5 and report["coverage"] > 0.98
    metrics = sparsity_metrics(report)
    assert "sparsity.layer.model.layers.0.mlp.experts.down_proj.2" in metrics  # MLflow allows no brackets


def test_gpt2_conv1d_pruned_end_to_end_equals_the_naive_reference():
    from transformers import AutoModelForCausalLM

    def gpt2():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_other_config("gpt2")).eval()

    reference = gpt2()
    conv = {n: m for n, m in reference.named_modules() if type(m).__name__ == "Conv1D"}
    sumsq = {n: torch.zeros(m.weight.shape[0], dtype=torch.float64) for n, m in conv.items()}
    def hook(name):
        def add(module, args, output):  # returns None: the output stays the layer's
            sumsq[name].add_((args[0].reshape(-1, args[0].shape[-1]).double() ** 2).sum(0))
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in conv.items()]
    with torch.no_grad():
        for row in TOKENS:
            reference(input_ids=row.unsqueeze(0))
    for handle in handles:
        handle.remove()
    model = gpt2()
    masks = _prune(model, mode="one_pass")
    assert masks.keys() == conv.keys()
    for name, module in conv.items():
        weight_out_in = module.weight.detach().t()  # Conv1D stores [in, out]
        expected = reference_mask(weight_out_in.abs() * sumsq[name].sqrt().float().unsqueeze(0), 0.5, None)
        assert torch.equal(masks[name], expected), name
        assert torch.all(model.get_submodule(name).weight.t()[expected] == 0)
    assert abs(whole_model_accounting(model, masks).block_sparsity - 0.5) < 1e-3  # Conv1D only: covered fully
    sequential = _prune(gpt2(), pattern="2:4")
    assert all(wanda.masks.is_nm(m, 2, 4) for m in sequential.values())


def test_gate_reads_the_block_wide_figures_of_a_real_report():
    """masks -> accounting -> report -> metrics -> gate: attention-only targets fail
    ``min_coverage`` and the block-wide ``min_sparsity``; all targets pass."""
    criteria = GateCriteria(min_sparsity=0.45, max_mean_acc_drop=None)

    def decision(**config):
        model = tiny_moe_model("olmoe")
        masks = _prune(model, **config)
        metrics = {**DENSE, **sparsity_metrics(sparsity_report(masks, whole_model_accounting(model, masks)))}
        return decide(metrics, DENSE, None, criteria)

    partial = decision(targets=["*.self_attn.*"])
    assert {c.criterion for c in partial.failures} == {"min_sparsity", "min_coverage"}, partial.summary()
    assert decision().passed


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_masks_and_prune_stages_on_a_moe_model(tmp_path, monkeypatch, mode):
    """The stages in-process on a tiny Mixtral: expert masks, block-wide figures in sparsity.json,
    the tokens-per-expert table and plot, the policy in the masks metadata, the pruned folder."""
    import random

    from tasks import calibration, masks as masks_stage, materialize, prune, statistics
    from tasks.params import apply_overrides, read_yaml, validate_params
    from tests.pipeline_project import REPO, TINY_OVERRIDES
    from tests.tiny import tiny_tokenizer
    from wanda.model_io import save_model

    save_model(tiny_moe_model("mixtral"), tiny_tokenizer(), tmp_path / "fixtures" / "tiny-model")
    rng = random.Random(0)
    (tmp_path / "fixtures" / "calib.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(3000)))
    (tmp_path / "fixtures" / "eval.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(2000)))
    monkeypatch.chdir(tmp_path)
    params = validate_params(apply_overrides(read_yaml(REPO / "params.yaml"), TINY_OVERRIDES + [
        f"statistics.mode={mode}", "statistics.expert_policy={min_tokens_per_expert: 2, fallback: magnitude}"]))
    for run in (materialize.run, calibration.run, statistics.run, masks_stage.run, prune.run):
        run(params, tmp_path)
    folder = tmp_path / params.paths.masks
    report = json.loads((folder / "sparsity.json").read_text())
    assert report["coverage"] > 0.98 and abs(report["block_sparsity"] - 0.5 * report["coverage"]) < 1e-3
    assert any(name.endswith("mlp.experts.down_proj[3]") for name in report["layers"])
    table = json.loads((folder / "tokens_per_expert.json").read_text())
    assert table["policy"] == "routed(min_tokens_per_expert=2, fallback=magnitude)"
    assert len(table["rows"]) == 2 * 4 and (folder / "tokens_per_expert.png").stat().st_size > 0
    saved, metadata = wanda.load_masks(folder / "masks.safetensors")
    assert metadata["expert_policy"] == table["policy"]
    from wanda.targets import target_of_name

    pruned = wanda.load_model(str(tmp_path / params.paths.prune / "model"), dtype="float32")[0]
    for name, mask in saved.items():  # the prune stage applied every expert's mask
        assert torch.all(target_of_name(pruned, name).weight(pruned)[mask] == 0), name


@pytest.mark.parametrize("family", ["gpt_oss"])
def test_streamed_apply_of_expert_masks_equals_loaded_apply(family, tmp_path):
    """The prune stage's streamed path (base shards + masks artifact, tensor by tensor) zeroes
    each expert's slice of the fused parameter exactly as ``apply_masks`` does on the model."""
    from safetensors.torch import load_file

    from wanda.streaming import apply_masks_to_checkpoint

    base = tmp_path / "base"
    tiny_moe_model(family).save_pretrained(base)
    pruned = tiny_moe_model(family)
    masks = wanda.prune_model(pruned, TOKENS, wanda.PruneConfig(batch_size=2))
    wanda.save_masks(tmp_path / "m.safetensors", masks, metadata=masks.metadata)
    counts = apply_masks_to_checkpoint(base, tmp_path / "out", tmp_path / "m.safetensors")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    experts = [k for k in written if ".experts." in k]
    assert experts and counts["total"] > 0 and counts["zeros"] >= counts["total"] // 2
    for key, tensor in pruned.state_dict().items():
        if key in written:
            assert torch.equal(written[key], tensor), key
