"""Experts of MoE families as pruning targets: discovery, [out, in] views, routed statistics equal
to an independent naive reference, every experts implementation, the few-token policies."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.reference_moe import moe_blocks, reference_expert_masks, reference_expert_norms
from tests.tiny import tiny_model
from tests.tiny_moe import MOE_FAMILIES, tiny_moe_model
from wanda.architecture import find_blocks, model_targets
from wanda.experts import (ExpertPolicy, ExpertStatisticsCollector, apply_expert_policy, expert_metadata,
                           tokens_per_expert_table)
from wanda.masks import mask_from_scores
from wanda.methods.wanda import wanda_score
from wanda.statistics import ActivationStatistics

FAMILIES = sorted(MOE_FAMILIES)
TOKENS = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))


def in_block(targets, prefix):
    return [t for t in targets if t.module_name.startswith(prefix + ".")]


def collect(model, policy=None, tokens=TOKENS):
    """Per-expert statistics from one forward of the whole model, the observer on every block."""
    path, blocks = find_blocks(model)
    targets = [t for t in model_targets(model) if t.kind == "expert"]
    stats = ActivationStatistics()
    collectors = [ExpertStatisticsCollector(in_block(targets, f"{path}.{i}"), model, stats, policy)
                  for i in range(len(blocks))]
    for c in collectors:
        c.__enter__()
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits
    finally:
        for c in collectors:
            c.__exit__(None, None, None)
    tokens_seen = {k: v for c in collectors for k, v in c.tokens.items()}
    return targets, stats, tokens_seen, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_names_every_expert_matrix_and_keeps_routers_dense(family):
    model = tiny_moe_model(family)
    targets = model_targets(model)
    experts = [t for t in targets if t.kind == "expert"]
    moe = moe_blocks(model)
    n_experts = moe[0][1].experts.down_proj.shape[0]
    assert len(experts) == 2 * n_experts * len(moe)
    assert f"{moe[0][0]}.gate_up_proj[{n_experts - 1}]" in {t.name for t in experts}
    names = {t.name for t in targets}
    assert not any(n.endswith((".gate", ".router", "shared_expert_gate")) for n in names)
    if family in ("qwen2_moe", "deepseek_v3"):  # shared experts are ordinary linear layers
        assert any("shared_expert" in t.name and t.kind == "linear" for t in targets)
    for target in experts:
        view = target.weight(model)
        assert view.dim() == 2
        storage = target.parameter(model).untyped_storage().data_ptr()
        assert view.untyped_storage().data_ptr() == storage  # a view into the fused parameter, no copy
    gate_up = experts[0]
    view = gate_up.weight(model)
    hidden = model.config.hidden_size
    assert view.shape[1] == hidden  # [out, in]: gate_up consumes the hidden states
    param = gate_up.parameter(model)
    stored = param[gate_up.expert].t() if family == "gpt_oss" else param[gate_up.expert]  # gpt-oss: [in, out]
    assert torch.equal(view, stored) and view[0, 1].item() != 0.0
    view[0, 1] = 0.0  # in place through the view changes the model
    assert param[gate_up.expert][(1, 0) if family == "gpt_oss" else (0, 1)].item() == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_statistics_and_masks_equal_the_naive_reference(family):
    model = tiny_moe_model(family)
    targets, stats, tokens_seen, _ = collect(model)
    norms, counts = reference_expert_norms(model, TOKENS)
    assert tokens_seen == counts
    assert set(norms) == {t.name for t in targets}
    for target in targets:
        assert stats[target.name].count == counts[target.module_name][target.expert]
        torch.testing.assert_close(stats[target.name].norm().double(), norms[target.name], rtol=1e-5, atol=1e-6)
    for sparsity, nm in ((0.5, None), (0.5, (2, 4))):
        expected = reference_expert_masks(model, norms, sparsity, nm)
        for target in targets:
            mask = mask_from_scores(wanda_score(target.weight(model), stats[target.name]), sparsity, nm)
            assert torch.equal(mask, expected[target.name]), (family, nm, target.name)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_every_experts_implementation_gives_the_same_statistics(family):
    results = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model = tiny_moe_model(family, experts_implementation=impl)
        _, stats, tokens_seen, logits = collect(model)
        results[impl] = (stats, tokens_seen, logits)
    eager_stats, eager_tokens, eager_logits = results["eager"]
    for impl, (stats, tokens_seen, logits) in results.items():
        assert tokens_seen == eager_tokens
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
        for name, s in eager_stats.layers.items():
            if name.startswith("model.layers.0."):  # same block input: the observer is exact
                assert torch.equal(stats[name].sumsq, s.sumsq), (impl, name)
            else:  # later blocks see the implementations' own rounding of the blocks before
                torch.testing.assert_close(stats[name].sumsq, s.sumsq, rtol=1e-5, atol=1e-6)


def test_calibrate_all_experts_feeds_every_token_to_every_expert_and_keeps_the_output():
    model = tiny_moe_model("qwen2_moe")
    with torch.no_grad():
        plain = model(input_ids=TOKENS, use_cache=False).logits
    targets, stats, tokens_seen, logits = collect(model, ExpertPolicy(mode="calibrate_all_experts"))
    assert torch.equal(logits, plain)  # statistics only: the block output stays normally routed
    norms, counts = reference_expert_norms(model, TOKENS, all_experts=True)
    assert tokens_seen == counts  # the table still reports the routed counts
    for target in targets:
        assert stats[target.name].count == TOKENS.numel()
        torch.testing.assert_close(stats[target.name].norm().double(), norms[target.name], rtol=1e-5, atol=1e-6)
    assert apply_expert_policy(stats, targets, tokens_seen, ExpertPolicy(mode="calibrate_all_experts")) == {}


def _starve(model, family: str, expert: int) -> None:
    """Bias the router so ``expert`` is never chosen."""
    with torch.no_grad():
        for _, block in moe_blocks(model):
            if family == "gpt_oss":
                block.router.bias[expert] = -1e4
            else:  # deepseek_v3: the selection-only correction bias
                block.gate.e_score_correction_bias[expert] = -1e4


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_an_expert_without_tokens_falls_back_loudly(family, caplog):
    model = tiny_moe_model(family)
    _starve(model, family, 3)
    targets, stats, tokens_seen, _ = collect(model)
    assert all(counts[3] == 0 for counts in tokens_seen.values())
    starved = [t for t in targets if t.expert == 3]
    for t in starved:
        assert stats[t.name].count == 0 and float(stats[t.name].sumsq.sum()) == 0.0

    pooled_stats = ActivationStatistics(layers=dict(stats.layers))
    with caplog.at_level(logging.WARNING, logger="wanda.experts"):
        fallbacks = apply_expert_policy(pooled_stats, targets, tokens_seen, ExpertPolicy(min_tokens_per_expert=1))
    assert set(fallbacks) == {t.name for t in starved}
    assert "fallback" in caplog.text and starved[0].name in caplog.text
    for t in starved:
        others = [o for o in targets if o.numel_key == t.numel_key and o.expert != 3]
        assert pooled_stats[t.name].count == sum(stats[o.name].count for o in others)
        torch.testing.assert_close(pooled_stats[t.name].sumsq, sum(stats[o.name].sumsq.double() for o in others))

    magnitude_stats = ActivationStatistics(layers=dict(stats.layers))
    apply_expert_policy(magnitude_stats, targets, tokens_seen, ExpertPolicy(min_tokens_per_expert=1,
                                                                            fallback="magnitude"))
    for t in starved:  # unit norms: the Wanda mask is the per-row magnitude mask
        weight = t.weight(model)
        assert torch.equal(mask_from_scores(wanda_score(weight, magnitude_stats[t.name]), 0.5, None),
                           mask_from_scores(weight.abs().float(), 0.5, None))
    meta = expert_metadata(ExpertPolicy(), tokens_seen, fallbacks)
    assert json.loads(meta["expert_tokens"]) == tokens_seen
    assert meta["expert_policy"] == "routed(min_tokens_per_expert=1, fallback=pooled)"


def test_policy_is_validated_with_the_field_name():
    with pytest.raises(ValueError, match="mode"):
        ExpertPolicy(mode="everything")
    with pytest.raises(ValueError, match="min_tokens_per_expert"):
        ExpertPolicy(min_tokens_per_expert=-1)


def test_tokens_per_expert_table_and_plot(tmp_path):
    from wanda.plots import tokens_per_expert_plot

    model = tiny_moe_model("mixtral")
    _, _, tokens_seen, _ = collect(model)
    rows = tokens_per_expert_table(tokens_seen)
    assert len(rows) == 2 * 4 and rows[0]["container"] == "model.layers.0.mlp.experts"
    # top-2 routing: every token counted twice per block
    assert sum(r["tokens"] for r in rows if r["container"] == "model.layers.0.mlp.experts") == 2 * TOKENS.numel()
    path = tokens_per_expert_plot(tokens_seen, tmp_path / "tokens.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tokens_per_expert_plot({}, tmp_path / "none.png") is None


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_block_by_block_walk_observes_what_the_full_forward_does(family):
    """The driver's walk (captured block calls, one block at a time) feeds the observer the same
    rows as a whole-model forward: nothing in the hook depends on the model around the block."""
    from wanda.blocks import capture_block_calls, capture_block_inputs, run_block_over

    model = tiny_moe_model(family)  # float32: grouped_mm (the CPU default) has no float64 kernel
    targets, full_stats, full_tokens, _ = collect(model)
    path, blocks = find_blocks(model)
    calls = capture_block_calls(model, blocks, TOKENS[:1])
    hidden = capture_block_inputs(model, blocks, TOKENS, batch_size=2)
    stats = ActivationStatistics()
    tokens_seen = {}
    for index, (block, call) in enumerate(zip(blocks, calls)):
        with ExpertStatisticsCollector(in_block(targets, f"{path}.{index}"), block, stats) as collector:
            hidden = run_block_over(block, hidden, call)
        tokens_seen.update(collector.tokens)
    assert tokens_seen == full_tokens
    for target in targets:
        # batches of 2 rows instead of 4: float32 matmul rounding in the blocks, nothing else
        torch.testing.assert_close(stats[target.name].sumsq, full_stats[target.name].sumsq, rtol=1e-5, atol=1e-6)


def test_float64_moe_models_get_an_experts_implementation_that_runs():
    from wanda.experts import usable_experts_implementation

    model = tiny_moe_model("mixtral", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Double"):  # what transformers' default does on CPU
        with torch.no_grad():
            model(input_ids=TOKENS[:1], use_cache=False)
    assert usable_experts_implementation(model) == "batched_mm"
    _, stats, _, logits = collect(model, tokens=TOKENS[:1])
    assert logits.dtype == torch.float64 and torch.isfinite(logits).all()
    assert usable_experts_implementation(tiny_model("llama")) is None  # no experts: nothing to choose


def test_load_model_gives_a_float64_moe_model_that_runs(tmp_path):
    from tests.tiny import tiny_tokenizer
    from wanda.model_io import load_model

    model = tiny_moe_model("olmoe")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, _ = load_model(str(tmp_path / "m"), dtype="float64")
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=TOKENS[:1], use_cache=False).logits).all()
