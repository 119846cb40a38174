"""Pruning models larger than memory: the block walk over safetensors shards, written back shard by shard.

``prune_checkpoint`` is the whole job in one call: a skeleton of the model on ``meta``, each
decoder block materialized from the memory-mapped shards when the walk reaches it, pruned (any
method and mode ``wanda.prune_model`` runs), its target weights written into the output shards
in place, and released. Memory holds one block, the calibration activations of one block
boundary (or, with ``offload_activations``, one batch of them; the rest on disk), and one
block's masks while they are packed to disk. The output keeps the input's sharding and index;
shards without targets are file copies.

The pipeline splits the same work over stages: statistics (``collect_statistics`` with a
streamed source), masks (``prune_model`` or ``masks_from_statistics`` into a ``MaskSpool``,
SparseGPT's updated weights through ``BlockWeightsWriter``) and the pruned model
(``apply_masks_to_checkpoint``: masks applied tensor by tensor, no model at all).

Checkpoints that store one tensor per expert (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3) are read
merged into the model's fused experts parameters and written split back under their own names,
both by transformers' own conversions (``wanda.conversion``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from .architecture import BlockLayout, discover
from .atomic import atomic_dir, atomic_temp_path
from .block_source import StreamedBlocks, open_streamed
from .checkpoint import Checkpoint, SafetensorsStreamWriter, ShardPatcher
from .config import PruneConfig
from .conversion import ShardConversion
from .errors import ArtifactMismatchError
from .masks import PERMUTATION_PREFIX, MaskDict, mask_shapes, read_mask, save_masks
from .prune import Progress, prune_model
from .statistics import ActivationStatistics

log = logging.getLogger(__name__)

RECORD = "wanda_model.json"


class MaskSpool:
    """The walk's ``masks_out`` for models larger than memory: each block's masks are packed to
    one bit per weight in a file as they arrive; ``save`` joins them into the masks artifact
    (the format of ``wanda.masks.save_masks``), ``report`` gives ``sparsity_report``'s numbers.
    """

    def __init__(self, folder: str | Path | None = None):
        Path(folder).mkdir(parents=True, exist_ok=True) if folder is not None else None
        self.folder = Path(tempfile.mkdtemp(prefix="masks-", dir=folder))
        self.permutations: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        self.shapes: dict[str, list[int]] = {}
        self.pruned: dict[str, int] = {}
        self._file_of: dict[str, Path] = {}

    def update(self, block_masks: dict[str, torch.Tensor]) -> None:
        if not block_masks:
            return
        path = self.folder / f"{len(set(self._file_of.values())):06d}.safetensors"
        save_masks(path, block_masks, permutations={})
        for name, mask in block_masks.items():
            self.shapes[name] = list(mask.shape)
            self.pruned[name] = int(mask.sum())
            self._file_of[name] = path

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file_of[name]), "pt") as handle:
            return read_mask(handle, name, self.shapes[name])

    def to_dict(self) -> MaskDict:
        """Every mask unpacked in memory (small models, tests)."""
        return MaskDict({name: self[name] for name in self}, permutations=self.permutations, metadata=self.metadata)

    def report(self) -> dict:
        layers = {}
        for name, shape in self.shapes.items():
            total = math.prod(shape)
            layers[name] = {"pruned": self.pruned[name], "total": total,
                            "sparsity": round(self.pruned[name] / total, 6)}
        pruned = sum(v["pruned"] for v in layers.values())
        total = sum(v["total"] for v in layers.values())
        return {"overall": round(pruned / total, 6) if total else 0.0, "pruned": pruned, "total": total, "layers": layers}

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """The masks artifact, written tensor by tensor (never all masks in memory)."""
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        if self.permutations:
            meta["permutations"] = json.dumps(sorted(self.permutations))
        meta["shapes"] = json.dumps(self.shapes, sort_keys=True)
        meta["format"] = "packbits-v1"
        entries = [(name, torch.uint8, ((math.prod(shape) + 7) // 8,)) for name, shape in self.shapes.items()]
        entries += [(PERMUTATION_PREFIX + name, torch.int32, (perm.numel(),)) for name, perm in self.permutations.items()]
        with atomic_temp_path(path) as tmp:
            writer = SafetensorsStreamWriter(tmp, entries, meta)
            for file in dict.fromkeys(self._file_of.values()):
                with safe_open(str(file), "pt") as handle:
                    for name in handle.keys():
                        writer.write(name, handle.get_tensor(name))
            for name, perm in self.permutations.items():
                writer.write(PERMUTATION_PREFIX + name, perm.to(torch.int32).contiguous())
            writer.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _target_weights(layout: BlockLayout, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's target parameters by state-dict key: linear/Conv1D weights and the fused
    parameters of its experts containers (whose experts are targets as slices)."""
    from .experts import expert_containers, expert_param_names

    prefix = layout.block_name(index) + "."
    tensors = {f"{prefix}{rel}.weight": block.get_submodule(rel).weight.detach() for rel in layout.targets[index]}
    for rel, container in expert_containers(block):
        for param in expert_param_names(container):
            tensors[f"{prefix}{rel}.{param}"] = getattr(container, param).detach()
    return tensors


class ShardBlockWriter:
    """``on_done`` of a streamed walk: each finished block's target weights into the output shards
    under the shards' own names (fused expert parameters split back into the per-expert tensors
    they were merged from), cast back to the shards' dtype when the walk ran in another one."""

    def __init__(self, patcher: ShardPatcher, layout: BlockLayout, conversion: ShardConversion):
        self.patcher, self.layout, self.conversion = patcher, layout, conversion

    def __call__(self, index: int, block: nn.Module) -> None:
        tensors = _target_weights(self.layout, index, block)
        prefix = self.layout.block_name(index) + "."
        for name in list(tensors):  # a converted group is split back whole
            group = self.conversion.group_of.get(name)
            for member in group.targets if group is not None else ():
                if member not in tensors:
                    tensors[member] = block.get_parameter(member[len(prefix):]).detach()
        self.patcher.write(self.conversion.to_shards(tensors, self.patcher.source))


class BlockWeightsWriter:
    """``on_done`` of a streamed walk: each finished block's target weights into one new file
    (SparseGPT's updated weights, the masks stage's ``weights.safetensors``)."""

    def __init__(self, path: str | Path, source: StreamedBlocks, layout: BlockLayout, metadata: dict | None = None):
        self.layout = layout
        # In the order the blocks write them (``_target_weights``).
        names = [name for index, block in enumerate(source.blocks) for name in _target_weights(layout, index, block)]
        entries = [(name, source.dtype, source.shape_of(name)) for name in names]
        self.writer = SafetensorsStreamWriter(path, entries, metadata)

    def __call__(self, index: int, block: nn.Module) -> None:
        for name, tensor in _target_weights(self.layout, index, block).items():
            self.writer.write(name, tensor.to("cpu").contiguous())

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def _work_dir(work_dir: str | Path | None) -> Iterator[Path]:
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="wanda-stream-", dir=work_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prune_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    calib_ids: torch.Tensor | None,
    config: PruneConfig,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    offload_activations: bool = False,
    work_dir: str | Path | None = None,
    masks_path: str | Path | None = None,
    statistics_out: ActivationStatistics | None = None,
    progress: Progress | None = None,
) -> dict:
    """Prune the safetensors model in ``model_dir`` into ``out_dir`` without loading it whole.

    Same masks and pruned weights as ``prune_model`` on the fully loaded model (every method and
    mode). ``out_dir`` is written atomically: the input's files with the target tensors replaced
    in their shards (the index and sharding are kept; ``wanda_model.json`` is not copied, the
    caller describes the new model). ``work_dir`` holds the spooled masks and, with
    ``offload_activations``, the activations between blocks. Returns ``MaskSpool.report()``,
    and writes the masks artifact to ``masks_path`` when given.
    """
    config = PruneConfig.model_validate(config)
    source = open_streamed(model_dir, dtype, device)
    source.conversion.check_writable()
    layout = discover(source.model, config.targets, config.ignore)
    with _work_dir(work_dir) as work, atomic_dir(out_dir) as out:
        spool = MaskSpool(work)
        patcher = ShardPatcher(source.checkpoint, out)
        source.on_done = ShardBlockWriter(patcher, layout, source.conversion)
        prune_model(source.model, calib_ids, config, statistics_out, progress, blocks=source, masks_out=spool,
                    offload_dir=str(work) if offload_activations else None)
        source.on_done = None
        patcher.finish(skip=(RECORD,))
        if masks_path is not None:
            spool.save(masks_path)
        return spool.report()


def apply_masks_to_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    masks_path: str | Path,
    weights_path: str | Path | None = None,
) -> dict:
    """The pruned model from base shards + a masks artifact (+ updated weights), tensor by tensor.

    Every masked parameter is read from the base shards (or from ``weights_path`` when the method
    updated it), masked exactly as ``wanda.masks.apply_masks`` does, checked, and written in
    place into a copy of its shard. A fused experts parameter whose checkpoint stores one tensor
    per expert (Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3) is merged from them as transformers loads
    it and split back into them by transformers' reverse conversion, so the output keeps the
    checkpoint's own names. Nothing is loaded as a model; memory holds one parameter and its
    masks (a fused experts parameter about twice over while it is merged or split). ``out_dir``
    must not exist yet or is replaced atomically by the caller. Returns ``{"zeros": ..., "total": ...}``
    counted on the written target weights.
    """
    from .block_source import build_skeleton
    from .masks import apply_mask
    from .targets import target_of_name

    checkpoint = Checkpoint(model_dir)
    out_dir = Path(out_dir)
    zeros = total = 0
    with contextlib.ExitStack() as stack:
        masks = stack.enter_context(safe_open(str(masks_path), "pt"))
        shapes = mask_shapes(masks)
        updated = stack.enter_context(safe_open(str(weights_path), "pt")) if weights_path else None
        updated_names = set(updated.keys()) if updated is not None else set()
        # Mask keys are target names; which stored tensor each masks, and through which view
        # (Conv1D: the transpose; an expert: one slice of a fused parameter), comes from the
        # config's model built on the meta device (no weights read), and which shard tensors
        # make that parameter from transformers' conversion mapping.
        skeleton = build_skeleton(model_dir, torch.float32)
        conversion = ShardConversion.plan(skeleton, checkpoint)
        checkpoint.aliases.update(conversion.aliases)
        targets = {}
        for name in shapes:
            try:
                targets[name] = target_of_name(skeleton, name)
            except KeyError:
                raise ArtifactMismatchError(f"mask for {name!r}: the model has no such layer") from None
        by_key: dict[str, list[str]] = {}
        for name, target in targets.items():
            by_key.setdefault(target.numel_key, []).append(name)
        # Every check before the first byte is written.
        for name, shape in shapes.items():
            key = targets[name].numel_key
            if key not in checkpoint and not conversion.is_converted(key):
                raise ArtifactMismatchError(
                    f"mask for {name!r}: the shards hold no tensor {key!r} and none that transformers converts "
                    "into it when loading")
            stored = conversion.shape(key, checkpoint)
            view_shape = tuple(targets[name].weight(skeleton).shape)
            if list(stored) != list(targets[name].parameter(skeleton).shape) or list(view_shape) != list(shape):
                raise ArtifactMismatchError(f"mask for {name!r} has shape {tuple(shape)}, weight has {stored}")
        if any(conversion.is_converted(key) for key in by_key):
            conversion.check_writable()
        unknown = sorted(n for n in updated_names if n not in by_key)
        if unknown:
            raise ArtifactMismatchError(f"updated weights name layers without masks, first {unknown[0]!r}")
        # A unit is read, masked and written together: one stored tensor, or a converted group
        # (all the parameters its shard tensors make), filed under the shard of its first tensor.
        units: dict[str, list[str]] = {}
        for key in by_key:
            group = conversion.group_of.get(key)
            units.setdefault(group.first if group is not None else key, []).append(key)
        by_file: dict[str, list[str]] = {}
        for unit in units:
            group = conversion.groups.get(unit)
            first = group.shard_keys[0] if group is not None else unit
            by_file.setdefault(checkpoint.info(first).file, []).append(unit)
        patcher = ShardPatcher(checkpoint, out_dir)
        for file in checkpoint.files:
            for unit in by_file.get(file, []):
                group = conversion.groups.get(unit)
                params = conversion.read(group, checkpoint) if group is not None else checkpoint.read([unit])
                for key in units[unit]:
                    if key in updated_names:
                        params[key] = updated.get_tensor(key).to(params[key].dtype)
                    for name in by_key[key]:
                        # The stored tensor in the place of the skeleton's parameter gives the view.
                        weight = targets[name].view_of(skeleton, params[key])
                        apply_mask(weight, read_mask(masks, name, shapes[name]), name)
                        zeros += int((weight == 0).sum())
                        total += weight.numel()
                patcher.write(conversion.to_shards(params, checkpoint))
                del params
            log.info("shard %s written", file)
        patcher.finish(skip=(RECORD,))
    return {"zeros": zeros, "total": total}


def convert_shards(folder: str | Path, dtype: torch.dtype) -> None:
    """Cast every floating-point tensor of a model folder to ``dtype``, one shard in memory at a time.

    The layout changes, so each shard is rewritten whole (atomically) and the index and
    ``config.json`` are updated.
    """
    from safetensors.torch import load_file, save_file

    from .checkpoint import INDEX

    folder = Path(folder)
    checkpoint = Checkpoint(folder)
    total = 0
    for file in checkpoint.files:
        tensors = load_file(str(folder / file))
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        with atomic_temp_path(folder / file) as tmp:
            save_file(tensors, str(tmp), metadata=checkpoint.metadata[file] or {"format": "pt"})
        del tensors
    index = folder / INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        name = str(dtype).replace("torch.", "")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
