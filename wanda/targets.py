"""Pruning targets: one named [out, in] weight matrix each, whatever module stores it.

The agreed contract between the block walk and the layer kinds (docs/moe-integration.md): a
``Target`` names one comparison-group matrix (a linear layer, a GPT-2 ``Conv1D``, or one expert's
slice of a fused experts parameter) and gives a view of it in the [out, in] layout masks use.
Discoverers (which targets a block has) and observers (which input rows each target sees during a
block forward) are registered per kind, so the driver walks every kind the same way.

This module knows only modules and tensors; the kinds register themselves on import
(``wanda.experts`` registers "conv1d" and "expert").
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# A discoverer: (block, prefix, targets_glob, ignore_glob) -> targets of its kind in the block.
Discoverer = Callable[[nn.Module, str, list[str], list[str]], list["Target"]]
# An observer factory: (block, prefix, targets of its kind, sink) -> a context manager that, while
# entered, calls ``sink(target_name, rows[tokens, in])`` during block forwards.
ObserverFactory = Callable[..., object]

_DISCOVERERS: dict[str, Discoverer] = {}
_OBSERVERS: dict[str, ObserverFactory] = {}

KINDS = ("linear", "conv1d", "expert")


@dataclass(frozen=True)
class Target:
    name: str  # mask key: "model.layers.3.self_attn.q_proj" or "model.layers.3.mlp.experts.gate_up_proj[7]"
    kind: str  # "linear" | "conv1d" | "expert"
    module_name: str  # the module whose call feeds it ("...q_proj", "...mlp.experts")
    param_name: str  # "weight" or the fused parameter ("gate_up_proj", "down_proj")
    expert: int | None = None  # expert index for kind "expert"

    def module(self, model_or_block: nn.Module) -> nn.Module:
        """The module holding the parameter, from the model root or from the target's block.

        ``module_name`` is the full name; given a block, the leading components that name the
        block are dropped (the first suffix of the name that resolves is taken).
        """
        parts = self.module_name.split(".")
        for start in range(len(parts)):
            try:
                return model_or_block.get_submodule(".".join(parts[start:]))
            except AttributeError:
                continue
        raise KeyError(f"target {self.name!r}: no module {self.module_name!r} under {type(model_or_block).__name__}")

    def parameter(self, model_or_block: nn.Module) -> torch.Tensor:
        return getattr(self.module(model_or_block), self.param_name)

    def weight(self, model_or_block: nn.Module) -> torch.Tensor:
        """A [out, in] VIEW sharing storage with the parameter (conv1d: W.T of [in, out]; expert:
        P[e] or P[e].T by the container's ``is_transposed``). In-place edits change the model."""
        module = self.module(model_or_block)
        param = getattr(module, self.param_name).data
        if self.kind == "linear":
            return param
        if self.kind == "conv1d":
            return param.t()
        if self.kind == "expert":
            view = param[self.expert]
            return view.t() if getattr(module, "is_transposed", False) else view
        raise ValueError(f"target {self.name!r}: unknown kind {self.kind!r} (known: {', '.join(KINDS)})")

    @property
    def numel_key(self) -> str:
        """The state-dict key of the stored parameter (several expert targets share one)."""
        return f"{self.module_name}.{self.param_name}"


def matches(target: Target, patterns: Iterable[str]) -> bool:
    """Glob over the target's name, its module name, and (for experts) its parameter path.

    An expert's name ends in ``[7]``, which ``fnmatch`` would read as a character class, so
    patterns are also matched against ``module.param`` (``*.experts.down_proj``) and against the
    name with the index escaped, so ``*.experts.down_proj[[]7]`` picks one expert.
    """
    keys = {target.name, target.module_name, target.numel_key}
    return any(fnmatch.fnmatchcase(key, pattern) for key in keys for pattern in patterns)


def register_discoverer(kind: str, discoverer: Discoverer) -> None:
    _DISCOVERERS[kind] = discoverer


def register_observer(kind: str, factory: ObserverFactory) -> None:
    _OBSERVERS[kind] = factory


def discoverers() -> dict[str, Discoverer]:
    return dict(_DISCOVERERS)


def observer_factory(kind: str) -> ObserverFactory:
    try:
        return _OBSERVERS[kind]
    except KeyError:
        raise KeyError(f"no observer registered for target kind {kind!r} (registered: {sorted(_OBSERVERS)})") from None


def block_targets(block: nn.Module, prefix: str, targets_glob: list[str] | None = None,
                  ignore_glob: list[str] | None = None) -> list[Target]:
    """Every registered kind's targets in one block, in module order within each kind."""
    from . import experts  # noqa: F401  (registers the "conv1d" and "expert" kinds)

    targets_glob = list(targets_glob or ["*"])
    ignore_glob = list(ignore_glob or [])
    found: list[Target] = []
    for kind in sorted(_DISCOVERERS, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        found += _DISCOVERERS[kind](block, prefix, targets_glob, ignore_glob)
    return found


def discover_linear_targets(block: nn.Module, prefix: str, targets_glob: list[str],
                            ignore_glob: list[str]) -> list[Target]:
    """``nn.Linear`` layers by the rule of ``wanda.architecture.discover`` (routers kept dense)."""
    from .architecture import is_linear_target

    found = []
    for rel, module in block.named_modules():
        full = f"{prefix}.{rel}" if prefix else rel
        if rel and is_linear_target(full, rel, module, targets_glob, ignore_glob):
            found.append(Target(full, "linear", full, "weight", None))
    return found


class ModuleInputObserver:
    """Forward pre-hooks on linear/Conv1D modules: ``sink(name, inputs flattened to [-1, in])``."""

    def __init__(self, block: nn.Module, prefix: str, targets: list[Target], sink):
        self.block, self.prefix, self.targets, self.sink = block, prefix, targets, sink
        self.handles: list = []

    def __enter__(self) -> "ModuleInputObserver":
        for target in self.targets:
            module = target.module(self.block)

            def hook(module, args, name=target.name):
                inputs = args[0]
                self.sink(name, inputs.reshape(-1, inputs.shape[-1]))

            self.handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


register_discoverer("linear", discover_linear_targets)
register_observer("linear", ModuleInputObserver)
register_observer("conv1d", ModuleInputObserver)
