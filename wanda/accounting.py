"""Whole-model accounting: how sparse the decoder (and the whole model) is, not just the masks.

A report over the masked layers alone says 0.5 for a Mixtral whose experts were never touched.
These figures count every >=2-D weight instead:

- ``block_sparsity``: zeros among all >=2-D weights of the decoder blocks (attention, MLPs,
  experts, shared experts, routers);
- ``coverage``: the fraction of those block weight elements that are pruning targets;
- ``model_sparsity``: zeros among all >=2-D weights of the model, embeddings and ``lm_head``
  included (tied weights counted once).

Fused expert biases (``gate_up_proj_bias [E, out]``) are per-expert 1-D biases stacked, not
weights, and are left out like every other bias.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .targets import Target

log = logging.getLogger(__name__)

DEFAULT_MIN_COVERAGE = 0.95
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.")


@dataclass(frozen=True)
class Accounting:
    blocks_path: str
    block_zeros: int
    block_total: int
    target_total: int
    model_zeros: int
    model_total: int
    # Untargeted block weight elements per block-independent name ("model.layers.*.mlp.gate.weight").
    untargeted: dict[str, int] = field(default_factory=dict)

    @property
    def block_sparsity(self) -> float:
        return self.block_zeros / self.block_total if self.block_total else 0.0

    @property
    def coverage(self) -> float:
        return self.target_total / self.block_total if self.block_total else 0.0

    @property
    def model_sparsity(self) -> float:
        return self.model_zeros / self.model_total if self.model_total else 0.0

    def report_fields(self) -> dict:
        """The fields ``sparsity_report(..., accounting=)`` adds."""
        return {
            "block_sparsity": round(self.block_sparsity, 6),
            "coverage": round(self.coverage, 6),
            "model_sparsity": round(self.model_sparsity, 6),
            "block_zeros": self.block_zeros, "block_total": self.block_total, "target_total": self.target_total,
            "model_zeros": self.model_zeros, "model_total": self.model_total,
        }


def _is_weight(name: str, shape) -> bool:
    return len(shape) >= 2 and not name.endswith(("bias", "_bias"))


def _named_tensors(source, read: bool = True) -> Iterator[tuple[str, torch.Tensor | None, tuple[int, ...]]]:
    """``(name, tensor or None, shape)`` of every stored tensor, tied ones once. Tensors of a
    safetensors folder are read one at a time (None when only shapes are needed)."""
    if isinstance(source, nn.Module):
        for name, param in source.named_parameters():  # named_parameters() already drops tied duplicates
            yield name, param.detach(), tuple(param.shape)
        return
    if isinstance(source, Mapping):
        seen = set()
        for name, tensor in source.items():
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.device.type != "meta" else name
            if key in seen:
                continue
            seen.add(key)
            yield name, tensor, tuple(tensor.shape)
        return
    from safetensors import safe_open

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source}: no *.safetensors files to account for")
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                yield name, (handle.get_tensor(name) if read and _is_weight(name, shape) else None), shape


def _blocks_path(source, targets: list) -> str:
    for target in targets:
        name = target.module_name if isinstance(target, Target) else str(target)
        match = _BLOCK.match(name)
        if match:
            return match.group(1)
    if isinstance(source, nn.Module):
        from .architecture import find_blocks

        return find_blocks(source)[0]
    raise ValueError("blocks_path is needed when no target names a decoder block")


def _target_sizes(targets, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Elements targeted per stored parameter name."""
    sizes: dict[str, int] = {}
    if isinstance(targets, Mapping):  # masks (name -> mask) or name -> element count
        items = [(name, value if isinstance(value, int) else int(value.numel())) for name, value in targets.items()]
        for name, numel in items:
            key = _param_key_of_mask(name, shapes)
            sizes[key] = sizes.get(key, 0) + numel
        return sizes
    for target in targets:
        shape = shapes.get(target.numel_key)
        if shape is None:
            raise KeyError(f"target {target.name!r}: no parameter {target.numel_key!r} in the model")
        numel = 1
        for dim in (shape[1:] if target.kind == "expert" else shape):
            numel *= dim
        sizes[target.numel_key] = sizes.get(target.numel_key, 0) + numel
    return sizes


def _param_key_of_mask(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``layer`` -> ``layer.weight``; ``container.param[e]`` -> ``container.param``."""
    if name.endswith("]") and "[" in name and name[: name.rindex("[")] in shapes:
        return name[: name.rindex("[")]
    if f"{name}.weight" in shapes:
        return f"{name}.weight"
    if name in shapes:
        return name
    raise KeyError(f"mask {name!r}: the model has no weight {name}.weight")


def whole_model_accounting(source, targets: Iterable[Target] | Mapping[str, object],
                           blocks_path: str | None = None, count_zeros: bool = True) -> Accounting:
    """Accounting of ``source`` (a model, a state dict or a safetensors folder) for ``targets``
    (``Target`` objects, or masks keyed by target name). ``count_zeros=False`` gives coverage from
    shapes alone (zeros read 0), cheap enough to run before any heavy work."""
    targets = targets if isinstance(targets, Mapping) else list(targets)
    path = blocks_path or _blocks_path(source, list(targets.keys()) if isinstance(targets, Mapping) else targets)
    counts: dict[str, tuple[tuple[int, ...], int]] = {}
    for name, tensor, shape in _named_tensors(source, read=count_zeros):
        if _is_weight(name, shape):
            counts[name] = (shape, _zeros(tensor) if count_zeros and tensor is not None else 0)
    return _summarize(path, counts, targets, layout_may_differ=isinstance(targets, Mapping)
                      and not isinstance(source, nn.Module))


def _zeros(tensor: torch.Tensor) -> int:
    return int(tensor.numel() - torch.count_nonzero(tensor).item())


def _summarize(path: str, counts: Mapping[str, tuple[tuple[int, ...], int]], targets,
               layout_may_differ: bool) -> Accounting:
    """``counts``: ``name -> (shape, zeros)`` of every >=2-D weight of the model."""
    block_prefix = re.compile(rf"^{re.escape(path)}\.\d+\.")
    entries = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (shape, zeros) in counts.items():
        numel = 1
        for dim in shape:
            numel *= dim
        shapes[name] = shape
        entries.append((name, numel, zeros, bool(block_prefix.match(name))))
    untargeted: dict[str, int] = {}
    try:
        sizes = _target_sizes(targets, shapes)
    except KeyError:
        # save_pretrained writes MoE experts back in the checkpoint's own layout (Mixtral:
        # ``experts.0.w1.weight`` ...), so fused target names do not name stored tensors. Element
        # counts do not depend on the layout: masks still give the targeted total.
        if not layout_may_differ:
            raise
        target_total = sum(v if isinstance(v, int) else int(v.numel()) for v in targets.values())
    else:
        outside = sorted(set(sizes) - {name for name, _, _, in_block in entries if in_block})
        if outside:
            raise ValueError(f"targets outside the decoder blocks at {path!r}: {', '.join(outside[:5])}")
        for name, numel, _, in_block in entries:
            rest = numel - sizes.get(name, 0)
            if in_block and rest > 0:
                key = block_prefix.sub(f"{path}.*.", name)
                untargeted[key] = untargeted.get(key, 0) + rest
        target_total = sum(sizes.values())
    return Accounting(
        blocks_path=path,
        block_zeros=sum(z for _, _, z, b in entries if b), block_total=sum(n for _, n, _, b in entries if b),
        target_total=target_total,
        model_zeros=sum(z for _, _, z, _ in entries), model_total=sum(n for _, n, _, _ in entries),
        untargeted=untargeted,
    )


class StreamedCounts:
    """Whole-model accounting of a model walked one block at a time (a streamed source), where
    the pruned model is never in memory at once: each block's weights are counted as the walk
    hands the block back (``on_done``, after its targets were pruned), the layers outside the
    blocks once at the end. Names are the model's own (fused experts included), so the figures
    equal :func:`whole_model_accounting` of the loaded, pruned model."""

    def __init__(self, blocks_path: str):
        self.blocks_path = blocks_path
        self.counts: dict[str, tuple[tuple[int, ...], int]] = {}
        self.blocks_seen: set[int] = set()

    def __call__(self, index: int, block: nn.Module) -> None:
        self.blocks_seen.add(index)
        for name, param in block.named_parameters():
            if _is_weight(name, param.shape):
                self.counts[f"{self.blocks_path}.{index}.{name}"] = (tuple(param.shape), _zeros(param.detach()))

    def add_outside(self, model: nn.Module) -> None:
        """The layers outside the blocks, loaded (embeddings, ``lm_head``; tied ones once)."""
        block_prefix = re.compile(rf"^{re.escape(self.blocks_path)}\.\d+\.")
        for name, param in model.named_parameters():
            if block_prefix.match(name) or not _is_weight(name, param.shape):
                continue
            if param.device.type == "meta":
                raise ValueError(f"{name}: not loaded; load the layers outside the blocks before counting them")
            self.counts[name] = (tuple(param.shape), _zeros(param.detach()))

    def accounting(self, targets: Mapping[str, object]) -> Accounting:
        return _summarize(self.blocks_path, self.counts, targets, layout_may_differ=False)


def target_sizes_of_layout(model: nn.Module, layout) -> dict[str, int]:
    """``name -> elements`` of a ``BlockLayout``'s linear targets (the current driver's targets)."""
    return {name: int(model.get_submodule(name).weight.numel()) for name in layout.all_targets()}


def coverage_warning(model_or_accounting, targets=None, threshold: float = DEFAULT_MIN_COVERAGE,
                     what: str = "targets") -> float:
    """Log a loud warning when ``targets`` cover less than ``threshold`` of the decoder-block
    weights, naming the largest untargeted weights; returns the coverage."""
    if isinstance(model_or_accounting, Accounting):
        accounting = model_or_accounting
    else:
        accounting = whole_model_accounting(model_or_accounting, targets, count_zeros=False)
    if accounting.coverage < threshold:
        largest = sorted(accounting.untargeted.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
        log.warning(
            "COVERAGE %.3f < %.2f: the %s cover only %.1f%% of the decoder-block weights, so the model stays far "
            "less sparse than the requested sparsity; not targeted: %s", accounting.coverage, threshold, what,
            100 * accounting.coverage,
            ", ".join(f"{name} ({count / accounting.block_total:.1%})" for name, count in largest))
    return accounting.coverage
