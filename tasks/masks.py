"""Stage ``masks``: one boolean per weight of every target layer (True = pruned).

Outputs: ``masks.safetensors`` (packed bits, with the base model fingerprint and the recipe in its
metadata), ``sparsity.json`` (per-layer report) and, in sequential mode, the statistics taken on
the way (``statistics.safetensors``). Methods that also change the kept weights (SparseGPT) add
``weights.safetensors`` with the updated target weights, which the prune stage applies.
"""
from __future__ import annotations

import json
import logging

from wanda.atomic import write_json
from wanda.plots import layer_sparsity_plot
from wanda.hashing import sha256_file

from .common import StageContext, StageResult, load_model_dir, stage_entry
from .common import offload_dir, open_streamed_dir, streamed
from .progress import block_progress

log = logging.getLogger(__name__)

NAME = "masks"
MASKS = "masks.safetensors"
WEIGHTS = "weights.safetensors"
STATS = "statistics.safetensors"


def prune_config(ctx: StageContext):
    """The recipe: the statistics artifact's settings (how statistics were or will be taken)
    joined with this stage's own section."""
    from .params import prune_config_of

    settings = json.loads(ctx.input("statistics").file("settings.json").read_text())
    return prune_config_of(settings, ctx.params.masks.model_dump())


def describe(config) -> str:
    """How tables name a candidate, e.g. ``wanda 50% unstructured (sequential)`` or
    ``wanda + OWL (M=5) + DSnoT 70% unstructured (one-pass)``: sweep points must not share a name."""
    amount = config.pattern if config.nm else f"{config.sparsity:.0%} unstructured"
    recipe = [config.method]
    if config.allocation == "owl":
        recipe.append(f"OWL (M={config.owl_m:g})")
    if config.variant:
        recipe.append("variant")
    if config.ria_permute:
        recipe.append("channel permutation")
    if config.refine == "dsnot":
        recipe.append("DSnoT")
    return f"{' + '.join(recipe)} {amount} ({config.mode.replace('_', '-')})"


def _metadata(config, lineage: dict) -> dict:
    return {
        "base_model_fingerprint": lineage["base_model_fingerprint"],
        "calibration_token_digest": lineage.get("calibration_token_digest", ""),
        "recipe": json.dumps(config.model_dump(mode="json"), sort_keys=True),
    }


class _Resident:
    """The loaded model: masks in memory, SparseGPT's updated weights read off the model at the end."""

    def __init__(self, ctx: StageContext):
        from wanda.block_source import ResidentBlocks
        from wanda.masks import MaskDict

        self.model, _ = load_model_dir(ctx.input("materialize").file("model"), ctx.params)
        self.blocks, self.masks = ResidentBlocks(self.model), MaskDict()

    def finish(self, ctx: StageContext, config, lineage: dict) -> dict:
        from wanda.accounting import whole_model_accounting
        from wanda.masks import save_masks, sparsity_report
        from wanda.targets import target_of_name

        save_masks(ctx.work / MASKS, self.masks, metadata=_metadata(config, lineage))
        if config.updates_weights:
            from safetensors.torch import save_file

            # Stored parameters by state-dict key: an experts container's fused parameter once
            # for all its experts' targets.
            weights = {}
            for name in self.masks:
                target = target_of_name(self.model, name)
                weights.setdefault(target.numel_key, target.parameter(self.model).detach().to("cpu").contiguous())
            save_file(weights, str(ctx.work / WEIGHTS),
                      metadata={"base_model_fingerprint": lineage["base_model_fingerprint"]})
        # The masks are applied to the loaded model by now: block-wide and whole-model zeros.
        return sparsity_report(self.masks, whole_model_accounting(self.model, self.masks))

    def close(self) -> None:
        pass


class _Streamed:
    """One block in memory: masks packed to disk as blocks finish, SparseGPT's updated weights
    written block by block as the source hands each block back."""

    def __init__(self, ctx: StageContext, config, lineage: dict, scratch):
        from wanda.accounting import StreamedCounts
        from wanda.architecture import discover
        from wanda.streaming import BlockWeightsWriter, MaskSpool

        self.blocks = open_streamed_dir(ctx.input("materialize").file("model"), ctx.params)
        self.model, self.writer = self.blocks.model, None
        # Every pruned block's weights are counted as the walk hands it back: the block-wide and
        # whole-model figures of the loaded mode, without the pruned model in memory.
        self.counts = StreamedCounts(self.blocks.path)
        if config.updates_weights:
            layout = discover(self.model, config.targets, config.ignore)
            self.writer = BlockWeightsWriter(ctx.work / WEIGHTS, self.blocks, layout,
                                             {"base_model_fingerprint": lineage["base_model_fingerprint"]})
        self.blocks.on_done = self._block_done
        self.masks = MaskSpool(scratch)

    def _block_done(self, index: int, block) -> None:
        if self.writer is not None:
            self.writer(index, block)
        self.counts(index, block)

    def finish(self, ctx: StageContext, config, lineage: dict) -> dict:
        if self.writer is not None:
            self.writer.close()
        self.masks.save(ctx.work / MASKS, metadata=_metadata(config, lineage))
        import math

        self.blocks.load_outside()
        try:
            self.counts.add_outside(self.model)
        finally:
            self.blocks.release_outside()
        if len(self.counts.blocks_seen) != len(self.blocks.blocks):
            raise RuntimeError(f"whole-model accounting saw {len(self.counts.blocks_seen)} of "
                               f"{len(self.blocks.blocks)} blocks")
        accounting = self.counts.accounting({name: math.prod(shape) for name, shape in self.masks.shapes.items()})
        return {**self.masks.report(), **accounting.report_fields()}

    def close(self) -> None:
        self.masks.close()


def _body(ctx: StageContext) -> StageResult:
    from wanda.calibration import CalibrationSet
    from wanda.prune import compute_masks, prune_model
    from wanda.statistics import ActivationStatistics

    config = prune_config(ctx)
    lineage = ctx.lineage()
    with offload_dir(ctx.params) as scratch:
        # The block source is chosen once; everything after runs the same for both.
        out = _Streamed(ctx, config, lineage, scratch) if streamed(ctx.params) else _Resident(ctx)
        try:
            stats_out = None
            if config.mode == "one_pass":
                stats = None
                if config.needs_statistics:
                    stats = ActivationStatistics.load(ctx.input("statistics").file("statistics.safetensors"))
                compute_masks(out.model, stats, config, blocks=out.blocks, masks_out=out.masks,
                              progress=block_progress(f"masks: {describe(config)}"))
            else:
                calib = CalibrationSet.load(ctx.input("calibration").file("tokens.safetensors"))
                stats_out = ActivationStatistics()
                prune_model(out.model, calib.tokens if config.needs_statistics else None, config,
                            statistics_out=stats_out, progress=block_progress(f"masks: {describe(config)}"),
                            blocks=out.blocks, masks_out=out.masks, offload_dir=scratch)
            report = out.finish(ctx, config, lineage)
            return _result(ctx, config, report, len(out.masks), stats_out, lineage, dict(out.masks.metadata))
        finally:
            out.close()


def _expert_tokens(ctx: StageContext, metadata: dict) -> None:
    """MoE models: routed calibration tokens per expert per block, as a table and a heat map."""
    if "expert_tokens" not in metadata:
        return
    from wanda.experts import tokens_per_expert_table
    from wanda.plots import tokens_per_expert_plot

    tokens = json.loads(metadata["expert_tokens"])
    write_json(ctx.work / "tokens_per_expert.json",
               {"policy": metadata.get("expert_policy", ""), "fallbacks": json.loads(metadata.get("expert_fallbacks",
                                                                                                  "{}")),
                "rows": tokens_per_expert_table(tokens)})
    tokens_per_expert_plot(tokens, ctx.work / "tokens_per_expert.png")


def _result(ctx: StageContext, config, report: dict, layers: int, stats_out, lineage: dict,
            masks_metadata: dict | None = None) -> StageResult:
    masks_metadata = masks_metadata or {}
    write_json(ctx.work / "sparsity.json", report)
    layer_sparsity_plot(report, ctx.work / "sparsity.png", title=describe(config))
    _expert_tokens(ctx, masks_metadata)
    summary = {
        "recipe": config.model_dump(mode="json"),
        "label": describe(config),
        "mode": config.mode,
        "overall_sparsity": report["overall"],
        "layers": layers,
        "updates_weights": bool(getattr(config, "updates_weights", False)),
    }
    lineage_out = {"masks_digest": sha256_file(ctx.work / MASKS)}
    if stats_out is not None and stats_out.layers:
        stats_out.save(ctx.work / STATS, metadata={"base_model_fingerprint": lineage["base_model_fingerprint"]})
        summary["sequential_statistics"] = STATS
    if summary["updates_weights"]:
        lineage_out["updated_weights_digest"] = sha256_file(ctx.work / WEIGHTS)
    return StageResult(summary=summary, lineage=lineage_out)


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
