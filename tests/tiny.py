"""Tiny random decoder-only models built from configs (no download), for unit tests."""
from __future__ import annotations

import torch

VOCAB = 128

_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "opt": ("OPTConfig", {"ffn_dim": 96, "word_embed_proj_dim": 64, "do_layer_norm_before": True}),
    "gpt_neox": ("GPTNeoXConfig", {}),
}


def tiny_config(arch: str = "llama", layers: int = 2):
    import transformers

    name, extra = _CONFIGS[arch]
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "opt":
        common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        common.pop("num_key_value_heads")
    common.update(extra)
    config = getattr(transformers, name)(**common)
    config._attn_implementation = "eager" if arch == "opt" else "sdpa"
    return config


def tiny_model(arch: str = "llama", layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=dtype)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 4)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def shard_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder, all shards."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors
