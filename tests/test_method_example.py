"""The worked example of docs/architecture.md: a new method is one class (here in this test file;
in the library, one module under ``wanda/methods/``) and every recipe and mode works with it."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import wanda
from tests.tiny import tiny_model
from wanda.config import PruneConfig
from wanda.methods.base import ScoreMethod, register, unregister


class WandaSquared(ScoreMethod):
    """(|W_ij| ||X_j||)^2: Wanda's score squared, so its masks must be Wanda's."""

    name = "wanda_squared"

    def score(self, weight, stats, config):
        stats = self.needs_stats(stats)
        return (weight.detach().abs().float() ** 2) * stats.mean_square().to(weight.device).reshape(1, -1)


@pytest.fixture
def example_method():
    register(WandaSquared)
    yield WandaSquared.name
    unregister(WandaSquared.name)


def test_example_method_prunes_like_wanda_in_every_mode(example_method):
    tokens = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    for mode in ("sequential", "one_pass"):
        expected_model, got_model = tiny_model(dtype=torch.float64), tiny_model(dtype=torch.float64)
        expected = wanda.prune_model(expected_model, tokens, PruneConfig(mode=mode))
        got = wanda.prune_model(got_model, tokens, PruneConfig(method=example_method, mode=mode))
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (mode, name)
    # recipes compose with it through the same interface
    masks = wanda.prune_model(tiny_model(), tokens, PruneConfig(method=example_method, pattern="2:4",
                                                                ria_permute=True, refine="dsnot"))
    assert wanda.sparsity_report(masks)["overall"] == pytest.approx(0.5)


def test_unregistered_method_is_refused_with_the_allowed_values():
    with pytest.raises(ValidationError, match="Input should be 'wanda', 'magnitude', 'sparsegpt' or 'ria'"):
        PruneConfig(method="wanda_squared")
