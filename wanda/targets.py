"""What the driver prunes: targets (one [out, in] weight matrix each) and how their inputs are seen.

A ``Target`` names one weight matrix and the module whose call feeds it. The driver and the
methods only ever use ``Target.weight(root)`` (an [out, in] view sharing storage with the
parameter) and the input rows an observer reports for the target's name, so a kind of weight
that is not an ``nn.Linear`` (a Conv1D stored [in, out], one expert's slice of a fused 3-D
parameter with its own routed tokens) plugs in by registering two functions:

- a *discoverer* ``(block, prefix, targets_glob, ignore_glob) -> list[Target]`` (``register_discoverer``);
- an *observer* factory ``(targets, root, sink) -> context manager`` (``register_observer``): while
  entered, each block forward calls ``sink(target_name, rows)`` with the 2-D input rows
  [tokens, in] that target saw. Targets fed the very same tensor get the very same ``rows``
  object, so sinks can share one reduction (q/k/v, gate/up).

Masks are [out, in] booleans (True = pruned) in the view's layout, keyed by ``Target.name``;
comparison groups are the view's rows, N:M runs along its in dimension. This module holds the
``linear`` kind; other kinds register themselves from their own modules.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

Sink = Callable[[str, torch.Tensor], None]
Discoverer = Callable[[nn.Module, str, list[str], list[str]], list["Target"]]
ObserverFactory = Callable[[list["Target"], nn.Module, Sink], ContextManager]

# Module names whose weights are never targets (embeddings and output heads).
NEVER_PRUNED = ("lm_head", "embed", "wte", "wpe", "embed_out")


@dataclass(frozen=True)
class Target:
    name: str  # mask key, e.g. "model.layers.3.self_attn.q_proj"
    kind: str  # "linear" (others registered by their modules: "conv1d", "expert")
    module_name: str  # the module whose call feeds it, relative to the root ``weight`` is given
    # (the driver always passes the model, so its discoverers give full module names)
    param_name: str = "weight"
    expert: int | None = None

    def module(self, root: nn.Module) -> nn.Module:
        return root.get_submodule(self.module_name) if self.module_name else root

    def weight(self, root: nn.Module) -> torch.Tensor:
        """The [out, in] view of the parameter (in-place edits change the model)."""
        return _VIEWS[self.kind](self, getattr(self.module(root), self.param_name))



_VIEWS: dict[str, Callable[[Target, torch.Tensor], torch.Tensor]] = {}
_DISCOVERERS: dict[str, Discoverer] = {}
_OBSERVERS: dict[str, ObserverFactory] = {}


def register_kind(kind: str, view: Callable[[Target, torch.Tensor], torch.Tensor]) -> None:
    """How a kind's parameter is seen as [out, in] (identity for linear, ``.T`` for conv1d...)."""
    _VIEWS[kind] = view


def register_discoverer(kind: str, discoverer: Discoverer) -> None:
    _DISCOVERERS[kind] = discoverer


def register_observer(kind: str, factory: ObserverFactory) -> None:
    _OBSERVERS[kind] = factory


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def block_targets(block: nn.Module, prefix: str, targets_glob: list[str] | None = None,
                  ignore_glob: list[str] | None = None) -> list[Target]:
    """Every registered kind's targets in ``block`` (named ``prefix.<relative>``), module order first."""
    found: list[Target] = []
    for discoverer in _DISCOVERERS.values():
        found.extend(discoverer(block, prefix, targets_glob or ["*"], ignore_glob or []))
    return found


@contextlib.contextmanager
def observe(targets: list[Target], root: nn.Module, sink: Sink) -> Iterator[None]:
    """Report every target's input rows to ``sink`` while the block runs (each kind's observer)."""
    by_kind: dict[str, list[Target]] = {}
    for target in targets:
        by_kind.setdefault(target.kind, []).append(target)
    with contextlib.ExitStack() as stack:
        for kind, group in by_kind.items():
            if kind not in _OBSERVERS:
                raise NotImplementedError(f"no input observer registered for target kind {kind!r}")
            stack.enter_context(_OBSERVERS[kind](group, root, sink))
        yield


# ----------------------------------------------------------------------------- linear


def _linear_discoverer(block: nn.Module, prefix: str, targets_glob: list[str], ignore_glob: list[str]) -> list[Target]:
    chosen = []
    for rel, module in block.named_modules():
        if not rel or not isinstance(module, nn.Linear):
            continue
        if any(part in rel.split(".")[-1] for part in NEVER_PRUNED):
            continue
        full = f"{prefix}.{rel}" if prefix else rel
        if matches(full, targets_glob) and not matches(full, ignore_glob):
            chosen.append(Target(full, "linear", full))
    return chosen


class LinearObserver:
    """Forward hooks on the targets' modules; rows are the input flattened to [-1, in]."""

    def __init__(self, targets: list[Target], root: nn.Module, sink: Sink):
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


register_kind("linear", lambda target, param: param)
register_discoverer("linear", _linear_discoverer)
register_observer("linear", LinearObserver)
