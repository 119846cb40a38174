"""Calibration and evaluation data as MLflow dataset inputs: metadata and digests only."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tasks.lineage import LineageRecord

from .run_inputs import RunInputs


def _digest_dataset(name: str, uri: str, sha256: str, profile: Mapping[str, Any]):
    """An MLflow dataset that is only metadata: where the data came from and its sha256.

    MLflow keeps at most 36 characters of a dataset digest, so the digest field holds the first
    32 hex digits and the full sha256 travels in the profile and the input tags.
    """
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    class WandaDataSource(DatasetSource):
        def __init__(self, uri: str, sha: str):
            self.uri, self.sha256 = uri, sha

        @staticmethod
        def _get_source_type() -> str:
            return "wanda"

        def load(self) -> Any:  # the pipeline reads its data itself
            raise NotImplementedError

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> "WandaDataSource":
            raise NotImplementedError

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri, "sha256": self.sha256}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> "WandaDataSource":
            return cls(source_dict["uri"], source_dict["sha256"])

    class DigestDataset(MetaDataset):
        @property
        def profile(self) -> Any:
            return dict(profile)

        def to_dict(self) -> dict[str, str]:
            data = super().to_dict()
            data["profile"] = json.dumps(dict(profile), sort_keys=True, default=str)
            return data

    return DigestDataset(WandaDataSource(uri, sha256), name=name, digest=sha256[:32])


def log_datasets(client, run_id: str, inputs: RunInputs, record: LineageRecord, candidate, dense) -> None:
    from mlflow.entities import DatasetInput, InputTag

    datasets = []

    def add(name: str, context: str, uri: str, sha: str, profile: dict[str, Any]) -> None:
        ds = _digest_dataset(name, uri, sha, profile)._to_mlflow_entity()
        datasets.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context), InputTag("sha256", sha)]))

    if record.calibration_token_digest:
        calib = record.stages.get("calibration")
        summary = calib.summary if calib else {}
        add("calibration", "calibration", record.calibration_source or "unknown", record.calibration_token_digest,
            {"token_digest": record.calibration_token_digest, "text_digest": summary.get("source_digest"),
             "nsamples": summary.get("nsamples"), "seqlen": summary.get("seqlen"),
             "fallback_used": summary.get("fallback_used")})
    for label, result in (("evaluation", candidate), ("dense_evaluation", dense)):
        if result is None or result.perplexity is None:
            continue
        ppl = result.perplexity
        add(f"{label}.perplexity", "evaluation", ppl.source, ppl.tokens_digest,
            {"tokens_digest": ppl.tokens_digest, "text_digest": ppl.text_digest, "windows": ppl.windows,
             "seqlen": ppl.seqlen})
    if candidate is not None and candidate.zeroshot is not None:
        for task, score in candidate.zeroshot.tasks.items():
            sha = score.data_digest or score.definition_digest
            if sha:
                add(f"zeroshot.{task}", "evaluation", score.data_file or task, sha,
                    {"data_digest": score.data_digest, "definition_digest": score.definition_digest,
                     "samples": score.samples})
    if datasets:
        client.log_inputs(run_id, datasets=datasets)
