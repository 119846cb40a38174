"""2:4 compliance, the exact compressed form, and the TensorRT-LLM checkpoint export (CPU, tiny models)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny import tiny_model
from wanda.architecture import discover
from wanda.errors import ArtifactMismatchError, ConfigError, UnsupportedArchitectureError
from wanda.export.sparse24 import (
    Not24SparseError,
    bitwise_equal,
    canonicalize_zeros,
    check_24,
    compliance_report,
    compress_24,
    decompress_24,
    magnitude_24_,
)
from wanda.export.trtllm_checkpoint import (
    CheckpointError,
    TrtllmCheckpointConfig,
    export_trtllm_checkpoint,
    read_checkpoint_config,
    unfuse_checkpoint_weights,
    validate_checkpoint,
)


def random_24(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A 2:4 weight whose groups hold 0, 1 or 2 nonzeros, plus pruned -0.0 entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    magnitude_24_(w)
    groups = w.view(rows, cols // 4, 4)
    drop = torch.rand(rows, cols // 4, 4, generator=g) < 0.25  # some groups end with < 2 nonzeros
    groups[drop] = 0.0
    w = w.to(dtype)
    negzero = (w == 0) & (torch.rand(rows, cols, generator=g) < 0.3)
    w[negzero] = -0.0  # what `W * mask` leaves for pruned negative weights
    return w


def prune_24_(model) -> None:
    for name in discover(model).all_targets():
        magnitude_24_(model.get_submodule(name).weight.data)


# --------------------------------------------------------------------------- compliance


def test_check_24_compliant_and_first_offender():
    w = random_24(8, 16)
    report = check_24(w, "a")
    assert report.compliant and report.bad_groups == 0 and report.zero_fraction >= 0.5
    w[5, 9] = 1.0
    w[5, 10] = 1.0
    w[5, 11] = 1.0  # row 5, group 2 now has >= 3 nonzeros
    w[6, 0:3] = 1.0
    report = check_24(w, "a")
    assert not report.compliant
    assert (report.first_bad_row, report.first_bad_group) == (5, 2)
    assert "row 5" in report.describe() and "inputs 8..11" in report.describe()


def test_check_24_counts_negative_zero_as_zero_and_rejects_bad_width():
    w = torch.tensor([[1.0, -0.0, 2.0, -0.0]])
    assert check_24(w).compliant
    bad = check_24(torch.zeros(4, 6), "odd")
    assert not bad.compliant and "multiple of 4" in bad.reason


def test_compliance_report_names_first_offending_layer():
    ok, bad = random_24(4, 8), torch.ones(4, 8)
    report = compliance_report({"l0": ok, "l1": bad, "l2": torch.ones(4, 8)})
    assert report.first_offending.name == "l1"
    with pytest.raises(Not24SparseError, match="2 of 3 .* first offending layer l1"):
        report.require()


# --------------------------------------------------------------------------- compressed form


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cols", [16, 12])  # 12: odd group count, half-filled last metadata byte
def test_compress_roundtrip_is_bitwise_exact(dtype, cols):
    w = random_24(32, cols, dtype)
    values, metadata = compress_24(w)
    assert values.shape == (32, cols // 2) and values.dtype == dtype
    assert metadata.shape == (32, (cols // 4 + 1) // 2) and metadata.dtype == torch.uint8
    restored = decompress_24(values, metadata)
    assert bitwise_equal(restored, canonicalize_zeros(w))
    assert torch.equal(restored, w)  # numerically identical, -0.0 == +0.0
    clean = canonicalize_zeros(w)
    assert bitwise_equal(decompress_24(*compress_24(clean)), clean)  # no -0.0: exact to the input itself


def test_compress_layout_by_hand():
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]])
    values, metadata = compress_24(w)
    # group 0 keeps positions 1,3 -> nibble 1|3<<2 = 0xD; group 1 all zero -> padded 0,1 -> 0x4;
    # group 2 keeps 0 and pads with 1 -> 0x4 in the low nibble of the second byte.
    assert values.tolist() == [[5.0, 7.0, 0.0, 0.0, 3.0, 0.0]]
    assert metadata.tolist() == [[0x4D, 0x04]]
    assert bitwise_equal(decompress_24(values, metadata), w)


def test_compress_refuses_dense_and_decompress_refuses_corrupt_metadata():
    with pytest.raises(Not24SparseError, match="row 0"):
        compress_24(torch.ones(2, 8), "dense_layer")
    values, metadata = compress_24(random_24(4, 8))
    with pytest.raises(ValueError, match="corrupt"):
        decompress_24(values, torch.zeros_like(metadata))  # positions 0,0
    with pytest.raises(ValueError, match="metadata shape"):
        decompress_24(values, metadata[:, :0])


def test_compress_is_vectorized_on_a_large_weight():
    w = random_24(2048, 2048, torch.float16)
    values, metadata = compress_24(w)
    assert bitwise_equal(decompress_24(values, metadata), canonicalize_zeros(w))


# --------------------------------------------------------------------------- checkpoint export


@pytest.fixture
def llama24():
    model = tiny_model("llama")
    prune_24_(model)
    # pruned negative weights as -0.0, as `W * mask` leaves them
    q = model.model.layers[0].self_attn.q_proj.weight.data
    q[(q == 0)] = -0.0
    return model


def test_export_llama_roundtrip(llama24, tmp_path):
    out = tmp_path / "ckpt"
    result = export_trtllm_checkpoint(llama24, out)
    assert sorted(p.name for p in out.iterdir()) == ["compliance.json", "config.json", "rank0.safetensors",
                                                     "sparse24.safetensors"]
    config = read_checkpoint_config(out)
    assert config.architecture == "LlamaForCausalLM" and config.dtype == "float16"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_size) == (4, 2, 16)
    assert config.position_embedding_type == "rope_gpt_neox" and config.rotary_base == 10000.0
    assert config.rotary_scaling is None and config.mapping.tp_size == 1

    rank0 = load_file(str(out / "rank0.safetensors"))
    assert all(t.dtype == torch.float16 for t in rank0.values())
    qkv = rank0["transformer.layers.0.attention.qkv.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)  # GQA: 4 query heads, 2 KV heads of 16
    # un-fusing gives back the HF weights in fp16 (rank0 holds canonical +0.0 zeros)
    hf = {n: p.detach().to(torch.float16) for n, p in llama24.named_parameters()}
    hf.setdefault("lm_head.weight", llama24.lm_head.weight.detach().to(torch.float16))
    back = unfuse_checkpoint_weights(rank0, config)
    assert set(back) == set(hf)
    for name, tensor in back.items():
        assert bitwise_equal(tensor, canonicalize_zeros(hf[name])), name
    # MLP mapping as TRT-LLM's llama converter: fc <- gate_proj, gate <- up_proj, proj <- down_proj
    mlp = llama24.model.layers[1].mlp
    assert torch.equal(rank0["transformer.layers.1.mlp.fc.weight"], mlp.gate_proj.weight.half())
    assert torch.equal(rank0["transformer.layers.1.mlp.gate.weight"], mlp.up_proj.weight.half())
    assert torch.equal(rank0["transformer.layers.1.mlp.proj.weight"], mlp.down_proj.weight.half())

    packed = load_file(str(out / "sparse24.safetensors"))
    assert len(result.sparse_tensors) == 2 * 5  # qkv, dense, fc, gate, proj per layer
    for name in result.sparse_tensors:
        restored = decompress_24(packed[name + ".values"], packed[name + ".metadata"])
        assert bitwise_equal(restored, rank0[name]), name
    assert result.compressed_bytes < 0.6 * result.dense_sparse_bytes

    compliance = json.loads((out / "compliance.json").read_text())
    assert compliance["all_compliant"] and len(compliance["layers"]) == 14
    assert compliance["layers"][0]["name"] == "model.layers.0.self_attn.q_proj.weight"
    assert validate_checkpoint(out).sparse_verified


def test_export_tied_embeddings_writes_lm_head(tmp_path):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prune_24_(model)
    export_trtllm_checkpoint(model, tmp_path / "ckpt")
    rank0 = load_file(str(tmp_path / "ckpt" / "rank0.safetensors"))
    assert torch.equal(rank0["lm_head.weight"], rank0["transformer.vocab_embedding.weight"])
    assert read_checkpoint_config(tmp_path / "ckpt").tie_word_embeddings


def test_export_mistral_and_qwen2_with_bias(tmp_path):
    mistral = tiny_model("mistral")
    prune_24_(mistral)
    assert read_checkpoint_config(export_trtllm_checkpoint(mistral, tmp_path / "m").out_dir).architecture == \
        "MistralForCausalLM"
    qwen = tiny_model("qwen2")
    prune_24_(qwen)
    result = export_trtllm_checkpoint(qwen, tmp_path / "q", dtype="bfloat16")
    config = result.config
    assert config.architecture == "Qwen2ForCausalLM" and config.attn_bias and config.qwen_type == "qwen2"
    # QWenDecoderLayer reads seq_length (max_seqlen_for_logn_scaling): missing, the build fails.
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["seq_length"] == qwen.config.max_position_embeddings == 256
    assert read_checkpoint_config(tmp_path / "q").seq_length == 256
    rank0 = load_file(str(tmp_path / "q" / "rank0.safetensors"))
    attn = qwen.model.layers[0].self_attn
    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).to(torch.bfloat16)
    assert torch.equal(rank0["transformer.layers.0.attention.qkv.bias"], bias)
    assert "transformer.layers.0.attention.dense.bias" not in rank0
    back = unfuse_checkpoint_weights(rank0, config)
    assert torch.equal(back["model.layers.1.self_attn.v_proj.bias"],
                       qwen.model.layers[1].self_attn.v_proj.bias.to(torch.bfloat16))


def test_export_rope_scaling_from_rope_parameters(tmp_path):
    model = tiny_model("llama")
    prune_24_(model)
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 128}
    config = export_trtllm_checkpoint(model, tmp_path / "c").config
    assert config.rotary_base == 500000.0
    scaling = config.rotary_scaling.model_dump()
    assert scaling["type"] == "llama3" and scaling["factor"] == 8.0
    assert scaling["original_max_position_embeddings"] == 128 and "rope_type" not in scaling


def test_non_compliant_model_refused_naming_first_bad_layer(tmp_path):
    model = tiny_model("llama")
    prune_24_(model)
    model.model.layers[1].mlp.up_proj.weight.data[3, 4:8] = 1.0
    model.model.layers[1].mlp.down_proj.weight.data[0, :4] = 1.0
    with pytest.raises(Not24SparseError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*row 3, inputs 4\.\.7"):
        export_trtllm_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_other_architectures_and_dtypes_refused(tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt_neox'"):
        export_trtllm_checkpoint(tiny_model("gpt_neox"), tmp_path / "x")
    with pytest.raises(ConfigError, match="export.dtype"):
        export_trtllm_checkpoint(tiny_model("llama"), tmp_path / "x", dtype="float32")


def test_mixture_of_experts_refused_with_a_clear_message(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", vocab_size=128, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=r"mixture-of-experts .*'mixtral', 4 experts"):
        export_trtllm_checkpoint(model, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_validation_catches_tampering(llama24, tmp_path):
    out = tmp_path / "ckpt"
    export_trtllm_checkpoint(llama24, out)
    config = json.loads((out / "config.json").read_text())

    broken = dict(config, num_key_value_heads=3)  # 4 heads are not a multiple of 3
    (out / "config.json").write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="num_key_value_heads"):
        validate_checkpoint(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_act"}))
    with pytest.raises(CheckpointError, match="hidden_act"):
        validate_checkpoint(out)
    (out / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(CheckpointError, match="mlp.fc.weight: shape"):
        validate_checkpoint(out)
    (out / "config.json").write_text(json.dumps(config))

    packed = load_file(str(out / "sparse24.safetensors"))
    name = "transformer.layers.0.mlp.fc.weight.values"
    packed[name] = packed[name].clone()
    packed[name][0, 0] += 1
    save_file(packed, str(out / "sparse24.safetensors"))
    with pytest.raises(ArtifactMismatchError, match="mlp.fc.weight does not decompress"):
        validate_checkpoint(out)
    assert validate_checkpoint(out, verify_sparse=False).tensors > 0


def test_config_schema_rejects_unknown_quantization_keys():
    base = dict(architecture="LlamaForCausalLM", dtype="float16", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, hidden_act="silu", position_embedding_type="rope_gpt_neox", rotary_base=1e4)
    TrtllmCheckpointConfig.model_validate(base)
    with pytest.raises(ValueError, match="bogus"):
        TrtllmCheckpointConfig.model_validate(dict(base, quantization={"bogus": 1}))
    with pytest.raises(ValueError, match="position_embedding_type"):
        TrtllmCheckpointConfig.model_validate(dict(base, position_embedding_type="rope"))
