"""The perplexity parameters and the evaluation text's digest: a torch-free module, so reading
parameters (and checking whether the text changed) imports no torch."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..data import TextSource, load_text

DEFAULT_SOURCE = TextSource(path="shared:wikitext-2-raw/wiki.test.raw")
# Config attributes under which decoder-only models state their context length.
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class PerplexityConfig(BaseModel):
    """What to evaluate on. ``max_windows=None`` uses every full window (release numbers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: TextSource = DEFAULT_SOURCE
    seqlen: int = Field(2048, ge=2)
    max_windows: int | None = Field(None, ge=1)
    # Windows per forward. Batching pays on accelerators; on a 2-core CPU it measured no faster
    # and costs one window of logits per extra row (docs/benchmarks-eval.md), hence 1.
    batch_size: int = Field(1, ge=1)


def source_digest(config: PerplexityConfig) -> str:
    """Digest of the evaluation text, without a model: part of the dense baseline's cache key."""
    config.source.check_exists("evaluation.source")
    return load_text(config.source).digest
