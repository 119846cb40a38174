"""Calibration sampling: seeded windows of tokens, their digest and a quality report."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .calibration_config import CalibrationConfig  # its home before it moved; still importable from here
from .checkpoint import save_safetensors
from .data import LoadedText, TextSource, load_text, split_documents, tokenize
from .errors import CalibrationError, ConfigError
from .hashing import sha256_tensor

log = logging.getLogger(__name__)

# Below this many distinct tokens in the whole source the text cannot characterize a layer's inputs.
MIN_DISTINCT_TOKENS = 16


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # [nsamples, seqlen] int64
    digest: str  # sha256 of the token tensor
    report: dict = field(default_factory=dict)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        meta = {"digest": self.digest, "report": json.dumps(self.report, sort_keys=True)}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        save_safetensors({"tokens": self.tokens.contiguous()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        tokens = load_file(str(path))["tokens"]
        digest = sha256_tensor(tokens)
        if meta.get("digest") and meta["digest"] != digest:
            from .errors import ArtifactMismatchError

            raise ArtifactMismatchError(f"{path}: tokens hash to {digest}, file records {meta['digest']}")
        return cls(tokens=tokens, digest=digest, report=json.loads(meta.get("report", "{}")))


def check_tokens(ids: torch.Tensor, seqlen: int, source: str) -> None:
    """Enough calibration text for one window of ``seqlen`` tokens, and not near-constant."""
    if ids.numel() == 0:
        raise CalibrationError(f"calibration.source: {source} is empty")
    if ids.numel() < seqlen + 1:
        raise CalibrationError(
            f"calibration.source: too little calibration text in {source}: {ids.numel()} tokens, "
            f"need more than calibration.seqlen={seqlen}"
        )
    distinct = int(torch.unique(ids).numel())
    if distinct < MIN_DISTINCT_TOKENS:
        raise CalibrationError(
            f"calibration.source: {source} is near-constant ({distinct} distinct tokens of {ids.numel()}); "
            f"need at least {MIN_DISTINCT_TOKENS}"
        )


def oversampling_note(ntokens: int, nsamples: int, seqlen: int) -> str | None:
    """A warning when ``nsamples`` windows of ``seqlen`` tokens need more tokens than the text has
    (windows then overlap: the same tokens are counted several times); None otherwise."""
    needed = nsamples * seqlen
    if ntokens >= needed:
        return None
    return (f"calibration text has {ntokens} tokens, fewer than calibration.nsamples x calibration.seqlen = "
            f"{nsamples} x {seqlen} = {needed}: windows overlap (oversampling ratio {needed / max(ntokens, 1):.2f}x); use a longer text or fewer/shorter windows")


def sample_wikitext(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """The reference's WikiText sampler, exactly: ``random.seed(seed)`` then one randint per sample."""
    random.seed(seed)
    starts = [random.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts]), starts


def sample_c4(documents: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, list]:
    """The reference's C4 sampler: a random document longer than ``seqlen``, a random window in it."""
    lengths: dict[int, torch.Tensor] = {}

    def encoded(index: int) -> torch.Tensor:
        if index not in lengths:
            lengths[index] = tokenize(tokenizer, documents[index])
        return lengths[index]

    random.seed(seed)
    windows, origins = [], []
    # Bounded retries instead of the reference's unbounded loop: a source without long documents
    # must fail, not spin.
    max_draws = max(1000, 50 * nsamples)
    draws = 0
    for _ in range(nsamples):
        while True:
            draws += 1
            if draws > max_draws:
                raise CalibrationError(
                    f"calibration.source: no document longer than calibration.seqlen={seqlen} tokens found "
                    f"after {max_draws} random draws over {len(documents)} documents"
                )
            doc = random.randint(0, len(documents) - 1)
            ids = encoded(doc)
            if ids.numel() > seqlen:
                break
        start = random.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
        origins.append((doc, start))
    return torch.stack(windows), origins


def quality_report(tokens: torch.Tensor, ntokens_source: int, starts: list) -> dict:
    """Small, cheap indicators of a poor calibration set."""
    flat = tokens.reshape(-1)
    distinct_rows = {tuple(row.tolist()) for row in tokens}
    return {
        "nsamples": int(tokens.shape[0]),
        "seqlen": int(tokens.shape[1]),
        "tokens": int(flat.numel()),
        "distinct_token_ratio": round(float(torch.unique(flat).numel()) / flat.numel(), 6),
        "source_tokens": int(ntokens_source),
        "fraction_of_source_used": round(min(1.0, tokens.numel() / max(ntokens_source, 1)), 6),
        "repeated_windows": int(tokens.shape[0] - len(distinct_rows)),
        "distinct_starts": len(set(starts)),
    }


def sample_calibration(
    tokenizer, config: CalibrationConfig, max_context: int | None = None, loaded: LoadedText | None = None
) -> CalibrationSet:
    """Draw ``nsamples`` windows of ``seqlen`` tokens. Fails before any model work on bad input."""
    if max_context is not None and config.seqlen > max_context:
        raise ConfigError(
            "calibration.seqlen", f"{config.seqlen} exceeds the model's context of {max_context} tokens",
            f"2..{max_context}",
        )
    loaded = loaded or load_text(config.source)
    if config.sampler == "wikitext":
        ids = tokenize(tokenizer, loaded.text)
        check_tokens(ids, config.seqlen, loaded.source)
        note = oversampling_note(ids.numel(), config.nsamples, config.seqlen)
        if note:
            log.warning("%s: %s", loaded.source, note)
        tokens, starts = sample_wikitext(ids, config.nsamples, config.seqlen, config.seed)
        ntokens = ids.numel()
    else:
        documents = split_documents(loaded)
        if not documents:
            raise CalibrationError(f"calibration.source: {loaded.source} has no documents")
        tokens, starts = sample_c4(documents, tokenizer, config.nsamples, config.seqlen, config.seed)
        # The C4 sampler never tokenizes the whole corpus; its size is measured in documents.
        ntokens = sum(tokenize(tokenizer, documents[d]).numel() for d in {doc for doc, _ in starts})
    report = quality_report(tokens, ntokens, starts)
    report["source"] = loaded.source
    report["sampler"] = config.sampler
    report["source_digest"] = loaded.digest
    if report["repeated_windows"]:
        log.warning("calibration: %d of %d windows are repeats (source too small for nsamples*seqlen?)",
                    report["repeated_windows"], config.nsamples)
    if report["distinct_token_ratio"] < 0.01:
        log.warning("calibration: only %.2f%% distinct tokens", 100 * report["distinct_token_ratio"])
    log.info("calibration: %d x %d tokens from %s (digest %s)", config.nsamples, config.seqlen,
             loaded.source, sha256_tensor(tokens)[:12])
    return CalibrationSet(tokens=tokens, digest=sha256_tensor(tokens), report=report)
