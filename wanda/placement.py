"""Where model weights go: one device for the block walk, or an accelerate device map.

Both are checked before any weight is read: a CUDA placement on a machine without CUDA (or
naming a GPU it does not have) fails here with the parameter's name, not deep inside a forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

from .errors import ConfigError

if TYPE_CHECKING:  # imported by check_device(): the parameters read STRATEGIES without torch
    import torch

# accelerate's device_map: a strategy name, or module name -> device (index, "cpu", "cuda:N", "disk").
DeviceMap = Union[str, dict[str, Union[int, str]]]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device(device: torch.device | str | int, field: str = "runtime.device") -> torch.device:
    """A device torch accepts and this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(field, f"{device!r} is not a device ({exc})", "cpu, cuda, cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{device} requested but no CUDA device is visible", "cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(field, f"{device}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif parsed.type != "cpu":
        raise ConfigError(field, f"device type {parsed.type!r} is not supported", "cpu, cuda, cuda:N")
    return parsed


def check_device_map(device_map: DeviceMap | None, field: str = "runtime.device_map") -> DeviceMap | None:
    """An accelerate device map this machine can honour.

    A strategy ("auto", ...) places on whatever accelerators exist, so it is valid anywhere
    (on a CPU-only machine everything lands on the CPU); explicit CUDA placements need CUDA.
    """
    if device_map is None:
        return None
    if isinstance(device_map, str):
        if device_map in STRATEGIES:
            return device_map
        check_device(device_map, field)
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ConfigError(field, f"expected a strategy or a non-empty mapping, got {device_map!r}",
                          ", ".join(STRATEGIES) + ", a device, or {module: device}")
    for module, device in device_map.items():
        if device == "disk":
            continue
        check_device(f"cuda:{device}" if isinstance(device, int) else device, f"{field}.{module}")
    return device_map
