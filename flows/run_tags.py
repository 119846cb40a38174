"""The lineage tags a run and its registered version both carry, built in one place."""
from __future__ import annotations

from tasks.lineage import LineageRecord

from .mlflow_uris import TAG


def lineage_tags(record: LineageRecord, candidate=None, commit: str | None = None) -> dict[str, str]:
    """What identifies the run's inputs: the lineage seal, base model, calibration tokens,
    ``dvc.lock``, code commit and the evaluation record (``candidate``: an EvaluationResult)."""
    tags = {
        f"{TAG}lineage_digest": record.digest,
        f"{TAG}base_model_fingerprint": record.base_model_fingerprint or "unknown",
        f"{TAG}calibration_token_digest": record.calibration_token_digest or "unknown",
        f"{TAG}dvc_lock_sha256": record.dvc_lock_sha256 or "absent",
        f"{TAG}git_commit": (commit or record.code_commit) or "unknown",
    }
    if candidate is not None:
        tags[f"{TAG}eval_content_digest"] = candidate.content_digest
    return tags
