"""Generic discovery of a decoder-only model's blocks and their prunable linear layers.

No architecture is hard-coded by attribute path: the decoder blocks are the longest
``nn.ModuleList`` of identical modules that contain linear layers (LLaMA, Mistral, Qwen2/3,
Gemma, Phi-3 keep them at ``model.layers``, OPT at ``model.decoder.layers``, GPT-NeoX at
``gpt_neox.layers``). Layers outside the blocks (embeddings, ``lm_head``) are never targets.

What cannot be pruned is refused before any forward pass, by name: models that are not
decoder-only causal LMs (BERT, RoBERTa, T5, ...), and any >=2-D weight inside a decoder block
that is neither a linear layer, a GPT-2 ``Conv1D``, a supported experts container
(``wanda.experts``) nor a router (kept dense by default), unless ``ignore`` names it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError, UnsupportedArchitectureError
from .experts import container_parameter_names, expert_containers, is_conv1d, is_experts_container

from .targets import NEVER_PRUNED, block_targets, matches as _matches  # noqa: F401  (NEVER_PRUNED re-exported)

# Routers decide which experts see a token; pruning them changes the routing itself, so they stay
# dense unless a ``targets`` pattern names them (``*.mlp.gate``, ``*.shared_expert_gate``).
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# Encoders and encoder-decoders whatever head AutoModelForCausalLM attaches (BertLMHeadModel
# exists and "works", with bidirectional attention it was never trained to predict with).
ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "bert-generation",
    "megatron-bert", "roberta-prelayernorm", "data2vec-text", "xmod", "rembert", "roc_bert", "big_bird",
    "qdqbert", "nezha", "deberta", "deberta-v2", "distilbert", "albert", "mpnet", "modernbert", "esm",
    "t5", "mt5", "umt5", "bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "prophetnet",
    "xlm-prophetnet", "longt5", "switch_transformers", "plbart", "m2m_100", "nllb-moe", "led", "bigbird_pegasus",
})


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
        if not any(_prunable_module(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise UnsupportedArchitectureError(
            f"model type {model_type(model)!r} ({type(model).__name__}): no list of decoder blocks "
            "with nn.Linear, Conv1D or experts layers found; supported are decoder-only transformers models "
            "such as LLaMA, Mistral, Qwen2/3, Gemma, Phi-3, OPT, GPT-NeoX and the MoE families of wanda.experts"
        )
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if expected is not None and len(best[1]) != expected:
        raise UnsupportedArchitectureError(
            f"model type {model_type(model)!r}: found {len(best[1])} blocks at {best[0]!r} but "
            f"config.num_hidden_layers is {expected}"
        )
    return best


def _prunable_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_experts_container(module)


def never_pruned(relative: str) -> bool:
    """Embeddings and output heads, wherever they sit."""
    return any(part in relative.split(".")[-1] for part in NEVER_PRUNED)


def is_router(relative: str, module: nn.Module | None = None) -> bool:
    """A MoE router: ``mlp.gate``, ``mlp.router``, ``shared_expert_gate``, or a ``*Router`` module."""
    return relative.split(".")[-1] in ROUTER_NAMES or (
        module is not None and type(module).__name__.endswith("Router"))


def router_requested(full: str, targets: list[str]) -> bool:
    """Routers are targets only when a pattern ends with their name (``*.mlp.gate``,
    ``*.shared_expert_gate``): ``*`` or ``*gate*`` keep them dense."""
    last = full.split(".")[-1]
    return any(p.endswith(last) and fnmatch.fnmatchcase(full, p) for p in targets)


def is_linear_target(full: str, relative: str, module: nn.Module, targets: list[str], ignore: list[str]) -> bool:
    """The rule for linear layers inside a block (shared by ``discover`` and ``wanda.targets``)."""
    if not isinstance(module, nn.Linear) or never_pruned(relative):
        return False
    if is_router(relative, module) and not router_requested(full, targets):
        return False
    return _matches(full, targets) and not _matches(full, ignore)


def check_decoder_only(model_or_config) -> None:
    """Refuse encoders and encoder-decoders by name (``ConfigError`` on ``model.source``)."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = getattr(config, "model_type", None) or type(model_or_config).__name__
    head = f" ({type(model_or_config).__name__})" if hasattr(model_or_config, "config") else ""
    reason = None
    if getattr(config, "is_encoder_decoder", False):
        reason = "is an encoder-decoder"
    elif kind in ENCODER_MODEL_TYPES:
        reason = "is an encoder (bidirectional attention), whatever causal-LM head is attached"
    if reason:
        raise ConfigError(
            "model.source", f"model type {kind!r}{head} {reason}; Wanda pruning here is for decoder-only causal "
            "language models", "decoder-only causal LMs such as LLaMA, Mistral, Qwen, Gemma, Phi, OPT, GPT-NeoX, "
            "GPT-2 and the MoE families Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss, GraniteMoE")


def check_source_decoder_only(location: str) -> None:
    """The same refusal from a model folder's ``config.json`` alone, before any weight is read."""
    from transformers import AutoConfig

    check_decoder_only(AutoConfig.from_pretrained(location))


def _weight_kind(block: nn.Module, param_name: str, experts: dict[str, nn.Module]) -> str | None:
    """What owns a >=2-D block parameter: "linear", "conv1d", "expert", "router", or None."""
    owner_name, _, leaf = param_name.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    if owner_name in experts:
        return "expert" if leaf in container_parameter_names(owner) else None
    if is_router(owner_name, owner) and leaf in ("weight", "bias"):
        return "router"
    if isinstance(owner, nn.Linear) and leaf == "weight":
        return "linear"
    if is_conv1d(owner) and leaf == "weight":
        return "conv1d"
    return None


def block_weight_kinds(block: nn.Module) -> dict[str, str | None]:
    """Every >=2-D parameter of a block (relative name) and what owns it (None: unsupported)."""
    experts = dict(expert_containers(block))
    return {name: _weight_kind(block, name, experts)
            for name, param in block.named_parameters() if param.dim() >= 2}


def check_block_weights(model: nn.Module, ignore: list[str] | None = None) -> None:
    """Refuse, before any forward pass, >=2-D block weights nothing here can prune.

    Skipping them would leave the model less sparse than its report says; ``ignore`` (globs over
    module or parameter names) leaves them out on purpose.
    """
    ignore = ignore or []
    check_decoder_only(model)
    path, blocks = find_blocks(model)
    unsupported = []
    for index, block in enumerate(blocks):
        for rel, kind in block_weight_kinds(block).items():
            full = f"{path}.{index}.{rel}"
            if kind is None and not (_matches(full, ignore) or _matches(full.rpartition(".")[0], ignore)):
                unsupported.append(f"{full} {tuple(block.get_parameter(rel).shape)}")
    if unsupported:
        shown = ", ".join(unsupported[:8]) + (f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else "")
        raise ConfigError(
            "ignore", f"model type {model_type(model)!r}: {len(unsupported)} weight(s) inside the decoder blocks are "
            f"neither linear, Conv1D, experts nor router weights and cannot be pruned: {shown}",
            "leave them out explicitly with ignore patterns over their module names, e.g. "
            f"'{unsupported[0].split(' ')[0].rpartition('.')[0]}'")


def check_router_requests(model: nn.Module, targets: list[str] | None) -> None:
    """A ``targets`` pattern that names a router which is not an ``nn.Linear`` (transformers 5.x
    ``*TopKRouter`` modules hold a bare weight) would select nothing: say so."""
    path, blocks = find_blocks(model)
    for index, block in enumerate(blocks):
        for rel, module in block.named_modules():
            full = f"{path}.{index}.{rel}"
            if rel and is_router(rel, module) and not isinstance(module, nn.Linear) \
                    and router_requested(full, targets or ["*"]):
                raise ConfigError("targets", f"{full} is a {type(module).__name__}, not a linear layer: pruning "
                                  "this router is not supported", "patterns naming linear routers "
                                  "(e.g. '*.shared_expert_gate'), or none")


def model_targets(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None):
    """Every pruning target of every kind (``wanda.targets.Target``), block by block."""
    from .targets import block_targets

    check_router_requests(model, targets)
    path, blocks = find_blocks(model)
    return [t for index, block in enumerate(blocks) for t in block_targets(block, f"{path}.{index}", targets, ignore)]


def discover(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None) -> BlockLayout:
    """Find blocks and target linear layers.

    ``targets`` and ``ignore`` are glob patterns over full module names
    (``model.named_modules()`` names, e.g. ``*.mlp.*`` or ``*.self_attn.q_proj``).
    Refuses encoders and unprunable block weights first, and warns when the linear targets cover
    less of the decoder blocks than ``wanda.accounting.DEFAULT_MIN_COVERAGE``.
    """
    targets = targets or ["*"]
    ignore = ignore or []
    check_block_weights(model, ignore)
    check_router_requests(model, targets)
    path, blocks = find_blocks(model)
    per_block: list[tuple[str, ...]] = []
    found = []
    for index, block in enumerate(blocks):
        # Every registered target kind's discoverer (wanda.targets): linear, Conv1D, experts.
        targets_here = block_targets(block, f"{path}.{index}", targets, ignore)
        found += targets_here
        # The layout lists module-level targets (linear, Conv1D) relative to the block; expert
        # matrices are slices of one fused parameter and live only as ``Target``s.
        per_block.append(tuple(t.name.removeprefix(f"{path}.{index}.") for t in targets_here if t.kind != "expert"))
    layout = BlockLayout(blocks_path=path, num_blocks=len(blocks), targets=tuple(per_block))
    if not found:
        raise ConfigError(
            "targets", f"no layer of {model_type(model)!r} matches targets={targets} ignore={ignore}",
            "glob patterns over module names, e.g. '*' or '*.mlp.*'",
        )
    from .accounting import coverage_warning

    coverage_warning(model, found, what="targets the pruning driver walks")
    return layout


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)
