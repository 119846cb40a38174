"""The pruning driver: statistics (one-pass or sequential), masks and their application.

Every method of ``PruneConfig`` runs through the same block walk:

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
(``wanda.streaming``). Both run the same code below, so their masks and weights are identical.
"""
from __future__ import annotations

import json
import logging
import re
import time
from typing import Callable

import torch
from torch import nn

from .architecture import BlockLayout, discover, find_blocks, model_type
from .block_source import ResidentBlocks
from .blocks import block_inputs, run_block_over
from .config import PruneConfig
from .errors import ArtifactMismatchError, ConfigError
from .masks import MaskDict, apply_masks, mask_from_scores
from .methods.dsnot import dsnot_refine
from .methods.owl import allocate_owl, outlier_ratio
from .methods.ria import channel_permutation
from .methods.sparsegpt import HessianCollector, sparsegpt_prune
from .methods.variant import variant_row_mask
from .scores import score
from .statistics import ActivationStatistics, ChannelStats, StatisticsCollector

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


def _check_finite(scores: torch.Tensor) -> None:
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity (non-finite weights or activation statistics)")


@torch.no_grad()
def _mask_layer(name: str, weight: torch.Tensor, stats: ChannelStats | None, config: PruneConfig,
                sparsity: float, out: MaskDict) -> torch.Tensor:
    """One layer's mask for the score methods; records a permutation in ``out`` when one is used."""
    scores = score(config.method, weight, stats, config.ria_alpha)
    nm = config.nm
    if config.variant:
        _check_finite(scores)
        mask, alpha, achieved = variant_row_mask(scores, sparsity, config.variant_tolerance)
        log.debug("%s: variant alpha %.6f sparsity %.6f", name, alpha, achieved)
    elif nm is not None and config.ria_permute:
        _check_finite(scores)
        perm, report = channel_permutation(scores, *nm, lsa=config.ria_lsa)
        log.debug("%s: channel permutation %s", name, report)
        if perm is not None:
            perm = perm.to(scores.device)
            permuted_mask = mask_from_scores(scores[:, perm], sparsity, nm)
            if config.refine == "dsnot":
                permuted_mask = _dsnot(name, weight[:, perm], permuted_mask, _permuted_stats(stats, perm),
                                       scores[:, perm], config)
            mask = torch.empty_like(permuted_mask)
            mask[:, perm] = permuted_mask
            out.permutations[name] = perm.cpu()
            return mask.cpu()
        mask = mask_from_scores(scores, sparsity, nm)
    else:
        mask = mask_from_scores(scores, sparsity, nm, config.scope)
    if config.refine == "dsnot":
        mask = _dsnot(name, weight, mask, stats, scores, config)
    return mask.cpu()


class _Moments:
    def __init__(self, mean: torch.Tensor, variance: torch.Tensor):
        self._mean, self._variance = mean, variance

    def mean(self) -> torch.Tensor:
        return self._mean

    def variance(self) -> torch.Tensor:
        return self._variance


def _permuted_stats(stats: ChannelStats | None, perm: torch.Tensor):
    if stats is None:
        return None
    return _Moments(stats.mean()[perm.cpu()], stats.variance()[perm.cpu()])


def _dsnot(name, weight, mask, stats, scores, config: PruneConfig) -> torch.Tensor:
    if stats is None:
        raise ConfigError("statistics", "refine 'dsnot' needs activation statistics (mean and variance)")
    refined, report = dsnot_refine(
        weight, mask, stats.mean(), stats.variance(), scores, config.nm,
        cycles=config.dsnot_cycles, threshold=config.dsnot_threshold, var_power=config.dsnot_var_power,
    )
    log.debug("%s: dsnot %s", name, report)
    return refined


@torch.no_grad()
def _layer_masks(modules: dict[str, nn.Linear], stats: ActivationStatistics | None, config: PruneConfig,
                 sparsities: dict[str, float] | None = None) -> MaskDict:
    masks = MaskDict()
    for name, module in modules.items():
        layer_stats = stats[name] if (stats is not None and config.needs_statistics) else None
        sparsity = config.sparsity if sparsities is None else sparsities[name]
        masks[name] = _mask_layer(name, module.weight, layer_stats, config, sparsity, masks)
    return masks


_BLOCK_KEY = re.compile(r"^(.*?\.\d+)\.")


def _block_groups(names: list[str], layout: BlockLayout | None) -> list[list[str]]:
    """Target layer names grouped by decoder block (from the layout, else by the first ``.<index>.``)."""
    if layout is not None:
        wanted = set(names)
        groups = [[layout.full_name(i, rel) for rel in rels] for i, rels in enumerate(layout.targets)]
        return [[n for n in group if n in wanted] for group in groups if any(n in wanted for n in group)]
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK_KEY.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return list(groups.values())


@torch.no_grad()
def owl_sparsities(modules: dict, stats: ActivationStatistics | None, config: PruneConfig,
                   layout: BlockLayout | None = None) -> tuple[dict[str, float], dict]:
    """Per-layer sparsity from OWL block allocation, and a record (block ratios and sparsities).

    Scores are the method's own (Wanda's for SparseGPT), from the current (dense) weights.
    """
    method = "wanda" if config.method == "sparsegpt" else config.method
    groups = _block_groups(list(modules), layout)
    ratios = []
    for group in groups:
        scores = [score(method, modules[n].weight, stats[n] if method != "magnitude" else None, config.ria_alpha)
                  for n in group]
        ratios.append(outlier_ratio(scores, config.owl_m))
    allocation = allocate_owl(ratios, config.sparsity, config.owl_lambda)
    sparsities = {n: s for group, s in zip(groups, allocation) for n in group}
    record = {"ratios": [round(r, 6) for r in ratios], "sparsities": list(allocation),
              "blocks": [_BLOCK_KEY.match(g[0]).group(1) if _BLOCK_KEY.match(g[0]) else g[0] for g in groups]}
    log.info("OWL allocation (M=%g, lambda=%g): block sparsities %s", config.owl_m, config.owl_lambda,
             ", ".join(f"{s:.3f}" for s in allocation))
    return sparsities, record


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
) -> ActivationStatistics:
    """One-pass statistics: every target layer's input statistics from the dense model, block by block.

    Costs one forward of the blocks over the calibration set (no ``lm_head``); memory holds one
    block's activations for the calibration set. Serves every method in
    ``config.ONE_PASS_METHODS`` with any allocation, variant, permutation and refinement.
    ``blocks`` is the block source (default: the model as loaded); ``offload_dir`` keeps the
    activations between blocks in files there instead of memory.
    """
    layout = discover(model, targets, ignore)
    validate_calibration_tokens(model, calib_ids)
    stats = ActivationStatistics(metadata={"mode": "one_pass", "model_type": model_type(model)})
    _walk_blocks(model, layout, calib_ids, batch_size, stats, prune=None, progress=progress,
                 source=blocks, offload_dir=offload_dir)
    return stats


def compute_masks(
    model_or_weights: nn.Module | dict[str, torch.Tensor],
    statistics: ActivationStatistics | None,
    config: PruneConfig,
) -> MaskDict:
    """Masks for every target layer from weights and (when needed) statistics; the model is not changed.

    Returns a ``MaskDict`` (a dict; ``.permutations`` holds RIA channel permutations, ``.metadata``
    the OWL allocation). SparseGPT cannot be computed this way (it needs Hessians and updates
    weights): use ``prune_model``.
    """
    config = PruneConfig.model_validate(config)
    if not config.supports_one_pass:
        raise ConfigError("method", f"{config.method!r} needs per-layer Hessians and updates weights; run it with "
                                    "prune_model in mode 'sequential'", ", ".join(("wanda", "magnitude", "ria")))
    layout = None
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
    sparsities, record = None, None
    if config.allocation == "owl":
        sparsities, record = owl_sparsities(modules, statistics, config, layout)
    masks = _layer_masks(modules, statistics, config, sparsities)
    _describe(masks, record)
    return masks


def masks_from_statistics(model: nn.Module, statistics: ActivationStatistics | None, config: PruneConfig, *,
                          blocks=None, masks_out=None):
    """``compute_masks`` block by block through a block source (a streamed model needs one block
    in memory); the source's blocks get the masks applied. Returns ``masks_out`` (default a new
    ``MaskDict``)."""
    config = PruneConfig.model_validate(config)
    if not config.supports_one_pass:
        raise ConfigError("method", f"{config.method!r} needs per-layer Hessians and updates weights; run it with "
                                    "prune_model in mode 'sequential'", ", ".join(("wanda", "magnitude", "ria")))
    if config.needs_statistics and statistics is None:
        raise ConfigError("statistics", f"method {config.method!r} needs activation statistics")
    layout = discover(model, config.targets, config.ignore)
    validate_layout(model, layout, config)
    masks = masks_out if masks_out is not None else MaskDict()
    _prune_by_block(model, layout, blocks if blocks is not None else ResidentBlocks(model), statistics, config,
                    masks, None)
    return masks


def _describe(masks: MaskDict, owl_record: dict | None, extra: dict | None = None) -> None:
    """Facts the recipe alone does not give (nothing for a plain uniform recipe, so its artifact is unchanged)."""
    if owl_record is not None:
        masks.metadata["owl"] = json.dumps(owl_record)
    for key, value in (extra or {}).items():
        masks.metadata[key] = value if isinstance(value, str) else json.dumps(value)


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
    layout = discover(model, config.targets, config.ignore)
    validate_layout(model, layout, config)
    source = blocks if blocks is not None else ResidentBlocks(model)
    masks = masks_out if masks_out is not None else MaskDict()
    started = time.perf_counter()
    if not config.needs_statistics:
        _prune_by_block(model, layout, source, None, config, masks, progress)
        log.info("%s pruning of %d layers in %.1fs", config.method, len(masks), time.perf_counter() - started)
        return masks
    validate_calibration_tokens(model, calib_ids)
    stats = statistics_out if statistics_out is not None else ActivationStatistics()
    stats.metadata.update({"mode": config.mode, "model_type": model_type(model)})
    if config.mode == "one_pass":
        _walk_blocks(model, layout, calib_ids, config.batch_size, stats, prune=None, progress=progress,
                     source=source, offload_dir=offload_dir)
        _prune_by_block(model, layout, source, stats, config, masks, None)
    else:
        sparsities, record = None, None
        if config.allocation == "owl":
            dense = None
            if config.owl_prepass:
                log.info("OWL: dense one-pass walk for the outlier ratios")
                dense = ActivationStatistics()
                _walk_blocks(model, layout, calib_ids, config.batch_size, dense, prune=None, progress=None,
                             source=source, offload_dir=offload_dir, write=False)
            sparsities, record = owl_sparsities(source.weights(layout.all_targets()), dense, config, layout)
            stats.metadata["owl"] = json.dumps(record)
        pruner = _SequentialPruner(model, config, masks, sparsities)
        _walk_blocks(model, layout, calib_ids, config.batch_size, stats, prune=pruner, progress=progress,
                     hessians=config.method == "sparsegpt", offload=config.sparsegpt_offload,
                     source=source, offload_dir=offload_dir)
        _describe(masks, record, pruner.extra())
    log.info("%s %s pruning (%s, %s) of %d layers in %.1fs", config.method, config.mode, config.pattern,
             config.sparsity, len(masks), time.perf_counter() - started)
    return masks


def _prune_by_block(model, layout: BlockLayout, source, stats: ActivationStatistics | None, config: PruneConfig,
                    masks, progress: Progress | None) -> None:
    """Masks from the weights and finished statistics (one-pass or none), applied block by block.

    Per layer the same computation as ``compute_masks`` + ``apply_masks``; done block by block so
    a streamed model needs only one block in memory.
    """
    if config.needs_statistics:
        missing = [name for name in layout.all_targets() if name not in stats]
        if missing:
            raise ArtifactMismatchError(f"statistics lack {len(missing)} target layers, first: {missing[0]!r}")
    sparsities, record = None, None
    if config.allocation == "owl":
        sparsities, record = owl_sparsities(source.weights(layout.all_targets()), stats, config, layout)
    for index in range(layout.num_blocks):
        with source.block(index):
            for name, module in _targets(model, layout, index).items():  # one layer's mask in memory
                layer_masks = _layer_masks({name: module}, stats, config, sparsities)
                apply_masks(model, layer_masks)
                masks.update(layer_masks)
                masks.permutations.update(layer_masks.permutations)
        if progress is not None:
            progress(index + 1, layout.num_blocks)
    _describe(masks, record)


class _SequentialPruner:
    """Prunes one block right after its statistics are taken (sequential mode)."""

    def __init__(self, model: nn.Module, config: PruneConfig, masks: MaskDict,
                 sparsities: dict[str, float] | None = None):
        self.model = model
        self.config = config
        self.masks = masks
        self.sparsities = sparsities
        self.fallbacks: dict[str, str] = {}
        self.dead_channels: dict[str, int] = {}

    def __call__(self, index: int, modules: dict[str, nn.Linear], stats: ActivationStatistics,
                 hessians: HessianCollector | None) -> None:
        config = self.config
        if config.method == "sparsegpt":
            block_masks = MaskDict()
            for name, module in modules.items():
                sparsity = config.sparsity if self.sparsities is None else self.sparsities[name]
                weight, mask, report = sparsegpt_prune(
                    module.weight, hessians.hessian(name), sparsity, config.nm,
                    config.sparsegpt_blocksize, config.sparsegpt_damp, name,
                )
                hessians.release(name)
                module.weight.data.copy_(weight)
                block_masks[name] = mask.cpu()
                if report["fallback"]:
                    self.fallbacks[name] = report["fallback"]
                if report["dead_channels"]:
                    self.dead_channels[name] = report["dead_channels"]
            self._keep(block_masks)
        else:
            # Layer by layer: a layer's mask depends only on its own weights and statistics, and
            # handing each mask on at once keeps one layer's mask in memory, not the block's.
            for name, module in modules.items():
                self._keep(_layer_masks({name: module}, stats, config, self.sparsities))

    def _keep(self, masks: MaskDict) -> None:
        apply_masks(self.model, masks)
        self.masks.update(masks)
        self.masks.permutations.update(masks.permutations)

    def extra(self) -> dict:
        extra = {}
        if self.fallbacks:
            extra["sparsegpt_fallbacks"] = self.fallbacks
        if self.dead_channels:
            extra["sparsegpt_dead_channels"] = self.dead_channels
        return extra


def _walk_blocks(model, layout, calib_ids, batch_size, stats, prune=None, progress=None, hessians=False,
                 offload=False, source=None, offload_dir=None, write=True) -> None:
    """Run the calibration set through the blocks one at a time, collecting statistics.

    With ``prune`` (a callable ``(index, modules, stats, hessians)`` that prunes the block in place)
    each block is pruned right after its statistics
    are taken and re-run so the next block sees the pruned outputs (sequential mode). With
    ``hessians`` a ``HessianCollector`` runs beside the channel statistics. ``source`` gives the
    blocks (default: the loaded model); ``write=False`` keeps a streamed source's block writer
    from seeing this walk's blocks (a dense pre-pass changes nothing).
    """
    source = source if source is not None else ResidentBlocks(model)
    on_done = getattr(source, "on_done", None)
    if not write and on_done is not None:
        source.on_done = None
    try:
        hidden, calls = block_inputs(model, source, calib_ids, batch_size, offload_dir)
        device = source.run_device
        for index in range(layout.num_blocks):
            with source.block(index) as block:
                modules = _targets(model, layout, index)
                collector = HessianCollector(modules, offload=offload) if hessians else None
                outputs = hidden.sibling()
                with StatisticsCollector(modules, stats):
                    if collector is not None:
                        with collector:
                            run_block_over(block, hidden, calls[index], out=outputs, device=device)
                    else:
                        run_block_over(block, hidden, calls[index], out=outputs, device=device)
                if prune is not None:
                    prune(index, modules, stats, collector)
                    outputs.close()
                    outputs = hidden.sibling()
                    run_block_over(block, hidden, calls[index], out=outputs, device=device)
                del collector
            hidden.close()
            hidden = outputs
            log.info("block %d of %d done (%d layers)", index + 1, layout.num_blocks, len(modules))
            if progress is not None:
                progress(index + 1, layout.num_blocks)
        hidden.close()
    finally:
        if not write and on_done is not None:
            source.on_done = on_done

