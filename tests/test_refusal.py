"""What cannot be pruned is refused by name before any forward pass; GPT-2 Conv1D is a target."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import wanda
from tests.reference_wanda import reference_mask
from tests.tiny import tiny_model
from tests.tiny_moe import tiny_moe_model, tiny_other_config
from wanda.architecture import check_block_weights, model_targets
from wanda.errors import ConfigError, UnsupportedArchitectureError
from wanda.masks import mask_from_scores
from wanda.methods.wanda import wanda_score
from wanda.statistics import ChannelStats


def _forward_counter(model):
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("model_type", ["bert", "t5"])
def test_encoders_are_refused_by_name_before_any_forward(model_type):
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    config = tiny_other_config(model_type)
    model = (T5ForConditionalGeneration(config) if model_type == "t5" else AutoModelForCausalLM.from_config(config))
    calls = _forward_counter(model)
    with pytest.raises(ConfigError, match=rf"model.source: model type '{model_type}' .*(encoder|encoder-decoder)"):
        wanda.prune_model(model, torch.randint(3, 100, (1, 8)), wanda.PruneConfig())
    assert calls == []


class _Odd(nn.Module):
    """A block weight that is neither linear, Conv1D, experts nor router."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 64))

    def forward(self, x):
        return x


def test_an_unprunable_block_weight_is_named_unless_ignored():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.odd = _Odd()
    calls = _forward_counter(model)
    with pytest.raises(ConfigError, match=r"ignore: .*model\.layers\.0\.mlp\.odd\.table \(4, 64\)"):
        wanda.prune_model(model, torch.randint(3, 100, (1, 8)), wanda.PruneConfig())
    assert calls == []
    check_block_weights(model, ignore=["*.mlp.odd"])  # left out on purpose: accepted


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_moe_containers_and_routers_are_known_weights(family):
    check_block_weights(tiny_moe_model(family))


def test_routers_become_targets_only_when_named():
    model = tiny_moe_model("qwen2_moe")
    default = {t.name for t in model_targets(model)}
    assert not any(n.endswith("shared_expert_gate") for n in default)
    named = {t.name for t in model_targets(model, targets=["*.self_attn.*", "*.shared_expert_gate"])}
    assert "model.layers.0.mlp.shared_expert_gate" in named
    with pytest.raises(ConfigError, match=r"targets: model.layers.0.mlp.gate is a Qwen2MoeTopKRouter"):
        model_targets(model, targets=["*.mlp.gate"])  # a bare-weight router: refused, not silently skipped


def test_gpt2_conv1d_layers_are_targets_with_in_out_weights_transposed():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_other_config("gpt2")).eval()
    targets = model_targets(model)
    assert {t.kind for t in targets} == {"conv1d"}
    assert [t.name for t in targets[:4]] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                             "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    c_fc = next(t for t in targets if t.name.endswith("0.mlp.c_fc"))
    module = model.get_submodule(c_fc.module_name)
    view = c_fc.weight(model)
    assert view.shape == (module.nf, module.weight.shape[0])  # [out, in] of a stored [in, out]

    # observed inputs -> Wanda mask equal to the naive reference on the same layer as nn.Linear
    from wanda.targets import observer_factory

    seen = {}
    tokens = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    block = model.transformer.h[0]
    with observer_factory("conv1d")([c_fc], block, lambda n, rows: seen.setdefault(n, rows)):
        with torch.no_grad():
            model(input_ids=tokens)
    rows = seen[c_fc.name]
    stats = ChannelStats.zeros(rows.shape[1])
    stats.add(rows)
    linear = nn.Linear(view.shape[1], view.shape[0])
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        linear.bias.copy_(module.bias)
    torch.testing.assert_close(linear(rows), module(rows))  # the view is the layer's linear map
    norms = (rows.double() ** 2).sum(0).sqrt()
    expected = reference_mask(linear.weight.detach().abs().float() * norms.float().unsqueeze(0), 0.5, None)
    assert torch.equal(mask_from_scores(wanda_score(view, stats), 0.5, None), expected)
    # the driver walks Conv1D targets: discovery lists them like linear layers
    assert set(wanda.discover(model).all_targets()) == {t.name for t in targets}


@pytest.mark.integration
@pytest.mark.parametrize("model_type", ["bert", "t5"])
def test_cli_refuses_encoders_with_exit_code_2(tmp_path, model_type):
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    from tests.pipeline_project import make_project, sh

    root = make_project(tmp_path / "p")  # no cold run needed: the refusal comes before any stage
    config = tiny_other_config(model_type)
    model = T5ForConditionalGeneration(config) if model_type == "t5" else AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / model_type)
    result = sh(root, sys.executable, "-m", "flows.cli", "run", "-S", f"model.source={tmp_path / model_type}",
                check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"model type '{model_type}'" in lines[0] and "decoder-only" in lines[0]
    assert "Starting temporary server" not in result.stdout + result.stderr  # before Prefect started
