"""Which shard tensors make each model parameter, converted the way transformers' own loader converts them.

transformers 5 renames some checkpoint tensors when it loads them (GPT-NeoX's ``embed_out`` is
``lm_head``; GraniteMoE's ``input_linear`` is ``experts.gate_up_proj``) and merges others: the
per-expert tensors of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3 and the families mapped onto them
(``...experts.3.gate_proj.weight``, ``...experts.3.w1.weight``) become one fused parameter
(``mlp.experts.gate_up_proj [E, 2I, H]``) through a ``WeightConverter`` (``MergeModulelist``
then ``Concatenate``), which ``save_pretrained`` reverses to write them split again.

``ShardConversion.plan`` asks transformers the same questions its loader asks
(``get_model_conversion_mapping``, ``rename_source_key``, in the loader's key order), so the
patterns and operations are transformers' own, not re-coded per family:

- ``aliases``: ``model name -> shard name`` for plain renames (one tensor, read as is);
- ``groups``: one ``ConvertedGroup`` per converter instance the loader would build, holding its
  shard keys in the loader's order; ``read`` runs the converter's operations on them (the fused
  parameter, equal bit for bit to ``from_pretrained``'s), ``to_shards`` runs transformers'
  reverse conversion (``revert_weight_conversion``, what ``save_pretrained`` runs) to split
  updated parameters back into the shard tensors they came from.

The plan runs both directions once on ``meta`` tensors before any data is read: a conversion
whose reverse does not give back the shards' own tensors (names, shapes, dtypes) cannot be
written in place, and is refused by name.
"""
from __future__ import annotations

import logging
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import Checkpoint
from .errors import ArtifactMismatchError, UnsupportedArchitectureError

log = logging.getLogger(__name__)


@dataclass
class ConvertedGroup:
    """The shard tensors one converter merges (or splits) into model parameters."""

    converter: object  # transformers' WeightConverter, as the mapping gives it (never used itself)
    first: str  # the model name the loader files the group under (its layer name)
    sources: list[tuple[str, str]] = field(default_factory=list)  # (shard key, source pattern), loader order
    targets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # model name -> shape
    unwritable: str | None = None  # why the pruned parameters cannot be split back into the shards

    @property
    def shard_keys(self) -> list[str]:
        return [key for key, _ in self.sources]

    def describe(self) -> str:
        keys = self.shard_keys
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        return f"{keys[0]!r}{more} -> {', '.join(sorted(self.targets)) or self.first!r}"


def _transformers_mapping(model: nn.Module):
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - transformers < 5 loads checkpoints by plain names
        return [], []
    if not hasattr(model, "config"):
        return [], []
    mapping = get_model_conversion_mapping(model)
    return ([t for t in mapping if isinstance(t, WeightRenaming)],
            [t for t in mapping if isinstance(t, WeightConverter)])


def convert_group(model: nn.Module, group: ConvertedGroup, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The converter's operations on the group's shard tensors, exactly as the loader runs them."""
    converter = deepcopy(group.converter)  # the loader deep-copies one per target key too
    for key, pattern in group.sources:
        converter.add_tensor(group.first, key, pattern, tensors[key])
    out = converter.convert(group.first, model=model, config=model.config)
    return {name: (value[0] if isinstance(value, list) else value) for name, value in out.items()}


def revert_conversion(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model tensors -> checkpoint tensors by transformers' reverse conversion (``save_pretrained``'s)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def _check_group(model: nn.Module, group: ConvertedGroup, checkpoint: Checkpoint, expected: dict) -> None:
    """Both directions on meta tensors: the targets it makes (else it cannot be read block by
    block: refused), and whether the reverse gives the shards' own tensors back (else it cannot
    be written in place: recorded, refused by ``check_writable``)."""
    model_name = type(model).__name__
    try:
        fakes = {key: torch.empty(checkpoint.tensors[key].shape, dtype=checkpoint.tensors[key].dtype,
                                  device="meta") for key in group.shard_keys}
        made = convert_group(model, group, fakes)
    except Exception as exc:  # an operation that cannot run on shapes alone
        raise UnsupportedArchitectureError(
            f"{model_name}: transformers converts {group.describe()} when loading, and that conversion "
            f"cannot be planned block by block ({type(exc).__name__}: {exc}); use runtime.load 'full'") from exc
    group.targets = {name: tuple(t.shape) for name, t in made.items()}
    unknown = sorted(n for n in made if n not in expected)
    if unknown:
        raise UnsupportedArchitectureError(
            f"{model_name}: transformers converts {group.describe()} into {unknown[0]!r}, which the model "
            "config.json describes does not have; use runtime.load 'full'")
    try:
        back = revert_conversion(model, made)
    except Exception as exc:
        group.unwritable = (f"{model_name}: transformers converts {group.describe()} when loading but cannot convert "
                            f"it back ({type(exc).__name__}: {exc})")
        return
    # Names and shapes: the writer casts each tensor to its shard's dtype, as for unconverted ones.
    wanted = {key: checkpoint.tensors[key].shape for key in group.shard_keys}
    got = {key: tuple(t.shape) for key, t in back.items()}
    if got != wanted:
        differ = sorted(set(got) ^ set(wanted)) or sorted(k for k in got if got[k] != wanted[k])
        group.unwritable = (f"{model_name}: transformers' reverse conversion of {group.describe()} does not give "
                            f"back the shards' own tensors (first difference: {differ[0]!r})")


class ShardConversion:
    """How every model parameter is read from (and written back to) a checkpoint's shards."""

    def __init__(self, model: nn.Module, aliases: dict[str, str], groups: dict[str, ConvertedGroup]):
        self.model = model
        self.aliases = aliases
        self.groups = groups  # by ``first``
        self.group_of = {name: group for group in groups.values() for name in group.targets}

    @classmethod
    def plan(cls, model: nn.Module, checkpoint: Checkpoint) -> "ShardConversion":
        """The loader's renames and conversions for ``checkpoint`` into ``model`` (a meta skeleton)."""
        renamings, converters = _transformers_mapping(model)
        if not renamings and not converters:
            return cls(model, {}, {})
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        expected = model.state_dict()  # meta tensors: names (and shapes) only
        prefix = getattr(model, "base_model_prefix", None)
        aliases: dict[str, str] = {}
        groups: dict[str, ConvertedGroup] = {}
        # The loader's own steps 1-2 (``convert_and_load_state_dict_in_model``): keys in natural
        # order, every renaming then at most one converter, a converter instance per target key.
        for key in sorted(checkpoint.tensors, key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if renamed not in expected and key in expected:
                renamed, pattern = rename_source_key(key, [], [], prefix, expected)
            if renamed not in expected:
                continue  # the loader ignores it too (reported as unexpected)
            if pattern is None:
                if renamed != key:
                    aliases[renamed] = key
                continue
            group = groups.setdefault(renamed, ConvertedGroup(by_pattern[pattern], renamed))
            group.sources.append((key, pattern))
        for group in groups.values():
            _check_group(model, group, checkpoint, expected)
        if groups:
            log.info("%d groups of shard tensors are converted on read as transformers converts them (%s, ...)",
                     len(groups), next(iter(groups.values())).describe())
        return cls(model, aliases, groups)

    def check_writable(self) -> None:
        """Refuse, before any work, a plan whose pruned parameters cannot be written into the shards."""
        for group in self.groups.values():
            if group.unwritable:
                raise UnsupportedArchitectureError(
                    f"{group.unwritable}, so the pruned tensors cannot be written into a copy of the shards under "
                    "their own names; use runtime.load 'full'")

    def is_converted(self, name: str) -> bool:
        return name in self.group_of

    def shape(self, name: str, checkpoint: Checkpoint) -> tuple[int, ...]:
        group = self.group_of.get(name)
        return group.targets[name] if group is not None else checkpoint.info(name).shape

    def read(self, group: ConvertedGroup, checkpoint: Checkpoint, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The group's model parameters from the shards (cast to ``dtype`` first, as the loader does)."""
        tensors = checkpoint.read(group.shard_keys, dtype)
        made = convert_group(self.model, group, tensors)
        del tensors
        return {name: (t.to(device) if str(device) != "cpu" else t) for name, t in made.items()}

    def to_shards(self, tensors: dict[str, torch.Tensor], checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        """Model tensors by model name -> the shard tensors to write, by shard name, in the shards' dtypes.

        Plain and renamed parameters map one to one; the members of a converted group are split
        back by transformers' reverse conversion, which needs the whole group.
        """
        out: dict[str, torch.Tensor] = {}
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            group = self.group_of.get(name)
            if group is None:
                key = checkpoint.aliases.get(name, self.aliases.get(name, name))
                out[key] = tensor.to(checkpoint.info(key).dtype)
            else:
                grouped.setdefault(group.first, {})[name] = tensor
        for first, members in grouped.items():
            group = self.groups[first]
            if group.unwritable:
                self.check_writable()
            missing = sorted(set(group.targets) - set(members))
            if missing:
                raise ArtifactMismatchError(f"{first}: writing it back into the shards needs {missing[0]!r} too "
                                            f"(transformers converts them together)")
            members = {n: t.detach().to("cpu") for n, t in members.items()}
            for key, tensor in revert_conversion(self.model, members).items():
                out[key] = tensor.to(checkpoint.info(key).dtype)
        return out
