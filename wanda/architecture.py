"""Generic discovery of a decoder-only model's blocks and their prunable linear layers.

No architecture is hard-coded by attribute path: the decoder blocks are the longest
``nn.ModuleList`` of identical modules that contain linear layers (LLaMA, Mistral, Qwen2/3,
Gemma, Phi-3 keep them at ``model.layers``, OPT at ``model.decoder.layers``, GPT-NeoX at
``gpt_neox.layers``). Layers outside the blocks (embeddings, ``lm_head``) are never targets.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import ConfigError, UnsupportedArchitectureError
from .targets import NEVER_PRUNED, block_targets, matches as _matches  # noqa: F401  (NEVER_PRUNED re-exported)


@dataclass(frozen=True)
class BlockLayout:
    """Where the blocks are and which linear layers inside each are pruning targets."""

    blocks_path: str  # e.g. "model.layers"
    num_blocks: int
    # Per block: module names relative to the block, e.g. ["self_attn.q_proj", ...]
    targets: tuple[tuple[str, ...], ...]

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def full_name(self, index: int, relative: str) -> str:
        return f"{self.block_name(index)}.{relative}"

    def all_targets(self) -> list[str]:
        return [self.full_name(i, rel) for i, names in enumerate(self.targets) for rel in names]


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list; refuses models that have none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UnsupportedArchitectureError(
            f"model type {model_type(model)!r} ({type(model).__name__}): no list of decoder blocks "
            "with nn.Linear layers found; supported are decoder-only transformers models such as "
            "LLaMA, Mistral, Qwen2/3, Gemma, Phi-3, OPT and GPT-NeoX"
        )
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if expected is not None and len(best[1]) != expected:
        raise UnsupportedArchitectureError(
            f"model type {model_type(model)!r}: found {len(best[1])} blocks at {best[0]!r} but "
            f"config.num_hidden_layers is {expected}"
        )
    return best


def discover(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None) -> BlockLayout:
    """Find blocks and target linear layers.

    ``targets`` and ``ignore`` are glob patterns over full module names
    (``model.named_modules()`` names, e.g. ``*.mlp.*`` or ``*.self_attn.q_proj``).
    """
    targets = targets or ["*"]
    ignore = ignore or []
    path, blocks = find_blocks(model)
    per_block: list[tuple[str, ...]] = []
    for index, block in enumerate(blocks):
        # Every registered target kind's discoverer (wanda.targets); names relative to the block.
        found = block_targets(block, f"{path}.{index}", targets, ignore)
        per_block.append(tuple(t.name.removeprefix(f"{path}.{index}.") for t in found))
    layout = BlockLayout(blocks_path=path, num_blocks=len(blocks), targets=tuple(per_block))
    if not layout.all_targets():
        raise ConfigError(
            "targets", f"no linear layer of {model_type(model)!r} matches targets={targets} ignore={ignore}",
            "glob patterns over module names, e.g. '*' or '*.mlp.*'",
        )
    return layout


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)
