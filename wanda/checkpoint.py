"""A model's safetensors shards read tensor group by tensor group, and written back in place.

Reading: ``Checkpoint`` knows which file holds each tensor (``model.safetensors.index.json``, or
the one ``model.safetensors``) and its dtype, shape and byte range (from the file headers, read
without touching the data). ``read`` reads each requested tensor's byte range straight into a
tensor of its own (positioned reads through the page cache). A memory map would do the same
work, but every page it touches counts in the process's resident set for as long as it is
mapped: a block read through it costs twice its size at the peak, which is what this module
exists to avoid.

Writing: ``ShardPatcher`` copies an input shard into the output folder the first time one of
its tensors is replaced and then overwrites that tensor's bytes in place. Shapes and dtypes do
not change, so the file keeps the input's header and layout: an output shard is byte-identical
to the input except for the replaced tensors, and untouched shards are plain file copies.
``SafetensorsStreamWriter`` writes a new file whose header is known up front (masks, updated
weights) one tensor at a time.
"""
from __future__ import annotations

import json
import logging
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .errors import ArtifactMismatchError, ConfigError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names <-> torch dtypes (the ones model weights and masks use).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # file name inside the checkpoint folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of the data in the file
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (JSON) and the absolute offset where its data starts."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ArtifactMismatchError(f"{path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ArtifactMismatchError(f"{path}: unreadable safetensors header ({exc})") from exc
    return header, 8 + length


class Checkpoint:
    """The tensors of a safetensors model folder, by name, without loading any of them."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError("model.path", f"model folder not found: {self.folder}")
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise ConfigError("model.path", f"{self.folder} holds neither {INDEX} nor {SINGLE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        missing = [name for name in files if not (self.folder / name).is_file()]
        if missing:
            raise ArtifactMismatchError(
                f"{self.folder}: shard {missing[0]} named by {INDEX} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.files = files
        # model parameter name -> name in the shards, where transformers renames on load
        self.aliases: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for name in files:
            header, start = read_header(self.folder / name)
            self.metadata[name] = header.pop("__metadata__", None) or {}
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                self.tensors[key] = TensorInfo(name, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                               start + begin, start + end)
        if weight_map is not None:
            for key, file in weight_map.items():
                info = self.tensors.get(key)
                if info is None or info.file != file:
                    raise ArtifactMismatchError(f"{self.folder}: {INDEX} places {key!r} in {file}, which does not hold it")

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.tensors

    def info(self, name: str) -> TensorInfo:
        stored = self.aliases.get(name, name)
        if stored not in self.tensors:
            raise ArtifactMismatchError(f"{self.folder}: no tensor {name!r} in the checkpoint's shards")
        return self.tensors[stored]

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        infos = self.tensors.values() if names is None else (self.info(n) for n in names)
        return sum(info.end - info.begin for info in infos)

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors (optionally cast), each file opened once and closed after."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.info(name).file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            with open(self.folder / file, "rb", buffering=0) as handle:
                for key in keys:
                    tensor = self._read_one(handle, key)
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    out[key] = tensor.to(device) if str(device) != "cpu" else tensor
        return out

    def _read_one(self, handle, name: str) -> torch.Tensor:
        info = self.info(name)
        tensor = torch.empty(info.shape, dtype=info.dtype)
        if tensor.numel():
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
            handle.seek(info.begin)
            done = 0
            while done < len(view):  # readinto may return short counts on large reads
                count = handle.readinto(view[done:])
                if not count:
                    raise ArtifactMismatchError(f"{self.folder / info.file}: truncated while reading {name!r}")
                done += count
        return tensor


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


class ShardPatcher:
    """Output shards = input shards with some tensors replaced (same name, shape and dtype)."""

    def __init__(self, source: Checkpoint, out_dir: str | Path):
        self.source = source
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._started: set[str] = set()
        self.replaced: set[str] = set()

    def _start(self, file: str) -> Path:
        target = self.out_dir / file
        if file not in self._started:
            # copyfile uses the kernel's copy (no user-space buffer the size of the shard).
            shutil.copyfile(self.source.folder / file, target)
            self._started.add(file)
            log.debug("shard %s copied for patching", file)
        return target

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        by_file: dict[str, list[str]] = {}
        for name, tensor in tensors.items():
            info = self.source.info(name)
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise ArtifactMismatchError(
                    f"{name}: replacement is {tensor.dtype} {tuple(tensor.shape)}, the shard holds "
                    f"{info.dtype} {info.shape} (in-place shard writing keeps shapes and dtypes)")
            by_file.setdefault(info.file, []).append(name)
        for file, names in by_file.items():
            with open(self._start(file), "r+b") as handle:
                for name in names:
                    handle.seek(self.source.info(name).begin)
                    handle.write(_bytes_of(tensors[name]))
            self.replaced.update(names)

    def finish(self, skip: Iterable[str] = ()) -> None:
        """Copy the shards nothing was written to, and every other file of the folder but ``skip``."""
        skip = set(skip)
        for path in sorted(self.source.folder.iterdir()):
            if path.name in skip or path.name.startswith("."):
                continue
            if path.name in self.source.files:
                self._start(path.name)
            elif path.is_file():
                shutil.copyfile(path, self.out_dir / path.name)


class SafetensorsStreamWriter:
    """A safetensors file whose tensors (names, dtypes, shapes) are declared up front and whose
    data is written one tensor at a time; reads back with ``safe_open`` like any other."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        # One canonical layout (metadata keys and tensors sorted by name), whatever order the
        # caller declares them in: the same tensors give the same bytes in every process and
        # whether they were written from memory or streamed (safetensors' own save_file orders
        # metadata by a per-process random hash seed).
        header: dict = {}
        if metadata:
            header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
        offset = 0
        self._layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        for name, dtype, shape in sorted(entries, key=lambda entry: entry[0]):
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._layout[name] = (offset, offset + size, dtype, tuple(shape))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data start to 8 bytes
        self._data_start = 8 + len(raw)
        self._written: set[str] = set()
        with open(self.path, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)))
            handle.write(raw)
            handle.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._layout:
            raise ArtifactMismatchError(f"{self.path.name}: {name!r} was not declared")
        begin, _, dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ArtifactMismatchError(f"{name}: {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
        with open(self.path, "r+b") as handle:
            handle.seek(self._data_start + begin)
            handle.write(_bytes_of(tensor))
        self._written.add(name)

    def close(self) -> None:
        missing = sorted(set(self._layout) - self._written)
        if missing:
            raise ArtifactMismatchError(f"{self.path.name}: {len(missing)} declared tensors never written, "
                                        f"first {missing[0]!r}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically in the canonical layout of
    ``SafetensorsStreamWriter``: byte-reproducible, unlike ``safetensors.torch.save_file``."""
    from .atomic import atomic_temp_path

    with atomic_temp_path(path) as tmp:
        writer = SafetensorsStreamWriter(tmp, [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()],
                                         metadata)
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.close()
