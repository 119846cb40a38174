"""Where a block walk gets its decoder blocks from: a fully loaded model, or safetensors shards.

The block walk (``wanda.prune``) and the streamed perplexity ask a source for block ``k`` right
before they run it and hand it back right after:

- ``ResidentBlocks``: the model is in memory; every request returns the block as it is.
- ``StreamedBlocks``: the model is a skeleton on the ``meta`` device (built from its config, no
  weights); a request copies the block's tensors out of the shards (onto the block device),
  converted as transformers converts them on load (``wanda.conversion``: renamed tensors, and
  per-expert tensors merged into the fused experts parameters), and handing it back first lets
  a writer see the pruned block, then puts its parameters back on ``meta``. The layers outside
  the blocks (embeddings, final norm, ``lm_head``) are loaded only while a caller needs them.

Both give the walk the same modules under the same names, so masks, statistics and pruned
weights are the same bit for bit whichever source ran.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .architecture import find_blocks
from .checkpoint import Checkpoint
from .conversion import ShardConversion
from .errors import ArtifactMismatchError, ConfigError
from .placement import check_device

log = logging.getLogger(__name__)

BlockDone = Callable[[int, nn.Module], None]


class ResidentBlocks:
    """Blocks of a model that is already in memory (the default source)."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model = model
        _, self.blocks = find_blocks(model)
        self.run_device: torch.device | None = None  # blocks run where they are

    def load(self, index: int) -> nn.Module:
        return self.blocks[index]

    def release(self, index: int) -> None:
        pass

    def load_outside(self) -> None:
        pass

    def release_outside(self) -> None:
        pass

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        yield self.blocks[index]

    def weights(self, names: list[str]) -> Mapping[str, nn.Module]:
        modules = dict(self.model.named_modules())
        return {name: modules[name] for name in names}


class _LazyWeight:
    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


class LazyWeights(Mapping):
    """``target name -> object with .weight`` (its [out, in] view) read from the shards on access.

    A linear layer reads its one tensor; a Conv1D or an expert reads its stored parameter (a fused
    experts parameter merged as transformers loads it) and takes the target's view. The parameters
    of the block asked for last are kept, so a block's experts share one read of their fused
    parameter and memory holds one block's parameters at most.
    """

    def __init__(self, source: "StreamedBlocks", names: list[str]):
        self.source, self.names = source, list(names)
        self._block: str | None = None
        self._params: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> _LazyWeight:
        from .targets import target_of_name

        if name not in self.names:
            raise KeyError(name)
        target = target_of_name(self.source.model, name)
        key = target.numel_key
        block = self.source.block_prefix(key)
        if block != self._block:
            self._block, self._params = block, {}
        if key not in self._params:
            self._params.update(self.source.read_parameters([key]))
        return _LazyWeight(target.view_of(self.source.model, self._params[key]))

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        # One Parameter object per tied group (the caller passes it to each name): the groups
        # are found by object identity, so separate wrappers would untie them for the next load.
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to do
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 1 << 22) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping (glibc).

    glibc raises its mmap threshold each time a mapped chunk is freed (up to 32 MiB), after
    which layer-sized temporaries (scores, mask chunks, sort indices) come from the heap and stay
    there once freed: a walk over many large blocks then ratchets the resident set up block after
    block. A fixed threshold gives each such tensor back to the system when it is freed.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, threshold)


def return_freed_memory() -> None:
    """Hand the freed block back to the operating system.

    glibc serves tensors below its (adaptive, up to 32 MiB) mmap threshold from its heap and
    keeps what is freed there for reuse; with the small Python objects a block's parameters
    leave between them, that heap only grows (measured: +12 MiB per block of SmolLM2, the
    whole model after one walk). ``malloc_trim`` releases the free pages; it costs milliseconds.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _to_meta(module: nn.Module) -> None:
    for child in module.modules():
        for attr, param in list(child._parameters.items()):
            if param is not None and param.device.type != "meta":
                child._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)


def build_skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model from ``config.json`` with every parameter on ``meta`` (no memory, no init cost).

    Buffers (rotary inverse frequencies and the like) are real: they are computed from the
    config, not stored in the shards.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        # from_pretrained ties after loading; a skeleton must tie itself, or the lm_head that
        # the shards omit would look missing.
        model.tie_weights()
    return model.eval()


def checkpoint_dtype(checkpoint: Checkpoint) -> torch.dtype:
    for info in checkpoint.tensors.values():
        if info.dtype.is_floating_point:
            return info.dtype
    raise ArtifactMismatchError(f"{checkpoint.folder}: no floating-point tensor in the shards")


class StreamedBlocks:
    """Blocks materialized from the shards on request, one at a time.

    ``device`` is where a requested block (and the layers outside the blocks) is placed and run;
    activations between blocks stay on the CPU (or on disk). ``on_done`` sees each block after
    the walk is done with it and before its memory is released (the shard writer uses it).
    """

    streamed = True

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = torch.device(device)
        self.run_device: torch.device | None = None if self.device.type == "cpu" else self.device
        self.path, self.blocks = find_blocks(model)
        self.on_done: BlockDone | None = None
        self._loaded: set[int] = set()
        self._outside_loaded = False
        # Renames and merges exactly as from_pretrained would do them (refused here, before any
        # work, if a conversion cannot be planned on shapes alone).
        self.conversion = ShardConversion.plan(model, checkpoint)
        checkpoint.aliases.update(self.conversion.aliases)
        self._check()
        map_large_allocations()

    # -- what the shards must hold ------------------------------------------------------------

    def _has(self, name: str) -> bool:
        return name in self.checkpoint or self.conversion.is_converted(name)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of model parameter ``name`` as the shards give it (after conversion)."""
        return self.conversion.shape(name, self.checkpoint)

    def _groups(self, module: nn.Module, prefix: str) -> list[list[str]]:
        """Parameter names (and persistent buffers the shards hold), tied parameters grouped."""
        groups: dict[object, list[str]] = {}
        for name, param in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        for name, _ in module.named_buffers(prefix=prefix.rstrip("."), remove_duplicate=False):
            if self._has(name):
                groups.setdefault(("buffer", name), []).append(name)
        return list(groups.values())

    def _outside_groups(self) -> list[list[str]]:
        inside = f"{self.path}."
        return [[n for n in group if not n.startswith(inside)]
                for group in self._groups(self.model, "")
                if any(not n.startswith(inside) for n in group)]

    def _check(self) -> None:
        """Every parameter of the config's model must be in the shards with its shape, before any work."""
        expected = dict(self.model.named_parameters(remove_duplicate=False))
        missing = []
        for group in self._groups(self.model, ""):
            present = [n for n in group if self._has(n)]
            if not present:
                missing.append(group[0])
                continue
            for name in present:
                if name in expected and tuple(expected[name].shape) != self.shape_of(name):
                    raise ArtifactMismatchError(
                        f"{self.checkpoint.folder}: {name} has shape {self.shape_of(name)} in the shards "
                        f"but {tuple(expected[name].shape)} in config.json's model")
        if missing:
            raise ArtifactMismatchError(
                f"{self.checkpoint.folder}: the shards lack {len(missing)} tensors of the model config.json "
                f"describes, first {missing[0]!r}")

    # -- loading --------------------------------------------------------------------------------

    def read_parameters(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Model parameters by name from the shards in the walk's dtype (a converted group's read
        gives all the parameters it makes)."""
        tensors = self.checkpoint.read([n for n in names if not self.conversion.is_converted(n)], self.dtype, device)
        for name in names:
            if name not in tensors:
                group = self.conversion.group_of[name]
                tensors.update(self.conversion.read(group, self.checkpoint, self.dtype, device))
        return tensors

    def block_prefix(self, name: str) -> str | None:
        """``<blocks path>.<index>.`` of a parameter inside the decoder blocks, else None."""
        if not name.startswith(f"{self.path}."):
            return None
        return f"{self.path}.{name[len(self.path) + 1:].split('.', 1)[0]}."

    def _load_groups(self, groups: list[list[str]]) -> None:
        wanted = [next(n for n in group if self._has(n)) for group in groups]
        tensors = self.read_parameters(wanted, self.device)
        for group, source in zip(groups, wanted):
            tensor = tensors[source]
            if len(group) > 1:  # tied parameters (a buffer's group has its one name)
                tensor = nn.Parameter(tensor, requires_grad=False)
            for name in group:
                _set_tensor(self.model, name, tensor)

    def load(self, index: int) -> nn.Module:
        block = self.blocks[index]
        if index not in self._loaded:
            self._load_groups(self._groups(block, f"{self.path}.{index}."))
            self._loaded.add(index)
            log.debug("block %d loaded from the shards", index)
        return block

    def release(self, index: int) -> None:
        if index in self._loaded:
            _to_meta(self.blocks[index])
            self._loaded.discard(index)
            return_freed_memory()

    def load_outside(self) -> None:
        if not self._outside_loaded:
            self._load_groups(self._outside_groups())
            self._outside_loaded = True

    def release_outside(self) -> None:
        if self._outside_loaded:
            for group in self._outside_groups():
                meta = None  # one per group: tied parameters (lm_head = embeddings) stay tied
                for name in group:
                    module_name, _, attr = name.rpartition(".")
                    module = self.model.get_submodule(module_name) if module_name else self.model
                    param = module._parameters.get(attr)
                    if param is not None and param.device.type != "meta":
                        if meta is None:
                            meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                        module._parameters[attr] = meta
            self._outside_loaded = False
            return_freed_memory()

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        block = self.load(index)
        try:
            yield block
            if self.on_done is not None:
                self.on_done(index, block)
        finally:
            self.release(index)

    def weights(self, names: list[str]) -> Mapping:
        return LazyWeights(self, names)


def open_streamed(folder: str | Path, dtype: torch.dtype | str | None = None,
                  device: torch.device | str = "cpu") -> StreamedBlocks:
    """A streamed model over the safetensors folder ``folder``: skeleton + shards, checked.

    ``dtype`` defaults to the shards' own floating-point dtype (no conversion, so the weights are
    bit-identical to a fully loaded model's).
    """
    from .model_io import DTYPES

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError("model.dtype", f"unknown dtype {dtype!r}", ", ".join(DTYPES))
        dtype = DTYPES[dtype]
    check_device(device, "runtime.device")
    checkpoint = Checkpoint(folder)
    dtype = dtype or checkpoint_dtype(checkpoint)
    model = build_skeleton(folder, dtype)
    return StreamedBlocks(model, checkpoint, dtype, device)
