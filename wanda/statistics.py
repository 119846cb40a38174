"""Per-input-channel activation statistics of linear layers.

For every target linear layer we accumulate, over all calibration tokens, the sum of squares,
the sum and the token count of each input channel. The Wanda norm, the mean and the variance
(used by DSnoT and friends) all derive from these three. Accumulation is float64 so the order
of batches cannot change the result beyond float32 storage precision.
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


@dataclass
class ChannelStats:
    sumsq: torch.Tensor  # [in] float64 while accumulating, float32 once loaded
    sum: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, channels: int) -> "ChannelStats":
        return cls(torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64), 0)

    def add(self, inputs: torch.Tensor) -> None:
        self.add_partial(*batch_partials(inputs))

    def add_partial(self, sumsq: torch.Tensor, total: torch.Tensor, count: int) -> None:
        self.sumsq += sumsq
        self.sum += total
        self.count += count

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
        meta = {**self.metadata, **{k: str(v) for k, v in (metadata or {}).items()}}
        meta["layers"] = json.dumps(sorted(self.layers))
        save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStatistics":
        stats = cls()
        with safe_open(str(path), "pt") as handle:
            stats.metadata = dict(handle.metadata() or {})
            names = json.loads(stats.metadata.pop("layers", "[]"))
            for name in names:
                stats.layers[name] = ChannelStats(
                    handle.get_tensor(f"{name}::sumsq"), handle.get_tensor(f"{name}::sum"),
                    int(handle.get_tensor(f"{name}::count").item()),
                )
        return stats


class StatisticsCollector:
    """A sink of observed input rows (``wanda.targets.observe``) accumulating each target's
    channel statistics into ``into``; ``channels`` maps target names to their input sizes.

    Targets fed the same rows (q/k/v, gate/up) share one reduction per batch.
    """

    def __init__(self, channels: dict[str, int], into: ActivationStatistics):
        self.into = into
        for name, size in channels.items():
            into.layers.setdefault(name, ChannelStats.zeros(size))
        self._last: tuple | None = None

    def __call__(self, name: str, rows: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not rows:
            self._last = (rows, batch_partials(rows))
        self.into.layers[name].add_partial(*self._last[1])

    def close(self) -> None:
        self._last = None
