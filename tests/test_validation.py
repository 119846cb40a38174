"""Bad input fails fast, naming the parameter, before any forward pass."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import wanda
from tests.tiny import tiny_model
from wanda.errors import ConfigError, UnsupportedArchitectureError


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"pattern": "4:2"}, "pattern"),
        ({"pattern": "2:2"}, "pattern"),
        ({"pattern": "two:four"}, "pattern"),
        ({"method": "sparsegpt-ish"}, "method"),
        ({"mode": "fast"}, "mode"),
        ({"batch_size": 0}, "batch_size"),
        ({"pattern": "2:4", "sparsity": 0.7}, "sparsity"),
        ({"scope": "layer"}, "scope"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        wanda.PruneConfig(**kwargs)
    assert field in str(info.value)


class _CountingModel(nn.Module):
    """Wraps nothing: used to prove no forward ran."""


def _forbid_forward(model):
    def boom(*args, **kwargs):
        raise AssertionError("a forward pass ran before validation")

    model.forward = boom
    return model


def test_pattern_not_dividing_inputs_fails_before_forward():
    model = _forbid_forward(tiny_model())  # inputs 64 and 96; 5 divides neither
    with pytest.raises(ConfigError, match="pattern"):
        wanda.prune_model(model, torch.randint(0, 128, (2, 8)), wanda.PruneConfig(pattern="2:5", sparsity=0.4))


def test_seqlen_over_context_fails_before_forward():
    model = _forbid_forward(tiny_model())
    with pytest.raises(ConfigError, match="seqlen"):
        wanda.prune_model(model, torch.randint(0, 128, (1, 300)), wanda.PruneConfig())


def test_token_ids_outside_vocab():
    model = _forbid_forward(tiny_model())
    with pytest.raises(ConfigError, match="token ids"):
        wanda.prune_model(model, torch.full((1, 8), 500), wanda.PruneConfig())


def test_wanda_without_calibration():
    with pytest.raises(ConfigError, match="calib"):
        wanda.prune_model(_forbid_forward(tiny_model()), None, wanda.PruneConfig())


def test_targets_matching_nothing():
    with pytest.raises(ConfigError, match="targets"):
        wanda.prune_model(_forbid_forward(tiny_model()), None,
                          wanda.PruneConfig(method="magnitude", targets=["*.nonexistent"]))


def test_unknown_architecture_is_refused_by_name():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitectureError, match="Tiny"):
        wanda.discover(Tiny())


def test_statistics_for_other_model_are_refused():
    stats = wanda.collect_statistics(tiny_model(), torch.randint(0, 128, (2, 8)))
    other = tiny_model(layers=3)
    with pytest.raises(wanda.ArtifactMismatchError, match="statistics"):
        wanda.compute_masks(other, stats, wanda.PruneConfig())


def test_mask_for_other_shape_is_refused():
    masks = wanda.prune_model(tiny_model(), None, wanda.PruneConfig(method="magnitude"))
    name = next(iter(masks))
    with pytest.raises(wanda.ArtifactMismatchError, match="shape"):
        wanda.apply_masks(tiny_model(), {name: masks[name][:, :8]})
