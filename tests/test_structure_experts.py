"""Expert removal (wanda.structure): saliencies equal an independent naive reference, the pruned
folder reloads as a plain model of its family and computes what the original computes with the
removed experts masked out of its router."""
from __future__ import annotations

import json
import logging

import pydantic
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.reference_structure import lowest, masked_router, reference_expert_saliency
from tests.tiny import tiny_model
from tests.tiny_moe import MOE_FAMILIES, tiny_moe_model
from wanda.errors import ConfigError, UnsupportedArchitectureError
from wanda.structure import StructureConfig, apply_structure, parameter_count
from wanda.structure.experts import EXPERT_COUNT_KEYS

TOKENS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
REFERENCE_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3"]


def _layer_index(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>.<...>


@pytest.mark.parametrize("saliency", ["reap", "frequency", "gate"])
@pytest.mark.parametrize("family", REFERENCE_FAMILIES)
def test_saliency_and_choice_equal_reference(family, saliency):
    model = tiny_moe_model(family)
    reference = reference_expert_saliency(model, TOKENS, family)
    _, report = apply_structure(model, TOKENS, StructureConfig(experts_removed=0.5, expert_saliency=saliency))
    assert len(report["experts"]) == len(reference)
    for name, layer in report["experts"].items():
        ref = reference[_layer_index(name)][saliency]
        assert layer["saliency"] == pytest.approx(ref, rel=1e-4, abs=1e-6)
        assert layer["tokens"] == [int(c) for c in reference[_layer_index(name)]["frequency"]]
        assert layer["removed"] == lowest(ref, 2)
        assert sorted(layer["removed"] + layer["kept"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_reloads_and_equals_masked_original(family, tmp_path):
    model = tiny_moe_model(family)
    smaller, report = apply_structure(model, TOKENS, StructureConfig(experts_removed=0.5))
    json.dumps(report)  # JSON-able as it is
    key = EXPERT_COUNT_KEYS[family]
    assert getattr(smaller.config, key) == 2 and report["config_changes"][key] == 2
    assert smaller.config.num_experts_per_tok <= 2
    assert report["params_after"] == parameter_count(smaller) < report["params_before"] == parameter_count(model)

    smaller.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    removed = {_layer_index(name): layer["removed"] for name, layer in report["experts"].items()}
    with torch.no_grad(), masked_router(model, removed):
        expected = model(input_ids=PROBE).logits
    with torch.no_grad():
        got = reloaded.eval()(input_ids=PROBE).logits
        again = smaller(input_ids=PROBE).logits
        unmasked = model(input_ids=PROBE).logits
    assert (unmasked - expected).abs().max() > 1e-3  # the mask does change the original
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_top_k_lowered_loudly_when_fewer_experts_remain(caplog, tmp_path):
    model = tiny_moe_model("mixtral")
    with caplog.at_level(logging.WARNING, logger="wanda.structure"):
        smaller, report = apply_structure(model, TOKENS, StructureConfig(experts_removed=0.75, expert_saliency="gate"))
    assert "num_experts_per_tok" in caplog.text
    assert report["config_changes"] == {"num_local_experts": 1, "num_experts_per_tok": 1}
    removed = {_layer_index(n): layer["removed"] for n, layer in report["experts"].items()}
    # Renormalised top-k: the one remaining expert gets weight 1, as in the masked original.
    with torch.no_grad(), masked_router(model, removed):
        expected = model(input_ids=PROBE).logits
    with torch.no_grad():
        torch.testing.assert_close(smaller(input_ids=PROBE).logits, expected, rtol=1e-5, atol=1e-5)


def test_off_by_default_returns_the_same_model_without_a_forward():
    model = tiny_moe_model("mixtral")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    same, report = apply_structure(model, None, StructureConfig())
    assert same is model and not calls
    assert report["params_after"] == report["params_before"] and report["config_changes"] == {}


def test_refusals_name_the_parameter():
    with pytest.raises(pydantic.ValidationError, match="experts_removed"):
        StructureConfig(experts_removed=1.0)
    with pytest.raises(pydantic.ValidationError, match="expert_saliency"):
        StructureConfig(expert_saliency="norm")
    with pytest.raises(UnsupportedArchitectureError, match="experts_removed.*'llama'.*supported"):
        apply_structure(tiny_model("llama"), TOKENS, StructureConfig(experts_removed=0.5))
    with pytest.raises(UnsupportedArchitectureError, match="width pruning is for dense models"):
        apply_structure(tiny_moe_model("mixtral"), TOKENS, StructureConfig(mlp_channels_removed=0.5))
    with pytest.raises(ConfigError, match="tokens"):
        apply_structure(tiny_moe_model("mixtral"), torch.zeros(4, 3), StructureConfig(experts_removed=0.5))


def test_deepseek_groups_keep_equal_sizes(tmp_path):
    """n_group > 1: the same number of experts leaves every routing group, and the result still
    equals the masked original (group scores are the two best kept experts of each group)."""
    from transformers import AutoConfig

    from tests.tiny_moe import _COMMON

    extra = dict(MOE_FAMILIES["deepseek_v3"], n_routed_experts=8, n_group=2, topk_group=1)
    config = AutoConfig.for_model("deepseek_v3", **{**_COMMON, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    smaller, report = apply_structure(model, TOKENS, StructureConfig(experts_removed=0.5, expert_saliency="frequency"))
    for layer in report["experts"].values():
        assert sum(e < 4 for e in layer["removed"]) == sum(e >= 4 for e in layer["removed"]) == 2
        group_lowest = lowest(layer["saliency"][:4], 2) + [4 + e for e in lowest(layer["saliency"][4:], 2)]
        assert layer["removed"] == group_lowest
    assert smaller.config.n_routed_experts == 4 and smaller.config.n_group == 2
    smaller.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    removed = {_layer_index(n): layer["removed"] for n, layer in report["experts"].items()}
    with torch.no_grad(), masked_router(model, removed):
        expected = model(input_ids=PROBE).logits
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=PROBE).logits, expected, rtol=1e-5, atol=1e-5)


def test_wanda_then_prunes_the_remaining_experts():
    """Experts removed first, then Wanda per remaining expert (STUN's order), in one process."""
    from wanda import PruneConfig, prune_model

    smaller, _ = apply_structure(tiny_moe_model("mixtral"), TOKENS, StructureConfig(experts_removed=0.5))
    masks = prune_model(smaller, TOKENS, PruneConfig(sparsity=0.5))
    experts = sorted(n for n in masks if "experts" in n)
    assert experts == sorted(f"model.layers.{i}.mlp.experts.{p}[{e}]" for i in range(2) for e in range(2)
                             for p in ("gate_up_proj", "down_proj"))
    assert smaller.model.layers[0].mlp.experts.down_proj.eq(0).float().mean().item() == pytest.approx(0.5)


def test_float64_moe_result_runs():
    """grouped_mm has no float64 kernel: the rebuilt model is switched off it like the original."""
    smaller, report = apply_structure(tiny_moe_model("qwen3_moe", dtype=torch.float64), TOKENS,
                                      StructureConfig(experts_removed=0.25))
    assert report["config_changes"] == {"num_experts": 3, "num_experts_per_tok": 2}
    with torch.no_grad():
        assert smaller(input_ids=PROBE).logits.dtype == torch.float64
