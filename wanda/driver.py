"""The one block walk behind every public entry point (``wanda.prune``).

``walk_blocks`` visits the decoder blocks in order, each taken from a block source (the loaded
model, a streamed skeleton filled from the shards, or either with activations offloaded to
disk) and handed back when done. Per block it may:

- *observe*: run the calibration activations through the block with the targets' inputs
  reported (``wanda.targets.observe``) to the channel statistics and, for a method that needs
  them, the Hessians;
- *prune*: each target's mask (and updated weight) from its method (``wanda.methods``), applied
  at once so the block's outputs, and the next block's statistics, see the pruned block;
- then run the pruned block again so the next block's inputs come from it (sequential mode).

Every mode is a choice of these: one-pass statistics observe only; one-pass masks (and plain
magnitude) prune only; sequential pruning does both. The same code runs for every source, so
masks, statistics and weights are identical bit for bit whichever source ran.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from .architecture import BlockLayout, find_blocks
from .blocks import block_inputs, run_block_over
from .config import PruneConfig
from .experts import ExpertPolicy, apply_expert_policy
from .masks import MaskDict, apply_mask
from .methods.base import Layer, Method
from .methods.owl import owl_sparsities
from .methods.sparsegpt import HessianCollector
from .statistics import ActivationStatistics, StatisticsCollector
from .targets import Target, block_targets, observe

log = logging.getLogger(__name__)

# ``progress(done, total)`` after each block (the stages draw it as a bar).
Progress = Callable[[int, int], None]


def layout_targets(model: nn.Module, layout: BlockLayout, config_targets: list[str] | None,
                   ignore: list[str] | None) -> list[list[Target]]:
    """Per block, its targets (every registered kind), named by full module name."""
    _, blocks = find_blocks(model)
    return [block_targets(blocks[i], layout.block_name(i), config_targets, ignore) for i in range(layout.num_blocks)]


@dataclass
class Pruner:
    """Prunes targets with the config's method: masks into ``masks``, applied to the weights
    returned by ``weight_of`` unless ``apply`` is false (``compute_masks`` leaves the model alone)."""

    config: PruneConfig
    masks: MaskDict
    stats: ActivationStatistics | None = None
    sparsities: Mapping[str, float] | None = None
    apply: bool = True
    report: dict = field(default_factory=dict)

    @property
    def method(self) -> Method:
        return self.config.method_impl

    @torch.no_grad()
    def prune(self, target: Target, weight: torch.Tensor, hessians: HessianCollector | None = None) -> None:
        config = self.config
        stats = self.stats[target.name] if (self.stats is not None and config.needs_statistics) else None
        hessian = hessians.hessian(target.name) if hessians is not None else None
        sparsity = config.sparsity if self.sparsities is None else self.sparsities[target.name]
        result = self.method.prune_layer(Layer(target.name, weight, stats, hessian), sparsity, config)
        if hessians is not None:
            hessians.release(target.name)
        if self.apply:
            if result.weight is not None:
                weight.copy_(result.weight)
            apply_mask(weight, result.mask, target.name)
        self.masks.update({target.name: result.mask})  # a MaskSpool packs it to disk at once
        if result.permutation is not None:
            self.masks.permutations[target.name] = result.permutation
        for key in ("fallback", "dead_channels"):
            if result.report.get(key):
                self.report.setdefault(key, {})[target.name] = result.report[key]

    def describe(self, owl_record: dict | None) -> None:
        """Facts the recipe alone does not give (nothing for a plain uniform recipe, so its artifact
        is unchanged): the OWL allocation, SparseGPT's fallbacks and dead channels."""
        if owl_record is not None:
            self.masks.metadata["owl"] = json.dumps(owl_record)
        for key, name in (("fallback", "sparsegpt_fallbacks"), ("dead_channels", "sparsegpt_dead_channels")):
            if key in self.report:
                self.masks.metadata[name] = json.dumps(self.report[key])


@dataclass
class ExpertRecord:
    """What a walk's expert observers saw: routed calibration tokens per expert per container
    (summed over the walk's forwards) and the experts whose statistics fell back."""

    policy: ExpertPolicy = field(default_factory=ExpertPolicy)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """String facts for an artifact's metadata (nothing for a model without experts)."""
        from .experts import expert_metadata

        return expert_metadata(self.policy, self.tokens, self.fallbacks) if self.tokens else {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], policy: ExpertPolicy) -> "ExpertRecord":
        """The record a statistics artifact carries (one-pass statistics, masks computed later)."""
        if "expert_tokens" not in metadata:
            return cls(policy)
        if metadata.get("expert_policy") != policy.describe():
            from .errors import ArtifactMismatchError

            raise ArtifactMismatchError(
                f"the statistics were collected with expert policy {metadata.get('expert_policy')!r} but the masks "
                f"ask for {policy.describe()!r}; collect the statistics again with the same expert_policy")
        return cls(policy, json.loads(metadata["expert_tokens"]), json.loads(metadata.get("expert_fallbacks", "{}")))


@torch.no_grad()
def walk_blocks(model: nn.Module, source, targets: list[list[Target]], *, pruner: Pruner | None = None,
                tokens: torch.Tensor | None = None, batch_size: int = 8, stats: ActivationStatistics | None = None,
                offload_dir: str | None = None, progress: Progress | None = None, write: bool = True,
                experts: ExpertRecord | None = None, reference_scaler: bool = False) -> None:
    """Visit every block of ``source``; observe when ``tokens`` are given, prune with ``pruner``.

    ``write=False`` keeps a streamed source's block writer from seeing this walk's blocks (a dense
    pre-pass changes nothing). ``experts`` gives the expert policy and receives the routed token
    counts and fallbacks (the observers see the routing; the policy fixes starved experts'
    statistics after the block is observed and before it is pruned). ``reference_scaler`` also
    accumulates the reference's running ``scaler_row`` per calibration sample (``tie_break: topk``).
    """
    experts = experts if experts is not None else ExpertRecord()
    observing = tokens is not None
    hessian_method = pruner is not None and pruner.method.calibration == "hessian"
    on_done = getattr(source, "on_done", None)
    if not write and on_done is not None:
        source.on_done = None
    hidden = calls = None
    try:
        if observing:
            hidden, calls = block_inputs(model, source, tokens, batch_size, offload_dir)
        device = getattr(source, "run_device", None)
        for index, block_targets_ in enumerate(targets):
            with source.block(index) as block:
                weights = {t.name: t.weight(model) for t in block_targets_}
                hessians = None
                if observing:
                    outputs = hidden.sibling()
                    channels = StatisticsCollector({n: w.shape[1] for n, w in weights.items()}, stats,
                                                   reference_seqlen=tokens.shape[1] if reference_scaler else None)
                    sinks = [channels]
                    if hessian_method:
                        hessians = HessianCollector(weights, offload=pruner.config.sparsegpt_offload)
                        sinks.append(hessians)
                    block_tokens: dict[str, list[int]] = {}
                    with observe(block_targets_, model, _fan_out(sinks), expert_policy=experts.policy,
                                 tokens=block_tokens):
                        run_block_over(block, hidden, calls[index], out=outputs, device=device)
                    for sink in sinks:
                        sink.close()
                    if block_tokens:
                        experts.tokens.update(block_tokens)
                        if stats is not None:
                            experts.fallbacks.update(apply_expert_policy(stats, block_targets_, block_tokens,
                                                                         experts.policy))
                if pruner is not None:
                    # Target by target: a mask depends only on its own weight and statistics, and
                    # handing each on at once keeps one target's mask in memory, not the block's.
                    for target in block_targets_:
                        pruner.prune(target, weights[target.name], hessians)
                    if observing:  # the next block's inputs come from the pruned block
                        outputs.close()
                        outputs = hidden.sibling()
                        run_block_over(block, hidden, calls[index], out=outputs, device=device)
                del hessians, weights
            if observing:
                hidden.close()
                hidden = outputs
            _return_freed_memory()
            log.info("block %d of %d done (%d layers)", index + 1, len(targets), len(block_targets_))
            if progress is not None:
                progress(index + 1, len(targets))
        if hidden is not None:
            hidden.close()
    finally:
        if not write and on_done is not None:
            source.on_done = on_done


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except OSError:  # pragma: no cover - no loadable C library
        return None


def _return_freed_memory() -> None:
    """Hand the heap's free pages back to the system after a block.

    Torch's CPU tensors are malloc'd, and the block's temporaries (scores, selection indices,
    masks, activations) are freed between long-lived allocations (the packed masks, the next
    block's buffers), so glibc keeps the holes: measured on the embedded model, the heap held
    ~180 MiB it had freed by the end of a loaded-mode walk, the largest part of its peak above
    the reference's. ``malloc_trim(0)`` releases them (a few ms per block); nothing is computed
    differently.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _fan_out(sinks):
    if len(sinks) == 1:
        return sinks[0]

    def sink(name: str, rows: torch.Tensor) -> None:
        for each in sinks:
            each(name, rows)

    return sink


def allocation(weights: Mapping, stats: ActivationStatistics | None, config: PruneConfig,
               targets: list[list[Target]], block_names: list[str]) -> tuple[dict[str, float] | None, dict | None]:
    """Per-target sparsities of the config's allocation (None, None for uniform)."""
    if config.allocation != "owl":
        return None, None
    groups = [[t.name for t in block] for block in targets]
    keep = [i for i, group in enumerate(groups) if group]
    return owl_sparsities(weights, stats, config, [groups[i] for i in keep], [block_names[i] for i in keep])
