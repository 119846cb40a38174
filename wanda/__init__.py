"""Wanda: one-shot pruning of causal LMs by |W| * ||X||, written from the paper.

The library knows nothing of orchestration; use it from a notebook as well as from the pipeline.
Its names are imported on first use (:mod:`wanda.lazy`): ``import wanda`` and its configs cost
no torch until a tensor is needed.
"""
import logging
from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and the stage code closure (tasks/imports.py)
    from .architecture import BlockLayout, discover
    from .block_source import open_streamed
    from .calibration import CalibrationConfig, CalibrationSet, sample_calibration
    from .config import PruneConfig
    from .data import TextSource
    from .errors import (ArtifactMismatchError, CalibrationError, ConfigError, EvaluationError,
                         UnsupportedArchitectureError, WandaError)
    from .masks import apply_masks, load_masks, save_masks, sparsity_report
    from .model_io import EMBEDDED_DEFAULT, fingerprint, load_model, materialize
    from .prune import collect_statistics, compute_masks, masks_from_statistics, prune_model
    from .statistics import ActivationStatistics
    from .streaming import apply_masks_to_checkpoint, prune_checkpoint

_EXPORTS = {
    ".architecture": ("BlockLayout", "discover"),
    ".block_source": ("open_streamed",),
    ".calibration": ("CalibrationConfig", "CalibrationSet", "sample_calibration"),
    ".config": ("PruneConfig",),
    ".data": ("TextSource",),
    ".errors": ("ArtifactMismatchError", "CalibrationError", "ConfigError", "EvaluationError",
                "UnsupportedArchitectureError", "WandaError"),
    ".masks": ("apply_masks", "load_masks", "save_masks", "sparsity_report"),
    ".model_io": ("EMBEDDED_DEFAULT", "fingerprint", "load_model", "materialize"),
    ".prune": ("collect_statistics", "compute_masks", "masks_from_statistics", "prune_model"),
    ".statistics": ("ActivationStatistics",),
    ".streaming": ("apply_masks_to_checkpoint", "prune_checkpoint"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ActivationStatistics", "ArtifactMismatchError", "BlockLayout", "CalibrationConfig", "CalibrationError",
    "CalibrationSet", "ConfigError", "EMBEDDED_DEFAULT", "EvaluationError", "PruneConfig", "TextSource",
    "UnsupportedArchitectureError", "WandaError", "apply_masks", "apply_masks_to_checkpoint", "collect_statistics",
    "compute_masks", "discover", "fingerprint", "load_masks", "load_model", "masks_from_statistics", "materialize",
    "open_streamed", "prune_checkpoint", "prune_model", "sample_calibration", "save_masks", "sparsity_report",
]
