"""Running a model one decoder block at a time.

The reference implementation broke when transformers moved rotary embeddings and masks out of
the blocks: a block now needs the exact keyword arguments the model computes for it
(attention mask, position ids, ``position_embeddings``, cache position, per-layer mask types).
We capture them by running one sample through the model with every block but the first
replaced by an identity that records its arguments, then reuse them (broadcast over the batch)
for every calibration batch. Block inputs are captured by stopping the forward at block 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class BlockCall:
    """What a block receives besides its hidden states."""

    args: tuple
    kwargs: dict[str, Any]


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _no_cache_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False}


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, sample: torch.Tensor) -> list[BlockCall]:
    """The call arguments of every block, from one sample ``[1, seqlen]``, at the cost of one block."""
    calls: list[BlockCall | None] = [None] * len(blocks)
    first_output: list[Any] = []
    originals = []

    def recorder(index: int, block: nn.Module):
        original = block.forward

        def forward(*args, **kwargs):
            hidden, rest, kw = _hidden_of(args, kwargs)
            calls[index] = BlockCall(rest, kw)
            if index == 0:
                out = original(*args, **kwargs)
                first_output.append(out)
                return out
            # Identity with the same output structure as a real block.
            template = first_output[0]
            return (hidden, *template[1:]) if isinstance(template, tuple) else hidden

        return forward

    try:
        for index, block in enumerate(blocks):
            originals.append(block)
            block.forward = recorder(index, block)
        model(input_ids=sample.to(_device_of(model)), **_no_cache_kwargs(model))
    finally:
        for block in originals:
            del block.forward  # restores the class's forward
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        from .errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(f"blocks {missing} were not called by the model's forward")
    return calls  # type: ignore[return-value]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Hidden states entering block 0 for each calibration batch (embeddings, scaled as the model does)."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden, _, _ = _hidden_of(args, kwargs)
        captured.append(hidden.detach())
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches(tokens, batch_size):
            try:
                model(input_ids=batch.to(_device_of(model)), **_no_cache_kwargs(model))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start:start + batch_size]


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block_over(block: nn.Module, inputs: list[torch.Tensor], call: BlockCall) -> list[torch.Tensor]:
    return [run_block(block, hidden, call) for hidden in inputs]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
