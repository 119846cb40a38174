"""What the driver prunes: targets (one [out, in] weight matrix each) and how their inputs are seen.

A ``Target`` names one weight matrix and the module whose call feeds it. The driver and the
methods only ever use ``Target.weight(root)`` (an [out, in] view sharing storage with the
parameter) and the input rows an observer reports for the target's name, so a kind of weight
that is not an ``nn.Linear`` (a Conv1D stored [in, out], one expert's slice of a fused 3-D
parameter with its own routed tokens) plugs in by registering three functions:

- a *view* ``(target, param) -> [out, in] view`` (``register_kind``);
- a *discoverer* ``(block, prefix, targets_glob, ignore_glob) -> list[Target]`` (``register_discoverer``);
- an *observer* factory ``(targets, root, sink, **options) -> context manager`` (``register_observer``):
  while entered, each block forward calls ``sink(target_name, rows)`` with the 2-D input rows
  [tokens, in] that target saw. Targets fed the very same tensor get the very same ``rows``
  object, so sinks can share one reduction (q/k/v, gate/up). ``options`` are the walk's
  per-kind settings (the expert policy, the token counts); a kind ignores those it does not use.

Masks are [out, in] booleans (True = pruned) in the view's layout, keyed by ``Target.name``;
comparison groups are the view's rows, N:M runs along its in dimension. This module holds the
``linear`` kind (and the ``conv1d`` view and observer, which are linear's with a transpose);
``wanda.experts`` registers the "conv1d" discoverer and the "expert" kind on import.
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn

Sink = Callable[[str, torch.Tensor], None]
Discoverer = Callable[[nn.Module, str, list[str], list[str]], list["Target"]]
ObserverFactory = Callable[..., ContextManager]

# Module names whose weights are never targets (embeddings and output heads).
NEVER_PRUNED = ("lm_head", "embed", "wte", "wpe", "embed_out")
# Discovery order within a block: linear layers, then Conv1D, then experts.
KINDS = ("linear", "conv1d", "expert")


@dataclass(frozen=True)
class Target:
    name: str  # mask key: "model.layers.3.self_attn.q_proj" or "model.layers.3.mlp.experts.gate_up_proj[7]"
    kind: str  # "linear" | "conv1d" | "expert"
    module_name: str  # the module whose call feeds it (full name: "...q_proj", "...mlp.experts")
    param_name: str = "weight"  # or the fused parameter ("gate_up_proj", "down_proj")
    expert: int | None = None  # expert index for kind "expert"

    def module(self, root: nn.Module) -> nn.Module:
        """The module holding the parameter, from the model root or from the target's block.

        ``module_name`` is the full name; given a block, the leading components that name the
        block are dropped (the first suffix of the name that resolves is taken).
        """
        if not self.module_name:
            return root
        parts = self.module_name.split(".")
        for start in range(len(parts)):
            try:
                return root.get_submodule(".".join(parts[start:]))
            except AttributeError:
                continue
        raise KeyError(f"target {self.name!r}: no module {self.module_name!r} under {type(root).__name__}")

    def parameter(self, root: nn.Module) -> torch.Tensor:
        return getattr(self.module(root), self.param_name)

    def weight(self, root: nn.Module) -> torch.Tensor:
        """The [out, in] view of the parameter (in-place edits change the model)."""
        return self.view_of(root, self.parameter(root))

    def view_of(self, root: nn.Module, stored: torch.Tensor) -> torch.Tensor:
        """The [out, in] view of ``stored``, a tensor standing for the parameter (read from shards)."""
        if self.kind not in _VIEWS:
            raise ValueError(f"target {self.name!r}: unknown kind {self.kind!r} (known: {', '.join(sorted(_VIEWS))})")
        return _VIEWS[self.kind](self, self.module(root), stored)

    @property
    def numel_key(self) -> str:
        """The state-dict key of the stored parameter (several expert targets share one)."""
        return f"{self.module_name}.{self.param_name}"


_VIEWS: dict[str, Callable[[Target, nn.Module, torch.Tensor], torch.Tensor]] = {}
_DISCOVERERS: dict[str, Discoverer] = {}
_OBSERVERS: dict[str, ObserverFactory] = {}


def register_kind(kind: str, view: Callable[[Target, nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """How a kind's parameter is seen as [out, in]: ``view(target, module, param)``."""
    _VIEWS[kind] = view


def register_discoverer(kind: str, discoverer: Discoverer) -> None:
    _DISCOVERERS[kind] = discoverer


def register_observer(kind: str, factory: ObserverFactory) -> None:
    _OBSERVERS[kind] = factory


def discoverers() -> dict[str, Discoverer]:
    return dict(_DISCOVERERS)


def observer_factory(kind: str) -> ObserverFactory:
    _load_kinds()
    try:
        return _OBSERVERS[kind]
    except KeyError:
        raise KeyError(f"no observer registered for target kind {kind!r} (registered: {sorted(_OBSERVERS)})") from None


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def target_matches(target: Target, patterns: Iterable[str]) -> bool:
    """Glob over the target's name, its module name, and (for experts) its parameter path.

    An expert's name ends in ``[7]``, which ``fnmatch`` would read as a character class, so
    patterns are also matched against ``module.param`` (``*.experts.down_proj``) and against the
    name with the index escaped, so ``*.experts.down_proj[[]7]`` picks one expert.
    """
    keys = {target.name, target.module_name, target.numel_key}
    return any(fnmatch.fnmatchcase(key, pattern) for key in keys for pattern in patterns)


_EXPERT_NAME = re.compile(r"^(?P<module>.+)\.(?P<param>[A-Za-z_][A-Za-z0-9_]*)\[(?P<expert>\d+)\]$")


def target_of_name(root: nn.Module, name: str) -> Target:
    """The ``Target`` a mask key names: ``<container>.<param>[<e>]`` is one expert's matrix, a
    module name is a linear layer or a Conv1D (``KeyError`` if the model has no such module)."""
    match = _EXPERT_NAME.match(name)
    if match:
        target = Target(name, "expert", match["module"], match["param"], int(match["expert"]))
    else:
        target = Target(name, "linear", name)
    try:
        module = target.module(root) if match else root.get_submodule(name)
    except (AttributeError, KeyError):
        raise KeyError(name) from None
    if not match:
        from .experts import is_conv1d

        if is_conv1d(module):
            target = Target(name, "conv1d", name)
    if not isinstance(getattr(module, target.param_name, None), torch.Tensor):
        raise KeyError(name)
    return target


def _load_kinds() -> None:
    from . import experts  # noqa: F401  (registers the "conv1d" and "expert" kinds)


def block_targets(block: nn.Module, prefix: str, targets_glob: list[str] | None = None,
                  ignore_glob: list[str] | None = None) -> list[Target]:
    """Every registered kind's targets in ``block`` (named ``prefix.<relative>``), kind then module order."""
    _load_kinds()
    found: list[Target] = []
    for kind in sorted(_DISCOVERERS, key=lambda k: KINDS.index(k) if k in KINDS else len(KINDS)):
        found.extend(_DISCOVERERS[kind](block, prefix, list(targets_glob or ["*"]), list(ignore_glob or [])))
    return found


@contextlib.contextmanager
def observe(targets: list[Target], root: nn.Module, sink: Sink, **options) -> Iterator[None]:
    """Report every target's input rows to ``sink`` while the block runs (each kind's observer)."""
    by_kind: dict[str, list[Target]] = {}
    for target in targets:
        by_kind.setdefault(target.kind, []).append(target)
    with contextlib.ExitStack() as stack:
        for kind, group in by_kind.items():
            stack.enter_context(observer_factory(kind)(group, root, sink, **options))
        yield


# ----------------------------------------------------------------------------- linear


def _linear_discoverer(block: nn.Module, prefix: str, targets_glob: list[str], ignore_glob: list[str]) -> list[Target]:
    """``nn.Linear`` layers by the rule of ``wanda.architecture.is_linear_target`` (routers kept dense)."""
    from .architecture import is_linear_target

    chosen = []
    for rel, module in block.named_modules():
        full = f"{prefix}.{rel}" if prefix else rel
        if rel and is_linear_target(full, rel, module, targets_glob, ignore_glob):
            chosen.append(Target(full, "linear", full))
    return chosen


class LinearObserver:
    """Forward hooks on the targets' modules; rows are the input flattened to [-1, in].

    Serves Conv1D too: its input is [..., in] like a linear layer's, only its weight is stored
    [in, out] (which the conv1d view transposes).
    """

    def __init__(self, targets: list[Target], root: nn.Module, sink: Sink, **_options):
        self.targets, self.root, self.sink = targets, root, sink
        self.handles: list = []
        # The last input and its rows: layers fed the same tensor get the same rows object,
        # and holding the input keeps its identity unique until the next one arrives.
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def _hook(self, name: str):
        def hook(module, args, output):
            inputs = args[0]
            if self._last is None or self._last[0] is not inputs:
                self._last = (inputs, inputs.detach().reshape(-1, inputs.shape[-1]))
            self.sink(name, self._last[1])

        return hook

    def __enter__(self):
        for target in self.targets:
            self.handles.append(target.module(self.root).register_forward_hook(self._hook(target.name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._last = None


register_kind("linear", lambda target, module, param: param)
register_kind("conv1d", lambda target, module, param: param.t())
register_discoverer("linear", _linear_discoverer)
register_observer("linear", LinearObserver)
register_observer("conv1d", LinearObserver)
