"""Build the smaller model as a plain instance of the same family from a new config.

Structured pruning changes shapes, so rather than patching every module's cached sizes
(``num_experts``, ``top_k``, ``head_dim``...) we instantiate the model class from the updated
config on the meta device and assign the sliced tensors: whatever the family's code derives from
its config is then derived exactly as ``from_pretrained`` will derive it when the result is
reloaded, and a mismatch between the config and the tensors fails here, by name.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError

log = logging.getLogger(__name__)


def select(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """The kept slices along ``dim``, as a new contiguous tensor on the tensor's own device."""
    return tensor.index_select(dim, index.to(tensor.device)).contiguous()


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def rebuild(model: nn.Module, config, state: dict[str, torch.Tensor],
            zero_fill: tuple[str, ...] = ()) -> nn.Module:
    """A new ``type(model)`` built from ``config`` holding ``state``.

    ``zero_fill``: suffixes of parameters the new config adds (biases switched on for bias
    compensation) that ``state`` may lack; they start at zero so the function is unchanged.
    Non-persistent buffers (rotary frequencies, embedding scales) are computed from the config
    exactly as they would be on reload, then checked against the original model's.
    """
    cls = type(model)
    dtype = next(model.parameters()).dtype
    config = copy.deepcopy(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            new = cls(config)
    finally:
        torch.set_default_dtype(previous)
    expected = new.state_dict()
    state = dict(state)
    for key, meta in expected.items():
        if key in state:
            if tuple(state[key].shape) != tuple(meta.shape):
                raise UnsupportedArchitectureError(
                    f"{config.model_type}: after structured pruning {key} has shape {tuple(state[key].shape)} "
                    f"but the updated config builds {tuple(meta.shape)}: this family derives that size from "
                    "something the config cannot express")
        elif key.endswith(zero_fill) and zero_fill:
            state[key] = torch.zeros(meta.shape, dtype=meta.dtype)
        else:
            raise UnsupportedArchitectureError(f"{config.model_type}: the rebuilt model expects {key}, which the "
                                               "pruned weights do not have")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UnsupportedArchitectureError(f"{config.model_type}: pruned weights {extra[:5]} have no place in the "
                                           "rebuilt model")
    new.load_state_dict(state, strict=True, assign=True)
    new.tie_weights()
    device = next(model.parameters()).device
    old_buffers = dict(model.named_buffers())
    for name, buffer in list(new.named_buffers()):
        if not buffer.is_meta:
            continue
        # Not in the state dict (non-persistent): take the original's value. These depend only
        # on head_dim, the hidden size and positions, which structured pruning keeps.
        if name not in old_buffers or old_buffers[name].shape != buffer.shape:
            raise UnsupportedArchitectureError(f"{config.model_type}: buffer {name} cannot be carried over")
        owner, _, leaf = name.rpartition(".")
        module = new.get_submodule(owner) if owner else new
        persistent = leaf not in getattr(module, "_non_persistent_buffers_set", set())
        module.register_buffer(leaf, old_buffers[name].clone(), persistent=persistent)
    stray = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if stray:
        raise UnsupportedArchitectureError(f"{config.model_type}: rebuilt model left {stray[:5]} uninitialised")
    new.to(device)
    new.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    new.eval()
    return new
