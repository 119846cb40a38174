"""Text sources for calibration and evaluation, and the one tokenization both use.

A source is a local text file, a JSON/JSONL/parquet file with a text field, a `datasets`
source (when online), or text that ships with Python itself (``pydoc_data`` topics), so the
embedded default runs on a machine with nothing but this repository.
"""
from __future__ import annotations

import json
import logging
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import ConfigError
from .hashing import sha256_text

if TYPE_CHECKING:  # imported by tokenize(): the text sources (parameters) need no torch
    import torch

log = logging.getLogger(__name__)

SHARED_PREFIX = "shared:"
REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The offline data folder: ``$WANDA_SHARED_DATA``, else ``../shared/data`` beside the repo."""
    env = os.environ.get("WANDA_SHARED_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve ``shared:relative/path`` against the shared data folder; other paths as given."""
    text = str(path)
    if text.startswith(SHARED_PREFIX):
        return shared_data_dir() / text[len(SHARED_PREFIX):]
    return Path(text).expanduser()


class TextSource(BaseModel):
    """Where text comes from. Exactly one of ``path``, ``dataset`` or ``builtin``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    text_field: str = "text"
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "validation"
    builtin: Literal["pydoc_topics"] | None = None
    # For the builtin source: which disjoint half to take.
    part: Literal["calibration", "evaluation"] = "calibration"

    @model_validator(mode="after")
    def _one_kind(self) -> "TextSource":
        kinds = [k for k in ("path", "dataset", "builtin") if getattr(self, k)]
        if len(kinds) != 1:
            raise ConfigError(
                "source", f"give exactly one of path, dataset, builtin (got {kinds or 'none'})",
                "path: FILE | dataset: NAME | builtin: pydoc_topics",
            )
        return self

    def describe(self) -> str:
        if self.path:
            return str(resolve_path(self.path))
        if self.dataset:
            return f"datasets:{self.dataset}/{self.dataset_config or ''}:{self.split}"
        return f"builtin:{self.builtin}:{self.part}"

    def check_exists(self, field: str = "source") -> None:
        """Fail before heavy work when a local file is missing."""
        if self.path:
            resolved = resolve_path(self.path)
            if not resolved.is_file():
                hint = ""
                if str(self.path).startswith(SHARED_PREFIX):
                    hint = f" (shared data folder: {shared_data_dir()}, set WANDA_SHARED_DATA)"
                raise ConfigError(f"{field}.path", f"file not found: {resolved}{hint}")


class LoadedText(BaseModel):
    """Documents of a source; ``text`` is their concatenation as the protocol defines it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    source: str
    documents: list[str]
    joiner: str

    @cached_property
    def text(self) -> str:
        return self.joiner.join(self.documents)

    @cached_property
    def digest(self) -> str:
        return sha256_text(self.text)


TEXT_FILE = "a UTF-8 text file, or a .json/.jsonl/.parquet file of records with a text field"


def _decode(path: Path, field: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{field}.path", f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start} of {len(data)})", TEXT_FILE) from None


def _read_plain(path: Path, field: str = "source") -> list[str]:
    # Protocol of the shared data: UTF-8, every '\r' dropped. The whole file is one text;
    # documents (for document samplers) are its blank-line separated paragraphs.
    raw = _decode(path, field).replace("\r", "")
    return [raw]


def check_text_file(source: TextSource, field: str) -> None:
    """Fail before any work on a local text file that cannot serve: missing, not UTF-8, or
    without a word of text (``field`` names the parameter, e.g. ``calibration.source``)."""
    if not source.path:
        return
    source.check_exists(field)
    path = resolve_path(source.path)
    if path.suffix.lower() in {".json", ".jsonl", ".parquet"}:
        return  # records: their own reader names a missing field
    if not _decode(path, field).strip():
        raise ConfigError(f"{field}.path", f"{path} holds no text ({path.stat().st_size} bytes)", TEXT_FILE)


def _read_records(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise ConfigError("text_field", f"column {field!r} not in {path}", ", ".join(table.column_names))
        return [str(v) for v in table.column(field).to_pylist() if v is not None]
    records: list[dict] = []
    with open(path, encoding="utf-8") as handle:
        if suffix == ".jsonl":
            records = [json.loads(line) for line in handle if line.strip()]
        else:
            loaded = json.load(handle)
            records = loaded if isinstance(loaded, list) else loaded.get("data", [])
    if records and field not in records[0]:
        raise ConfigError("text_field", f"field {field!r} not in records of {path}", ", ".join(records[0]))
    return [str(r[field]) for r in records if r.get(field) is not None]


def _pydoc_topics(part: str) -> list[str]:
    from pydoc_data.topics import topics

    # Disjoint halves, so calibration and evaluation never share text. Several topic names are
    # aliases of one text: deduplicate by content first, in a stable (name-sorted) order.
    unique = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    wanted = 0 if part == "calibration" else 1
    return [text for index, text in enumerate(unique) if index % 2 == wanted]


def load_text(source: TextSource, field: str = "source") -> LoadedText:
    """Read a source into documents. Local files and builtin text need no network. Errors name
    ``field`` (the parameter that holds ``source``)."""
    if source.path:
        source.check_exists(field)
        path = resolve_path(source.path)
        if path.suffix.lower() in {".json", ".jsonl", ".parquet"}:
            return LoadedText(source=str(path), documents=_read_records(path, source.text_field), joiner="\n\n")
        return LoadedText(source=str(path), documents=_read_plain(path, field), joiner="")
    if source.builtin:
        return LoadedText(source=source.describe(), documents=_pydoc_topics(source.part), joiner="\n\n")
    import datasets

    log.info("loading %s through datasets", source.describe())
    data = datasets.load_dataset(source.dataset, source.dataset_config, split=source.split)
    return LoadedText(
        source=source.describe(), documents=[t for t in data[source.text_field] if t is not None], joiner="\n\n"
    )


def split_documents(loaded: LoadedText) -> list[str]:
    """Documents for document-level samplers: records as they are, plain text by blank lines."""
    if loaded.joiner:
        return loaded.documents
    return [p for p in loaded.text.split("\n\n") if p.strip()]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, as the reference does; returns a 1-D int64 tensor."""
    import torch

    # The length warning is about feeding the model, which we never do with this tensor whole.
    previous = getattr(tokenizer, "model_max_length", None)
    try:
        if previous is not None:
            tokenizer.model_max_length = int(1e30)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        if previous is not None:
            tokenizer.model_max_length = previous
    return ids.to(torch.int64)
