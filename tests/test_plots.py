"""Sparsity plots: per-block aggregation (what OWL's allocation looks like) and the PNG files."""
from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_model
from wanda import PruneConfig, compute_masks, collect_statistics, sparsity_report
from wanda.plots import block_sparsities, block_sparsity_plot, layer_sparsity_plot


def test_block_sparsities_weight_layers_by_size():
    report = {"overall": 0.5, "layers": {
        "model.layers.0.q": {"pruned": 10, "total": 100, "sparsity": 0.1},
        "model.layers.0.mlp": {"pruned": 270, "total": 300, "sparsity": 0.9},
        "model.layers.1.q": {"pruned": 50, "total": 100, "sparsity": 0.5},
        "lm_head": {"pruned": 0, "total": 10, "sparsity": 0.0},  # not in a numbered block: left out
    }}
    assert block_sparsities(report) == [(0, pytest.approx(0.7)), (1, pytest.approx(0.5))]


def test_owl_profile_is_non_uniform_and_plots(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float64)
    calib = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, calib, batch_size=2)
    reports = {}
    for allocation in ("uniform", "owl"):
        config = PruneConfig(sparsity=0.5, mode="one_pass", allocation=allocation, owl_lambda=0.2, owl_m=1.5)
        reports[allocation] = sparsity_report(compute_masks(model, stats, config))
    uniform = [s for _, s in block_sparsities(reports["uniform"])]
    owl = [s for _, s in block_sparsities(reports["owl"])]
    assert max(uniform) - min(uniform) < 1e-3
    assert len(set(round(s, 3) for s in owl)) > 1  # OWL moves sparsity between blocks
    assert sum(owl) / len(owl) == pytest.approx(0.5, abs=0.01)
    assert layer_sparsity_plot(reports["owl"], tmp_path / "layers.png", title="owl").stat().st_size > 1000
    assert block_sparsity_plot(reports, tmp_path / "blocks.png").stat().st_size > 1000
    assert layer_sparsity_plot({"layers": {}}, tmp_path / "none.png") is None
