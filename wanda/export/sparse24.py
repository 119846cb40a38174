"""2:4 semi-structured sparsity: compliance checks and an exact compressed representation.

The pattern is the one NVIDIA sparse tensor cores accelerate: along the *input* dimension of a
linear weight ``W [out, in]``, every group of 4 consecutive inputs holds at most 2 nonzeros.

Compressed form (this pipeline's portable storage format, not the hardware-interleaved layout
cuSPARSELt or CUTLASS use internally, which both libraries produce from the dense tensor):

- ``values [out, in/2]``: the 2 kept entries of every group, in ascending position order;
- ``metadata [out, ceil(in/8)] uint8``: per group a 4-bit nibble ``i0 | i1 << 2`` with the two
  kept positions ``i0 < i1`` (2 bits each); group ``g`` sits in byte ``g // 2``, low nibble
  for even ``g``, high nibble for odd ``g`` (an odd group count leaves the last high nibble 0).

Groups with fewer than 2 nonzeros are padded with their lowest-index zero positions, so every
group always stores exactly 2 slots and the layout stays fixed-size.

Signed zeros: ``W * mask`` turns pruned negative weights into ``-0.0``. Zeros are not stored,
so the compressed form cannot remember their sign; :func:`compress_24` therefore works on the
*canonical* tensor :func:`canonicalize_zeros` (every zero is ``+0.0``, numerically identical)
and ``decompress_24(compress_24(w))`` is bitwise equal to ``canonicalize_zeros(w)``, hence to
``w`` itself whenever ``w`` holds no ``-0.0``. The exporter writes the canonical tensor to
``rank0.safetensors``, so the checkpoint and its compressed form agree bit for bit.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import WandaError

log = logging.getLogger(__name__)

GROUP = 4  # M of N:M: consecutive inputs per group
KEEP = 2  # N kept per group
FORMAT = "wanda-sparse24-v1"


class Not24SparseError(WandaError, ValueError):
    """A weight that must be 2:4 sparse is not; names the first offending layer and position."""


class LayerCompliance(BaseModel):
    """2:4 compliance of one weight along its input dimension."""

    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, ...]
    compliant: bool
    groups: int  # groups of 4 inputs, over all rows
    bad_groups: int  # groups with more than 2 nonzeros
    zero_fraction: float
    first_bad_row: int | None = None
    first_bad_group: int | None = None  # group index within the row: inputs [4g, 4g+4)
    reason: str | None = None  # set when the layer cannot be 2:4 at all (shape) or is not

    def describe(self) -> str:
        if self.compliant:
            return f"{self.name}: 2:4 compliant ({self.zero_fraction:.1%} zeros)"
        if self.first_bad_row is None:
            return f"{self.name}: {self.reason}"
        g = self.first_bad_group
        return (
            f"{self.name}: {self.bad_groups} of {self.groups} groups of 4 inputs hold more than 2 nonzeros; "
            f"first at row {self.first_bad_row}, inputs {4 * g}..{4 * g + 3}"
        )


class ComplianceReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    pattern: str = "2:4"
    layers: list[LayerCompliance]

    @property
    def all_compliant(self) -> bool:
        return all(layer.compliant for layer in self.layers)

    @property
    def first_offending(self) -> LayerCompliance | None:
        return next((layer for layer in self.layers if not layer.compliant), None)

    def require(self) -> "ComplianceReport":
        """Raise :class:`Not24SparseError` naming the first non-compliant layer."""
        bad = self.first_offending
        if bad is not None:
            count = sum(not layer.compliant for layer in self.layers)
            raise Not24SparseError(
                f"{count} of {len(self.layers)} target weights are not 2:4 sparse along the input dimension; "
                f"first offending layer {bad.describe()}"
            )
        return self


def _as_2d(weight: torch.Tensor, name: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D linear weight [out, in], got shape {tuple(weight.shape)}")
    return weight.detach()


def check_24(weight: torch.Tensor, name: str = "weight") -> LayerCompliance:
    """Check that every group of 4 consecutive inputs of every row has at most 2 nonzeros."""
    w = _as_2d(weight, name)
    rows, cols = w.shape
    zero_fraction = float((w == 0).sum()) / max(w.numel(), 1)
    if cols % GROUP:
        return LayerCompliance(
            name=name, shape=(rows, cols), compliant=False, groups=0, bad_groups=0, zero_fraction=zero_fraction,
            reason=f"input dimension {cols} is not a multiple of {GROUP}",
        )
    # -0.0 == 0 is True, so signed zeros count as zeros here (numerically they are).
    nonzeros = (w != 0).reshape(rows, cols // GROUP, GROUP).sum(-1)
    bad = nonzeros > KEEP
    bad_count = int(bad.sum())
    first_row = first_group = None
    if bad_count:
        flat = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))  # first True in row-major order
        first_row, first_group = divmod(flat, cols // GROUP)
    return LayerCompliance(
        name=name, shape=(rows, cols), compliant=bad_count == 0, groups=nonzeros.numel(), bad_groups=bad_count,
        zero_fraction=zero_fraction, first_bad_row=first_row, first_bad_group=first_group,
        reason="more than 2 nonzeros in a group of 4 inputs" if bad_count else None,
    )


def compliance_report(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> ComplianceReport:
    """Check named weights in the given order (the order decides which is 'first offending')."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    return ComplianceReport(layers=[check_24(w, name) for name, w in items])


def target_compliance_report(model, targets: list[str] | None = None,
                             ignore: list[str] | None = None) -> ComplianceReport:
    """2:4 compliance of every pruning target of every kind, by target name: linear layers,
    Conv1D (checked in its [out, in] view) and each expert matrix (``...experts.down_proj[7]``)."""
    from ..architecture import model_targets

    return compliance_report((t.name, t.weight(model)) for t in model_targets(model, targets, ignore))


def canonicalize_zeros(weight: torch.Tensor) -> torch.Tensor:
    """Same tensor with every ``-0.0`` replaced by ``+0.0`` (NaN and nonzeros untouched)."""
    return torch.where(weight == 0, torch.zeros_like(weight), weight)


def _kept_positions(nonzero: torch.Tensor) -> torch.Tensor:
    """Per group the 2 positions to store: nonzeros first, padded with the lowest zero positions,
    returned in ascending order. ``nonzero``: bool ``[rows, groups, 4]``; result int64 ``[..., 2]``."""
    # Stable descending sort of the nonzero flag lists nonzeros in position order, then zeros.
    order = torch.sort(nonzero.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :KEEP], dim=-1).values


def compress_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``W [out, in]`` (2:4 along ``in``) -> ``(values [out, in/2], metadata uint8 [out, ceil(in/8)])``.

    Raises :class:`Not24SparseError` when the weight is not 2:4; see the module docstring for the
    layout and the signed-zero rule.
    """
    w = _as_2d(weight, name)
    report = check_24(w, name)
    if not report.compliant:
        raise Not24SparseError(f"cannot compress {report.describe()}")
    rows, cols = w.shape
    groups = cols // GROUP
    canon = canonicalize_zeros(w).reshape(rows, groups, GROUP)
    positions = _kept_positions(canon != 0)
    values = torch.gather(canon, -1, positions).reshape(rows, groups * KEEP).contiguous()
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)  # [rows, groups]
    if groups % 2:
        nibbles = torch.cat([nibbles, torch.zeros(rows, 1, dtype=torch.uint8, device=nibbles.device)], dim=1)
    metadata = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    return values, metadata


def decompress_24(values: torch.Tensor, metadata: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`compress_24`; ``in_features`` defaults to ``2 * values.shape[1]``."""
    if values.dim() != 2 or metadata.dim() != 2 or metadata.dtype != torch.uint8:
        raise ValueError(
            f"expected values [out, in/2] and uint8 metadata [out, ceil(in/8)], got {tuple(values.shape)} "
            f"{values.dtype} and {tuple(metadata.shape)} {metadata.dtype}"
        )
    rows = values.shape[0]
    cols = in_features if in_features is not None else values.shape[1] * 2
    if cols % GROUP or values.shape[1] * 2 != cols:
        raise ValueError(f"values shape {tuple(values.shape)} does not match in_features={cols} of a 2:4 weight")
    groups = cols // GROUP
    if metadata.shape != (rows, (groups + 1) // 2):
        want = (rows, (groups + 1) // 2)
        raise ValueError(f"metadata shape {tuple(metadata.shape)} != {want} for in_features={cols}")
    nibbles = torch.stack([metadata & 0x0F, metadata >> 4], dim=-1).reshape(rows, -1)[:, :groups]
    positions = torch.stack([nibbles & 0x3, (nibbles >> 2) & 0x3], dim=-1).to(torch.int64)
    if bool((positions[..., 0] >= positions[..., 1]).any()):
        raise ValueError("corrupt 2:4 metadata: kept positions must be two distinct ascending indices")
    dense = torch.zeros(rows, groups, GROUP, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, values.reshape(rows, groups, KEEP))
    return dense.reshape(rows, cols)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so ``-0.0`` differs from ``+0.0`` and equal NaNs match)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.numel() == 0:
        return True
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def magnitude_24_(weight: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the 2 smallest-|w| entries of every group of 4 inputs; returns the weight.

    For tests and latency benchmarks only, where which weights survive does not matter, only the
    pattern; the pipeline's pruning (Wanda scores) lives in the masks/prune modules.
    """
    w = _as_2d(weight, "weight")
    rows, cols = w.shape
    if cols % GROUP:
        raise ValueError(f"input dimension {cols} is not a multiple of {GROUP}")
    grouped = w.reshape(rows, cols // GROUP, GROUP)
    drop = torch.topk(grouped.abs().float(), GROUP - KEEP, dim=-1, largest=False).indices
    with torch.no_grad():
        weight.view(rows, cols // GROUP, GROUP).scatter_(-1, drop, 0.0)
    return weight
