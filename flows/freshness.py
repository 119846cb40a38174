"""May the workspace be tracked? Only a state ``dvc.lock`` records, made from one model chain.

``wanda-pipeline track`` logs whatever the stage folders hold. After a failed run on another
model, or with a parameter changed since the last run, those folders are an older state that
no longer matches ``params.yaml``: logging it would register the previous model's perplexity
as "evaluation: ok". Before anything is logged, two witnesses must agree:

- DVC: every stage of the main graph is cached (:func:`flows.status.pipeline_status`: no
  changed parameter, input, code file or output);
- the manifests: the evaluated model is the prune stage's output (the evaluate result's and
  manifest's ``pruned_model_fingerprint`` equal the prune stage's), which was made from the
  materialized base model (same ``base_model_fingerprint``), and every manifest names the
  manifest of its input that is on disk (:func:`tasks.lineage.verify_chain`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks import graph
from tasks.lineage import build_lineage, read_manifests, verify_chain
from tasks.params import PathsSection, cached_document

log = logging.getLogger(__name__)


class StaleState(RuntimeError):
    """The workspace is not what ``dvc.lock`` records, or its model chain does not match."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("refusing to track a stale or mismatched workspace: " + "; ".join(problems))


def dvc_problems(root: Path) -> list[str]:
    """Stages of the main graph that are not cached, each with DVC's reasons."""
    from .status import UP_TO_DATE, pipeline_status

    main = set(graph.order())
    return [f"stage {s.address} is {s.state}" + (f" ({'; '.join(s.reasons)})" if s.reasons else "")
            for s in pipeline_status(root) if s.address in main and s.state != UP_TO_DATE]


def _fact(manifests: dict, stage: str, key: str) -> str | None:
    return ((manifests.get(stage) or {}).get("lineage") or {}).get(key)


def lineage_problems(root: Path, params_file: str = "params.yaml") -> list[str]:
    """Where the evaluated model, the pruned model and the base model do not chain up."""
    path = root / params_file
    folders = PathsSection(**((cached_document(path).get("paths") if path.is_file() else None) or {})).model_dump()
    manifests, digests = read_manifests(folders, root)
    problems = [f"stage {stage} has no manifest in {folders[stage]} (never run here)"
                for stage in ("materialize", "prune", "evaluate") if stage not in manifests]
    if problems:
        return problems
    pruned = _fact(manifests, "prune", "pruned_model_fingerprint")
    for stage, key, expected, owner in (
            ("evaluate", "pruned_model_fingerprint", pruned, "prune"),
            ("prune", "base_model_fingerprint", _fact(manifests, "materialize", "base_model_fingerprint"),
             "materialize"),
            ("dense_eval", "base_model_fingerprint", _fact(manifests, "materialize", "base_model_fingerprint"),
             "materialize")):
        if stage in manifests and _fact(manifests, stage, key) != expected:
            problems.append(f"{stage} was made from {key} {_fact(manifests, stage, key)}, but {owner} holds "
                            f"{expected}")
    result = root / folders["evaluate"] / "result.json"
    try:
        evaluated = json.loads(result.read_text(encoding="utf-8")).get("model_fingerprint")
    except (OSError, ValueError):
        evaluated = None
        problems.append(f"{result.relative_to(root)} is absent or unreadable")
    if evaluated is not None and evaluated != pruned:
        problems.append(f"the evaluation result is of model {evaluated}, but the prune stage holds {pruned}")
    record = build_lineage(manifests, folders, manifest_sha256=digests)
    problems += [f"{c.path}: {c.note or c.status} (recorded {c.expected}, on disk {c.actual})"
                 for c in verify_chain(record) if c.status != "ok"]
    return problems


def check_trackable(root: str | Path, params_file: str = "params.yaml") -> None:
    """Raise :class:`StaleState` naming every stale stage and lineage break; return when clean."""
    root = Path(root)
    problems = dvc_problems(root) + lineage_problems(root, params_file)
    if problems:
        raise StaleState(problems)
    log.info("workspace matches dvc.lock and its model chain: ok to track")
