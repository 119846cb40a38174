"""Export of MoE models: the TensorRT-LLM writer refuses them by name; the 2:4 check covers experts."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_moe import tiny_moe_model
from wanda.architecture import model_targets
from wanda.errors import UnsupportedArchitectureError
from wanda.export.sparse24 import target_compliance_report
from wanda.export.trtllm_checkpoint import export_trtllm_checkpoint
from wanda.masks import mask_from_scores


def test_trtllm_writer_refuses_moe_models_by_name(tmp_path):
    model = tiny_moe_model("mixtral")
    with pytest.raises(UnsupportedArchitectureError, match=r"mixture-of-experts.*'mixtral'.*model.layers.0.mlp.experts"):
        export_trtllm_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_24_compliance_names_each_expert(family):
    model = tiny_moe_model(family)
    targets = model_targets(model)
    with torch.no_grad():
        for target in targets:
            view = target.weight(model)
            view.mul_(~mask_from_scores(view.abs().float(), 0.5, (2, 4)))
    report = target_compliance_report(model)
    names = [layer.name for layer in report.layers]
    assert names == [t.name for t in targets] and any(n.endswith("down_proj[3]") for n in names)
    assert report.all_compliant
    spoiled = next(t for t in targets if t.name.endswith("experts.down_proj[2]"))
    with torch.no_grad():
        spoiled.weight(model)[0, :4] = 1.0
    bad = target_compliance_report(model)
    assert not bad.all_compliant and bad.first_offending.name == spoiled.name
