"""Tiny random mixture-of-experts (and GPT-2, encoder) models from configs, for unit tests.

Sizes keep every expert matrix's input divisible by 8 (4:8 and 2:4 patterns) and a forward of a
few dozen tokens in milliseconds.
"""
from __future__ import annotations

import torch

from tests.tiny import VOCAB

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

MOE_FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    # first block dense (first_k_dense_replace), then routed experts + a shared expert
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4, kv_lora_rank=16,
                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_moe_config(family: str, layers: int = 2):
    from transformers import AutoConfig

    extra = dict(MOE_FAMILIES[family])
    if "layer_types" in extra:
        extra["layer_types"] = (extra["layer_types"] * layers)[:layers]
    return AutoConfig.for_model(family, **{**_COMMON, "num_hidden_layers": layers, **extra})


def tiny_moe_model(family: str, layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0,
                   experts_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(family, layers)
    if experts_implementation:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves some parameters at zero (routers of Qwen/OLMoE, gpt-oss biases): give
    # every floating parameter a seeded random value so routing and biases are exercised.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name and param.is_floating_point():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * 0.2)
    return model.eval()


def tiny_other_config(model_type: str):
    """GPT-2 (Conv1D), BERT and T5 configs of the same tiny size."""
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                    bos_token_id=1, eos_token_id=2)
    if model_type == "bert":
        return AutoConfig.for_model("bert", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48, max_position_embeddings=128,
                                    is_decoder=True)
    if model_type == "t5":
        return AutoConfig.for_model("t5", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
    raise KeyError(model_type)
