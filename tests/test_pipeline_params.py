"""Pipeline parameters: validation names the field and the allowed values, overrides are typed."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks import graph
from tasks.params import (PipelineParams, apply_overrides, load_params, parse_value, read_yaml, validate_params,
                          write_params_file)
from wanda.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_params(apply_overrides(read_yaml(REPO / "params.yaml"), overrides))
    return str(info.value)


def test_embedded_default_and_paper_files_validate():
    default = load_params(REPO / "params.yaml")
    assert default.model.source == "embedded:smollm2-135m-instruct"
    assert default.calibration.fallback is not None and default.evaluate.perplexity.fallback is not None
    paper = load_params(REPO / "params-paper.yaml")
    assert (paper.calibration.nsamples, paper.calibration.seqlen, paper.calibration.sampler) == (128, 4096, "c4")
    assert paper.evaluate.zeroshot is not None and len(paper.evaluate.zeroshot.tasks) == 7
    assert paper.model.source == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("overrides, expected", [
    (["masks.sparsity=1.2"], "masks.sparsity: Input should be less than 1"),
    (["masks.method=foo"], "masks.method: Input should be 'wanda', 'magnitude'"),
    (["statistics.mode=fast"], "statistics.mode: Input should be 'sequential' or 'one_pass'"),
    (["masks.sparsty=0.3"], "masks.sparsty: unknown parameter (allowed: method, sparsity, pattern"),
    (["masks.pattern=2:4", "masks.sparsity=0.6"], "masks: sparsity 0.6 contradicts pattern 2:4"),
    (["masks.pattern=5:4"], "masks.pattern: pattern '5:4': need 0 < N < M"),
    (["calibration.nsamples=0"], "calibration.nsamples: Input should be greater than or equal to 1"),
    (["model.dtype=int8"], "model.dtype: Input should be 'float32', 'float16', 'bfloat16' or 'float64'"),
    (["runtime.device=tpu"], "runtime.device: device 'tpu' is not supported (allowed: cpu, cuda, cuda:N)"),
    (["paths.masks=/tmp/x"], "paths.masks: '/tmp/x': must be a relative folder inside the repository"),
    (["paths.masks=artifacts/prune/m"], "stage folders may not nest"),
    (["evaluate.perplexity=null", "evaluate.zeroshot=null"], "evaluate: nothing to evaluate"),
    (["engine.shapes.max_seq_len=64"], "max_seq_len 64 must exceed max_input_len 128"),
])
def test_invalid_values_fail_with_field_and_allowed(overrides, expected):
    assert expected in _error(overrides)


def test_unknown_section_lists_sections():
    message = _error(["mask.sparsity=0.5"])
    assert message.startswith("mask: ") and "allowed: model, runtime, calibration" in message


def test_cross_section_rule_from_the_library():
    # SparseGPT updates weights from Hessians: the library allows it in sequential mode only.
    assert "mode 'sequential'" in _error(["statistics.mode=one_pass", "masks.method=sparsegpt"])


def test_override_values_are_yaml_1_2_typed():
    assert parse_value("0.6") == 0.6
    assert parse_value("2:4") == "2:4"  # YAML 1.1 would read base-60 124
    assert parse_value("null") is None
    assert parse_value("[a, b]") == ["a", "b"]
    params = validate_params(apply_overrides(read_yaml(REPO / "params.yaml"),
                                             ["masks.pattern=2:4", "statistics.targets=[mlp.*]"]))
    assert params.masks.pattern == "2:4" and params.statistics.targets == ["mlp.*"]


def test_sections_split_prune_config_without_duplicating_it():
    from wanda.config import PruneConfig

    params = PipelineParams()
    names = set(params.statistics.model_fields) | set(params.masks.model_fields)
    assert names == set(PruneConfig.model_fields)
    assert not set(params.statistics.model_fields) & set(params.masks.model_fields)
    assert params.prune_config() == PruneConfig(**params.statistics.model_dump(), **params.masks.model_dump())


def test_fallback_text_is_used_only_when_the_file_is_absent(tmp_path):
    params = validate_params(apply_overrides({}, ["calibration.source={path: /nonexistent/x.txt}",
                                                  "calibration.fallback={builtin: pydoc_topics}"]))
    config, note = params.calibration.resolve()
    assert config.source.builtin == "pydoc_topics" and "absent" in note
    present = tmp_path / "c.txt"
    present.write_text("text")
    params = validate_params(apply_overrides({}, [f"calibration.source={{path: {present}}}",
                                                  "calibration.fallback={builtin: pydoc_topics}"]))
    config, note = params.calibration.resolve()
    assert config.source.path == str(present) and note is None


def test_write_params_file_keeps_comments_and_applies_overrides(tmp_path):
    target = tmp_path / "params.yaml"
    write_params_file(target, (REPO / "params.yaml").read_text(), ["masks.sparsity=0.6", "masks.pattern=unstructured"])
    text = target.read_text()
    assert "# Embedded default" in text
    assert load_params(target).masks.sparsity == 0.6


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == graph.main_dvc_yaml(), "run `python -m flows.cli dvc-yaml`"
    pipeline = graph.main_pipeline()["stages"]
    assert list(pipeline) == graph.order()
    for spec in graph.STAGES:
        deps = pipeline[spec.name]["deps"]
        assert all((REPO / path).exists() for path in spec.code_files), spec.name
        assert [f"${{paths.{up}}}" for up in spec.inputs] == deps[len(spec.code_files):]


def test_graph_masks_depend_on_statistics_not_the_reverse():
    assert graph.ancestors("masks") == {"materialize", "calibration", "statistics"}
    assert "statistics" not in graph.descendants("masks")
    assert graph.descendants("masks") == {"prune", "evaluate", "export_24", "engine", "benchmark", "savings"}
