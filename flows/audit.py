"""Lineage audit of a registered model version: ``wanda-pipeline audit MODEL[@ALIAS|/VERSION]``.

The audit trusts nothing it can recompute. From the version it reads the lineage record the
run logged (an immutable MLflow artifact), checks the record's seal and that the version's tags
name the same record, then hashes the bytes still around (workspace, DVC cache, local DVC
remotes) against the recorded DVC md5s and manifest sha256 digests, recomputes the base model
fingerprint and the calibration token digest, and hashes the registered model bytes.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from tasks.lineage import (ArtifactCheck, DvcOut, LineageRecord, Located, check_in_caches, dvc_md5, lineage_ok,
                           listing_md5, md5_file, model_dir_md5s, model_fingerprint_from, sha256_file, verify_lineage)
from tasks.params import TrackingConfig
from wanda.model_io import fingerprint as model_fingerprint

from .dvc_places import dvc_caches
from .mlflow_uris import TAG, get_client, resolve_tracking
from .redact import redact
from .registry import registered_model_dir
from .tracking import LINEAGE_ARTIFACT

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)


class ModelRef(BaseModel):
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return self.name + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")


def parse_ref(ref: str, default_alias: str | None = "champion") -> ModelRef:
    """``NAME@ALIAS``, ``NAME/VERSION`` or ``NAME`` (-> ``default_alias``; None: latest version)."""
    from wanda.errors import ConfigError

    ref = ref.strip()
    if ref.startswith("models:/"):
        ref = ref[len("models:/"):]
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if not name or not alias:
            raise ConfigError("model", f"bad reference {ref!r}", "NAME, NAME@ALIAS, NAME/VERSION")
        return ModelRef(name=name, alias=alias)
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        if not name or not version.isdigit():
            raise ConfigError("model", f"bad reference {ref!r}: the version must be a number",
                              "NAME, NAME@ALIAS, NAME/VERSION")
        return ModelRef(name=name, version=version)
    if not ref:
        raise ConfigError("model", "empty model reference", "NAME, NAME@ALIAS, NAME/VERSION")
    return ModelRef(name=ref, alias=default_alias)


def get_version(client: "MlflowClient", ref: ModelRef):
    """The ModelVersion a reference names (the highest version when neither alias nor version)."""
    if ref.alias:
        return client.get_model_version_by_alias(ref.name, ref.alias)
    if ref.version:
        return client.get_model_version(ref.name, ref.version)
    versions = client.search_model_versions(f"name = '{ref.name}'")
    if not versions:
        from wanda.errors import ConfigError

        raise ConfigError("model", f"registered model {ref.name!r} has no versions")
    return max(versions, key=lambda v: int(v.version))


class AuditReport(BaseModel):
    model: str
    version: str
    ref: str
    aliases: list[str] = Field(default_factory=list)
    source: str
    run_id: str | None
    tracking_uri: str
    version_tags: dict[str, str] = Field(default_factory=dict)
    lineage: LineageRecord | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict)
    checks: list[ArtifactCheck] = Field(default_factory=list)
    ok: bool
    problems: list[str] = Field(default_factory=list)


def _record_check(path: str, expected: str | None, actual: str | None, note: str = "") -> ArtifactCheck:
    if expected is None or actual is None:
        return ArtifactCheck(kind="record", path=path, expected=expected or "—", actual=actual,
                             status="missing" if actual is None else "unchecked", note=note)
    return ArtifactCheck(kind="record", path=path, expected=expected, actual=actual,
                         status="ok" if expected == actual else "mismatch", note=note)


def _download(client: "MlflowClient", run_id: str, path: str, dst: Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except Exception as exc:  # noqa: BLE001 - absent artifact: reported as missing
        log.debug("artifact %s of run %s unavailable: %s", path, run_id, exc)
        return None


def load_recorded_lineage(client: "MlflowClient", version,
                          work: Path) -> tuple[LineageRecord | None, list[ArtifactCheck], Path | None]:
    """The lineage record the run logged, its seal, its tag, and the recorded dvc.lock's bytes."""
    checks: list[ArtifactCheck] = []
    if not version.run_id:
        return None, [_record_check("lineage.json", "present", None, "version has no run")], None
    lineage_dir = _download(client, version.run_id, "lineage", work)
    path = lineage_dir / Path(LINEAGE_ARTIFACT).name if lineage_dir else None
    if path is None or not path.is_file():
        return None, [_record_check("lineage.json", "present", None, "the run logged no lineage record")], None
    try:
        record = LineageRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        return None, [_record_check("lineage.json", "valid", f"unreadable: {exc}"[:200])], None
    seal = record.compute_digest()
    checks.append(_record_check("lineage.json seal", record.digest, seal, "record content vs its digest"))
    tags = version.tags or {}
    checks.append(_record_check("version tag lineage_digest", tags.get(f"{TAG}lineage_digest"), record.digest))
    lock = lineage_dir / "dvc.lock"
    if record.dvc_lock_sha256:
        checks.append(_record_check("recorded dvc.lock", record.dvc_lock_sha256,
                                    sha256_file(lock) if lock.is_file() else None))
    for name, stage in record.stages.items():
        manifest = lineage_dir / "manifests" / f"{name}.json"
        if stage.manifest_sha256:
            checks.append(_record_check(f"recorded manifest {name}", stage.manifest_sha256,
                                        sha256_file(manifest) if manifest.is_file() else None))
    return record, checks, lineage_dir


def _evaluation_check(client: "MlflowClient", version, work: Path) -> list[ArtifactCheck]:
    expected = (version.tags or {}).get(f"{TAG}eval_content_digest")
    if not expected or not version.run_id:
        return []
    path = _download(client, version.run_id, "evaluation/candidate.json", work)
    if path is None:
        return [_record_check("evaluation/candidate.json", expected, None)]
    from wanda.evaluation.results import load_result

    try:
        actual = load_result(path).content_digest
    except Exception as exc:  # noqa: BLE001 - a damaged record is the finding
        return [ArtifactCheck(kind="record", path="evaluation/candidate.json", expected=expected,
                              actual=f"damaged: {exc}"[:200], status="mismatch")]
    return [_record_check("evaluation/candidate.json", expected, actual)]


def _registered_bytes_checks(client: "MlflowClient", version, record: LineageRecord | None,
                             located: dict[str, Located], caches: list[Path], work: Path) -> list[ArtifactCheck]:
    """The registered bytes hash to the version's tags, and the tags to a lineage output."""
    tags = version.tags or {}
    want_md5, want_fp = tags.get(f"{TAG}model_dvc_md5"), tags.get(f"{TAG}model_fingerprint")
    checks: list[ArtifactCheck] = []
    if tags.get(f"{TAG}register_source") == "dvc":
        checks += _dvc_source_checks(version.source, tags.get(f"{TAG}model_subpath", "."), want_md5, want_fp, caches)
    else:
        model_dir = registered_model_dir(client, version, work / "registered")
        if model_dir is None:
            return [ArtifactCheck(kind="registered", path=version.source, expected=want_md5 or "—", status="missing",
                                  note="registered model bytes not found")]
        actual_md5 = dvc_md5(model_dir)
        checks.append(ArtifactCheck(kind="registered", path=f"{version.source} (dvc md5)", expected=want_md5 or "—",
                                    actual=actual_md5, status="ok" if actual_md5 == want_md5 else "mismatch"))
        try:
            actual_fp = model_fingerprint(model_dir)
        except Exception as exc:  # noqa: BLE001 - no weights: the finding
            actual_fp = f"unreadable: {exc}"[:200]
        checks.append(ArtifactCheck(kind="registered", path=f"{version.source} (fingerprint)",
                                    expected=want_fp or "—", actual=actual_fp,
                                    status="ok" if actual_fp == want_fp else "mismatch"))
    if record is not None and want_fp:
        checks.append(ArtifactCheck(kind="registered", path="fingerprint vs lineage", expected=want_fp,
                                    actual=record.pruned_model_fingerprint,
                                    status="ok" if record.pruned_model_fingerprint == want_fp else "mismatch",
                                    note="the prune stage's pruned_model_fingerprint"))
    if record is not None and want_md5:
        # The registered model must be one of the lineage's outputs (or a model folder inside one).
        known = {out.md5 for out in record.dvc_outs}
        for loc in located.values():
            known.update(model_dir_md5s(loc).values())
        in_lineage = want_md5 in known
        checks.append(ArtifactCheck(kind="registered", path="model in lineage", expected=want_md5,
                                    actual=want_md5 if in_lineage else None,
                                    status="ok" if in_lineage else ("mismatch" if located else "unchecked"),
                                    note="" if in_lineage else "no verified pipeline output holds these weights"))
    return checks


def _dvc_source_checks(source: str, subpath: str, want_md5: str | None, want_fp: str | None,
                       caches: list[Path]) -> list[ArtifactCheck]:
    """A ``register_source: dvc`` version: the DVC object in a local remote (or cache) holds
    the model folder with the recorded md5 and fingerprint."""
    if not source.startswith("file://"):
        return [ArtifactCheck(kind="registered", path=source, expected=want_md5 or "—", status="unchecked",
                              note="cloud DVC remote: `dvc fetch` the output, then the DVC cache is checked")]
    obj = Path(source.removeprefix("file://"))
    remote_root, out_md5 = obj.parents[3], obj.parent.name + obj.name  # <root>/files/md5/ab/cdef...dir
    found, problems = check_in_caches(DvcOut(stage="registry", path="registered", md5=out_md5), [remote_root, *caches])
    if found is None:
        return [ArtifactCheck(kind="registered", path=source, expected=out_md5,
                              status="mismatch" if problems else "missing",
                              note="; ".join(problems) or "not pushed to the remote (dvc push)")]
    prefix = "" if subpath in ("", ".") else subpath.rstrip("/") + "/"
    files = {rel[len(prefix):]: path for rel, path in found.files.items() if rel.startswith(prefix)}
    actual_md5 = listing_md5([{"md5": md5_file(path), "relpath": rel} for rel, path in files.items()])
    actual_fp = model_fingerprint_from(files)
    return [
        ArtifactCheck(kind="registered", path=f"{source} (dvc md5)", expected=want_md5 or "—", actual=actual_md5,
                      status="ok" if actual_md5 == want_md5 else "mismatch", where=found.where),
        ArtifactCheck(kind="registered", path=f"{source} (fingerprint)", expected=want_fp or "—", actual=actual_fp,
                      status="ok" if actual_fp == want_fp else "mismatch", where=found.where),
    ]


def verify_version(
    client: "MlflowClient",
    version,
    root: str | Path,
    caches: list[Path] | None = None,
    check_registered_bytes: bool = True,
) -> tuple[LineageRecord | None, list[ArtifactCheck]]:
    """Every check an audit or a release gate runs on one registered version."""
    root = Path(root).resolve()
    caches = dvc_caches(root) if caches is None else caches
    with tempfile.TemporaryDirectory(prefix="wanda-audit-") as tmp:
        work = Path(tmp)
        record, checks, _ = load_recorded_lineage(client, version, work)
        located: dict[str, Located] = {}
        if record is not None:
            current = root / "dvc.lock"
            workspace_is_recorded = (current.is_file() and record.dvc_lock_sha256 is not None
                                     and sha256_file(current) == record.dvc_lock_sha256)
            found, located = verify_lineage(record, root, caches, workspace_is_recorded)
            checks += found
        checks += _evaluation_check(client, version, work)
        if check_registered_bytes:
            checks += _registered_bytes_checks(client, version, record, located, caches, work)
    return record, checks


def audit(
    model_ref: str,
    root: str | Path = ".",
    config: TrackingConfig | None = None,
    caches: list[Path] | None = None,
    client: "MlflowClient | None" = None,
) -> AuditReport:
    """Trace a registered version back to everything that made it, and verify the bytes."""
    config = config or TrackingConfig()
    resolved = resolve_tracking(config, root)
    client = client or get_client(resolved)
    ref = parse_ref(model_ref)
    version = get_version(client, ref)
    record, checks = verify_version(client, version, root, caches)
    metrics: dict[str, float] = {}
    if version.run_id:
        metrics = dict(client.get_run(version.run_id).data.metrics)
    tags = dict(version.tags or {})
    gate = {k: v for k, v in tags.items() if k.startswith(f"{TAG}gate") or k == "rejected"}
    ok, problems = lineage_ok(checks)
    if record is None:
        ok, problems = False, [*problems, "no lineage record"]
    aliases = list(getattr(version, "aliases", []) or [])
    if "champion" in aliases and tags.get(f"{TAG}gate") != "passed":  # a release cut short (issue 25)
        ok, problems = False, [*problems, f"version {version.version} is champion but its {TAG}gate tag is "
                               f"{tags.get(f'{TAG}gate', 'absent')!r}, not 'passed': its release did not complete "
                               "(run `wanda-pipeline release` again to finish or judge it)"]
    return AuditReport(
        model=version.name, version=str(version.version), ref=str(ref),
        aliases=list(getattr(version, "aliases", []) or []), source=version.source, run_id=version.run_id,
        tracking_uri=redact(resolved.tracking_uri), version_tags=tags, lineage=record, metrics=metrics, gate=gate,
        checks=checks, ok=ok, problems=problems,
    )


def format_report(report: AuditReport) -> str:
    """The human-readable audit: the chain back to the base weights, then the verification."""
    lines = [f"Model {report.model} version {report.version}"
             + (f" (aliases: {', '.join(report.aliases)})" if report.aliases else ""),
             f"  source:        {report.source}", f"  run:           {report.run_id}",
             f"  tracking:      {report.tracking_uri}"]
    rec = report.lineage
    if rec is not None:
        lines += [
            f"  base model:    {rec.base_model_fingerprint}"
            + (f"  ({rec.base_model_source})" if rec.base_model_source else ""),
            f"  calibration:   {rec.calibration_source}",
            f"                 tokens {rec.calibration_token_digest}",
            f"  pruned model:  {rec.pruned_model_fingerprint}",
            f"  code commit:   {rec.code_commit}" + (" (uncommitted changes)" if rec.code_dirty else ""),
            f"  dvc.lock:      sha256 {rec.dvc_lock_sha256}",
            f"  lineage:       {rec.digest}",
            "  versions:      " + ", ".join(f"{k} {v}" for k, v in sorted(rec.versions.items())),
            "", "Stages:",
        ]
        for name, stage in rec.stages.items():
            timing = ", ".join(part for part in (
                f"{stage.wall_s:.1f} s" if stage.wall_s is not None else "",
                f"peak {stage.peak_memory_mb:.0f} MB" if stage.peak_memory_mb is not None else "") if part)
            lines.append(f"  {name} [{stage.status}] {stage.folder}" + (f"  ({timing})" if timing else ""))
            if stage.reason:
                lines.append(f"    reason:  {stage.reason}")
            code = stage.code_version
            lines.append(f"    code:    commit {code.get('git_commit')}, digest {code.get('code_digest')}")
            for section, values in stage.params.items():
                lines.append(f"    params {section}: {json.dumps(values, sort_keys=True, default=str)}")
            for key, value in stage.lineage.items():
                lines.append(f"    fact {key}: {value}")
            for rel, digest in stage.outputs.items():
                lines.append(f"    out {rel}: sha256 {digest}")
            for out in rec.dvc_outs:
                if out.stage == name:
                    lines.append(f"    dvc {out.path}: md5 {out.md5}")
    if report.metrics:
        lines += ["", "Metrics:"]
        shown = {k: v for k, v in report.metrics.items() if not k.startswith(("sparsity.layer.", "latency."))}
        lines += [f"  {k}: {v:.6g}" for k, v in sorted(shown.items())]
        hidden = len(report.metrics) - len(shown)
        if hidden:
            lines.append(f"  (+{hidden} per-layer/latency metrics; see --json)")
    lines += ["", "Gate:"] + ([f"  {k}: {v}" for k, v in sorted(report.gate.items())] or ["  not gated"])
    lines += ["", "Verification:"]
    for check in report.checks:
        actual = "" if check.status == "ok" else f" got {check.actual}"
        lines.append(f"  [{check.status.upper():9}] {check.kind:10} {check.path}: {check.expected}{actual}"
                     + (f" @ {check.where}" if check.where else "") + (f" — {check.note}" if check.note else ""))
    lines += ["", "AUDIT OK" if report.ok else f"AUDIT FAILED: {len(report.problems)} problem(s)"]
    lines += [f"  - {p}" for p in report.problems]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    """A markdown table cell: no pipes or newlines from the value break the table."""
    return " ".join(str("" if value is None else value).split()).replace("|", "\\|")


def format_markdown(report: AuditReport) -> str:
    """The audit as a markdown report to attach to a release ticket: verdict first, then the
    chain back to the base weights, every stage, the metrics, the gate and every check."""
    verdict = "**AUDIT OK**" if report.ok else f"**AUDIT FAILED**: {len(report.problems)} problem(s)"
    lines = [f"# Audit of `{report.model}` version {report.version}", "", verdict, ""]
    lines += [f"- {_cell(p)}" for p in report.problems] + ([""] if report.problems else [])
    lines += ["| | |", "|---|---|", f"| reference | `{_cell(report.ref)}` |",
              f"| aliases | {_cell(', '.join(report.aliases) or 'none')} |", f"| source | `{_cell(report.source)}` |",
              f"| run | `{_cell(report.run_id)}` |", f"| tracking | `{_cell(report.tracking_uri)}` |"]
    rec = report.lineage
    if rec is not None:
        lines += [f"| base model | `{_cell(rec.base_model_fingerprint)}` ({_cell(rec.base_model_source)}) |",
                  f"| calibration | {_cell(rec.calibration_source)}, tokens `{_cell(rec.calibration_token_digest)}` |",
                  f"| pruned model | `{_cell(rec.pruned_model_fingerprint)}` |",
                  f"| code commit | `{_cell(rec.code_commit)}`" + (" (uncommitted changes)" if rec.code_dirty else "") + " |",
                  f"| dvc.lock sha256 | `{_cell(rec.dvc_lock_sha256)}` |", f"| lineage digest | `{_cell(rec.digest)}` |",
                  f"| versions | {_cell(', '.join(f'{k} {v}' for k, v in sorted(rec.versions.items())))} |",
                  "", "## Stages", "", "| stage | status | folder | code digest | wall s | outputs |",
                  "|---|---|---|---|---:|---|"]
        for name, stage in rec.stages.items():
            outs = [f"{rel} sha256 {digest[:12]}" for rel, digest in stage.outputs.items()]
            outs += [f"dvc {o.path} md5 {o.md5[:12]}" for o in rec.dvc_outs if o.stage == name]
            wall = f"{stage.wall_s:.1f}" if stage.wall_s is not None else ""
            status = stage.status + (f": {stage.reason}" if stage.reason else "")
            lines.append(f"| {name} | {_cell(status)} | `{_cell(stage.folder)}` | "
                         f"`{_cell(stage.code_version.get('code_digest'))}` | {wall} | {_cell('; '.join(outs))} |")
    if report.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {_cell(k)} | {v:.6g} |" for k, v in sorted(report.metrics.items())
                  if not k.startswith(("sparsity.layer.", "latency."))]
    lines += ["", "## Gate", ""] + ([f"- `{_cell(k)}`: {_cell(v)}" for k, v in sorted(report.gate.items())]
                                    or ["not gated"])
    lines += ["", "## Verification", "", "| status | kind | path | expected | actual | where | note |",
              "|---|---|---|---|---|---|---|"]
    for c in report.checks:
        lines.append(f"| {c.status.upper()} | {c.kind} | `{_cell(c.path)}` | `{_cell(c.expected)}` | "
                     f"{'' if c.status == 'ok' else '`' + _cell(c.actual) + '`'} | {_cell(c.where)} | {_cell(c.note)} |")
    return "\n".join(lines) + "\n"
