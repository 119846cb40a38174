"""Content digests: the identity of every artifact is the sha256 of its bytes."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a tensor is hashed: file digests need none
    import torch

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path], root: Path | None = None) -> str:
    """One digest over several files: names (relative to ``root``) and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_tensor(tensor: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and raw bytes (contiguous, on CPU)."""
    import torch

    data = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256()
    digest.update(f"{data.dtype}:{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
