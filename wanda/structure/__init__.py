"""Structured pruning: remove whole experts (MoE) or whole MLP channels and head groups (dense),
saving a smaller plain checkpoint of the same family. ``apply_structure(model, tokens, config)``
is the entry point; ``StructureConfig`` its typed settings (all off by default)."""
from __future__ import annotations

from .apply import apply_structure
from .config import StructureConfig
from .rebuild import parameter_count

__all__ = ["StructureConfig", "apply_structure", "parameter_count"]
