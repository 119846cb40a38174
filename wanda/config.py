"""Typed pruning configuration, validated at the edge before any forward pass."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

METHODS = ("wanda", "magnitude")
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


class PruneConfig(BaseModel):
    """What to prune and how.

    ``sparsity`` is the fraction of weights zeroed in each output row (unstructured), or in the
    whole layer with ``scope="layer"`` (the paper's magnitude baseline). For an N:M pattern the
    sparsity is N/M by construction and ``sparsity`` must equal it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["wanda", "magnitude"] = "wanda"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: str = "unstructured"
    scope: Literal["row", "layer"] = "row"
    mode: Literal["sequential", "one_pass"] = "sequential"
    batch_size: int = Field(8, ge=1)
    targets: list[str] = Field(default_factory=lambda: ["*"])
    ignore: list[str] = Field(default_factory=list)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value.strip().replace(" ", "")

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
        if self.scope == "layer" and self.method != "magnitude":
            raise ValueError("scope 'layer' is the magnitude baseline's comparison group (allowed: method 'magnitude')")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def needs_statistics(self) -> bool:
        return self.method != "magnitude"
