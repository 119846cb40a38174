"""The public pruning API: statistics (one-pass or sequential), masks and their application.

Thin over one block walk (``wanda.driver.walk_blocks``) and one method interface
(``wanda.methods``):

- score methods (wanda, magnitude, ria), with the Wanda variant, RIA's channel permutation and
  DSnoT refinement, compute each layer's mask from its weights and per-channel statistics;
- SparseGPT collects a Hessian per distinct layer input in the same walk (sequential only) and
  prunes with weight updates;
- OWL allocation replaces the uniform sparsity by per-block sparsities from outlier ratios. In
  one-pass mode the ratios come from the one-pass statistics; in sequential mode (as in the OWL
  reference) from a dense one-pass walk first, which costs one extra forward of the blocks over
  the calibration set. Magnitude scores need no walk at all.

The walk takes its blocks from a block source (``wanda.block_source``): the fully loaded model,
or a skeleton whose blocks are materialized from the safetensors shards one at a time
(``wanda.streaming``). Both run the same code, so their masks and weights are identical.
"""
from __future__ import annotations

import json
import logging
import re
import time

import torch
from torch import nn

from .architecture import discover, model_type
from .block_source import ResidentBlocks
from .config import PruneConfig
from .driver import ExpertRecord, Progress, Pruner, allocation, layout_targets, walk_blocks
from .experts import ExpertPolicy, usable_experts_implementation
from .errors import ArtifactMismatchError, ConfigError
from .masks import MaskDict
from .methods.base import one_pass_methods
from .statistics import ActivationStatistics
from .targets import Target

log = logging.getLogger(__name__)

__all__ = ["Progress", "collect_statistics", "compute_masks", "masks_from_statistics", "prune_model",
           "validate_calibration_tokens", "validate_layout"]


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


def validate_layout(model: nn.Module, targets: list[list[Target]], config: PruneConfig) -> None:
    """Shape checks that would otherwise fail only after a long forward pass."""
    nm = config.nm
    if nm is None:
        return
    for target in (t for block in targets for t in block):
        in_features = target.weight(model).shape[1]
        if in_features % nm[1]:
            raise ConfigError(
                "pattern", f"{target.name} has {in_features} inputs, not divisible by M={nm[1]} of pattern "
                           f"{config.pattern}",
                "an N:M pattern whose M divides every target layer's input size, or narrower targets/ignore",
            )


def _plan(model: nn.Module, targets: list[str] | None, ignore: list[str] | None):
    """``(layout, targets per block)`` of ``model`` for the given globs."""
    usable_experts_implementation(model)  # float64 experts: grouped_mm has no kernel
    layout = discover(model, targets, ignore)
    return layout, layout_targets(model, layout, targets, ignore)


def _check_statistics(stats: ActivationStatistics | None, config: PruneConfig, names) -> None:
    if not config.needs_statistics:
        return
    if stats is None:
        raise ConfigError("statistics", f"method {config.method!r} needs activation statistics")
    missing = [name for name in names if name not in stats]
    if missing:
        raise ArtifactMismatchError(f"statistics lack {len(missing)} target layers, first: {missing[0]!r}")


def _check_one_pass(config: PruneConfig) -> None:
    if not config.supports_one_pass:
        raise ConfigError("method", f"{config.method!r} needs per-layer Hessians and updates weights; run it with "
                                    "prune_model in mode 'sequential'", ", ".join(one_pass_methods()))


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    calib_ids: torch.Tensor,
    batch_size: int = 8,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    progress: Progress | None = None,
    *,
    blocks=None,
    offload_dir: str | None = None,
    expert_policy: ExpertPolicy | None = None,
    reference_scaler: bool = False,
) -> ActivationStatistics:
    """One-pass statistics: every target layer's input statistics from the dense model, block by block.

    Costs one forward of the blocks over the calibration set (no ``lm_head``); memory holds one
    block's activations for the calibration set. Serves every method whose ``one_pass`` is true
    (``wanda.methods``) with any allocation, variant, permutation and refinement. ``blocks`` is
    the block source (default: the model as loaded); ``offload_dir`` keeps the activations
    between blocks in files there instead of memory. ``expert_policy`` decides which tokens an
    expert's statistics see and how starved experts fall back; the statistics' metadata records it
    with the routed tokens per expert (masks computed from them must ask for the same policy).
    ``reference_scaler`` also keeps the reference's own running ``scaler_row`` per layer, which
    ``tie_break: topk`` scores use to reproduce the reference's masks bit for bit.
    """
    _, per_block = _plan(model, targets, ignore)
    validate_calibration_tokens(model, calib_ids)
    stats = ActivationStatistics(metadata={"mode": "one_pass", "model_type": model_type(model)})
    record = ExpertRecord(expert_policy or ExpertPolicy())
    walk_blocks(model, blocks or ResidentBlocks(model), per_block, tokens=calib_ids, batch_size=batch_size,
                stats=stats, offload_dir=offload_dir, progress=progress, experts=record,
                reference_scaler=reference_scaler)
    stats.metadata.update(record.metadata())
    return stats


def compute_masks(
    model_or_weights: nn.Module | dict[str, torch.Tensor],
    statistics: ActivationStatistics | None,
    config: PruneConfig,
    *,
    blocks=None,
    masks_out=None,
    progress: Progress | None = None,
) -> MaskDict:
    """Masks for every target layer from weights and (when needed) one-pass statistics.

    Returns ``masks_out`` (default a new ``MaskDict``; ``.permutations`` holds RIA channel
    permutations, ``.metadata`` the OWL allocation). Without ``blocks`` the model is not changed;
    with a block source (a streamed model needs one block in memory) its blocks get the masks
    applied as they are visited, so a block writer sees the pruned blocks. ``model_or_weights``
    may also be a ``name -> weight`` dict. SparseGPT cannot be computed this way (it needs
    Hessians and updates weights): use ``prune_model``.
    """
    config = PruneConfig.model_validate(config)
    _check_one_pass(config)
    masks = masks_out if masks_out is not None else MaskDict()
    if not isinstance(model_or_weights, nn.Module):
        groups = _block_groups(list(model_or_weights))
        per_block = [[Target(name, "linear", name) for name in group] for group in groups]
        _check_statistics(statistics, config, model_or_weights)
        weights = {name: _WeightOnly(w) for name, w in model_or_weights.items()}
        sparsities, record = allocation(weights, statistics, config, per_block, [_block_key(g[0]) for g in groups])
        pruner = Pruner(config, masks, statistics, sparsities, apply=False)
        for name, weight in model_or_weights.items():
            pruner.prune(Target(name, "linear", name), weight)
        pruner.describe(record)
        return masks
    model = model_or_weights
    layout, per_block = _plan(model, config.targets, config.ignore)
    validate_layout(model, per_block, config)
    source = blocks if blocks is not None else ResidentBlocks(model)
    _check_statistics(statistics, config, (t.name for block in per_block for t in block))
    if statistics is not None and config.needs_statistics:
        masks.metadata.update(ExpertRecord.from_metadata(statistics.metadata, config.expert_policy).metadata())
    sparsities, record = allocation(_allocation_weights(model, source, per_block, config), statistics, config,
                                    per_block, [layout.block_name(i) for i in range(layout.num_blocks)])
    pruner = Pruner(config, masks, statistics, sparsities, apply=blocks is not None)
    walk_blocks(model, source, per_block, pruner=pruner, progress=progress)
    pruner.describe(record)
    return masks


def _allocation_weights(model: nn.Module, source, per_block: list[list[Target]], config: PruneConfig):
    """``name -> object with .weight`` for OWL's outlier ratios: the source's own lookup for
    linear layers and for every target of a streamed source (which reads each target's [out, in]
    view from the shards); Conv1D and expert targets of a loaded model through their views."""
    if config.allocation != "owl":
        return {}
    targets = [t for block in per_block for t in block]
    if all(t.kind == "linear" for t in targets) or getattr(source, "streamed", False):
        return source.weights([t.name for t in targets])
    return {t.name: _WeightOnly(t.weight(model)) for t in targets}


def masks_from_statistics(model: nn.Module, statistics: ActivationStatistics | None, config: PruneConfig, *,
                          blocks=None, masks_out=None):
    """``compute_masks`` through a block source, which gets the masks applied (kept for callers
    of the earlier API)."""
    return compute_masks(model, statistics, config, blocks=blocks if blocks is not None else ResidentBlocks(model),
                         masks_out=masks_out)


_BLOCK_KEY = re.compile(r"^(.*?\.\d+)\.")


def _block_key(name: str) -> str:
    match = _BLOCK_KEY.match(name)
    return match.group(1) if match else name


def _block_groups(names: list[str]) -> list[list[str]]:
    """Target names grouped by decoder block (by the first ``.<index>.`` of the name)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_block_key(name), []).append(name)
    return list(groups.values())


class _WeightOnly:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    config: PruneConfig,
    statistics_out: ActivationStatistics | None = None,
    progress: Progress | None = None,
    *,
    blocks=None,
    masks_out=None,
    offload_dir: str | None = None,
) -> MaskDict:
    """Prune ``model`` in place and return the masks keyed by module name (True = pruned).

    ``sequential`` follows the reference: block by block, statistics of block k come from the
    outputs of the already-pruned blocks before it, and each block runs twice (statistics, then
    the pruned block's outputs for the next). ``one_pass`` takes all statistics from the dense
    model and prunes afterwards. Pass ``statistics_out`` to keep the (channel) statistics.
    SparseGPT also updates the kept weights, so its result is the model, not base weights + masks.

    ``blocks`` is the block source (default: ``model`` as loaded; a ``StreamedBlocks`` prunes a
    skeleton block by block from its shards); ``masks_out`` receives the masks block by block
    (default: a new ``MaskDict``; a ``wanda.streaming.MaskSpool`` keeps them on disk) and is
    returned; ``offload_dir`` keeps the activations between blocks on disk.
    """
    config = PruneConfig.model_validate(config)
    layout, per_block = _plan(model, config.targets, config.ignore)
    validate_layout(model, per_block, config)
    source = blocks if blocks is not None else ResidentBlocks(model)
    masks = masks_out if masks_out is not None else MaskDict()
    started = time.perf_counter()
    if not config.needs_statistics:  # nothing to observe: the one-pass masks path with no statistics
        compute_masks(model, None, config, blocks=source, masks_out=masks, progress=progress)
        log.info("%s pruning of %d layers in %.1fs", config.method, len(masks), time.perf_counter() - started)
        return masks
    validate_calibration_tokens(model, calib_ids)
    stats = statistics_out if statistics_out is not None else ActivationStatistics()
    stats.metadata.update({"mode": config.mode, "model_type": model_type(model)})
    walk = dict(tokens=calib_ids, batch_size=config.batch_size, offload_dir=offload_dir,
                reference_scaler=config.tie_break == "topk")
    experts = ExpertRecord(config.expert_policy)
    if config.mode == "one_pass":
        walk_blocks(model, source, per_block, stats=stats, progress=progress, experts=experts, **walk)
        stats.metadata.update(experts.metadata())
        compute_masks(model, stats, config, blocks=source, masks_out=masks)
    else:
        names = [layout.block_name(i) for i in range(layout.num_blocks)]
        dense = None
        if config.owl_prepass:
            log.info("OWL: dense one-pass walk for the outlier ratios")
            dense = ActivationStatistics()
            walk_blocks(model, source, per_block, stats=dense, write=False,
                        experts=ExpertRecord(config.expert_policy), **walk)
        sparsities, record = allocation(_allocation_weights(model, source, per_block, config), dense, config,
                                        per_block, names)
        if record is not None:
            stats.metadata["owl"] = json.dumps(record)
        pruner = Pruner(config, masks, stats, sparsities)
        walk_blocks(model, source, per_block, pruner=pruner, stats=stats, progress=progress, experts=experts, **walk)
        pruner.describe(record)
        stats.metadata.update(experts.metadata())
        masks.metadata.update(experts.metadata())
    log.info("%s %s pruning (%s, %s) of %d layers in %.1fs", config.method, config.mode, config.pattern,
             config.sparsity, len(masks), time.perf_counter() - started)
    return masks
