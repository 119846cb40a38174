"""Where the calibration activations between blocks live: in memory, or in files on disk.

A block walk holds the inputs of the current block (``nsamples x seqlen x hidden``) and builds
its outputs. In memory that is two copies of the calibration activations; with ``offload`` each
batch is written to its own file under a temporary folder as soon as it is produced, and read
back (memory-mapped) only while that batch runs through the next block, so memory holds one
batch in and one batch out.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)


class ActivationStore:
    """An append-only sequence of batch tensors; ``offload_dir`` keeps them in files instead of RAM."""

    def __init__(self, offload_dir: str | Path | None = None, device: torch.device | str | None = None):
        self._tensors: list[torch.Tensor] = []
        # Per offloaded batch: its file, shape, dtype and the device it came from.
        self._files: list[tuple[Path, torch.Size, torch.dtype, torch.device]] = []
        self._folder: Path | None = None
        self.device = torch.device(device) if device is not None else None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="activations-", dir=offload_dir))

    @property
    def offloaded(self) -> bool:
        return self._folder is not None

    def sibling(self) -> "ActivationStore":
        """An empty store kept the same way (the next block's outputs)."""
        return ActivationStore(self._folder.parent if self._folder else None, self.device)

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self._folder is None:
            self._tensors.append(tensor if self.device is None else tensor.to(self.device))
            return
        path = self._folder / f"{len(self._files):06d}.bin"
        cpu = tensor.to("cpu").contiguous()
        # Raw bytes, read back with torch.from_file: no pickling, and any dtype (bfloat16 included).
        with open(path, "wb") as handle:
            handle.write(cpu.reshape(-1).view(torch.uint8).numpy().data)
        self._files.append((path, cpu.shape, cpu.dtype, tensor.device))

    def __len__(self) -> int:
        return len(self._files) if self._folder is not None else len(self._tensors)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._folder is None:
            return self._tensors[index]
        path, shape, dtype, home = self._files[index]
        tensor = torch.from_file(str(path), shared=False, size=shape.numel(), dtype=dtype).reshape(shape)
        return tensor.to(self.device if self.device is not None else home)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self)):
            yield self[index]

    def nbytes(self) -> int:
        if self._folder is None:
            return sum(t.numel() * t.element_size() for t in self._tensors)
        return sum(shape.numel() * dtype.itemsize for _, shape, dtype, _ in self._files)

    def close(self) -> None:
        """Drop the activations (and their files)."""
        self._tensors.clear()
        self._files.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self):  # a store dropped without close() still removes its files
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def store_of(tensors: list[torch.Tensor], offload_dir: str | Path | None = None) -> ActivationStore:
    store = ActivationStore(offload_dir)
    for tensor in tensors:
        store.append(tensor)
    return store
