"""``wanda-pipeline status``: which stages are cached, stale or missing, and why.

The answer is DVC's (``dvc status`` against ``dvc.lock``), translated into stage terms, with
parameter changes spelled out (``masks.sparsity: 0.5 -> 0.6``) and the content checks DVC
cannot make itself (:func:`flows.prepare.content_force_reasons`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks import graph
from tasks.params import PipelineParams, load_params, read_yaml

from . import dvc
from .prepare import content_force_reasons

log = logging.getLogger(__name__)

UP_TO_DATE, STALE, MISSING, MODIFIED, UPSTREAM = "cached", "stale", "missing", "modified", "stale (upstream)"
# Outputs whose bytes differ from dvc.lock although DVC calls them up to date (a damaged cache
# object checked out: DVC trusts its state database and does not re-hash).
DAMAGED = "damaged"


@dataclass
class StageState:
    address: str
    state: str
    reasons: list[str] = field(default_factory=list)
    outcome: str | None = None  # manifest status when present: completed / skipped (+ reason)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _param_changes(root: Path, lock_entry: dict, params_file: str, keys: dict[str, str]) -> list[str]:
    """``section.field: old -> new`` for each changed parameter under the changed keys."""
    recorded = ((lock_entry or {}).get("params") or {}).get(params_file) or {}
    current = read_yaml(root / params_file) if (root / params_file).is_file() else {}
    changes = []
    for key, kind in keys.items():
        old = _flatten(recorded.get(key, {}), f"{key}.") if key in recorded else {}
        node: Any = current
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        new = _flatten(node, f"{key}.") if node is not None else {}
        diff = [f"{name}: {old.get(name, '(unset)')} -> {new.get(name, '(unset)')}"
                for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        changes += diff or [f"{key}: {kind}"]
    return changes


def _reasons(root: Path, address: str, entries: list, lock_entry: dict | None, code: set[str]) -> tuple[str, list[str]]:
    if lock_entry is None:
        return MISSING, ["never run (no dvc.lock entry)"]
    reasons: list[str] = []
    inputs_changed = deleted = modified = False
    for entry in entries:
        if isinstance(entry, str):
            reasons.append(entry)  # "changed command", "always changed"
            inputs_changed = True
            continue
        for path, change in (entry.get("changed deps") or {}).items():
            inputs_changed = True
            if isinstance(change, dict):  # a parameter file
                reasons += [f"parameter {line}" for line in _param_changes(root, lock_entry, path, change)]
            elif path in code or any(path.startswith(c.rstrip("/") + "/") for c in code):
                reasons.append(f"code {change}: {path}")
            else:
                reasons.append(f"input {change}: {path}")
        for path, change in (entry.get("changed outs") or {}).items():
            deleted |= change in ("deleted", "not in cache")
            modified |= change not in ("deleted", "not in cache")
            reasons.append(f"output {change}: {path}")
    if deleted:
        return MISSING, reasons
    if inputs_changed:
        return STALE, reasons
    # Only the outputs changed, outside the pipeline: DVC restores them from its run cache.
    return (MODIFIED if modified else STALE), reasons


def _lock_entries(root: Path) -> dict[str, dict]:
    entries = {}
    for name, entry in (dvc.read_lock(root / "dvc.lock").get("stages") or {}).items():
        entries[name] = entry
    for lock in sorted((root / "sweeps").glob("*/dvc.lock")):
        prefix = lock.parent.relative_to(root).as_posix() + "/dvc.yaml:"
        for name, entry in (dvc.read_lock(lock).get("stages") or {}).items():
            entries[prefix + name] = entry
    return entries


def _addresses(root: Path) -> list[tuple[str, list[str]]]:
    """Every stage address with its upstream addresses: the main graph, then each sweep."""
    found = [(spec.name, list(spec.inputs)) for spec in graph.STAGES]
    for pipeline in sorted((root / "sweeps").glob("*/dvc.yaml")):
        prefix = pipeline.relative_to(root).as_posix() + ":"
        document = read_yaml(pipeline)
        sweep_params = read_yaml(pipeline.parent / "params.yaml")
        for point, entry in (sweep_params.get("points") or {}).items():
            stages = entry.get("stages") or []
            for name in stages:
                ups = [prefix + f"{point}-{u}" if u in stages else u for u in graph.stage(name).inputs]
                found.append((prefix + f"{point}-{name}", ups))
        if "report" in (document.get("stages") or {}):
            points = sweep_params.get("points") or {}
            found.append((prefix + "report", ["dense_eval"] + [prefix + f"{p}-evaluate" for p in points]))
    return found


def pipeline_status(repo: str | Path = ".") -> list[StageState]:
    root = dvc.find_root(repo)
    status = dvc.status(root)
    locks = _lock_entries(root)
    addresses = _addresses(root)
    code: set[str] = set()  # the stages' code files; the import closure is computed only for a stage not cached
    try:
        params: PipelineParams | None = load_params(root / "params.yaml")
    except Exception as exc:
        log.warning("params.yaml does not validate: %s", exc)
        params = None
    extra = content_force_reasons(root, params) if params is not None else {}

    states: dict[str, StageState] = {}
    for address, upstream in addresses:
        entry_name = address.split(":", 1)[1] if ":" in address else address
        lock_key = address if ":" in address else entry_name
        state, reasons = (UP_TO_DATE, [])
        if address in status or lock_key not in locks:
            code = code or set(graph.code_files(graph.order())) | set(graph.SWEEP_REPORT.code_files)
            state, reasons = _reasons(root, address, status.get(address, []), locks.get(lock_key), code)
        if address in extra:
            state, reasons = STALE, reasons + [extra[address]]
        if state == UP_TO_DATE:
            damaged = dvc.damaged_outputs(root, address)
            if damaged:
                state, reasons = DAMAGED, [f"output {d.describe()}" for d in damaged] + [
                    "delete the damaged file and `wanda-pipeline run`: the bad cache object is dropped and the stage re-run"]
        if state == UP_TO_DATE:
            blocked = [u for u in upstream if u in states and states[u].state != UP_TO_DATE]
            if blocked:
                state, reasons = UPSTREAM, [f"re-runs if {', '.join(blocked)} produce new bytes"]
        states[address] = StageState(address, state, reasons, _outcome(root, address, params))
    return list(states.values())


def _outcome(root: Path, address: str, params: PipelineParams | None) -> str | None:
    from tasks.common import read_stage_record

    if params is None or ":" in address or address not in graph.by_name():
        return None
    manifest = read_stage_record(root / getattr(params.paths, address))
    if not manifest:
        return None
    if manifest.get("status") == "skipped":
        return f"skipped: {manifest.get('reason')}"
    # The run facts live beside the folder: outputs DVC restored from its cache have none here.
    if manifest.get("run_facts") is None:
        return f"{manifest.get('status')}; restored from DVC's cache, no run facts here"
    wall = manifest.get("wall_s")
    return f"{manifest.get('status')} at {manifest.get('started_at')}" + (f" in {wall:.1f} s" if wall is not None else "")


def render(states: list[StageState]) -> str:
    width = max(len(s.address) for s in states)
    lines = [f"{'stage'.ljust(width)}  {'state'.ljust(16)}  why"]
    for s in states:
        why = "; ".join(s.reasons) if s.reasons else ("up to date" + (f" ({s.outcome})" if s.outcome else ""))
        lines.append(f"{s.address.ljust(width)}  {s.state.ljust(16)}  {why}")
    return "\n".join(lines)


def as_json(states: list[StageState]) -> list[dict]:
    return [asdict(s) for s in states]
