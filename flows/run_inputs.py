"""What one pipeline run produced, found on disk: params, stage folders, manifests, results."""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lineage import read_manifests
from tasks.params import PathsSection, cached_document

log = logging.getLogger(__name__)

# Sections of params.yaml the release flows own (tracking, gate): logged as written.
OWN_SECTIONS = ("tracking", "gate")
# Every stage's folder by default (tasks/graph.py's stage list, through the paths section).
DEFAULT_FOLDERS: dict[str, str] = PathsSection().model_dump()


@dataclass
class RunInputs:
    """What one pipeline run produced, as the tracker needs it (paths absolute or relative to
    ``root``). :func:`discover_run_inputs` fills it from params.yaml and the stage folders."""

    root: Path
    params: dict[str, Any] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FOLDERS))
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest_sha256: dict[str, str] = field(default_factory=dict)
    dvc_lock: Path | None = None
    params_file: Path | None = None
    candidate_eval: Path | None = None
    dense_eval: Path | None = None
    sparsity: dict[str, Any] | None = None  # wanda.sparsity_report(...) as masks/sparsity.json holds it
    benchmark: dict[str, Any] | None = None  # BenchmarkReport dump, or flat figures
    savings: dict[str, Any] | None = None  # the savings stage's metrics.json (pruned against dense)
    model_dir: Path | None = None  # the pruned model folder
    plots: list[Path] = field(default_factory=list)
    flow_run_id: str | None = None
    run_name: str | None = None
    extra_artifacts: list[Path] = field(default_factory=list)


def resolved_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters the run used: params.yaml validated with its defaults filled in (through
    tasks/params.py when importable), plus this module's own sections as written."""
    own = {k: raw[k] for k in OWN_SECTIONS if k in raw}
    rest = {k: v for k, v in raw.items() if k not in OWN_SECTIONS}
    try:
        from tasks.params import params_dict, validate_params

        full = params_dict(validate_params(rest))
    except Exception as exc:  # noqa: BLE001 - log what was written rather than nothing
        log.debug("params not validated (%s); logging them as written", exc)
        full = dict(rest)
    return {**full, **own}


def _status(manifest: Mapping[str, Any] | None) -> str | None:
    return None if manifest is None else str(manifest.get("status") or "completed")


def discover_run_inputs(root: str | Path, params_file: str = "params.yaml", **overrides: Any) -> RunInputs:
    """Fill :class:`RunInputs` from ``params.yaml`` and the stage folders it names."""
    root = Path(root).resolve()
    found: dict[str, Any] = {"root": root}
    raw: dict[str, Any] = {}
    if (root / params_file).is_file():
        found["params_file"] = root / params_file
        raw = cached_document(root / params_file)
    found["params"] = resolved_params(raw)
    folders = {**DEFAULT_FOLDERS, **{k: str(v) for k, v in (found["params"].get("paths") or {}).items()}}
    found["folders"] = folders
    found["manifests"], found["manifest_sha256"] = read_manifests(folders, root)
    manifests = found["manifests"]
    if (root / "dvc.lock").is_file():
        found["dvc_lock"] = root / "dvc.lock"
    # Only finished stages count: a skipped or absent evaluation is "missing" to the gate.
    for key, stage in (("candidate_eval", "evaluate"), ("dense_eval", "dense_eval")):
        path = root / folders[stage] / "result.json"
        if _status(manifests.get(stage)) == "completed" and path.is_file():
            found[key] = path
    sparsity = root / folders["masks"] / "sparsity.json"
    if sparsity.is_file():
        found["sparsity"] = json.loads(sparsity.read_text())
    bench = root / folders["benchmark"] / "benchmark.json"
    if _status(manifests.get("benchmark")) == "completed" and bench.is_file():
        found["benchmark"] = json.loads(bench.read_text())
    savings = root / folders["savings"] / "metrics.json"
    if _status(manifests.get("savings")) == "completed" and savings.is_file():
        found["savings"] = json.loads(savings.read_text())
        found.setdefault("extra_artifacts", []).append(savings.with_name("savings.md"))
    model = root / folders["prune"] / "model"
    if (model / "config.json").is_file():
        found["model_dir"] = model
    found["plots"] = sorted((root / folders["evaluate"]).glob("*.png"))
    found.update({k: v for k, v in overrides.items() if v is not None})
    return RunInputs(**found)


def current_flow_run_id() -> str | None:
    """The Prefect flow run id when called inside a flow; Prefect is not imported otherwise."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a flow run context
        return None
