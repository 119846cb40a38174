"""Whole-model accounting: block-wide zeros, coverage, whole-model zeros; the report fields, the
coverage warning and the gate criteria that read them."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import wanda
from tests.tiny import tiny_model
from tests.tiny_moe import tiny_moe_model
from wanda.accounting import coverage_warning, target_sizes_of_layout, whole_model_accounting
from wanda.architecture import model_targets
from flows.gate_policy import GateCriteria, GateMetrics, decide
from wanda.masks import mask_from_scores, sparsity_report

DENSE = {"perplexity": 10.0}


def _prune_all(model, targets, sparsity=0.5):
    """Magnitude row masks on every target, applied through the targets' views."""
    masks = {}
    with torch.no_grad():
        for target in targets:
            view = target.weight(model)
            masks[target.name] = mask_from_scores(view.abs().float(), sparsity, None)
            view.mul_(~masks[target.name])
    return masks


def test_dense_llama_is_fully_covered():
    model = tiny_model("llama")
    layout = wanda.discover(model)
    accounting = whole_model_accounting(model, target_sizes_of_layout(model, layout))
    assert accounting.coverage == 1.0 and accounting.block_zeros == 0
    assert accounting.blocks_path == "model.layers"
    # embeddings and lm_head count in the whole-model total only
    assert accounting.model_total > accounting.block_total


def test_mixtral_counts_every_expert_and_the_router(tmp_path):
    model = tiny_moe_model("mixtral")
    targets = model_targets(model)
    masks = _prune_all(model, targets)
    accounting = whole_model_accounting(model, targets)
    router = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert accounting.block_total - accounting.target_total == router  # routers stay dense
    assert set(accounting.untargeted) == {"model.layers.*.mlp.gate.weight"}
    pruned = sum(int(m.sum()) for m in masks.values())
    assert accounting.block_zeros == pruned  # random weights: the only zeros are the pruned ones
    assert accounting.block_sparsity == pytest.approx(pruned / accounting.block_total)
    assert accounting.model_zeros == pruned and accounting.model_sparsity < accounting.block_sparsity

    # the same figures from masks, a state dict and a safetensors folder
    assert whole_model_accounting(model, masks) == accounting
    assert whole_model_accounting(model.state_dict(), masks) == accounting
    model.save_pretrained(tmp_path / "m")  # written back as Mixtral's per-expert w1/w2/w3 tensors
    assert whole_model_accounting(tmp_path / "m", masks) == dataclasses.replace(accounting, untargeted={})

    report = sparsity_report(masks, accounting)
    plain = sparsity_report(masks)
    assert {k: report[k] for k in plain} == plain  # existing fields unchanged
    assert report["overall"] == 0.5 and report["coverage"] == round(accounting.coverage, 6)
    assert report["block_sparsity"] == round(accounting.block_sparsity, 6)
    assert report["model_total"] == accounting.model_total


def test_attention_only_pruning_of_a_moe_model_warns_and_reads_its_true_sparsity(caplog):
    """What the driver did before experts were targets (now: targets naming attention only):
    the masks say 0.5, the blocks are ~5%."""
    model = tiny_moe_model("olmoe")
    with caplog.at_level(logging.WARNING, logger="wanda.accounting"):
        layout = wanda.discover(model, targets=["*.self_attn.*"])
    assert "COVERAGE" in caplog.text and "mlp.experts.gate_up_proj" in caplog.text
    attention = [t for t in model_targets(model) if t.kind == "linear"]
    assert {t.name for t in attention} == set(layout.all_targets())
    masks = _prune_all(model, attention)
    accounting = whole_model_accounting(model, masks)
    report = sparsity_report(masks, accounting)
    assert report["overall"] == 0.5 and report["block_sparsity"] < 0.1 and report["coverage"] < 0.2
    assert coverage_warning(accounting) == accounting.coverage

    metrics = {**DENSE, "perplexity": 10.5, "sparsity": report["overall"],
               "sparsity.block": report["block_sparsity"], "sparsity.coverage": report["coverage"]}
    decision = decide(metrics, DENSE, None, GateCriteria(min_sparsity=0.45, max_mean_acc_drop=None))
    failed = {c.criterion for c in decision.failures}
    assert failed == {"min_sparsity", "min_coverage"}, decision.summary()
    sparsity = next(c for c in decision.reasons if c.criterion == "min_sparsity")
    assert sparsity.value == report["block_sparsity"]


def test_gate_coverage_and_block_sparsity_criteria():
    full = {"perplexity": 10.5, "sparsity": 0.5, "sparsity.block": 0.497, "sparsity.coverage": 0.994}
    criteria = GateCriteria(min_sparsity=0.49, max_mean_acc_drop=None)
    assert decide(full, DENSE, None, criteria).passed
    low_coverage = decide({**full, "sparsity.coverage": 0.9}, DENSE, None, criteria)
    assert {c.criterion for c in low_coverage.failures} == {"min_coverage"}
    low_block = decide({**full, "sparsity.block": 0.3}, DENSE, None, criteria)
    assert {c.criterion for c in low_block.failures} == {"min_sparsity"}
    # no accounting recorded: the masked-layer figure, said so; coverage not checked, said so
    legacy = decide({"perplexity": 10.5, "sparsity": 0.5}, DENSE, None, criteria)
    assert legacy.passed
    notes = {c.criterion: c.note for c in legacy.reasons}
    assert "masked layers only" in notes["min_sparsity"] and "not checked" in notes["min_coverage"]
    assert GateMetrics.from_flat(full).coverage == 0.994
    assert decide({**full, "sparsity.coverage": 0.5}, DENSE, None,
                  GateCriteria(min_coverage=None, max_mean_acc_drop=None)).passed
    with pytest.raises(ValueError, match="min_coverage"):
        GateCriteria(min_coverage=1.5)
