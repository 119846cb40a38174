"""Streaming MoE checkpoints whose experts transformers converts on load, equal to loading them.

Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 checkpoints store one tensor per expert
(``...experts.3.w1.weight``, ``...experts.3.gate_proj.weight``); transformers merges them into the
fused ``experts.gate_up_proj`` / ``experts.down_proj`` when it loads and splits them when it saves.
Tiny random models (``tests/tiny_moe.py``) saved in small shards, so one layer's experts span
several files: a streamed block equals ``from_pretrained``'s, streamed masks equal loaded masks,
and the streamed pruned folder, reloaded, equals the loaded pruned model, bit for bit.
"""
from __future__ import annotations

import json

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wanda
from tests.tiny import shard_tensors
from tests.tiny_moe import tiny_moe_model
from wanda.block_source import open_streamed
from wanda.checkpoint import INDEX
from wanda.errors import UnsupportedArchitectureError
from wanda.streaming import BlockWeightsWriter, MaskSpool, apply_masks_to_checkpoint, prune_checkpoint

CONVERTED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
TOKENS = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _base(family: str, folder: Path) -> Path:
    tiny_moe_model(family).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / INDEX).is_file()
    return folder




def _assert_loads_as(folder: Path, model) -> None:
    """``from_pretrained(folder)`` has exactly ``model``'s parameters and buffers, bit for bit."""
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    want = model.state_dict()
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def _assert_own_names(out: Path, base: Path) -> None:
    """The output shards hold the base checkpoint's tensor names, sharding and index."""
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert (out / INDEX).read_text() == (base / INDEX).read_text()
    for file in base.glob("*.safetensors"):
        with safe_open(str(file), "pt") as a, safe_open(str(out / file.name), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())


@pytest.mark.parametrize("family", CONVERTED)
def test_streamed_blocks_equal_from_pretrained(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base = _base(family, tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    source = open_streamed(base)
    groups = source.conversion.groups
    assert groups and all(len(g.shard_keys) == 4 * (2 if g.first.endswith("gate_up_proj") else 1)
                          for g in groups.values())  # 4 experts (x gate and up) merged per parameter
    assert len({source.checkpoint.info(k).file for g in groups.values() for k in g.shard_keys}) > 1
    for index in range(len(source.blocks)):
        prefix = f"{source.path}.{index}."
        with source.block(index) as block:
            state = {prefix + k: v for k, v in block.state_dict().items()}
            assert any(k.endswith("experts.gate_up_proj") for k in state) or index == 0 and family == "deepseek_v3"
            for key, tensor in state.items():
                assert torch.equal(tensor, loaded[key]), key
        assert all(p.device.type == "meta" for p in source.blocks[index].parameters())  # released


@pytest.mark.parametrize("config", [dict(), dict(mode="one_pass"), dict(pattern="2:4")],
                         ids=["sequential", "one_pass", "2:4"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_streamed_prune_equals_loaded(family, config, tmp_path):
    """``prune_checkpoint`` (the whole job, block by block) and the prune stage's tensor-by-tensor
    ``apply_masks_to_checkpoint``: same masks, and folders that reload to the loaded pruned model."""
    base = _base(family, tmp_path / "base")
    loaded = tiny_moe_model(family)
    prune_config = wanda.PruneConfig(batch_size=2, **config)
    expected = wanda.prune_model(loaded, TOKENS, prune_config)
    prune_checkpoint(base, tmp_path / "out", TOKENS, prune_config, masks_path=tmp_path / "m.safetensors")
    masks, _ = wanda.load_masks(tmp_path / "m.safetensors")
    assert masks.keys() == expected.keys() and any(n.endswith("gate_up_proj[3]") for n in masks)
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    assert masks.metadata["expert_tokens"] == expected.metadata["expert_tokens"]
    _assert_loads_as(tmp_path / "out", loaded)
    _assert_own_names(tmp_path / "out", base)

    counts = apply_masks_to_checkpoint(base, tmp_path / "applied", tmp_path / "m.safetensors")
    _assert_loads_as(tmp_path / "applied", loaded)
    assert shard_tensors(tmp_path / "applied").keys() == shard_tensors(base).keys()
    assert counts["zeros"] >= sum(int(m.sum()) for m in expected.values())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_streamed_sparsegpt_updated_weights_equal_loaded(family, tmp_path):
    """The masks stage's streamed SparseGPT (updated weights written by model name, fused experts
    included) then the prune stage's apply: the reloaded folder equals the loaded pruned model."""
    from wanda.architecture import discover

    base = _base(family, tmp_path / "base")
    loaded = tiny_moe_model(family)
    config = wanda.PruneConfig(batch_size=2, method="sparsegpt")
    expected = wanda.prune_model(loaded, TOKENS, config)
    source = open_streamed(base)
    writer = BlockWeightsWriter(tmp_path / "weights.safetensors", source,
                                discover(source.model, config.targets, config.ignore))
    source.on_done = writer
    spool = MaskSpool(tmp_path / "spool")
    wanda.prune_model(source.model, TOKENS, config, blocks=source, masks_out=spool)
    writer.close()
    spool.save(tmp_path / "m.safetensors")
    masks = spool.to_dict()
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    with safe_open(str(tmp_path / "weights.safetensors"), "pt") as handle:
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in handle.keys())
    apply_masks_to_checkpoint(base, tmp_path / "out", tmp_path / "m.safetensors", tmp_path / "weights.safetensors")
    _assert_loads_as(tmp_path / "out", loaded)
    prune_checkpoint(base, tmp_path / "whole", TOKENS, config)
    _assert_loads_as(tmp_path / "whole", loaded)


def test_streamed_apply_of_renamed_experts_equals_loaded(tmp_path):
    """GraniteMoE's shards hold the fused experts as ``input_linear``/``output_linear`` (renamed on
    load): the tensor-by-tensor apply writes them under those names."""
    base = tmp_path / "base"
    tiny_moe_model("granitemoe").save_pretrained(base)
    loaded = tiny_moe_model("granitemoe")
    masks = wanda.prune_model(loaded, TOKENS, wanda.PruneConfig(batch_size=2))
    wanda.save_masks(tmp_path / "m.safetensors", masks, metadata=masks.metadata)
    apply_masks_to_checkpoint(base, tmp_path / "out", tmp_path / "m.safetensors")
    assert any(".input_linear." in k for k in shard_tensors(tmp_path / "out"))
    _assert_loads_as(tmp_path / "out", loaded)


def test_a_conversion_that_cannot_be_written_back_is_refused_by_name(tmp_path):
    """Experts numbered from 1: transformers loads them (merged in key order) but saves them as 0..3,
    so the pruned tensors cannot keep the shards' own names: the streamed prune refuses before any
    work and writes nothing; reading the block still equals from_pretrained's."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    tiny_moe_model("mixtral").save_pretrained(base)
    tensors = load_file(str(base / "model.safetensors"))
    renumbered = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if "experts" in parts:
            at = parts.index("experts") + 1
            parts[at] = str(int(parts[at]) + 1)
        renumbered[".".join(parts)] = tensor
    save_file(renumbered, str(base / "model.safetensors"), metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    source = open_streamed(base)
    with source.block(0) as block:
        assert torch.equal(block.mlp.experts.gate_up_proj, loaded.model.layers[0].mlp.experts.gate_up_proj)
    with pytest.raises(UnsupportedArchitectureError, match=r"experts\.1\.w1\.weight.*runtime\.load 'full'"):
        prune_checkpoint(base, tmp_path / "out", TOKENS, wanda.PruneConfig(batch_size=2))
    assert not (tmp_path / "out").exists()
    masks = wanda.prune_model(loaded, TOKENS, wanda.PruneConfig(batch_size=2))
    wanda.save_masks(tmp_path / "m.safetensors", masks, metadata=masks.metadata)
    with pytest.raises(UnsupportedArchitectureError, match="cannot be written into a copy of the shards"):
        apply_masks_to_checkpoint(base, tmp_path / "applied", tmp_path / "m.safetensors")
    assert not (tmp_path / "applied").exists()


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
def test_streamed_owl_over_experts_and_conv1d_equals_loaded(family, tmp_path):
    """OWL's outlier ratios read every target's view from the shards (fused experts merged as on
    load, Conv1D transposed): the allocation and the masks equal the loaded model's."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_moe import tiny_other_config

    def fresh():
        if family != "gpt2":
            return tiny_moe_model(family)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_other_config("gpt2")).eval()

    base = tmp_path / "base"
    fresh().save_pretrained(base, max_shard_size="40KB")
    loaded = fresh()
    config = wanda.PruneConfig(batch_size=2, allocation="owl", owl_lambda=0.05)
    expected = wanda.prune_model(loaded, TOKENS, config)
    prune_checkpoint(base, tmp_path / "out", TOKENS, config, masks_path=tmp_path / "m.safetensors")
    masks, _ = wanda.load_masks(tmp_path / "m.safetensors")
    assert masks.keys() == expected.keys()
    for name in expected:
        assert torch.equal(masks[name], expected[name]), name
    _assert_loads_as(tmp_path / "out", loaded)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_stream_stages_on_a_converted_moe_equal_full(method, tmp_path, monkeypatch):
    """The pipeline's stages in-process (materialize, calibration, statistics, masks, prune) on a
    tiny Mixtral with ``runtime.load`` ``stream`` and ``full``: same masks artifact contents, and the
    streamed pruned folder reloads to the fully loaded run's pruned model."""
    import random

    from tasks import calibration, masks as masks_stage, materialize, prune, statistics
    from tasks.params import apply_overrides, read_yaml, validate_params
    from tests.pipeline_project import REPO, TINY_OVERRIDES
    from tests.tiny import tiny_tokenizer
    from wanda.model_io import save_model

    fixtures = tmp_path / "fixtures"
    save_model(tiny_moe_model("mixtral"), tiny_tokenizer(), fixtures / "tiny-model")
    rng = random.Random(0)
    (fixtures / "calib.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(3000)))
    (fixtures / "eval.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(2000)))
    results, reports = {}, {}
    for load in ("full", "stream"):
        root = tmp_path / load
        root.mkdir()
        shutil.copytree(fixtures, root / "fixtures")
        monkeypatch.chdir(root)
        params = validate_params(apply_overrides(read_yaml(REPO / "params.yaml"), TINY_OVERRIDES + [
            f"runtime.load={load}", f"masks.method={method}"]))
        for run in (materialize.run, calibration.run, statistics.run, masks_stage.run, prune.run):
            run(params, root)
        assert (root / params.paths.masks / "weights.safetensors").is_file() == (method == "sparsegpt")
        results[load] = (wanda.load_masks(root / params.paths.masks / "masks.safetensors")[0],
                         root / params.paths.prune / "model")
        reports[load] = (root / params.paths.masks / "sparsity.json").read_bytes()
    (full_masks, full_dir), (stream_masks, stream_dir) = results["full"], results["stream"]
    # Block-wide and whole-model figures in both modes, counted the same (streamed: block by block).
    assert reports["stream"] == reports["full"]
    report = json.loads(reports["full"])
    assert report["coverage"] > 0.9 and report["block_zeros"] > 0 and report["model_total"] > report["block_total"]
    assert full_masks.keys() == stream_masks.keys() and any(n.endswith("]") for n in full_masks)
    assert all(torch.equal(full_masks[n], stream_masks[n]) for n in full_masks)
    from transformers import AutoModelForCausalLM

    _assert_loads_as(stream_dir, AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.float32))
    with safe_open(str(next(stream_dir.glob("*.safetensors"))), "pt") as handle:
        assert any(".block_sparse_moe.experts.0.w1." in k for k in handle.keys())  # the checkpoint's own names
