"""Stage ``materialize``: the base model, from any source, as a fingerprinted safetensors folder.

Output: ``model/`` (weights, config, tokenizer, ``wanda_model.json``). Every later stage names
the base model by the fingerprint recorded here, so artifacts made for another base model are
refused downstream.
"""
from __future__ import annotations

from pathlib import Path

from wanda.hashing import sha256_file

from .common import StageContext, StageResult, stage_entry

NAME = "materialize"


def source_digest(source: str) -> str | None:
    """sha256 of the bytes behind a local source (GGUF file or model folder); None for the hub.

    ``status`` compares it with the recorded one: DVC sees the parameter ``model.source`` (a
    name), not the bytes behind it.
    """
    from wanda.model_io import fingerprint, resolve_source

    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        return sha256_file(Path(resolved.location) / resolved.gguf_file)
    if resolved.kind == "dir":
        return fingerprint(resolved.location)
    return None


def _body(ctx: StageContext) -> StageResult:
    from wanda.model_io import materialize

    section = ctx.params.model
    digest = source_digest(section.source)
    record = materialize(section.source, ctx.work / "model", dtype=section.dtype)
    config = (ctx.work / "model" / "config.json").read_text()
    import json

    hf = json.loads(config)
    summary = {
        "fingerprint": record.fingerprint,
        "source": section.source,
        "source_digest": digest,
        "model_type": record.model_type,
        "dtype": record.dtype,
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "hidden_size": hf.get("hidden_size"),
        "max_position_embeddings": hf.get("max_position_embeddings"),
    }
    return StageResult(summary=summary, lineage={"base_model_fingerprint": record.fingerprint})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
