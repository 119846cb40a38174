"""Lineage: what made an artifact, and whether the bytes still say so. No MLflow, no DVC import.

It lives beside the code that writes the stage manifests (``tasks/common.py``) because it knows
their format and DVC's lock file; the library (``wanda/``) knows neither.

A lineage record joins two independent witnesses of a pipeline run:
- the stage manifests (``artifacts/<stage>/manifest.json``): parameters, input and output sha256
  digests, code version, library versions, wall time and peak memory of each stage;
- ``dvc.lock``: DVC's md5 of every stage output, the key under which DVC's cache and remote store
  the bytes.

Verification recomputes both kinds of hash from the bytes that are still around. DVC's hashes are
reproduced here without importing DVC (an audit must work where DVC is absent): a file's hash is
the md5 of its bytes (DVC 3 ``hash: md5``); a directory's is the md5 of the JSON listing
``[{"md5": ..., "relpath": ...}, ...]`` sorted by relpath, dumped with ``sort_keys``, plus the
suffix ``.dir``; that listing is stored in the cache as the ``.dir`` object itself, so a directory
can be verified file by file from the cache alone (``.dvcignore`` is not applied: pipeline outputs
hold no ignored files). Tests cross-check these functions against DVC's own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field

from wanda.hashing import sha256_file

from .common import MANIFEST as MANIFEST_NAME
from .common import read_run_facts
from .graph import order as _stage_order

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- DVC hashes

_MD5_MEMO: dict[tuple[str, int, int], str] = {}


def md5_file(path: str | Path) -> str:
    """md5 of a file's bytes; memoized by (path, size, mtime) since an audit meets the same
    multi-gigabyte weight file several times (workspace check, model folder check)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _MD5_MEMO:
        return _MD5_MEMO[key]
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    _MD5_MEMO[key] = digest.hexdigest()
    return _MD5_MEMO[key]


def dir_listing(directory: str | Path) -> list[dict[str, str]]:
    """DVC's ``.dir`` listing of a directory: every file below it, md5 and posix relpath."""
    directory = Path(directory)
    entries = [{"md5": md5_file(p), "relpath": p.relative_to(directory).as_posix()}
               for p in directory.rglob("*") if p.is_file()]
    return sorted(entries, key=lambda e: e["relpath"])


def listing_md5(listing: list[dict[str, str]]) -> str:
    """The hash DVC gives a directory with this listing (``<md5>.dir``)."""
    data = json.dumps(sorted(listing, key=lambda e: e["relpath"]), sort_keys=True).encode("utf-8")
    return hashlib.md5(data, usedforsecurity=False).hexdigest() + ".dir"


def dvc_md5(path: str | Path) -> str:
    """What ``dvc.lock`` records as ``md5`` for a file or directory output."""
    path = Path(path)
    return listing_md5(dir_listing(path)) if path.is_dir() else md5_file(path)


def cache_object(cache_dir: str | Path, md5: str) -> list[Path]:
    """Candidate locations of an object in a DVC cache or local remote (DVC 3, then DVC 2 layout)."""
    cache_dir = Path(cache_dir)
    return [cache_dir / "files" / "md5" / md5[:2] / md5[2:], cache_dir / md5[:2] / md5[2:]]


# ----------------------------------------------------------------------------- records

class StageLineage(BaseModel):
    """One stage as its manifest (``tasks/common.py``, schema ``wanda-stage-manifest/1``) says."""

    stage: str
    folder: str  # the stage's artifact folder, relative to the repository root
    status: str = "completed"  # "completed" | "skipped"
    reason: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)  # key -> {path, manifest_sha256, outputs}
    outputs: dict[str, str] = Field(default_factory=dict)  # relpath in folder -> sha256
    lineage: dict[str, Any] = Field(default_factory=dict)  # facts: base_model_fingerprint, ...
    summary: dict[str, Any] = Field(default_factory=dict)
    code_version: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, Any] = Field(default_factory=dict)
    wall_s: float | None = None
    peak_memory_mb: float | None = None
    manifest_sha256: str | None = None  # of the manifest file's bytes


class DvcOut(BaseModel):
    stage: str
    path: str
    md5: str
    size: int | None = None
    nfiles: int | None = None


class LineageRecord(BaseModel):
    """Everything an auditor needs to trace a model back; ``digest`` seals it."""

    base_model_fingerprint: str | None = None
    base_model_source: str | None = None
    calibration_source: str | None = None
    calibration_token_digest: str | None = None
    pruned_model_fingerprint: str | None = None
    code_commit: str | None = None
    code_dirty: bool | None = None
    dvc_lock_sha256: str | None = None
    facts: dict[str, Any] = Field(default_factory=dict)  # every stage's lineage facts, merged
    versions: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, StageLineage] = Field(default_factory=dict)
    dvc_outs: list[DvcOut] = Field(default_factory=list)
    digest: str = ""

    def sealed(self) -> "LineageRecord":
        return self.model_copy(update={"digest": self.compute_digest()})

    def compute_digest(self) -> str:
        return canonical_digest(self.model_dump(mode="json", exclude={"digest"}))

    def out_for(self, path: str) -> DvcOut | None:
        """The DVC output that holds ``path`` (itself or a directory above it)."""
        target = PurePosixPath(path)
        for out in self.dvc_outs:
            base = PurePosixPath(out.path)
            if target == base or base in target.parents:
                return out
        return None


def canonical_digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stage_lineage(stage: str, folder: str, manifest: Mapping[str, Any],
                  manifest_sha256: str | None = None) -> StageLineage:
    wall, peak = manifest.get("wall_s"), manifest.get("peak_memory_mb")
    return StageLineage(
        stage=str(manifest.get("stage", stage)), folder=folder,
        status=str(manifest.get("status") or "completed"), reason=manifest.get("reason"),
        params=dict(manifest.get("params") or {}), inputs=dict(manifest.get("inputs") or {}),
        outputs={k: v for k, v in (manifest.get("outputs") or {}).items() if isinstance(v, str)},
        lineage=dict(manifest.get("lineage") or {}), summary=dict(manifest.get("summary") or {}),
        code_version=dict(manifest.get("code_version") or {}), versions=dict(manifest.get("versions") or {}),
        wall_s=float(wall) if isinstance(wall, (int, float)) else None,
        peak_memory_mb=float(peak) if isinstance(peak, (int, float)) else None,
        manifest_sha256=manifest_sha256,
    )


def parse_dvc_lock(data: Mapping[str, Any] | None) -> list[DvcOut]:
    """Outputs of every stage in a parsed ``dvc.lock`` (schema 2.0)."""
    outs: list[DvcOut] = []
    stages = (data or {}).get("stages", {}) or {}
    for name, stage in stages.items():
        for out in stage.get("outs", []) or []:
            md5 = out.get("md5")
            if md5:
                outs.append(DvcOut(stage=name, path=str(out["path"]), md5=str(md5), size=out.get("size"),
                                   nfiles=out.get("nfiles")))
    return outs


def _describe_source(source: Any) -> str | None:
    """A calibration/evaluation ``TextSource`` dump as one string (path, dataset or builtin)."""
    if isinstance(source, Mapping):
        if source.get("path"):
            return str(source["path"])
        if source.get("dataset"):
            return f"datasets:{source['dataset']}/{source.get('dataset_config') or ''}:{source.get('split')}"
        if source.get("builtin"):
            return f"builtin:{source['builtin']}:{source.get('part')}"
    return str(source) if source is not None else None


def build_lineage(
    manifests: Mapping[str, Mapping[str, Any]],
    folders: Mapping[str, str],
    dvc_lock: Mapping[str, Any] | None = None,
    dvc_lock_sha256: str | None = None,
    manifest_sha256: Mapping[str, str] | None = None,
    code_commit: str | None = None,
    code_dirty: bool | None = None,
) -> LineageRecord:
    """Join stage manifests (``stage -> manifest``, their ``folders``) and ``dvc.lock`` into one
    sealed record."""
    stages = {name: stage_lineage(name, folders.get(name, f"artifacts/{name}"), manifest,
                                  (manifest_sha256 or {}).get(name))
              for name, manifest in sorted(manifests.items(), key=lambda kv: _stage_rank(kv[0]))}
    facts: dict[str, Any] = {}
    versions: dict[str, Any] = {}
    for stage in stages.values():
        facts.update(stage.lineage)
        versions.update(stage.versions)
    base = stages.get("materialize")
    calib = stages.get("calibration")
    calib_source = None
    if calib is not None:
        calib_source = calib.summary.get("source_description") or _describe_source(
            (calib.params.get("calibration") or {}).get("source"))
    commits = {s.code_version.get("git_commit") for s in stages.values() if s.code_version.get("git_commit")}
    record = LineageRecord(
        base_model_fingerprint=facts.get("base_model_fingerprint"),
        base_model_source=(base.summary.get("source") or (base.params.get("model") or {}).get("source"))
        if base else None,
        calibration_source=calib_source,
        calibration_token_digest=facts.get("calibration_token_digest"),
        pruned_model_fingerprint=facts.get("pruned_model_fingerprint"),
        # the commit the run was logged at; each stage's own commit is in its code_version
        code_commit=code_commit or (commits.pop() if len(commits) == 1 else None),
        code_dirty=code_dirty,
        dvc_lock_sha256=dvc_lock_sha256,
        facts=facts,
        versions=versions,
        stages=stages,
        dvc_outs=parse_dvc_lock(dvc_lock),
    )
    return record.sealed()


def _stage_rank(stage: str) -> tuple[int, str]:
    """Records print in the order of tasks/graph.py (the one stage list); others after them."""
    order = _stage_order()
    return (order.index(stage) if stage in order else len(order), stage)


def read_manifests(folders: Mapping[str, str], root: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(stage -> manifest, stage -> sha256 of the manifest file)`` for every stage folder that
    holds a ``manifest.json`` (stages not run yet are absent). Each manifest comes with the facts
    of the run that wrote it merged in (wall time, peak memory, code version: they live beside the
    folder, :func:`tasks.common.read_run_facts`); the digest is of the manifest file alone."""
    found: dict[str, dict[str, Any]] = {}
    digests: dict[str, str] = {}
    for stage, folder in folders.items():
        path = Path(root) / folder / MANIFEST_NAME
        if path.is_file():
            manifest = json.loads(path.read_text(encoding="utf-8"))
            facts = read_run_facts(Path(root) / folder)
            found[stage] = {**manifest, **facts} if facts else manifest
            digests[stage] = sha256_file(path)
    return found, digests


def verify_chain(record: LineageRecord) -> list["ArtifactCheck"]:
    """Each stage's inputs name the manifest its upstream stage recorded (no stale links), and
    every stage agrees on the facts they share (one base model, one calibration set)."""
    checks: list[ArtifactCheck] = []
    by_folder = {stage.folder: stage for stage in record.stages.values()}
    for stage in record.stages.values():
        for key, info in stage.inputs.items():
            upstream = by_folder.get(str(info.get("path"))) or record.stages.get(key)
            expected = info.get("manifest_sha256")
            if upstream is None or not expected:
                continue
            actual = upstream.manifest_sha256
            checks.append(ArtifactCheck(
                kind="record", path=f"{stage.stage} <- {upstream.stage}", expected=expected, actual=actual,
                status="ok" if actual == expected else "mismatch",
                note="" if actual == expected else "made from another version of its input"))
    for key, value in record.facts.items():
        differing = sorted({str(s.lineage[key]) for s in record.stages.values() if key in s.lineage} - {str(value)})
        if differing:
            checks.append(ArtifactCheck(kind="record", path=f"fact {key}", expected=str(value), actual=differing[0],
                                        status="mismatch", note="stages disagree"))
    return checks


# ----------------------------------------------------------------------------- verification

Status = Literal["ok", "mismatch", "missing", "unchecked"]


class ArtifactCheck(BaseModel):
    """One recorded hash checked against bytes. ``where``: workspace, cache:<dir>, or none."""

    kind: Literal["dvc_md5", "sha256", "recomputed", "record", "registered"]
    path: str
    expected: str
    actual: str | None = None
    status: Status
    where: str = ""
    note: str = ""


class Located(BaseModel):
    """Where the bytes of one DVC output are: relpath -> file (for a file output, key "")."""

    where: str
    files: dict[str, str]


def check_in_caches(out: DvcOut, caches: list[Path]) -> tuple[Located | None, list[str]]:
    """Find ``out`` in a cache/local remote and verify every object it names."""
    problems: list[str] = []
    for cache in caches:
        candidates = [p for p in cache_object(cache, out.md5) if p.is_file()]
        if not candidates:
            continue
        obj = candidates[0]
        if not out.md5.endswith(".dir"):
            actual = md5_file(obj)
            if actual != out.md5:
                problems.append(f"{obj}: cache object hashes to {actual}")
                continue
            return Located(where=f"cache:{cache}", files={"": str(obj)}), problems
        try:
            listing = json.loads(obj.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{obj}: unreadable .dir object ({exc})")
            continue
        if listing_md5(listing) != out.md5:
            problems.append(f"{obj}: .dir listing hashes to {listing_md5(listing)}")
            continue
        files: dict[str, str] = {}
        bad = False
        for entry in listing:
            found = [p for p in cache_object(cache, entry["md5"]) if p.is_file()]
            if not found:
                problems.append(f"{out.path}/{entry['relpath']}: object {entry['md5']} absent from {cache}")
                bad = True
                break
            actual = md5_file(found[0])
            if actual != entry["md5"]:
                problems.append(f"{out.path}/{entry['relpath']}: cache object {found[0]} hashes to {actual}, "
                                f"expected {entry['md5']}")
                bad = True
                break
            files[entry["relpath"]] = str(found[0])
        if not bad:
            return Located(where=f"cache:{cache}", files=files), problems
    return None, problems


def verify_dvc_outs(
    record: LineageRecord,
    root: str | Path,
    caches: Iterable[str | Path] = (),
    workspace_is_recorded: bool = True,
) -> tuple[list[ArtifactCheck], dict[str, Located]]:
    """Check every DVC output of ``record`` against the bytes in the workspace and caches.

    ``workspace_is_recorded``: the workspace's ``dvc.lock`` is the recorded one, so its outputs
    must match; a difference there is tampering. When the workspace has moved on (a later run), a
    workspace difference is expected and only the content-addressed copy in a cache or local
    remote counts. Returns the checks and, for verified outputs, where their bytes lie.
    """
    root = Path(root)
    caches = [Path(c) for c in caches]
    checks: list[ArtifactCheck] = []
    located: dict[str, Located] = {}
    for out in record.dvc_outs:
        path = root / out.path
        workspace_actual = dvc_md5(path) if path.exists() else None
        if workspace_actual == out.md5:
            files = ({p.relative_to(path).as_posix(): str(p) for p in path.rglob("*") if p.is_file()}
                     if path.is_dir() else {"": str(path)})
            located[out.path] = Located(where="workspace", files=files)
            checks.append(ArtifactCheck(kind="dvc_md5", path=out.path, expected=out.md5, actual=workspace_actual,
                                        status="ok", where="workspace"))
            continue
        in_cache, problems = check_in_caches(out, caches)
        if workspace_actual is not None and workspace_is_recorded:
            checks.append(ArtifactCheck(
                kind="dvc_md5", path=out.path, expected=out.md5, actual=workspace_actual, status="mismatch",
                where="workspace",
                note="workspace bytes differ from the recorded hash while dvc.lock is unchanged (modified artifact)"
                     + ("; the recorded version is intact in " + in_cache.where if in_cache else "")))
            if in_cache:
                located[out.path] = in_cache
            continue
        if in_cache:
            located[out.path] = in_cache
            note = "workspace holds another version" if workspace_actual else "absent from the workspace"
            checks.append(ArtifactCheck(kind="dvc_md5", path=out.path, expected=out.md5, actual=out.md5,
                                        status="ok", where=in_cache.where, note=note))
        elif problems:
            checks.append(ArtifactCheck(kind="dvc_md5", path=out.path, expected=out.md5, status="mismatch",
                                        where="cache", note="; ".join(problems)))
        else:
            checks.append(ArtifactCheck(kind="dvc_md5", path=out.path, expected=out.md5, status="missing",
                                        where="none", note="not in the workspace, the DVC cache or a local remote "
                                                           "(run `dvc fetch` first for a cloud remote)"))
    return checks, located


def model_dir_md5s(located: Located) -> dict[str, str]:
    """DVC md5 of every folder holding a ``config.json`` inside a located output ("" = itself)."""
    found: dict[str, str] = {}
    for rel in located.files:
        if PurePosixPath(rel).name != "config.json":
            continue
        parent = PurePosixPath(rel).parent.as_posix()
        prefix = "" if parent == "." else parent + "/"
        listing = [{"md5": md5_file(path), "relpath": k[len(prefix):]}
                   for k, path in located.files.items() if k.startswith(prefix)]
        found["" if parent == "." else parent] = listing_md5(listing)
    return found


def verify_manifest_outputs(record: LineageRecord, located: Mapping[str, Located]) -> list[ArtifactCheck]:
    """Recompute each manifest's sha256 output digests (paths relative to the stage folder)
    from the located bytes: a second, independent hash of everything DVC's md5 covers."""
    checks: list[ArtifactCheck] = []
    for stage in record.stages.values():
        for rel, expected in stage.outputs.items():
            path = f"{stage.folder}/{rel}"
            out = record.out_for(path)
            files = _files_under(located[out.path], out.path, path) if out is not None and out.path in located else {}
            if list(files) != [""]:
                checks.append(ArtifactCheck(kind="sha256", path=path, expected=expected, status="unchecked",
                                            note="bytes not located (no verified DVC output holds them)"))
                continue
            actual = sha256_file(files[""])
            checks.append(ArtifactCheck(kind="sha256", path=path, expected=expected, actual=actual,
                                        status="ok" if actual == expected else "mismatch",
                                        where=located[out.path].where))
    return checks


def _files_under(located: Located, out_path: str, target: str) -> dict[str, str]:
    """Files of ``located`` below ``target``, keyed relative to ``target`` ("" for the file itself)."""
    rel = PurePosixPath(target).relative_to(PurePosixPath(out_path)).as_posix()
    if rel == ".":
        return dict(located.files)
    if rel in located.files:
        return {"": located.files[rel]}
    prefix = rel + "/"
    return {k[len(prefix):]: v for k, v in located.files.items() if k.startswith(prefix)}


def sha256_named(files: Mapping[str, str | Path]) -> str:
    """``wanda.hashing.sha256_files`` over ``relpath -> file`` pairs (the bytes may be cache objects)."""
    digest = hashlib.sha256()
    for rel in sorted(files, key=PurePosixPath):
        digest.update(rel.encode())
        digest.update(b"\0")
        digest.update(sha256_file(files[rel]).encode())
    return digest.hexdigest()


def model_fingerprint_from(files: Mapping[str, str]) -> str:
    """``wanda.model_io.fingerprint`` (top-level ``*.safetensors``) from ``relpath -> file``."""
    weights = {rel: path for rel, path in files.items() if "/" not in rel and rel.endswith(".safetensors")}
    return sha256_named(weights)


def _model_dir_files(files: Mapping[str, str]) -> dict[str, str]:
    """The files of the (shallowest) folder holding ``config.json``, keyed within it."""
    for rel in sorted(files, key=lambda r: (r.count("/"), r)):
        if PurePosixPath(rel).name == "config.json":
            parent = PurePosixPath(rel).parent.as_posix()
            prefix = "" if parent == "." else parent + "/"
            return {k[len(prefix):]: v for k, v in files.items() if k.startswith(prefix)}
    return {}


def _stage_files(record: LineageRecord, located: Mapping[str, Located], stage: str) -> dict[str, str]:
    """``relpath in the stage folder -> file`` over every located output of ``stage`` (a stage
    declares either its folder or its files, one by one, as DVC outputs)."""
    folder = PurePosixPath(record.stages[stage].folder) if stage in record.stages else None
    files: dict[str, str] = {}
    for out in record.dvc_outs:
        if out.stage != stage or out.path not in located:
            continue
        out_path = PurePosixPath(out.path)
        inside = folder is not None and (out_path == folder or folder in out_path.parents)
        prefix = out_path.relative_to(folder).as_posix() if inside else ""
        for rel, path in located[out.path].files.items():
            files["/".join(p for p in (prefix, rel) if p and p != ".")] = path
    return files


def _recompute(name: str, expected: str, compute: Callable[[], str | None]) -> ArtifactCheck:
    try:
        actual = compute()
    except Exception as exc:  # noqa: BLE001 - unreadable bytes are a finding, not a crash
        log.warning("recomputing %s failed: %s", name, exc)
        actual = f"unreadable: {exc}"[:200]
    if actual is None:
        return ArtifactCheck(kind="recomputed", path=name, expected=expected, status="unchecked",
                             note="artifact not located")
    return ArtifactCheck(kind="recomputed", path=name, expected=expected, actual=actual,
                         status="ok" if actual == expected else "mismatch")


def recompute_checks(record: LineageRecord, located: Mapping[str, Located]) -> list[ArtifactCheck]:
    """The lineage facts recomputed from bytes: base and pruned model fingerprints (over the
    model folders' weights) and the calibration token digest (over the token tensor)."""
    checks: list[ArtifactCheck] = []
    for stage, name, expected in (("materialize", "base_model_fingerprint", record.base_model_fingerprint),
                                  ("prune", "pruned_model_fingerprint", record.pruned_model_fingerprint)):
        if expected:
            files = _model_dir_files(_stage_files(record, located, stage))
            checks.append(_recompute(name, expected, lambda f=files: model_fingerprint_from(f) if f else None))
    if record.calibration_token_digest:
        def tokens_digest() -> str | None:
            from wanda.calibration import CalibrationSet  # torch: imported only when an audit recomputes

            files = _stage_files(record, located, "calibration")
            tokens = [path for rel, path in sorted(files.items()) if rel.endswith(".safetensors")]
            return CalibrationSet.load(tokens[0]).digest if tokens else None

        checks.append(_recompute("calibration_token_digest", record.calibration_token_digest, tokens_digest))
    return checks


def verify_lineage(
    record: LineageRecord,
    root: str | Path,
    caches: Iterable[str | Path] = (),
    workspace_is_recorded: bool = True,
) -> tuple[list[ArtifactCheck], dict[str, Located]]:
    """Every check on a record: DVC md5s (workspace, then caches), the manifest chain, the
    manifests' sha256 digests, and the recomputed fingerprints and token digest."""
    checks, located = verify_dvc_outs(record, root, caches, workspace_is_recorded)
    checks += verify_chain(record)
    checks += verify_manifest_outputs(record, located)
    checks += recompute_checks(record, located)
    return checks, located


def lineage_ok(checks: Iterable[ArtifactCheck]) -> tuple[bool, list[str]]:
    """No mismatch and nothing missing: the condition for a release."""
    problems = [f"{c.path}: {c.status}" + (f" ({c.note})" if c.note else "")
                for c in checks if c.status in ("mismatch", "missing")]
    return not problems, problems

