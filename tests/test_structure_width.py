"""Width pruning (wanda.structure): MLP channels and key/value head groups chosen as an
independent naive reference chooses them; the smaller model reloads as a plain model of its
family and equals the original with the removed channels' outputs zeroed (plus FLAP's
compensation bias)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tests.reference_structure import masked_width, reference_width
from tests.tiny import VOCAB, tiny_config
from tests.tiny_moe import tiny_other_config
from wanda.errors import ConfigError, UnsupportedArchitectureError
from wanda.structure import StructureConfig, apply_structure, parameter_count

TOKENS = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _config(family: str):
    if family == "gpt2":
        return tiny_other_config("gpt2")
    if family == "gemma3_text":
        return AutoConfig.for_model("gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    sliding_window=8, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    return tiny_config(family)


def tiny_dense(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
    # Seeded random values for every weight and bias (init leaves biases at zero), so the
    # compensation and the sliced biases are exercised.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name and "ln_" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (0.1 if "bias" in name else 0))
    return model.eval()


def _index(prefix: str) -> int:
    return int(prefix.rsplit(".", 1)[1])


def _group(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads // c.num_key_value_heads * head_dim


CASES = [  # family, score, mlp fraction, kv groups, compensated
    ("llama", "flap", 0.25, 1, True),
    ("llama", "wanda", 0.3, 1, False),
    ("qwen2", "wanda", 0.25, 1, False),
    ("gemma3_text", "wanda", 0.25, 1, False),
    ("gemma3_text", "flap", 0.0, 1, True),
    ("gpt2", "flap", 0.25, 0, True),
]


@pytest.mark.parametrize("family,score,mlp,kv,compensated", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_width_equals_reference_and_masked_original(family, score, mlp, kv, compensated, tmp_path):
    model = tiny_dense(family)
    config = StructureConfig(mlp_channels_removed=mlp, kv_groups_removed=kv, width_score=score)
    plans = {}
    if mlp:
        intermediate = model.config.intermediate_size if family != "gpt2" else 4 * model.config.n_embd
        plans["mlp"] = (reference_width(model, TOKENS, "mlp", score, int(mlp * intermediate)), 1)
    if kv:
        group = _group(model)
        plans["attn"] = (reference_width(model, TOKENS, "attn", score, kv, group=group), group)

    smaller, report = apply_structure(model, TOKENS, config)
    json.dumps(report)
    for prefix, entry in report["width"].items():
        if mlp:
            assert entry["mlp_channels_removed"] == plans["mlp"][0][_index(prefix)][0]
        if kv:
            assert entry["kv_groups_removed"] == plans["attn"][0][_index(prefix)][0]
    heads_before = model.config.num_attention_heads
    if kv:
        c = smaller.config
        assert c.num_key_value_heads == model.config.num_key_value_heads - kv
        assert c.num_attention_heads == heads_before - kv * heads_before // model.config.num_key_value_heads
        assert c.head_dim == (getattr(model.config, "head_dim", None) or model.config.hidden_size // heads_before)
    assert report["params_after"] == parameter_count(smaller) < report["params_before"]

    smaller.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for part, (plan, group) in plans.items():
            stack.enter_context(masked_width(model, part, plan, group, compensate=compensated))
        expected = model(input_ids=PROBE).logits
    with torch.no_grad():
        got = reloaded.eval()(input_ids=PROBE).logits
        unmasked = model(input_ids=PROBE).logits
    assert (unmasked - expected).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_compensation_refused_by_name_where_the_config_cannot_add_a_bias():
    with pytest.raises(UnsupportedArchitectureError, match="bias_compensation.*'qwen2'.*o_proj"):
        apply_structure(tiny_dense("qwen2"), TOKENS, StructureConfig(kv_groups_removed=1, width_score="flap"))
    with pytest.raises(UnsupportedArchitectureError, match="bias_compensation.*'gemma3_text'.*down_proj"):
        apply_structure(tiny_dense("gemma3_text"), TOKENS, StructureConfig(mlp_channels_removed=0.25,
                                                                            width_score="flap"))
    # Without compensation FLAP's ranking alone is fine.
    smaller, _ = apply_structure(tiny_dense("qwen2"), TOKENS, StructureConfig(
        kv_groups_removed=1, width_score="flap", bias_compensation=False))
    assert smaller.config.num_key_value_heads == 1


def test_refusals_name_the_parameter():
    with pytest.raises(UnsupportedArchitectureError, match="kv_groups_removed.*'gpt2'.*head_dim"):
        apply_structure(tiny_dense("gpt2"), TOKENS, StructureConfig(kv_groups_removed=1))
    with pytest.raises(ConfigError, match="kv_groups_removed.*allowed: 0 to 1"):
        apply_structure(tiny_dense("llama"), TOKENS, StructureConfig(kv_groups_removed=2))
    with pytest.raises(UnsupportedArchitectureError, match="'opt' is not supported for width pruning"):
        apply_structure(AutoModelForCausalLM.from_config(tiny_config("opt")), TOKENS,
                        StructureConfig(mlp_channels_removed=0.5))


def test_fraction_rounding_to_nothing_warns_and_changes_nothing(caplog):
    import logging

    model = tiny_dense("llama")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with caplog.at_level(logging.WARNING, logger="wanda.structure"):
        same, report = apply_structure(model, TOKENS, StructureConfig(mlp_channels_removed=0.005, width_score="flap"))
    assert same is model and not calls and report["config_changes"] == {}
    assert "removes no channel of 96" in caplog.text
