"""Typed pruning configuration, validated at the edge before any forward pass.

One ``PruneConfig`` selects a whole pruning recipe. ``method`` picks the score (and, for
SparseGPT, the weight reconstruction); the other choices are orthogonal and default to off, so a
config written before they existed prunes exactly as it did:

- ``allocation``: ``uniform`` (every layer at ``sparsity``) or ``owl`` (per-block sparsity from
  each block's outlier ratio, Yin et al. 2023; averages to ``sparsity``);
- ``variant``: Wanda's per-row adaptive sparsity found by bisection on the cumulative score share;
- ``refine``: ``dsnot`` refines any initial mask (Zhang et al. 2024) by swapping pruned and kept
  weights of a row to shrink the expected output error;
- ``ria_permute``: input-channel permutation for N:M masks (RIA's channel reallocation).
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


def _registry():
    # Imported on use: the methods import the masks and statistics modules, not this one.
    from . import methods

    return methods.base


def _allowed(names) -> str:
    """``'a', 'b' or 'c'``: how pydantic lists a Literal's allowed values."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _known_method(value: str) -> str:
    names = _registry().method_names()
    if value not in names:
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": _allowed(names)})
    return value


# A registered method's name (``wanda.methods``); the error lists the registry's names.
MethodName = Annotated[str, AfterValidator(_known_method)]


def _normalized_pattern(value: str) -> str:
    parse_pattern(value)
    return value.strip().replace(" ", "")


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N pruned of every M inputs), got N={n}, M={m}")
    return n, m


# ``"unstructured"`` or ``"N:M"``, spaces removed.
Pattern = Annotated[str, AfterValidator(_normalized_pattern)]


class ExpertPolicy(BaseModel):
    """How experts with few calibration tokens get their statistics (recorded in the masks artifact).

    - ``routed`` (default): an expert's statistics come from the tokens the router sends to it;
      an expert with fewer than ``min_tokens_per_expert`` routed tokens uses ``fallback``:
      ``pooled`` (the statistics of all experts of its container pooled) or ``magnitude``
      (every input channel weighted 1, so its score is ``|W|``).
    - ``calibrate_all_experts``: every calibration token also passes through every expert for
      statistics only; the block output stays the normally routed one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["routed", "calibrate_all_experts"] = "routed"
    min_tokens_per_expert: int = Field(1, ge=0, description="routed mode: experts under this use the fallback")
    fallback: Literal["pooled", "magnitude"] = "pooled"

    def describe(self) -> str:
        if self.mode == "calibrate_all_experts":
            return "calibrate_all_experts"
        return f"routed(min_tokens_per_expert={self.min_tokens_per_expert}, fallback={self.fallback})"


class PruneConfig(BaseModel):
    """What to prune and how.

    ``sparsity`` is the fraction of weights zeroed in each output row (unstructured), or in the
    whole layer with ``scope="layer"`` (the paper's magnitude baseline, and RIA's reference
    comparison group). For an N:M pattern the sparsity is N/M by construction and ``sparsity``
    must equal it. With ``allocation="owl"`` ``sparsity`` is the average over blocks; with
    ``variant`` it is each layer's target, reached within ``variant_tolerance``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MethodName = "wanda"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: Pattern = "unstructured"
    scope: Literal["row", "layer"] = "row"
    mode: Literal["sequential", "one_pass"] = "sequential"
    batch_size: int = Field(8, ge=1)
    targets: list[str] = Field(default_factory=lambda: ["*"])
    ignore: list[str] = Field(default_factory=list)

    # --- mixture-of-experts: statistics of experts that see few calibration tokens ---
    # Recorded in the masks artifact; changes nothing for models without experts.
    expert_policy: ExpertPolicy = Field(default_factory=ExpertPolicy)

    # --- layer-wise sparsity allocation (OWL) ---
    allocation: Literal["uniform", "owl"] = "uniform"
    owl_m: float = Field(5.0, gt=0.0)  # outlier: score > owl_m * mean score of the block
    owl_lambda: float = Field(0.08, ge=0.0, lt=0.5)  # block sparsities span exactly 2 * lambda

    # --- the Wanda variant (per-row adaptive sparsity) ---
    variant: bool = False
    variant_tolerance: float = Field(0.001, gt=0.0, lt=1.0)

    # --- mask refinement (DSnoT) ---
    refine: Literal["none", "dsnot"] = "none"
    dsnot_cycles: int = Field(50, ge=0)
    # Stop refining a row once |expected output error| falls to this. The reference's 0.1 is on
    # a sum over 2048-token samples; ours is per token: 0.1 / 2048.
    dsnot_threshold: float = Field(0.1 / 2048, ge=0.0)
    dsnot_var_power: float = Field(1.0, ge=0.0)  # regrowth ranks W_ij E[X_j] / Var(X_j)^power

    # --- RIA ---
    ria_alpha: float = Field(0.5, ge=0.0)  # exponent of ||X_j|| in the RIA score
    ria_permute: bool = False  # N:M only: input-channel permutation (heuristic reallocation)
    ria_lsa: bool = False  # refine the permutation by linear sum assignment (needs scipy)

    # --- SparseGPT ---
    sparsegpt_blocksize: int = Field(128, ge=1)
    sparsegpt_damp: float = Field(0.01, gt=0.0)  # times the mean Hessian diagonal
    sparsegpt_offload: bool = False  # keep Hessians in CPU memory (accumulated per batch)

    # --- selection among equal scores ---
    # "stable": ties go to the lower input index (a stable sort; the default, results as before).
    # "topk": the reference code's own calls (N:M: torch.topk(..., largest=False) per group of M
    # columns; unstructured: its stable sort) on the reference's own score arithmetic (Wanda: its
    # float32 running scaler_row, collected per sample; the rounding decides near-equal scores),
    # so masks reproduce the reference's bit for bit.
    tie_break: Literal["stable", "topk"] = "stable"

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        nm = self.nm
        if nm is not None:
            n, m = nm
            if abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which prunes exactly {n}/{m} = "
                    f"{n / m:g}); set sparsity to {n / m:g}"
                )
            if self.scope != "row":
                raise ValueError("scope 'layer' applies to unstructured masks only (allowed with N:M: 'row')")
        registry = _registry()
        method = registry.get_method(self.method)

        def composing(recipe: str) -> str:
            return ", ".join(registry.methods_where(lambda m: recipe in m.recipes))

        if self.scope == "layer" and "layer_scope" not in method.recipes:
            raise ValueError(
                "scope 'layer' is the magnitude baseline's comparison group (allowed: method "
                f"{' or '.join(repr(n) for n in registry.methods_where(lambda m: 'layer_scope' in m.recipes))}; "
                "RIA's reference also compares per layer)"
            )
        if not method.one_pass and self.mode != "sequential":
            raise ValueError(
                f"mode {self.mode!r}: method {self.method!r} updates weights from per-layer Hessians and runs only in "
                f"mode 'sequential' (one-pass statistics serve: {', '.join(registry.one_pass_methods())})"
            )
        if self.allocation == "owl":
            if nm is not None:
                raise ValueError(
                    "allocation 'owl' gives blocks different sparsities, which a fixed N:M pattern cannot express "
                    "(allowed with N:M: allocation 'uniform')"
                )
            low, high = self.sparsity - 2 * self.owl_lambda, self.sparsity + 2 * self.owl_lambda
            if low < 0.0 or high >= 1.0:
                raise ValueError(
                    f"owl_lambda {self.owl_lambda}: block sparsities may range over sparsity +/- 2*lambda = "
                    f"[{low:g}, {high:g}], outside [0, 1); with sparsity {self.sparsity:g} owl_lambda must be "
                    f"<= {self.sparsity / 2:g} and < {(1.0 - self.sparsity) / 2:g}"
                )
        if self.variant:
            if nm is not None:
                raise ValueError("variant: the Wanda variant adapts each row's sparsity, which N:M fixes "
                                 "(allowed with N:M: variant false)")
            if self.scope != "row":
                raise ValueError("variant: the Wanda variant works per output row (allowed: scope 'row')")
            if "variant" not in method.recipes:
                raise ValueError(f"variant: not defined for method {self.method!r} (allowed: {composing('variant')})")
        if self.refine == "dsnot" and "refine" not in method.recipes:
            raise ValueError(
                f"refine 'dsnot' swaps weights of an unchanged dense row; method {self.method!r} does not compose with "
                f"it (allowed with dsnot: {composing('refine')})"
            )
        if self.ria_permute:
            if nm is None:
                raise ValueError("ria_permute: the channel permutation serves N:M patterns only (set a pattern 'N:M')")
            if "permute" not in method.recipes:
                raise ValueError(f"ria_permute: not available with method {self.method!r} "
                                 f"(allowed: {composing('permute')})")
        if self.ria_lsa:
            if not self.ria_permute:
                raise ValueError("ria_lsa: refines the channel permutation, so it needs ria_permute true")
            try:
                import scipy.optimize  # noqa: F401
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ValueError(f"ria_lsa: needs scipy (pip install scipy): {exc}") from exc
        method.validate(self)
        return self

    @property
    def method_impl(self):
        """The registered ``wanda.methods.base.Method`` named by ``method``."""
        return _registry().get_method(self.method)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_statistics(self) -> bool:
        """True when calibration data is needed (everything but plain magnitude pruning)."""
        return self.method_impl.calibration != "none" or self.refine != "none"

    @property
    def statistics_kind(self) -> Literal["none", "channel", "hessian"]:
        """What the masks are computed from: nothing, per-channel sums (norm, mean, variance), or Hessians."""
        if self.method_impl.calibration == "hessian":
            return "hessian"
        return "channel" if self.needs_statistics else "none"

    @property
    def supports_one_pass(self) -> bool:
        """Whether one-pass statistics (``collect_statistics``) can serve this config via ``compute_masks``."""
        return self.method_impl.one_pass

    @property
    def updates_weights(self) -> bool:
        """True when pruning changes kept weights: the result is the pruned model, not base weights + mask."""
        return self.method_impl.updates_weights

    @property
    def owl_prepass(self) -> bool:
        """Sequential OWL first takes outlier ratios from a dense one-pass walk (as the OWL reference)."""
        return self.allocation == "owl" and self.mode == "sequential" and self.needs_outlier_statistics

    @property
    def needs_outlier_statistics(self) -> bool:
        """OWL outlier ratios come from scores that need activation statistics (all but magnitude)."""
        method = self.method_impl
        registry = _registry()
        return self.allocation == "owl" and registry.get_method(method.allocation_score or method.name).calibration != "none"
