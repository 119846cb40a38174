"""The method interface and its registry.

In the spirit of llm-compressor's sparsity modifiers: a method states what it needs from
calibration (``calibration``: nothing, per-channel sums, or Hessians), whether one-pass
statistics can serve it, whether it updates the weights it keeps, which recipes compose with it,
and how it prunes one layer (``prune_layer``). The driver (``wanda.driver``) walks the blocks and
calls it per target; ``PruneConfig`` takes the allowed method names and the combination rules
from this registry. Adding a method is one module under ``wanda/methods/`` that subclasses
``Method`` (or ``ScoreMethod``) and calls ``register``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from ..errors import ConfigError

if TYPE_CHECKING:  # the config imports this registry; torch and the rest are imported where used
    import torch

    from ..config import PruneConfig
    from ..statistics import ChannelStats

log = logging.getLogger(__name__)

Calibration = Literal["none", "channel", "hessian"]
# Recipes that compose with a method (per method: ``Method.recipes``).
RECIPES = ("allocation", "variant", "refine", "permute", "layer_scope")


@dataclass
class Layer:
    """One target as a method sees it: its [out, in] weight view and what calibration gave."""

    name: str
    weight: torch.Tensor
    stats: ChannelStats | None = None
    hessian: torch.Tensor | None = None


@dataclass
class LayerResult:
    mask: torch.Tensor  # [out, in] bool on the CPU, True = pruned
    weight: torch.Tensor | None = None  # updated weight (methods that update weights)
    permutation: torch.Tensor | None = None  # input-channel permutation the mask was chosen in
    report: dict = field(default_factory=dict)


class Method:
    """A pruning method. Subclasses set the class attributes and implement ``prune_layer``."""

    name: ClassVar[str]
    calibration: ClassVar[Calibration] = "channel"
    one_pass: ClassVar[bool] = True  # one-pass statistics (``collect_statistics``) serve it
    updates_weights: ClassVar[bool] = False
    recipes: ClassVar[frozenset[str]] = frozenset({"allocation"})
    # Whose score OWL's outlier ratios use (a method without a plain score names another's).
    allocation_score: ClassVar[str | None] = None

    def validate(self, config: "PruneConfig") -> None:
        """Method-specific checks of a config (raise ValueError naming the field and allowed values)."""

    def score(self, weight: torch.Tensor, stats: ChannelStats | None, config: "PruneConfig") -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} has no plain score")

    def prune_layer(self, layer: Layer, sparsity: float, config: "PruneConfig") -> LayerResult:
        raise NotImplementedError

    def needs_stats(self, stats: ChannelStats | None) -> ChannelStats:
        if stats is None:
            raise ConfigError("statistics", f"method {self.name!r} needs activation statistics")
        return stats


class ScoreMethod(Method):
    """A method whose mask keeps each comparison group's highest scores (Wanda, magnitude, RIA).

    The recipes run here, so they compose with every score method: the Wanda variant (per-row
    adaptive sparsity), RIA's channel permutation for N:M, and DSnoT refinement of the mask.
    """

    recipes = frozenset({"allocation", "variant", "refine", "permute"})

    def prune_layer(self, layer: Layer, sparsity: float, config: "PruneConfig") -> LayerResult:
        from ..masks import mask_from_scores
        from .dsnot import refine_mask
        from .ria import permuted_mask
        from .variant import variant_row_mask

        scores = self.score(layer.weight, layer.stats, config)
        nm = config.nm
        if config.variant:
            check_finite(scores)
            mask, alpha, achieved = variant_row_mask(scores, sparsity, config.variant_tolerance)
            log.debug("%s: variant alpha %.6f sparsity %.6f", layer.name, alpha, achieved)
        elif nm is not None and config.ria_permute:
            check_finite(scores)
            mask, perm = permuted_mask(layer, scores, sparsity, config)
            if perm is not None:
                return LayerResult(mask.cpu(), permutation=perm.cpu())
        else:
            mask = mask_from_scores(scores, sparsity, nm, config.scope, config.tie_break)
        if config.refine == "dsnot":
            mask = refine_mask(layer.name, layer.weight, mask, layer.stats, scores, config)
        return LayerResult(mask.cpu())


def check_finite(scores: torch.Tensor) -> None:
    import torch

    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity (non-finite weights or activation statistics)")


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``PruneConfig(method=cls.name)``."""
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register an example method clean up after themselves)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ConfigError("method", f"unknown method {name!r}", ", ".join(_REGISTRY))
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods_where(predicate) -> tuple[str, ...]:
    """Names of the registered methods for which ``predicate(method)`` holds (registry order)."""
    return tuple(name for name, method in _REGISTRY.items() if predicate(method))


def one_pass_methods() -> tuple[str, ...]:
    return methods_where(lambda m: m.one_pass)


def sequential_only_methods() -> tuple[str, ...]:
    return methods_where(lambda m: not m.one_pass)
