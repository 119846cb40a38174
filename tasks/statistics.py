"""Stage ``statistics``: per-input-channel activation statistics of every target layer.

``one_pass`` mode takes them from the dense model in one walk over the calibration set
(``statistics.safetensors``), and every mask configuration reuses them: a sparsity, pattern or
method change re-runs only the masks stage onward. ``sequential`` mode (the paper's procedure)
cannot separate them from the masks, because block k's statistics come from the outputs of the
already-pruned blocks before it; the masks stage computes both, and this stage only records the
settings (``settings.json``), so the artifact says which mode was used either way.
"""
from __future__ import annotations


from wanda.atomic import write_json
from wanda.hashing import sha256_file

from .common import StageContext, StageResult, load_model_dir, stage_entry
from .common import offload_dir, open_streamed_dir, streamed
from .progress import block_progress

NAME = "statistics"
STATS = "statistics.safetensors"
SETTINGS = "settings.json"


def _body(ctx: StageContext) -> StageResult:
    section = ctx.params.statistics
    settings = section.model_dump(mode="json")
    write_json(ctx.work / SETTINGS, settings)
    if section.mode == "sequential":
        summary = {"mode": "sequential", "computed": False,
                   "note": "sequential mode: the masks stage computes statistics block by block on the "
                           "already-pruned prefix, together with the masks"}
        return StageResult(summary=summary, lineage={"statistics_mode": "sequential"})

    from wanda.calibration import CalibrationSet
    from wanda.prune import collect_statistics

    calib = CalibrationSet.load(ctx.input("calibration").file("tokens.safetensors"))
    model_dir = ctx.input("materialize").file("model")
    if streamed(ctx.params):
        blocks = open_streamed_dir(model_dir, ctx.params)
        model = blocks.model
    else:
        (model, _), blocks = load_model_dir(model_dir, ctx.params), None
    with offload_dir(ctx.params) as scratch:
        stats = collect_statistics(model, calib.tokens, batch_size=section.batch_size, targets=section.targets,
                                   ignore=section.ignore, blocks=blocks, offload_dir=scratch,
                                   expert_policy=section.expert_policy,
                                   progress=block_progress("statistics: one-pass walk"))
    lineage = ctx.lineage()
    stats.save(ctx.work / STATS, metadata={"base_model_fingerprint": lineage["base_model_fingerprint"],
                                           "calibration_token_digest": calib.digest})
    digest = sha256_file(ctx.work / STATS)
    summary = {"mode": "one_pass", "computed": True, "layers": len(stats.layers), "digest": digest,
               "tokens": int(calib.tokens.numel())}
    return StageResult(summary=summary, lineage={"statistics_mode": "one_pass", "statistics_digest": digest})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
