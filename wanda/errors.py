"""Exceptions the library raises; each names the offending parameter so callers can fail fast."""
from __future__ import annotations


class WandaError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(WandaError, ValueError):
    """An invalid parameter value. ``field`` names the parameter, ``allowed`` what is accepted."""

    def __init__(self, field: str, message: str, allowed: str | None = None):
        self.field = field
        self.allowed = allowed
        text = f"{field}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class UnsupportedArchitectureError(WandaError):
    """The model's layout cannot be handled (no decoder blocks or no prunable linear layers)."""


class CalibrationError(WandaError, ValueError):
    """The calibration text cannot give a meaningful sample."""


class ArtifactMismatchError(WandaError):
    """An artifact was produced for different inputs than the ones it is being used with."""


class EvaluationError(WandaError):
    """An evaluation could not produce a valid number (NaN/inf loss, missing task data)."""
