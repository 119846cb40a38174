"""Masks from scores (True = pruned), their bit-packed storage, application and reports."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import save_safetensors
from .errors import ArtifactMismatchError, ConfigError

log = logging.getLogger(__name__)

PERMUTATION_PREFIX = "perm::"


class MaskDict(dict):
    """Masks keyed by module name (True = pruned), plus what a mask alone cannot say.

    A plain ``dict`` to every caller; two optional attributes ride along:

    - ``permutations``: per layer, the input-channel permutation ``perm`` (int64, [in]) of an N:M
      mask computed in permuted order (``ria_permute``). The mask is stored in the layer's own
      column order, so ``apply_masks`` on the unpermuted model gives exactly the pruned function;
      ``mask[:, perm]`` is the N:M-valid mask of ``weight[:, perm]``, and a 2:4 kernel needs
      the permuted weight and the input permuted the same way (``x[..., perm]``).
    - ``metadata``: string-valued facts about how the masks were made (OWL block sparsities,
      SparseGPT fallbacks); ``save_masks`` writes them into the artifact.

    Plain-dict operations (``{**masks}``, ``dict(masks)``) drop both attributes.

    Bool masks are held packed, one bit per weight (``_PackedMask``), and unpacked on access: a
    loaded-mode prune keeps every target's mask until it returns, and at one byte per weight
    that was the largest part of its memory above the reference's (~100 MiB on the embedded
    model). Every accessor returns the bool tensor, so callers see a dict of bool tensors; a
    mask read back is a new tensor each time (edit it, then store it again).
    """

    def __init__(self, *args, permutations: dict[str, torch.Tensor] | None = None,
                 metadata: dict[str, str] | None = None, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)
        self.permutations: dict[str, torch.Tensor] = dict(permutations or {})
        self.metadata: dict[str, str] = dict(metadata or {})

    def __setitem__(self, name, mask) -> None:
        is_bool = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
        super().__setitem__(name, _PackedMask(mask) if is_bool else mask)

    def __getitem__(self, name):
        return _unpacked(super().__getitem__(name))

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __iter__(self):
        # Overriding __iter__ makes dict(masks) and {**masks} go through keys() and __getitem__
        # (CPython copies a dict subclass's storage directly only when it keeps dict's __iter__).
        return super().__iter__()

    def items(self):
        return ((name, self[name]) for name in self)

    def values(self):
        return (self[name] for name in self)

    def update(self, *args, **kwargs) -> None:
        for name, mask in dict(*args, **kwargs).items():
            self[name] = mask

    def setdefault(self, name, default=None):
        if name not in self:
            self[name] = default
        return self[name]

    def pop(self, name, *default):
        return _unpacked(super().pop(name, *default))

    def copy(self) -> "MaskDict":
        return MaskDict(self, permutations=self.permutations, metadata=self.metadata)


class _PackedMask:
    """A bool mask as np.packbits of its flattened values, its shape and device."""

    __slots__ = ("bits", "shape", "device")

    def __init__(self, mask: torch.Tensor):
        self.bits = np.packbits(mask.detach().cpu().numpy().reshape(-1))
        self.shape, self.device = mask.shape, mask.device

    def unpack(self) -> torch.Tensor:
        flat = np.unpackbits(self.bits, count=math.prod(self.shape)).view(bool)
        return torch.from_numpy(flat).reshape(self.shape).to(self.device)


def _unpacked(value):
    return value.unpack() if isinstance(value, _PackedMask) else value


def unstructured_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """In every output row, prune the ``int(in * sparsity)`` lowest scores (ties: lower index first).

    Same result as taking the first k of a stable sort, but by selection (k-th value) rather than
    a full sort, which is about 3x cheaper on CPU.
    """
    out_features, in_features = scores.shape
    k = int(in_features * sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < kth
    at = scores == kth
    # Among entries equal to the k-th value, prune the lowest indices until k are pruned.
    needed = k - below.sum(1, keepdim=True)
    return below | (at & (at.cumsum(1) <= needed))


def unstructured_layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * sparsity)`` lowest scores of the whole layer (magnitude baseline);
    ties to the lower flat index, as a stable sort would, by the k-th value instead of a sort."""
    return unstructured_row_mask(scores.reshape(1, -1), sparsity).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest of every ``m`` consecutive inputs of each row."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ConfigError("pattern", f"input size {in_features} is not divisible by M={m}")
    groups = scores.reshape(out_features, in_features // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return mask.reshape(out_features, in_features)


# Row-wise masks are computed this many scores at a time. kthvalue and sort allocate a copy of
# their input plus int64 indices (five times the float32 scores); for a 7B-sized MLP layer that
# is ~0.9 GB on top of the layer, more than the block itself. Rows are independent, so chunking
# changes nothing in the result.
ROW_CHUNK_ELEMENTS = 1 << 22


def _by_row_chunks(fn, scores: torch.Tensor) -> torch.Tensor:
    rows = max(1, ROW_CHUNK_ELEMENTS // max(1, scores.shape[1]))
    if scores.shape[0] <= rows:
        return fn(scores)
    return torch.cat([fn(scores[start:start + rows]) for start in range(0, scores.shape[0], rows)])


def nm_mask_topk(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The reference's N:M selection, call for call (locuslab/wanda ``prune_wanda``): for each group
    of ``m`` columns, ``torch.topk(group.float(), n, dim=1, largest=False)`` scattered True. Ties
    fall where ``torch.topk`` puts them (device- and kernel-dependent), not to the lower index."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise ConfigError("pattern", f"input size {in_features} is not divisible by M={m}")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for start in range(0, in_features, m):
        group = scores[:, start:start + m].float()
        mask.scatter_(1, start + torch.topk(group, n, dim=1, largest=False)[1], True)
    return mask


def unstructured_row_mask_sort(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's unstructured selection, call for call: the first ``int(in * sparsity)``
    indices of ``torch.sort(scores, dim=-1, stable=True)`` scattered True (the same mask as
    ``unstructured_row_mask``, by a full sort)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    indices = torch.sort(scores, dim=-1, stable=True)[1][:, :int(scores.shape[1] * sparsity)]
    return mask.scatter_(1, indices, True)


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, scope: str = "row",
                     tie_break: str = "stable") -> torch.Tensor:
    """The mask (True = pruned) keeping each comparison group's highest scores.

    ``tie_break`` ``"stable"``: among equal scores the lower input index is pruned first;
    ``"topk"``: the reference's own calls (``nm_mask_topk``, ``unstructured_row_mask_sort``).
    They select what the reference selects only from bit-equal scores: near-equal scores order by
    their float32 rounding, so the Wanda method computes them with the reference's arithmetic
    under ``topk`` (``wanda.methods.wanda.reference_wanda_score``).
    """
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity (non-finite weights or activation statistics)")
    if tie_break not in ("stable", "topk"):
        raise ConfigError("tie_break", f"unknown tie break {tie_break!r}", "stable, topk")
    if scope == "layer" and nm is None:
        return unstructured_layer_mask(scores, sparsity)
    if tie_break == "topk":  # whole layer at once, as the reference calls them
        return nm_mask_topk(scores, *nm) if nm is not None else unstructured_row_mask_sort(scores, sparsity)
    if nm is not None:
        return _by_row_chunks(lambda chunk: nm_mask(chunk, *nm), scores)
    return _by_row_chunks(lambda chunk: unstructured_row_mask(chunk, sparsity), scores)


def is_nm(mask_or_weight: torch.Tensor, n: int, m: int, is_mask: bool = True) -> bool:
    """True when every group of ``m`` consecutive inputs has at least ``n`` pruned (zero) entries."""
    pruned = mask_or_weight if is_mask else mask_or_weight == 0
    out_features, in_features = pruned.shape
    if in_features % m:
        return False
    return bool((pruned.reshape(out_features, -1, m).sum(-1) >= n).all())


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], verify: bool = True) -> None:
    """Zero exactly the masked weights; with ``verify`` check every masked weight is zero after.

    Mask keys are target names (``wanda.targets``): linear and Conv1D module names, and expert
    matrices ``<container>.<param>[<e>]``; each mask is [out, in] in its target's view.
    """
    from .targets import target_of_name

    for name, mask in masks.items():
        try:
            weight = target_of_name(model, name).weight(model)
        except KeyError:
            raise ArtifactMismatchError(f"mask for {name!r}: the model has no such layer") from None
        if tuple(weight.shape) != tuple(mask.shape):
            raise ArtifactMismatchError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}"
            )
        apply_mask(weight.data, mask, name, verify)


@torch.no_grad()
def apply_mask(weight: torch.Tensor, mask: torch.Tensor, name: str, verify: bool = True) -> None:
    """Zero the masked entries of one weight (or [out, in] view) in place."""
    mask = mask.to(weight.device)
    # Multiplying by the keep-mask is several times faster than masked_fill_ on CPU. It leaves
    # -0.0 for negative weights; adding +0.0 turns those into +0.0 (IEEE round-to-nearest) and
    # changes nothing else, so pruned weights are bitwise +0.0 as with masked_fill_.
    weight.mul_(~mask).add_(0.0)
    if verify and weight.ne(0).logical_and_(mask).any():
        raise RuntimeError(f"{name}: masked weights are not all zero after applying the mask")


def layer_sparsity(mask: torch.Tensor) -> float:
    return float(mask.sum()) / mask.numel()


def sparsity_report(masks: dict[str, torch.Tensor], accounting=None) -> dict:
    """Per-layer and overall fraction of pruned weights among the masked layers.

    With ``accounting`` (``wanda.accounting.whole_model_accounting`` of the pruned model) the
    report adds ``block_sparsity`` (zeros among all decoder-block weights), ``coverage`` (the
    fraction of those weights that were targets), ``model_sparsity`` (embeddings and lm_head
    included) and their counts; the other fields are unchanged.
    """
    layers = {name: {"pruned": int(mask.sum()), "total": mask.numel(), "sparsity": round(layer_sparsity(mask), 6)}
              for name, mask in masks.items()}
    pruned = sum(v["pruned"] for v in layers.values())
    total = sum(v["total"] for v in layers.values())
    report = {"overall": round(pruned / total, 6) if total else 0.0, "pruned": pruned, "total": total, "layers": layers}
    if accounting is not None:
        report.update(accounting.report_fields())
    return report


def save_masks(path: str | Path, masks: dict[str, torch.Tensor], metadata: dict | None = None,
               permutations: dict[str, torch.Tensor] | None = None) -> None:
    """One bit per weight: np.packbits of the flattened mask, shapes in the metadata.

    Input-channel permutations (``permutations``, else ``masks.permutations`` of a ``MaskDict``)
    are stored as extra int32 tensors ``perm::<layer>`` listed in the metadata key
    ``permutations``; readers that predate them ignore them.
    """
    tensors = {}
    shapes = {}
    for name, mask in masks.items():
        bits = np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1))
        tensors[name] = torch.from_numpy(bits)
        shapes[name] = list(mask.shape)
    if permutations is None:
        permutations = getattr(masks, "permutations", None) or {}
    for name, perm in permutations.items():
        if name not in masks:
            raise ArtifactMismatchError(f"permutation for {name!r} has no mask")
        if perm.numel() != masks[name].shape[1]:
            raise ArtifactMismatchError(f"permutation for {name!r} has {perm.numel()} entries, mask has "
                                        f"{masks[name].shape[1]} input channels")
        tensors[PERMUTATION_PREFIX + name] = perm.detach().cpu().to(torch.int32).contiguous()
    meta = {k: str(v) for k, v in getattr(masks, "metadata", {}).items()}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    if permutations:
        meta["permutations"] = json.dumps(sorted(permutations))
    meta["shapes"] = json.dumps(shapes, sort_keys=True)
    meta["format"] = "packbits-v1"
    save_safetensors(tensors, path, metadata=meta)


def read_mask(handle, name: str, shape: list[int]) -> torch.Tensor:
    """One layer's mask from an open masks file (``safe_open`` handle), unpacked."""
    bits = handle.get_tensor(name).numpy()
    flat = np.unpackbits(bits, count=math.prod(shape)).astype(bool)
    return torch.from_numpy(flat).reshape(shape)


def mask_shapes(handle) -> dict[str, list[int]]:
    """``layer -> shape`` of every mask in an open masks file, without reading any mask."""
    meta = handle.metadata() or {}
    if "shapes" not in meta:
        raise ArtifactMismatchError("not a masks file (no 'shapes' in its metadata)")
    return json.loads(meta["shapes"])


def load_masks(path: str | Path) -> tuple[MaskDict, dict[str, str]]:
    """Masks (a ``MaskDict``, with ``permutations`` when the artifact has any) and the metadata."""
    masks = MaskDict()
    with safe_open(str(path), "pt") as handle:
        meta = dict(handle.metadata() or {})
        shapes = json.loads(meta.pop("shapes"))
        for name, shape in shapes.items():
            masks[name] = read_mask(handle, name, shape)
        for name in json.loads(meta.pop("permutations", "[]")):
            masks.permutations[name] = handle.get_tensor(PERMUTATION_PREFIX + name).to(torch.int64)
    masks.metadata = {k: v for k, v in meta.items() if k != "format"}
    return masks, meta
