"""Stage ``calibration``: seeded windows of calibration tokens, their digest and a quality report.

Outputs: ``tokens.safetensors`` (``[nsamples, seqlen]`` int64, digest in its metadata) and
``report.json``. When the configured text file is absent and a ``fallback`` is set (the embedded
default falls back to text shipped with Python), the artifact says which source was used.
"""
from __future__ import annotations

import json
import logging

from wanda.atomic import write_json

from .common import StageContext, StageResult, stage_entry

log = logging.getLogger(__name__)
NAME = "calibration"
TOKENS = "tokens.safetensors"


def _body(ctx: StageContext) -> StageResult:
    from transformers import AutoTokenizer

    from wanda.calibration import sample_calibration

    base = ctx.input("materialize")
    config, note = ctx.params.calibration.resolve()
    if note:
        log.warning("%s", note)
    model_dir = base.file("model")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    context = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    calib = sample_calibration(tokenizer, config, max_context=context)
    fingerprint = base.lineage["base_model_fingerprint"]
    calib.save(ctx.work / TOKENS, metadata={"base_model_fingerprint": fingerprint,
                                            "source": config.source.describe()})
    write_json(ctx.work / "report.json", calib.report)
    summary = {
        "token_digest": calib.digest,
        "source": config.source.model_dump(mode="json", exclude_defaults=True),
        "source_description": config.source.describe(),
        "fallback_used": note,
        "source_digest": calib.report.get("source_digest"),
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "report": calib.report,
    }
    return StageResult(summary=summary, lineage={"calibration_token_digest": calib.digest})


run, main = stage_entry(NAME, _body)


if __name__ == "__main__":
    main()
