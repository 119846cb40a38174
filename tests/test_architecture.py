"""Generic block discovery and block-by-block execution across decoder-only architectures."""
from __future__ import annotations

import pytest
import torch

import wanda
from tests.tiny import tiny_model
from wanda.architecture import find_blocks
from wanda.blocks import capture_block_calls, capture_block_inputs, run_block_over

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_run_equals_full_forward(arch):
    """Captured block arguments reproduce the model's own forward, batch size notwithstanding."""
    model = tiny_model(arch, layers=3, dtype=torch.float64)
    _, blocks = find_blocks(model)
    tokens = torch.randint(3, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    calls = capture_block_calls(model, blocks, tokens[:1])
    hidden = capture_block_inputs(model, blocks, tokens, batch_size=2)
    for block, call in zip(blocks, calls):
        hidden = run_block_over(block, hidden, call)
    reference = []
    handle = blocks[-1].register_forward_hook(lambda m, a, o: reference.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    assert torch.allclose(torch.cat(hidden), reference[0], atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_every_architecture(arch):
    model = tiny_model(arch, layers=2)
    masks = wanda.prune_model(model, torch.randint(3, 128, (2, 16)), wanda.PruneConfig(batch_size=2))
    layout = wanda.discover(model)
    assert set(masks) == set(layout.all_targets())
    assert layout.num_blocks == 2
    assert not any(("lm_head" in n) or ("embed" in n) for n in masks)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(3, 128, (1, 8))).logits
    assert torch.isfinite(logits).all()
