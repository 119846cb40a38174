"""Perplexity on a text, the way the Wanda paper measures it.

Protocol (kept identical to the reference ``eval_ppl``): concatenate the evaluation text,
tokenize it once, cut consecutive non-overlapping windows of ``seqlen`` tokens (a shorter tail
is dropped), and report exp(mean next-token NLL over every predicted token). Each window is
scored on its own: its first token has no context and is never predicted.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..data import load_text, tokenize
from ..errors import ConfigError, EvaluationError
from ..hashing import sha256_tensor
from .perplexity_config import CONTEXT_ATTRS, DEFAULT_SOURCE, PerplexityConfig, source_digest  # noqa: F401 (moved)

log = logging.getLogger(__name__)


class PerplexityResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity: float
    nll: float  # mean NLL per predicted token, in nats
    seqlen: int
    windows: int  # windows evaluated
    windows_available: int  # full windows the text holds
    tokens: int  # tokens fed to the model (windows * seqlen)
    predicted_tokens: int  # tokens whose NLL is averaged (windows * (seqlen - 1))
    text_tokens: int  # tokens in the whole text
    tokens_digest: str  # sha256 of exactly the evaluated tokens: equal digests => comparable numbers
    text_digest: str
    source: str
    batch_size: int
    # Run facts (None in a record that leaves them out: EvaluationResult.without_run_facts)
    wall_s: float | None
    tokens_per_s: float | None  # model throughput over the scored windows (excludes reading/tokenizing)


def model_context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model, seqlen: int) -> None:
    """Fail before any work when windows would not fit the model's context."""
    context = model_context_length(model)
    if context is not None and seqlen > context:
        raise ConfigError(
            "evaluation.seqlen", f"{seqlen} exceeds the model's context of {context} tokens", f"2..{context}"
        )


def window_tokens(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> tuple[torch.Tensor, int]:
    """``(windows x seqlen)`` tensor of the evaluated windows, and how many full windows exist."""
    available = ids.numel() // seqlen
    used = available if max_windows is None else min(available, max_windows)
    return ids[: used * seqlen].reshape(used, seqlen), available


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off while evaluating; the caller's model keeps its own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batch_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL per window of ``batch`` (float64, on CPU)."""
    return _logits_nll(model(batch, use_cache=False).logits, batch)


def _logits_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(logits.device)
    sums = torch.empty(batch.shape[0], dtype=torch.float64)
    # Row by row: the upcast and log-softmax then cost one window of vocabulary-wide activations,
    # not a whole batch of them, on top of the logits the forward produced. Half-precision
    # logits go to float32 (their log-softmax loses digits); float64 stays float64.
    wide = torch.promote_types(logits.dtype, torch.float32)
    for row in range(batch.shape[0]):
        nll = F.cross_entropy(logits[row, :-1].to(wide), batch[row, 1:], reduction="sum")
        sums[row] = nll.double().cpu()
    del logits
    return sums


def _loaded_sums(model, windows: torch.Tensor, batch_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    from ..blocks import _device_of

    device = _device_of(model)
    for start in range(0, windows.shape[0], batch_size):
        stop = min(start + batch_size, windows.shape[0])
        yield start, stop, _batch_nll(model, windows[start:stop].to(device))


def _streamed_sums(source, windows: torch.Tensor, batch_size: int,
                   offload_dir: str | None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The loaded model's numbers, one block in memory: every window's hidden states go through
    block k before block k+1 is loaded; then the layers after the blocks, a batch at a time."""
    from ..blocks import block_inputs, run_block_over, run_tail

    model, count = source.model, len(source.blocks)
    hidden, calls = block_inputs(model, source, windows, batch_size, offload_dir, keep_outside=True)
    try:
        for index in range(count):
            with source.block(index) as block:
                outputs = hidden.sibling()
                run_block_over(block, hidden, calls[index], out=outputs, device=source.run_device)
            hidden.close()
            hidden = outputs
            log.info("perplexity: block %d of %d done", index + 1, count)
        for number, final in enumerate(hidden):
            start = number * batch_size
            stop = min(start + batch_size, windows.shape[0])
            logits = run_tail(model, source.blocks, final.to(source.device), windows[start:stop], calls[-1])
            yield start, stop, _logits_nll(logits, windows[start:stop])
    finally:
        hidden.close()
        source.release_outside()


def evaluate_perplexity(model, tokenizer, config: PerplexityConfig | None = None, *, blocks=None,
                        offload_dir: str | None = None, progress=None) -> PerplexityResult:
    """Perplexity of ``model`` on ``config.source``; raises EvaluationError on a non-finite loss.

    ``blocks``: a ``wanda.block_source.StreamedBlocks`` whose skeleton is ``model`` evaluates
    block by block from the shards (one block in memory; ``offload_dir`` keeps the windows'
    hidden states on disk); the result equals the loaded model's within float rounding.
    ``progress(done, total)`` is called after each batch of windows.
    """
    config = config or PerplexityConfig()
    started = time.perf_counter()
    check_seqlen(model, config.seqlen)
    config.source.check_exists("evaluation.source")

    loaded = load_text(config.source)
    ids = tokenize(tokenizer, loaded.text)
    if ids.numel() < config.seqlen:
        raise ConfigError(
            "evaluation.source",
            f"{loaded.source} has {ids.numel()} tokens, fewer than one window of seqlen={config.seqlen}",
            f"a longer text, or evaluation.seqlen in 2..{ids.numel()}" if ids.numel() >= 2 else "a longer text",
        )
    windows, available = window_tokens(ids, config.seqlen, config.max_windows)
    count = windows.shape[0]
    if config.max_windows is not None and config.max_windows > available:
        log.warning("max_windows=%d but the text holds only %d windows of %d tokens; using %d",
                    config.max_windows, available, config.seqlen, available)

    total = torch.zeros((), dtype=torch.float64)
    forward_s = 0.0
    with torch.inference_mode(), eval_mode(model):
        if blocks is not None and getattr(blocks, "streamed", False):
            sums_of = _streamed_sums(blocks, windows, config.batch_size, offload_dir)
        else:
            sums_of = _loaded_sums(model, windows, config.batch_size)
        tick = time.perf_counter()
        for start, stop, sums in sums_of:
            forward_s += time.perf_counter() - tick
            if not torch.isfinite(sums).all():
                bad = [start + i for i in range(stop - start) if not math.isfinite(float(sums[i]))]
                raise EvaluationError(
                    f"non-finite loss in evaluation windows {bad} (seqlen {config.seqlen}, source {loaded.source}); "
                    "the model produces NaN/inf logits, no perplexity is reported"
                )
            total += sums.sum()
            log.info("perplexity: windows %d/%d", stop, count)
            if progress is not None:
                progress(stop, count)
            tick = time.perf_counter()

    predicted = count * (config.seqlen - 1)
    nll = float(total) / predicted
    perplexity = math.exp(nll) if nll < 709.0 else math.inf  # exp overflows a double past ~709.78
    if not math.isfinite(perplexity):
        raise EvaluationError(f"perplexity overflows (mean NLL {nll:.1f} nats); no perplexity is reported")
    return PerplexityResult(
        perplexity=perplexity,
        nll=nll,
        seqlen=config.seqlen,
        windows=count,
        windows_available=available,
        tokens=count * config.seqlen,
        predicted_tokens=predicted,
        text_tokens=int(ids.numel()),
        tokens_digest=sha256_tensor(windows),
        text_digest=loaded.digest,
        source=loaded.source,
        batch_size=config.batch_size,
        wall_s=time.perf_counter() - started,
        tokens_per_s=(count * config.seqlen) / forward_s if forward_s > 0 else 0.0,
    )
