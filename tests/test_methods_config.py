"""PruneConfig for the methods beyond Wanda: defaults unchanged, combinations checked at the edge."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import wanda
from tests.tiny import tiny_model
from wanda.config import PruneConfig
from wanda.methods.base import one_pass_methods


def test_defaults_are_the_plain_wanda_recipe():
    config = PruneConfig()
    assert (config.method, config.allocation, config.variant, config.refine, config.ria_permute) == \
        ("wanda", "uniform", False, "none", False)
    assert config.supports_one_pass and not config.updates_weights and config.statistics_kind == "channel"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"method": "sparsegpt", "mode": "one_pass"}, "mode"),
        ({"allocation": "owl", "pattern": "2:4"}, "allocation"),
        ({"allocation": "owl", "sparsity": 0.1}, "owl_lambda"),
        ({"allocation": "owl", "sparsity": 0.9}, "owl_lambda"),
        ({"allocation": "owls"}, "allocation"),
        ({"owl_m": 0}, "owl_m"),
        ({"variant": True, "pattern": "2:4"}, "variant"),
        ({"variant": True, "method": "magnitude", "scope": "layer"}, "variant"),
        ({"variant": True, "method": "sparsegpt"}, "variant"),
        ({"refine": "dsnot", "method": "sparsegpt"}, "refine"),
        ({"refine": "dsnoT"}, "refine"),
        ({"dsnot_cycles": -1}, "dsnot_cycles"),
        ({"ria_permute": True}, "ria_permute"),
        ({"ria_permute": True, "pattern": "2:4", "method": "sparsegpt"}, "ria_permute"),
        ({"ria_lsa": True, "pattern": "2:4"}, "ria_lsa"),
        ({"method": "sparsegpt", "pattern": "2:4", "sparsegpt_blocksize": 126}, "sparsegpt_blocksize"),
        ({"sparsegpt_damp": 0}, "sparsegpt_damp"),
        ({"method": "wanda", "scope": "layer"}, "scope"),
        ({"method": "sparsegpt", "scope": "layer"}, "scope"),
        ({"variant_tolerance": 0}, "variant_tolerance"),
    ],
)
def test_invalid_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        PruneConfig(**kwargs)
    assert field in str(info.value)


def test_valid_combinations():
    PruneConfig(method="ria", scope="layer")
    PruneConfig(method="ria", pattern="2:4", ria_permute=True, refine="dsnot")
    PruneConfig(method="magnitude", allocation="owl", variant=True, refine="dsnot", sparsity=0.7)
    PruneConfig(method="sparsegpt", allocation="owl", sparsity=0.7)
    PruneConfig(method="sparsegpt", pattern="4:8")


def test_statistics_reuse_is_stated():
    assert set(one_pass_methods()) == {"wanda", "magnitude", "ria"}
    assert not PruneConfig(method="sparsegpt").supports_one_pass
    assert PruneConfig(method="sparsegpt").statistics_kind == "hessian"
    assert PruneConfig(method="sparsegpt").updates_weights
    assert PruneConfig(method="magnitude").statistics_kind == "none"
    assert PruneConfig(method="magnitude", refine="dsnot").statistics_kind == "channel"
    assert PruneConfig(allocation="owl").owl_prepass
    assert not PruneConfig(allocation="owl", mode="one_pass").owl_prepass
    assert not PruneConfig(method="magnitude", allocation="owl").owl_prepass


def test_compute_masks_refuses_sparsegpt():
    model = tiny_model()
    stats = wanda.collect_statistics(model, torch.randint(3, 128, (2, 8)))
    with pytest.raises(wanda.ConfigError, match="method"):
        wanda.compute_masks(model, stats, PruneConfig(method="sparsegpt"))


def test_magnitude_owl_needs_no_calibration():
    masks = wanda.prune_model(tiny_model(), None, PruneConfig(method="magnitude", allocation="owl", sparsity=0.6))
    assert abs(wanda.sparsity_report(masks)["overall"] - 0.6) < 0.02
