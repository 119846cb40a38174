"""Stage ``masks``: one boolean per weight of every target layer (True = pruned).

Outputs: ``masks.safetensors`` (packed bits, with the base model fingerprint and the recipe in its
metadata), ``sparsity.json`` (per-layer report) and, in sequential mode, the statistics taken on
the way (``statistics.safetensors``). Methods that also change the kept weights (SparseGPT) add
``weights.safetensors`` with the updated target weights, which the prune stage applies.
"""
from __future__ import annotations

import json

from wanda.atomic import write_json
from wanda.plots import layer_sparsity_plot
from wanda.hashing import sha256_file

from .common import StageContext, StageResult, load_model_dir, stage_entry
from .common import offload_dir, open_streamed_dir, streamed

NAME = "masks"
MASKS = "masks.safetensors"
WEIGHTS = "weights.safetensors"
STATS = "statistics.safetensors"


def prune_config(ctx: StageContext):
    """The recipe: the statistics artifact's settings (how statistics were or will be taken)
    joined with this stage's own section."""
    from wanda.config import PruneConfig

    settings = json.loads(ctx.input("statistics").file("settings.json").read_text())
    return PruneConfig(**settings, **ctx.params.masks.model_dump())


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


def _streamed_body(ctx: StageContext, config, lineage: dict) -> tuple[dict, dict, object]:
    """Masks with one block in memory: masks packed to disk as blocks finish, SparseGPT's updated
    weights written block by block. Returns (report, summary extras, statistics or None)."""
    from wanda.architecture import discover
    from wanda.calibration import CalibrationSet
    from wanda.prune import masks_from_statistics, prune_model
    from wanda.statistics import ActivationStatistics
    from wanda.streaming import BlockWeightsWriter, MaskSpool

    blocks = open_streamed_dir(ctx.input("materialize").file("model"), ctx.params)
    writer = None
    if config.updates_weights:
        layout = discover(blocks.model, config.targets, config.ignore)
        writer = BlockWeightsWriter(ctx.work / WEIGHTS, blocks, layout,
                                    {"base_model_fingerprint": lineage["base_model_fingerprint"]})
        blocks.on_done = writer
    stats_out = None
    with offload_dir(ctx.params) as scratch:
        spool = MaskSpool(scratch)
        try:
            if config.mode == "one_pass":
                stats = None
                if config.needs_statistics:
                    stats = ActivationStatistics.load(ctx.input("statistics").file("statistics.safetensors"))
                masks_from_statistics(blocks.model, stats, config, blocks=blocks, masks_out=spool)
            else:
                calib = CalibrationSet.load(ctx.input("calibration").file("tokens.safetensors"))
                stats_out = ActivationStatistics()
                prune_model(blocks.model, calib.tokens if config.needs_statistics else None, config,
                            statistics_out=stats_out, blocks=blocks, masks_out=spool, offload_dir=scratch)
            if writer is not None:
                writer.close()
            spool.save(ctx.work / MASKS, metadata=_metadata(config, lineage))
            return spool.report(), len(spool), stats_out
        finally:
            spool.close()


def _metadata(config, lineage: dict) -> dict:
    return {
        "base_model_fingerprint": lineage["base_model_fingerprint"],
        "calibration_token_digest": lineage.get("calibration_token_digest", ""),
        "recipe": json.dumps(config.model_dump(mode="json"), sort_keys=True),
    }


def _body(ctx: StageContext) -> StageResult:
    from wanda.calibration import CalibrationSet
    from wanda.masks import save_masks, sparsity_report
    from wanda.prune import compute_masks, prune_model
    from wanda.statistics import ActivationStatistics

    config = prune_config(ctx)
    lineage = ctx.lineage()
    if streamed(ctx.params):
        report, layers, stats_out = _streamed_body(ctx, config, lineage)
        return _result(ctx, config, report, layers, stats_out, lineage)
    model, _ = load_model_dir(ctx.input("materialize").file("model"), ctx.params)
    stats_out = None
    if config.mode == "one_pass":
        stats = None
        if config.needs_statistics:
            stats = ActivationStatistics.load(ctx.input("statistics").file("statistics.safetensors"))
        masks = compute_masks(model, stats, config)
    else:
        calib = CalibrationSet.load(ctx.input("calibration").file("tokens.safetensors"))
        stats_out = ActivationStatistics()
        masks = prune_model(model, calib.tokens if config.needs_statistics else None, config,
                            statistics_out=stats_out)
    save_masks(ctx.work / MASKS, masks, metadata=_metadata(config, lineage))
    if config.updates_weights:
        from safetensors.torch import save_file

        modules = dict(model.named_modules())
        weights = {f"{name}.weight": modules[name].weight.detach().to("cpu").contiguous() for name in masks}
        save_file(weights, str(ctx.work / WEIGHTS), metadata={"base_model_fingerprint": lineage["base_model_fingerprint"]})
    return _result(ctx, config, sparsity_report(masks), len(masks), stats_out, lineage)


def _result(ctx: StageContext, config, report: dict, layers: int, stats_out, lineage: dict) -> StageResult:
    write_json(ctx.work / "sparsity.json", report)
    layer_sparsity_plot(report, ctx.work / "sparsity.png", title=describe(config))
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
