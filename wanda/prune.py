"""The pruning driver: statistics (one-pass or sequential), masks and their application."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from .architecture import BlockLayout, discover, find_blocks, model_type
from .blocks import capture_block_calls, capture_block_inputs, run_block_over
from .config import PruneConfig
from .errors import ArtifactMismatchError, ConfigError
from .masks import apply_masks, mask_from_scores
from .scores import score
from .statistics import ActivationStatistics, StatisticsCollector

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def model_context(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def validate_calibration_tokens(model: nn.Module, tokens: torch.Tensor | None, field: str = "calib_ids") -> None:
    if tokens is None:
        raise ConfigError(field, "calibration tokens are required for this method")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ConfigError(field, f"expected a [nsamples, seqlen] token tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ConfigError(field, f"expected integer token ids, got {tokens.dtype}")
    context = model_context(model)
    if context is not None and tokens.shape[1] > context:
        raise ConfigError(f"{field}.seqlen", f"{tokens.shape[1]} exceeds the model's context of {context}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ConfigError(field, f"token ids must lie in [0, {vocab}) for this model")


def validate_layout(model: nn.Module, layout: BlockLayout, config: PruneConfig) -> None:
    """Shape checks that would otherwise fail only after a long forward pass."""
    nm = config.nm
    if nm is None:
        return
    modules = dict(model.named_modules())
    for name in layout.all_targets():
        in_features = modules[name].weight.shape[1]
        if in_features % nm[1]:
            raise ConfigError(
                "pattern", f"{name} has {in_features} inputs, not divisible by M={nm[1]} of pattern {config.pattern}",
                "an N:M pattern whose M divides every target layer's input size, or narrower targets/ignore",
            )


def _targets(model: nn.Module, layout: BlockLayout, index: int) -> dict[str, nn.Linear]:
    block = find_blocks(model)[1][index]
    return {layout.full_name(index, rel): block.get_submodule(rel) for rel in layout.targets[index]}


@torch.no_grad()
def _layer_masks(modules: dict[str, nn.Linear], stats: ActivationStatistics | None, config: PruneConfig) -> dict[str, torch.Tensor]:
    masks = {}
    for name, module in modules.items():
        layer_stats = stats[name] if (stats is not None and config.needs_statistics) else None
        scores = score(config.method, module.weight, layer_stats)
        masks[name] = mask_from_scores(scores, config.sparsity, config.nm, config.scope).cpu()
    return masks


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    calib_ids: torch.Tensor,
    batch_size: int = 8,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    progress: Progress | None = None,
) -> ActivationStatistics:
    """One-pass statistics: every target layer's input statistics from the dense model, block by block.

    Costs one forward of the blocks over the calibration set (no ``lm_head``); memory holds one
    block's activations for the calibration set.
    """
    layout = discover(model, targets, ignore)
    validate_calibration_tokens(model, calib_ids)
    stats = ActivationStatistics(metadata={"mode": "one_pass", "model_type": model_type(model)})
    _walk_blocks(model, layout, calib_ids, batch_size, stats, prune=None, progress=progress)
    return stats


def compute_masks(
    model_or_weights: nn.Module | dict[str, torch.Tensor],
    statistics: ActivationStatistics | None,
    config: PruneConfig,
) -> dict[str, torch.Tensor]:
    """Masks for every target layer from weights and (for Wanda) statistics; the model is not changed."""
    if isinstance(model_or_weights, nn.Module):
        layout = discover(model_or_weights, config.targets, config.ignore)
        validate_layout(model_or_weights, layout, config)
        named = dict(model_or_weights.named_modules())
        modules = {name: named[name] for name in layout.all_targets()}
    else:
        modules = {name: _WeightOnly(w) for name, w in model_or_weights.items()}
    if config.needs_statistics:
        if statistics is None:
            raise ConfigError("statistics", f"method {config.method!r} needs activation statistics")
        missing = [name for name in modules if name not in statistics]
        if missing:
            raise ArtifactMismatchError(f"statistics lack {len(missing)} target layers, first: {missing[0]!r}")
    return _layer_masks(modules, statistics, config)


class _WeightOnly:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    config: PruneConfig,
    statistics_out: ActivationStatistics | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place and return the masks keyed by module name (True = pruned).

    ``sequential`` follows the reference: block by block, statistics of block k come from the
    outputs of the already-pruned blocks before it, and each block runs twice (statistics, then
    the pruned block's outputs for the next). ``one_pass`` takes all statistics from the dense
    model and prunes afterwards. Pass ``statistics_out`` to keep the statistics.
    """
    config = PruneConfig.model_validate(config)
    layout = discover(model, config.targets, config.ignore)
    validate_layout(model, layout, config)
    started = time.perf_counter()
    if not config.needs_statistics:
        masks = compute_masks(model, None, config)
        apply_masks(model, masks)
        log.info("%s pruning of %d layers in %.1fs", config.method, len(masks), time.perf_counter() - started)
        return masks
    validate_calibration_tokens(model, calib_ids)
    stats = statistics_out if statistics_out is not None else ActivationStatistics()
    stats.metadata.update({"mode": config.mode, "model_type": model_type(model)})
    if config.mode == "one_pass":
        _walk_blocks(model, layout, calib_ids, config.batch_size, stats, prune=None, progress=progress)
        masks = compute_masks(model, stats, config)
        apply_masks(model, masks)
    else:
        masks = {}
        _walk_blocks(model, layout, calib_ids, config.batch_size, stats, prune=(config, masks), progress=progress)
    log.info("%s %s pruning (%s, %s) of %d layers in %.1fs", config.method, config.mode, config.pattern,
             config.sparsity, len(masks), time.perf_counter() - started)
    return masks


def _walk_blocks(model, layout, calib_ids, batch_size, stats, prune, progress) -> None:
    """Run the calibration set through the blocks one at a time, collecting statistics.

    With ``prune=(config, masks)`` each block is pruned right after its statistics are taken
    and re-run so the next block sees the pruned outputs (sequential mode).
    """
    _, blocks = find_blocks(model)
    calls = capture_block_calls(model, blocks, calib_ids[:1])
    hidden = capture_block_inputs(model, blocks, calib_ids, batch_size)
    for index, block in enumerate(blocks):
        modules = _targets(model, layout, index)
        with StatisticsCollector(modules, stats):
            outputs = run_block_over(block, hidden, calls[index])
        if prune is not None:
            config, masks = prune
            block_masks = _layer_masks(modules, stats, config)
            apply_masks(model, block_masks)
            masks.update(block_masks)
            outputs = run_block_over(block, hidden, calls[index])
        hidden = outputs
        log.info("block %d/%d done (%d layers)", index + 1, len(blocks), len(modules))
        if progress is not None:
            progress(index + 1, len(blocks))
