"""``apply_structure``: one calibration forward, then the smaller model and a JSON-able report."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..architecture import find_blocks
from ..errors import ConfigError, UnsupportedArchitectureError
from ..experts import expert_containers, usable_experts_implementation
from . import experts as _experts
from . import width as _width
from .config import StructureConfig
from .rebuild import parameter_count, rebuild

log = logging.getLogger(__name__)


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.numel() == 0 \
            or tokens.dtype not in (torch.int32, torch.int64):
        raise ConfigError("tokens", f"calibration tokens must be a non-empty integer tensor [samples, seqlen], "
                          f"got {getattr(tokens, 'dtype', type(tokens).__name__)} "
                          f"{tuple(getattr(tokens, 'shape', ()))}")


@torch.no_grad()
def _calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    for start in range(0, tokens.shape[0], batch_size):
        model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)


def apply_structure(model: nn.Module, tokens: torch.Tensor | None, config: StructureConfig,
                    batch_size: int = 8) -> tuple[nn.Module, dict]:
    """Remove what ``config`` asks from ``model`` (a loaded transformers causal LM).

    Returns ``(smaller model, report)``. The smaller model is a new instance of the same class
    built from the updated config; ``save_pretrained`` of it loads with ``from_pretrained`` as a
    plain model of the family. ``model`` keeps its shapes and values, but the tensors structured
    pruning does not touch (embeddings, norms, unpruned projections) are shared with the result,
    not copied (a large model is not held twice): treat ``model`` as consumed, or read it only,
    since pruning the result in place (Wanda after structure) changes those shared tensors too.
    With nothing to remove (all off, or fractions that round down to nothing) the same ``model``
    object comes back with no forward pass. ``tokens`` ([samples, seqlen] ids) are
    the calibration tokens the saliencies/scores are measured on. The report lists per layer what
    was removed (and, for experts, every expert's saliency and routed token count), the config
    changes and the parameter counts before and after.
    """
    if not isinstance(config, StructureConfig):
        raise ConfigError("config", f"expected a StructureConfig, got {type(config).__name__}")
    before = parameter_count(model)
    report: dict = {"settings": config.model_dump(), "model_type": getattr(model.config, "model_type", None),
                    "params_before": before}
    if not config.enabled:
        report.update(params_after=before, param_reduction=0.0, config_changes={})
        return model, report
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
    _check_tokens(tokens)
    blocks_path, blocks = find_blocks(model)
    new_config = copy.deepcopy(model.config)
    changes: dict = {}

    # Validate everything (family, counts, bias switches) before the forward pass.
    moe_layers: list = []
    if config.removes_experts:
        _experts.check_family(model)
        moe_layers = _experts.find_moe_layers(model, blocks_path, blocks)
        if not moe_layers:
            raise UnsupportedArchitectureError(f"structure.experts_removed: model type {report['model_type']!r} "
                                               "has no experts layers")
        if config.removes_width:
            raise ConfigError("structure", "experts_removed and width pruning together: width pruning is for dense "
                              "models only", "experts_removed alone on MoE models")
        removed_per_layer, groups = _experts.plan_count(model, config, moe_layers[0].num_experts)
        if not removed_per_layer:  # rounded down to nothing (warned): no forward pass either
            report.update(params_after=before, param_reduction=0.0, config_changes={})
            return model, report
    elif expert_containers(model):
        raise UnsupportedArchitectureError(f"structure: width pruning is for dense models; "
                                           f"{report['model_type']!r} has experts (use structure.experts_removed)")
    family = None
    zero_fill: tuple[str, ...] = ()
    if config.removes_width:
        family = _width.width_family(model, config)
        if config.kv_groups_removed:
            _width.head_layout(model, config)
        elif not _width.mlp_channels_to_remove(blocks, family, config):  # rounded down to nothing (warned)
            report.update(params_after=before, param_reduction=0.0, config_changes={})
            return model, report
        if config.compensates:
            if _width.enable_bias(model, family, config, new_config):
                zero_fill = (".bias",)

    was_training = model.training
    model.eval()
    try:
        if moe_layers:
            usable_experts_implementation(model)
            with _experts.SaliencyObserver(moe_layers):
                _calibrate(model, tokens, batch_size)
            state = {k: v for k, v in model.state_dict().items()}
            detail = _experts.remove_experts(model, config, moe_layers, removed_per_layer, groups, state, new_config)
            report["experts"] = detail["layers"]
            changes.update(detail["config"])
        else:
            modules = {}
            for index, block in enumerate(blocks):
                if config.mlp_channels_removed:
                    modules[f"{blocks_path}.{index}.{family.mlp_out}"] = block.get_submodule(family.mlp_out)
                if config.kv_groups_removed:
                    modules[f"{blocks_path}.{index}.{family.attn[3]}"] = block.get_submodule(family.attn[3])
            with _width.InputStatistics(modules) as observer:
                _calibrate(model, tokens, batch_size)
            state = {k: v for k, v in model.state_dict().items()}
            detail = _width.plan_and_slice(model, blocks_path, blocks, family, config, observer.stats, state,
                                           new_config)
            report["width"] = detail["layers"]
            changes.update(detail["config"])
            if zero_fill:
                changes.update({k: True for k in (_width.MLP_BIAS_KEY, _width.ATTN_BIAS_KEY)
                                if getattr(new_config, k, False) and not getattr(model.config, k, False)})
    finally:
        model.train(was_training)
    if not changes:
        report.update(params_after=before, param_reduction=0.0, config_changes={})
        return model, report
    smaller = rebuild(model, new_config, state, zero_fill)
    if moe_layers:
        usable_experts_implementation(smaller)  # float64 experts: off grouped_mm, as for the original
    after = parameter_count(smaller)
    report.update(params_after=after, param_reduction=round(1 - after / before, 8), config_changes=changes)
    log.info("structure: %s -> %s parameters (%.2f%% fewer); config %s", before, after,
             100 * (1 - after / before), changes)
    return smaller, report
