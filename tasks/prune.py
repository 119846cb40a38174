"""Stage ``prune``: the pruned model, written as a materialized safetensors folder.

The base weights with the masks applied (and, for weight-updating methods, the updated target
weights from the masks artifact first), tensor by tensor in every load mode. The masks'
recorded base model must be the base model read here; every masked weight is checked to be
exactly zero before it is written.
"""
from __future__ import annotations

from wanda.errors import ArtifactMismatchError

from .common import StageContext, StageResult, stage_entry

NAME = "prune"


def _body(ctx: StageContext) -> StageResult:
    """One path for every load mode: the base shards copied, each masked tensor rewritten in
    place (its updated weights first, for weight-updating methods), checked, then cast to
    ``prune.dtype``. The same bytes a loaded model masked and saved would give, with one tensor
    in memory instead of the model."""
    import json

    from wanda.atomic import write_json
    from wanda.model_io import fingerprint as weights_fingerprint
    from wanda.streaming import apply_masks_to_checkpoint, convert_shards

    base, masks_artifact = ctx.input("materialize"), ctx.input("masks")
    fingerprint = base.lineage["base_model_fingerprint"]
    _check_masks_base(masks_artifact, fingerprint)
    out = ctx.work / "model"
    weights = masks_artifact.file("weights.safetensors") if masks_artifact.summary.get("updates_weights") else None
    counts = apply_masks_to_checkpoint(base.file("model"), out, masks_artifact.file("masks.safetensors"), weights)
    base_record = json.loads((base.file("model") / "wanda_model.json").read_text())
    dtype = ctx.params.prune.dtype or base_record["dtype"]
    if dtype != base_record["dtype"]:
        from wanda.model_io import DTYPES

        convert_shards(out, DTYPES[dtype])
    info = {"fingerprint": weights_fingerprint(out), "model_type": base_record["model_type"], "dtype": dtype,
            "source": base.summary.get("source", ""), "base_model_fingerprint": fingerprint,
            "masks_digest": masks_artifact.lineage.get("masks_digest", ""), "pruned": True}
    write_json(out / "wanda_model.json", info)
    return _result(masks_artifact, info["fingerprint"], dtype, masks_artifact.summary.get("overall_sparsity"),
                   counts["zeros"], counts["total"])


def _check_masks_base(masks_artifact, fingerprint: str) -> None:
    """The manifests already agree (common.check_lineage); the masks file's own record must too."""
    from safetensors import safe_open

    with safe_open(str(masks_artifact.file("masks.safetensors")), "pt") as handle:  # the header only
        recorded = (handle.metadata() or {}).get("base_model_fingerprint")
    if recorded and recorded != fingerprint:
        raise ArtifactMismatchError(
            f"masks were computed for base model {recorded[:16]}, but the base model is {fingerprint[:16]}")


def _result(masks_artifact, fingerprint: str, dtype: str, mask_sparsity, zeros: int, total: int) -> StageResult:
    summary = {
        "fingerprint": fingerprint,
        "dtype": dtype,
        "recipe": masks_artifact.summary.get("recipe"),
        "label": masks_artifact.summary.get("label"),
        "mask_sparsity": mask_sparsity,
        # Counted on the written weights: includes weights that were zero before pruning.
        "zero_fraction": round(zeros / total, 6) if total else 0.0,
    }
    return StageResult(summary=summary, lineage={"pruned_model_fingerprint": fingerprint})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
