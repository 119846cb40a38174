"""benchmarks/gpu_check.sh without a GPU: it refuses clearly, and what it times is the model.

The timing itself needs a GPU (see README, serving section); here: the refusal (exit 2, what is
missing, before any work), argument errors, its torch-only LLaMA equals transformers' LLaMA on
the same weights (prefill and cached decode steps), and its 2:4 rule equals wanda's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_model
from wanda.export.sparse24 import magnitude_24_

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_script_refuses_without_a_gpu_and_rejects_bad_arguments(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter with torch (CI has no torch on PATH)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "gpu_check needs a CUDA GPU of compute capability >= 8.0" in proc.stderr
    assert "would measure 7 shapes x tokens [1, 16, 128, 2048]" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tokens", "0,16"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--tokens" in bad.stderr


def test_its_two_four_rule_is_wandas():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gpu_check.magnitude_24_(w.clone()), magnitude_24_(w.clone()))


def test_torch_only_llama_matches_transformers():
    hf = tiny_model("llama")
    c = hf.config
    config = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_key_value_heads, rope_theta=float(c.rope_parameters["rope_theta"]),
                  rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False)
    model = gpu_check.TinyLlama(config, max_len=24).eval()
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected
    ids = torch.randint(c.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = hf(ids).logits
        model.reset_cache()
        prefill = model(ids[:, :8], torch.arange(8))
        assert torch.allclose(prefill, full[:, 7], atol=1e-5)
        for pos in range(8, 12):  # decode steps through the static cache
            step = model(ids[:, pos:pos + 1], torch.tensor([pos]))
            assert torch.allclose(step, full[:, pos], atol=1e-5), pos
    assert gpu_check.sparsify_(model) == 7 * c.num_hidden_layers
