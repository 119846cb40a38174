"""Per-input-channel activation statistics of linear layers.

For every target linear layer we accumulate, over all calibration tokens, the sum of squares,
the sum and the token count of each input channel. The Wanda norm, the mean and the variance
(used by DSnoT and friends) all derive from these three. Accumulation is float64 so the order
of batches cannot change the result beyond float32 storage precision.

On request (``tie_break: topk``) a fourth statistic rides along: the reference code's own
``scaler_row`` (locuslab/wanda ``WrappedGPT.add_batch``), a float32 running mean over samples of
each channel's squared norm, updated sample by sample with the reference's exact operations. It
equals ``sumsq / samples`` up to float32 rounding, and that rounding is what decides near-equal
scores: with the pipeline's arithmetic the embedded model's 2:4 masks already differ from the
reference's in block 0 (one pair of scores in ``layers.0.mlp.up_proj`` orders the other way),
and sequential pruning carries the difference through every later block.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import save_safetensors
from .errors import ArtifactMismatchError

log = logging.getLogger(__name__)


def batch_partials(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum of squares and sum of one batch.

    Within a batch the reduction runs in float32 (a float64 reduction costs about as much as the
    layer's matmul on CPU); batches are then accumulated in float64.
    """
    flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    return flat.pow(2).sum(0).double().cpu(), flat.sum(0).double().cpu(), flat.shape[0]


def reference_sample_norms(rows: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """Per calibration sample (``seqlen`` consecutive rows each), ``torch.norm(x, p=2, dim=1)`` of
    its rows transposed to [in, seqlen]: the reference's call on the same values in the same memory
    layout (its hook sees one sample's [1, seqlen, in] input, reshapes it to [seqlen, in] and
    transposes it), so the float32 reduction rounds the same way."""
    if rows.shape[0] % seqlen:
        raise ValueError(f"{rows.shape[0]} input rows are not whole samples of {seqlen} tokens")
    return [torch.norm(rows[start:start + seqlen].t().type(torch.float32), p=2, dim=1)
            for start in range(0, rows.shape[0], seqlen)]


@dataclass
class ChannelStats:
    sumsq: torch.Tensor  # [in] float64 while accumulating, float32 once loaded
    sum: torch.Tensor
    count: int = 0
    # The reference's running ``scaler_row`` (float32, [in]) and its sample count; None unless
    # collected with ``reference_seqlen`` (see the module docstring).
    scaler_row: torch.Tensor | None = None
    samples: int = 0

    @classmethod
    def zeros(cls, channels: int) -> "ChannelStats":
        return cls(torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0)

    def add(self, inputs: torch.Tensor) -> None:
        self.add_partial(*batch_partials(inputs))

    def add_partial(self, sumsq: torch.Tensor, total: torch.Tensor, count: int) -> None:
        self.sumsq += sumsq
        self.sum += total
        self.count += count

    def add_reference_sample(self, norm: torch.Tensor) -> None:
        """One sample's channel norms into ``scaler_row``, with ``WrappedGPT.add_batch``'s exact
        float32 operations and order (rescale the running mean, then add norm^2 / samples)."""
        if self.scaler_row is None:
            self.scaler_row = torch.zeros(norm.shape[0], dtype=torch.float32, device=norm.device)
        self.scaler_row *= self.samples / (self.samples + 1)
        self.samples += 1
        self.scaler_row += norm ** 2 / self.samples

    def mean_square(self) -> torch.Tensor:
        """sum of squares / count: the reference's ``scaler_row`` up to a per-layer constant."""
        return (self.sumsq / max(self.count, 1)).float()

    def norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens."""
        return self.sumsq.double().sqrt().float()

    def mean(self) -> torch.Tensor:
        return (self.sum.double() / max(self.count, 1)).float()

    def variance(self) -> torch.Tensor:
        mean = self.sum.double() / max(self.count, 1)
        return (self.sumsq.double() / max(self.count, 1) - mean.pow(2)).clamp_min(0).float()


@dataclass
class ActivationStatistics:
    layers: dict[str, ChannelStats] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ChannelStats:
        if name not in self.layers:
            raise ArtifactMismatchError(f"statistics have no entry for layer {name!r} (were they collected with other targets?)")
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        tensors = {}
        for name, stats in self.layers.items():
            tensors[f"{name}::sumsq"] = stats.sumsq.float().contiguous()
            tensors[f"{name}::sum"] = stats.sum.float().contiguous()
            tensors[f"{name}::count"] = torch.tensor([stats.count], dtype=torch.int64)
            if stats.scaler_row is not None:  # only when asked for: artifacts without it are unchanged
                tensors[f"{name}::scaler_row"] = stats.scaler_row.cpu().contiguous()
                tensors[f"{name}::samples"] = torch.tensor([stats.samples], dtype=torch.int64)
        meta = {**self.metadata, **{k: str(v) for k, v in (metadata or {}).items()}}
        meta["layers"] = json.dumps(sorted(self.layers))
        save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStatistics":
        stats = cls()
        with safe_open(str(path), "pt") as handle:
            stats.metadata = dict(handle.metadata() or {})
            names = json.loads(stats.metadata.pop("layers", "[]"))
            keys = set(handle.keys())
            for name in names:
                stats.layers[name] = ChannelStats(
                    handle.get_tensor(f"{name}::sumsq"), handle.get_tensor(f"{name}::sum"),
                    int(handle.get_tensor(f"{name}::count").item()),
                )
                if f"{name}::scaler_row" in keys:
                    stats.layers[name].scaler_row = handle.get_tensor(f"{name}::scaler_row")
                    stats.layers[name].samples = int(handle.get_tensor(f"{name}::samples").item())
        return stats


class StatisticsCollector:
    """A sink of observed input rows (``wanda.targets.observe``) accumulating each target's
    channel statistics into ``into``; ``channels`` maps target names to their input sizes.

    Targets fed the same rows (q/k/v, gate/up) share one reduction per batch. With
    ``reference_seqlen`` (the calibration samples' length) each target also accumulates the
    reference's ``scaler_row`` sample by sample (``ChannelStats.add_reference_sample``).
    """

    def __init__(self, channels: dict[str, int], into: ActivationStatistics, reference_seqlen: int | None = None):
        self.into = into
        self.reference_seqlen = reference_seqlen
        for name, size in channels.items():
            into.layers.setdefault(name, ChannelStats.zeros(size))
        self._last: tuple | None = None

    def __call__(self, name: str, rows: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not rows:
            norms = reference_sample_norms(rows, self.reference_seqlen) if self.reference_seqlen else []
            self._last = (rows, batch_partials(rows), norms)
        stats = self.into.layers[name]
        stats.add_partial(*self._last[1])
        for norm in self._last[2]:
            stats.add_reference_sample(norm)

    def close(self) -> None:
        self._last = None
