"""Models larger than memory: the streamed block walk equals the fully loaded model, bit for bit.

Tiny random models saved with several safetensors shards; every method and mode is pruned both
ways and the masks, the pruned weights, the statistics and the perplexity are compared.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wanda
from tests.tiny import shard_tensors, tiny_config, tiny_model, tiny_tokenizer
from wanda.block_source import open_streamed
from wanda.checkpoint import INDEX, Checkpoint, SafetensorsStreamWriter
from wanda.data import TextSource
from wanda.errors import ArtifactMismatchError, ConfigError
from wanda.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from wanda.masks import apply_masks, save_masks
from wanda.placement import check_device, check_device_map
from wanda.prune import masks_from_statistics
from wanda.streaming import MaskSpool, apply_masks_to_checkpoint, prune_checkpoint

LAYERS = 3


def _tokens(n=6, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _model(arch="llama", dtype=torch.float64, tie=False):
    if not tie:
        return tiny_model(arch, layers=LAYERS, dtype=dtype)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(arch, LAYERS)
    config.tie_word_embeddings = True
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="100KB")  # several shards, blocks split across them
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    folder = _save(_model(), tmp_path_factory.mktemp("sharded") / "model")
    assert len(list(folder.glob("*.safetensors"))) > LAYERS and (folder / INDEX).is_file()
    return folder




CONFIGS = {
    "wanda-sequential": dict(),
    "wanda-one-pass": dict(mode="one_pass"),
    "wanda-2:4": dict(pattern="2:4"),
    "wanda-4:8-one-pass": dict(pattern="4:8", mode="one_pass"),
    "magnitude": dict(method="magnitude"),
    "sparsegpt": dict(method="sparsegpt"),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "owl-sequential": dict(allocation="owl", owl_lambda=0.05),
    "owl-one-pass": dict(allocation="owl", owl_lambda=0.05, mode="one_pass"),
    "ria-permute-2:4": dict(method="ria", pattern="2:4", ria_permute=True, mode="one_pass"),
    "dsnot": dict(refine="dsnot", dsnot_cycles=5),
}


@pytest.mark.parametrize("offload", [False, True], ids=["ram", "offload"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_pruning_equals_loaded(sharded, tmp_path, name, offload):
    config = wanda.PruneConfig(batch_size=4, **CONFIGS[name])
    tokens = _tokens()
    loaded = _model()
    expected = wanda.prune_model(loaded, tokens, config)
    report = prune_checkpoint(sharded, tmp_path / "out", tokens, config, offload_activations=offload,
                              work_dir=tmp_path / "work", masks_path=tmp_path / "masks.safetensors")
    masks, metadata = wanda.load_masks(tmp_path / "masks.safetensors")
    assert masks.keys() == expected.keys()
    for layer in expected:
        assert torch.equal(masks[layer], expected[layer]), layer
    assert masks.permutations.keys() == expected.permutations.keys()
    for layer, perm in expected.permutations.items():
        assert torch.equal(masks.permutations[layer], perm)
    assert masks.metadata == expected.metadata  # OWL allocation, SparseGPT fallbacks
    assert report["overall"] == wanda.sparsity_report(expected)["overall"]
    written, state = shard_tensors(tmp_path / "out"), loaded.state_dict()
    assert written.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(written[key], tensor), key
    # Same sharding and index; the scratch folders are gone.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in sharded.iterdir())
    assert not any((tmp_path / "work").iterdir())


@pytest.mark.parametrize("arch", ["opt", "gpt_neox", "qwen3"])
def test_other_architectures_stream(tmp_path, arch):
    base = _save(tiny_model(arch, layers=2, dtype=torch.float64), tmp_path / "base")
    tokens = _tokens(4)
    config = wanda.PruneConfig(batch_size=2)
    expected = wanda.prune_model(tiny_model(arch, layers=2, dtype=torch.float64), tokens, config)
    prune_checkpoint(base, tmp_path / "out", tokens, config, masks_path=tmp_path / "m.safetensors")
    masks, _ = wanda.load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(masks[n], expected[n]) for n in expected) and masks.keys() == expected.keys()


def test_tied_embeddings_stream(tmp_path):
    model = _model(tie=True)
    base = _save(model, tmp_path / "base")
    assert "lm_head.weight" not in Checkpoint(base)
    tokens = _tokens(4)
    expected = wanda.prune_model(_model(tie=True), tokens, wanda.PruneConfig())
    prune_checkpoint(base, tmp_path / "out", tokens, wanda.PruneConfig(), masks_path=tmp_path / "m.safetensors")
    masks, _ = wanda.load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(masks[n], expected[n]) for n in expected)


def test_streamed_statistics_and_one_pass_masks_equal_loaded(sharded):
    tokens = _tokens()
    loaded = _model()
    expected = wanda.collect_statistics(loaded, tokens, batch_size=4)
    source = open_streamed(sharded)
    got = wanda.collect_statistics(source.model, tokens, batch_size=4, blocks=source)
    assert got.layers.keys() == expected.layers.keys()
    for name, stats in expected.layers.items():
        assert torch.equal(got[name].sumsq, stats.sumsq) and torch.equal(got[name].sum, stats.sum)
        assert got[name].count == stats.count
    config = wanda.PruneConfig(mode="one_pass", pattern="2:4")
    spool = MaskSpool()
    masks_from_statistics(source.model, got, config, blocks=source, masks_out=spool)
    reference = wanda.compute_masks(loaded, expected, config)
    streamed = spool.to_dict()
    assert all(torch.equal(streamed[n], reference[n]) for n in reference)
    spool.close()


def test_apply_masks_to_checkpoint_equals_apply_masks(sharded, tmp_path):
    """The prune stage's streamed path: masks (and SparseGPT's updated weights) applied shard by shard."""
    tokens = _tokens()
    pruned = _model()
    masks = wanda.prune_model(pruned, tokens, wanda.PruneConfig(method="sparsegpt"))
    save_masks(tmp_path / "masks.safetensors", masks)
    modules = dict(pruned.named_modules())
    save_file({f"{n}.weight": modules[n].weight.detach().contiguous() for n in masks}, str(tmp_path / "w.safetensors"))
    counts = apply_masks_to_checkpoint(sharded, tmp_path / "out", tmp_path / "masks.safetensors",
                                       tmp_path / "w.safetensors")
    written = shard_tensors(tmp_path / "out")
    for key, tensor in pruned.state_dict().items():
        assert torch.equal(written[key], tensor), key
    assert counts["zeros"] >= sum(int(m.sum()) for m in masks.values())
    # Without updated weights: the base weights with the masks applied, as apply_masks does.
    wanda_masks = wanda.prune_model(_model(), tokens, wanda.PruneConfig())
    save_masks(tmp_path / "wanda.safetensors", wanda_masks)
    apply_masks_to_checkpoint(sharded, tmp_path / "out2", tmp_path / "wanda.safetensors")
    reference = _model()
    apply_masks(reference, wanda_masks)
    written = shard_tensors(tmp_path / "out2")
    assert all(torch.equal(written[k], t) for k, t in reference.state_dict().items())
    # Unpruned shards are byte-identical copies.
    names = {p.name for p in sharded.glob("*.safetensors")}
    untouched = [n for n in names if (sharded / n).read_bytes() == (tmp_path / "out2" / n).read_bytes()]
    assert untouched, "the shard holding only embeddings/norms should be a plain copy"


@pytest.mark.parametrize("offload", [False, True], ids=["ram", "offload"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_streamed_perplexity_equals_loaded(tmp_path, offload, tie):
    model = _model(dtype=torch.float32, tie=tie)
    base = _save(model, tmp_path / "base")
    words = " ".join(f"w{(i * 7) % 120}" for i in range(2000))
    (tmp_path / "eval.txt").write_text(words)
    config = PerplexityConfig(source=TextSource(path=str(tmp_path / "eval.txt")), seqlen=64, max_windows=5,
                              batch_size=2)
    expected = evaluate_perplexity(model, tiny_tokenizer(), config)
    source = open_streamed(base)
    got = evaluate_perplexity(source.model, tiny_tokenizer(), config, blocks=source,
                              offload_dir=str(tmp_path / "scratch") if offload else None)
    assert got.windows == expected.windows and got.tokens_digest == expected.tokens_digest
    assert got.perplexity == pytest.approx(expected.perplexity, rel=1e-6)


def test_progress_is_logged_per_block(sharded, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="wanda"):
        prune_checkpoint(sharded, tmp_path / "out", _tokens(2), wanda.PruneConfig(batch_size=2))
    assert f"block {LAYERS} of {LAYERS} done" in caplog.text


# ----------------------------------------------------------------------------- bad input


def test_missing_shard_is_named_before_any_work(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ArtifactMismatchError, match=victim.name):
        prune_checkpoint(broken, tmp_path / "out", _tokens(2), wanda.PruneConfig())
    assert not (tmp_path / "out").exists()


def test_tensor_missing_from_shards_is_named(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / INDEX).read_text())
    name = "model.layers.2.mlp.down_proj.weight"
    file = broken / index["weight_map"].pop(name)
    tensors = load_file(str(file))
    tensors.pop(name)
    save_file(tensors, str(file), metadata={"format": "pt"})
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(ArtifactMismatchError, match="model.layers.2.mlp.down_proj.weight"):
        open_streamed(broken)


def test_config_shard_mismatch_is_named(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactMismatchError, match=r"mlp\..*shape"):
        open_streamed(broken)


def test_index_naming_a_file_without_the_tensor_is_refused(sharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(ArtifactMismatchError, match="does not hold it"):
        Checkpoint(broken)


def test_gpu_placements_need_cuda():
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="runtime.device.*no CUDA"):
        check_device("cuda:0")
    with pytest.raises(ConfigError, match=r"runtime.device_map.model.layers.0.*no CUDA"):
        check_device_map({"model.layers.0": 0, "lm_head": "cpu"})
    with pytest.raises(ConfigError, match="runtime.device"):
        open_streamed(Path("/nonexistent"), device="cuda")
    assert check_device_map("auto") == "auto" and check_device_map({"": "cpu"}) == {"": "cpu"}
    with pytest.raises(ConfigError):
        check_device("tpu")


def test_cpu_device_map_loads_and_evaluates(sharded):
    """The device_map plumbing on a CPU-only machine: accelerate places everything on the CPU."""
    from transformers import AutoModelForCausalLM

    placed = AutoModelForCausalLM.from_pretrained(str(sharded), dtype=torch.float64, device_map=check_device_map("auto"))
    reference = _model()
    tokens = _tokens(2)
    with torch.no_grad():
        assert torch.equal(placed(tokens).logits, reference(tokens).logits)
    masks = wanda.prune_model(placed, tokens, wanda.PruneConfig(batch_size=2))
    expected = wanda.prune_model(_model(), tokens, wanda.PruneConfig(batch_size=2))
    assert all(torch.equal(masks[n], expected[n]) for n in expected)


def test_stream_writer_round_trips(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2, 3], dtype=torch.uint8),
               "c": torch.ones(5, dtype=torch.bfloat16)}
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                                     {"k": "v"})
    for name in ("c", "a", "b"):
        writer.write(name, tensors[name])
    writer.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    incomplete = SafetensorsStreamWriter(tmp_path / "y.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(ArtifactMismatchError, match="never written"):
        incomplete.close()


# ----------------------------------------------------------------------------- pipeline parameters


def test_runtime_parameters_are_validated():
    from tasks.params import validate_params

    params = validate_params({"runtime": {"load": "stream", "offload_activations": True}})
    assert params.runtime.load == "stream" and params.runtime.offload_activations
    with pytest.raises(ConfigError, match="runtime.load"):
        validate_params({"runtime": {"load": "lazy"}})
    with pytest.raises(ConfigError, match="offload_activations needs load 'stream'"):
        validate_params({"runtime": {"offload_activations": True}})
    with pytest.raises(ConfigError, match="device_map"):
        validate_params({"runtime": {"load": "stream", "device_map": "auto"}})
    with pytest.raises(ConfigError, match="device_map"):
        validate_params({"runtime": {"device_map": "everywhere"}})
    assert validate_params({"runtime": {"device_map": {"model": "cpu", "lm_head": 0}}}).runtime.device_map


@pytest.mark.integration
def test_embedded_model_streams_like_loaded(embedded_model_dir, tmp_path):
    tokens = torch.randint(3, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    config = wanda.PruneConfig(batch_size=2)
    model, _ = wanda.load_model(str(embedded_model_dir))
    expected = wanda.prune_model(model, tokens, config)
    prune_checkpoint(embedded_model_dir, tmp_path / "out", tokens, config, masks_path=tmp_path / "m.safetensors",
                     offload_activations=True, work_dir=tmp_path / "work")
    masks, _ = wanda.load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(masks[n], expected[n]) for n in expected)
    written = shard_tensors(tmp_path / "out")
    state = model.state_dict()
    assert all(torch.equal(written[k], state[k]) for k in written)


# ----------------------------------------------------------------------------- pipeline stages


# The tiny project (model and text fixtures in a temporary root) of the pipeline stage tests.
from tests.test_pipeline_stages import project  # noqa: E402,F401 (fixture)


def _stage_params(*overrides: str):
    from tasks.params import apply_overrides, read_yaml, validate_params
    from tests.pipeline_project import REPO, TINY_OVERRIDES

    return validate_params(apply_overrides(read_yaml(REPO / "params.yaml"), TINY_OVERRIDES + list(overrides)))


@pytest.mark.parametrize("recipe", [
    ("statistics.mode=sequential",),
    ("statistics.mode=one_pass", "masks.pattern=2:4"),
    ("statistics.mode=sequential", "masks.method=sparsegpt"),
    ("statistics.mode=one_pass", "prune.dtype=float16"),
], ids=["sequential", "one-pass-2:4", "sparsegpt", "to-float16"])
def test_stages_stream_to_the_same_artifacts(project, recipe):  # noqa: F811 (the imported fixture)
    """statistics -> masks -> prune -> evaluate with runtime.load=stream: same masks, the very same
    pruned model (fingerprint), the same perplexity as fully loaded."""
    from tasks import calibration, evaluate, masks, materialize, prune, statistics

    results = {}
    for load in ("full", "stream"):
        extra = ["runtime.offload_activations=true"] if load == "stream" else []
        paths = [f"paths.{s}=artifacts/{load}/{s}" for s in ("statistics", "masks", "prune", "dense_eval", "evaluate")]
        params = _stage_params(*recipe, f"runtime.load={load}", *extra, *paths)
        if load == "full":
            materialize.run(params, project)
            calibration.run(params, project)
        by_stage = {run.__module__ + run.__name__: run(params, project) for run in
                    (statistics.run, masks.run, prune.run, evaluate.run_dense, evaluate.run)}
        results[load] = (params, by_stage)
    (full_params, full), (stream_params, streamed) = results["full"], results["stream"]
    full_masks, _ = wanda.load_masks(project / full_params.paths.masks / "masks.safetensors")
    stream_masks, _ = wanda.load_masks(project / stream_params.paths.masks / "masks.safetensors")
    assert full_masks.keys() == stream_masks.keys()
    assert all(torch.equal(full_masks[n], stream_masks[n]) for n in full_masks)
    assert (streamed["tasks.prunerun"]["lineage"]["pruned_model_fingerprint"]
            == full["tasks.prunerun"]["lineage"]["pruned_model_fingerprint"])
    assert streamed["tasks.prunerun"]["summary"] == full["tasks.prunerun"]["summary"]
    for key in ("tasks.evaluaterun_dense", "tasks.evaluaterun"):
        a = full[key]["summary"]["metrics"]["perplexity"]
        b = streamed[key]["summary"]["metrics"]["perplexity"]
        assert b == pytest.approx(a, rel=1e-5)
    # Streaming is not an evaluation setting: its results compare with the loaded model's.
    assert streamed["tasks.evaluaterun"]["summary"]["settings_digest"] == full["tasks.evaluaterun"]["summary"]["settings_digest"]


def test_zeroshot_needs_the_loaded_model():
    with pytest.raises(ConfigError, match="runtime.load 'stream': zero-shot"):
        _stage_params("runtime.load=stream", "evaluate.zeroshot={tasks: [boolq]}")
