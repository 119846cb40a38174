"""The core library on the real embedded model (SmolLM2-135M) with real calibration text."""
from __future__ import annotations

import math

import pytest
import torch

import wanda
from wanda.calibration import CalibrationConfig, sample_calibration
from wanda.data import TextSource, load_text, tokenize
from wanda.masks import is_nm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calibration(embedded_model_dir, shared_data):
    _, tokenizer = wanda.load_model(str(embedded_model_dir))
    cfg = CalibrationConfig(source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=4, seqlen=128, seed=0)
    return sample_calibration(tokenizer, cfg, max_context=8192)


def _loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


def test_prune_embedded_model_sequential(embedded_model_dir, calibration):
    model, tokenizer = wanda.load_model(str(embedded_model_dir))
    text = load_text(TextSource(path="shared:wikitext-2-raw/wiki.test.raw"))
    ids = tokenize(tokenizer, text.text[:20_000])[:256].unsqueeze(0)
    dense = _loss(model, ids)
    masks = wanda.prune_model(model, calibration.tokens, wanda.PruneConfig(sparsity=0.5, batch_size=4))
    layout = wanda.discover(model)
    assert layout.num_blocks == 30 and len(masks) == 30 * 7
    report = wanda.sparsity_report(masks)
    assert report["overall"] == pytest.approx(0.5)
    pruned = _loss(model, ids)
    assert math.isfinite(pruned)
    # Wanda at 50% hurts a 135M model, but it stays a language model.
    assert dense < pruned < dense + 2.0
    assert calibration.report["repeated_windows"] == 0 and len(calibration.digest) == 64


def test_one_pass_2_4_on_embedded_model(embedded_model_dir, calibration):
    model, _ = wanda.load_model(str(embedded_model_dir))
    stats = wanda.collect_statistics(model, calibration.tokens, batch_size=4)
    masks = wanda.compute_masks(model, stats, wanda.PruneConfig(pattern="2:4", mode="one_pass"))
    wanda.apply_masks(model, masks)
    for name in masks:
        assert is_nm(model.get_submodule(name).weight, 2, 4, is_mask=False), name
