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
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .activations import ActivationStore

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class BlockCall:
    """What a block receives besides its hidden states."""

    args: tuple
    kwargs: dict[str, Any]
    # What the block returned besides its hidden states (a tuple's tail), so an identity
    # stand-in can return the same structure (see ``run_tail``).
    extra_outputs: tuple | None = field(default=None, repr=False)

    def to(self, device: torch.device | str) -> "BlockCall":
        """The same call with its tensors on ``device`` (a block placed on another device)."""
        return BlockCall(_tensors_to(self.args, device), _tensors_to(self.kwargs, device), self.extra_outputs)


def _tensors_to(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_tensors_to(v, device) for v in value)
    if isinstance(value, list):
        return [_tensors_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _tensors_to(v, device) for k, v in value.items()}
    return value


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _no_cache_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False}


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, sample: torch.Tensor) -> list[BlockCall]:
    """The call arguments of every block, from one sample ``[1, seqlen]``, at the cost of one block.

    Needs the layers before the blocks and block 0 in memory, nothing else: the forward stops
    after the last block's arguments are recorded (so a streamed model needs no ``lm_head``).
    """
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
            else:
                # Identity with the same output structure as a real block.
                template = first_output[0]
                out = (hidden, *template[1:]) if isinstance(template, tuple) else hidden
            if index == len(blocks) - 1:
                raise _StopForward
            return out

        return forward

    try:
        for index, block in enumerate(blocks):
            originals.append(block)
            block.forward = recorder(index, block)
        try:
            model(input_ids=sample.to(_device_of(model)), **_no_cache_kwargs(model))
        except _StopForward:
            pass
    finally:
        for block in originals:
            del block.forward  # restores the class's forward
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        from .errors import UnsupportedArchitectureError

        raise UnsupportedArchitectureError(f"blocks {missing} were not called by the model's forward")
    template = first_output[0]
    extra = tuple(template[1:]) if isinstance(template, tuple) else None
    for call in calls:
        call.extra_outputs = extra
    return calls  # type: ignore[return-value]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
                         out=None) -> list[torch.Tensor]:
    """Hidden states entering block 0 for each calibration batch (embeddings, scaled as the model does);
    appended to ``out`` (an ``ActivationStore``) when given."""
    captured = [] if out is None else out

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


def block_inputs(model, source, tokens: torch.Tensor, batch_size: int, offload_dir: str | None = None,
                 keep_outside: bool = False):
    """``(hidden, calls)``: the hidden states entering block 0 per batch (an ``ActivationStore``)
    and every block's call arguments. Needs the layers before the blocks and block 0, which stays
    loaded for the walk; the layers outside the blocks are released unless ``keep_outside``."""
    from .architecture import find_blocks

    _, blocks = find_blocks(model)
    source.load_outside()
    source.load(0)
    calls = capture_block_calls(model, blocks, tokens[:1])
    hidden = capture_block_inputs(model, blocks, tokens, batch_size,
                                  out=ActivationStore(offload_dir, "cpu" if source.streamed else None))
    if not keep_outside:
        source.release_outside()
    return hidden, calls


def batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start:start + batch_size]


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    out = block(hidden, *call.args, **call.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block_over(block: nn.Module, inputs: Iterable[torch.Tensor], call: BlockCall, out=None,
                   device: torch.device | str | None = None):
    """The block's outputs for every input batch: a list, or appended to ``out`` (an ActivationStore).

    With ``device`` each batch runs there (the block's device) and its output returns to the
    device its input came from, so the activations stay where the store keeps them.
    """
    results = [] if out is None else out
    if device is not None:
        call = call.to(device)
    for hidden in inputs:
        home = hidden.device
        output = run_block(block, hidden if device is None else hidden.to(device), call)
        results.append(output if device is None else output.to(home))
    return results


@torch.no_grad()
def run_tail(model: nn.Module, blocks: nn.ModuleList, hidden: torch.Tensor, input_ids: torch.Tensor,
             call: BlockCall):
    """The model's output (logits) for ``hidden``, the output of the last block.

    The layers after the blocks differ by architecture (final norm, projections, ``lm_head``),
    so the model's own forward runs them: every block is replaced by a stand-in, the first
    returning ``hidden`` and the others passing it on. ``input_ids`` only feed the (cheap)
    embedding lookup the forward does before the blocks.
    """
    def stand_in(index: int):
        def forward(*args, **kwargs):
            current = hidden if index == 0 else _hidden_of(args, kwargs)[0]
            return (current, *call.extra_outputs) if call.extra_outputs is not None else current

        return forward

    try:
        for index, block in enumerate(blocks):
            block.forward = stand_in(index)
        return model(input_ids=input_ids.to(_device_of(model)), **_no_cache_kwargs(model)).logits
    finally:
        for block in blocks:
            del block.forward


def _device_of(model: nn.Module) -> torch.device:
    """Where the token ids go: the input embedding's device (a streamed or dispatched model's
    first parameter may be elsewhere, or not loaded)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
