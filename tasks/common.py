"""The one way a stage runs: verify its inputs, do the work in a temporary folder, describe it
in ``manifest.json``, then rename the folder into place.

A stage folder holds its outputs and ``manifest.json`` (stage, parameters used, input digests,
output digests, lineage, library versions): only what the stage's inputs determine, so a stage
that runs again on the same inputs writes the same bytes, and DVC finds every stage after it
cached (early cutoff). The facts of one particular run (start time, wall time, peak memory, host,
git commit and code digest) go beside the folder, in ``<folder>.run.json`` (:func:`write_run_facts`),
naming the manifest they belong to; readers take them only while that manifest is the one in the
folder (:func:`read_run_facts`). The manifest is written last inside the temporary folder and the
folder is renamed as a whole, so a folder that exists is finished; an interrupted stage leaves
only a ``.<name>.tmp-*`` sibling, which is never read and is removed the next time the stage runs.

Inputs are refused when their bytes no longer match their manifest, when they were made for a
different upstream artifact than their siblings (for example masks computed for another base
model), or when they are not the artifact the stage expects.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from wanda.atomic import atomic_dir, write_json
from wanda.errors import ArtifactMismatchError, ConfigError, WandaError
from wanda.hashing import sha256_file

from . import graph
from .offline import OFFLINE_ENV, apply_offline_env  # noqa: F401 (re-exported)
from .params import DEFAULT_PARAMS_FILE, PipelineParams, load_params

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# /2: run facts moved out of the manifest into <folder>.run.json; /1 manifests held them inline
# (workspaces made before that still read, see read_stage_record).
SCHEMA = "wanda-stage-manifest/2"
SCHEMAS = ("wanda-stage-manifest/1", SCHEMA)
RUN_FACTS_SCHEMA = "wanda-stage-run/1"
RUN_FACTS_SUFFIX = ".run.json"
# Keys of a run's facts; a /1 manifest holds them inline.
RUN_FACT_KEYS = ("started_at", "wall_s", "peak_memory_mb", "code_version", "environment")
LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "numpy", "pydantic", "wanda-pipeline")


# ----------------------------------------------------------------------------- records


@dataclass
class StageResult:
    """What a stage body returns: facts for the manifest, lineage it adds, or a skip."""

    summary: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    status: str = "completed"  # "completed" | "skipped"
    reason: str | None = None
    # Facts of this run that the outputs must not hold (timings, throughput): they go to the run
    # facts beside the folder, so an identical re-run leaves the outputs' bytes unchanged.
    run_facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def skipped(cls, reason: str, **summary: Any) -> "StageResult":
        return cls(summary=summary, status="skipped", reason=reason)


@dataclass
class Artifact:
    """A verified upstream artifact: its folder and its manifest."""

    stage: str
    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.get("summary", {})

    @property
    def lineage(self) -> dict[str, str]:
        return self.manifest.get("lineage", {})

    @property
    def skipped(self) -> bool:
        return self.manifest.get("status") == "skipped"

    @property
    def reason(self) -> str | None:
        return self.manifest.get("reason")

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.exists():
            raise ArtifactMismatchError(f"{self.path}: {self.stage} artifact has no {name}")
        return path


@dataclass
class StageContext:
    spec: graph.StageSpec
    params: PipelineParams | None
    root: Path
    work: Path  # the temporary folder the stage writes into
    inputs: dict[str, Artifact]

    def input(self, name: str) -> Artifact:
        return self.inputs[name]

    def lineage(self, keys: tuple[str, ...] | None = None) -> dict[str, str]:
        merged: dict[str, str] = {}
        for artifact in self.inputs.values():
            merged.update({k: v for k, v in artifact.lineage.items() if keys is None or k in keys})
        return merged


def output_digests(folder: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``folder`` except the manifest."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST:
            digests[rel] = sha256_file(path)
    return digests


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_facts_path(folder: str | Path) -> Path:
    """``<folder>.run.json``: beside the stage folder, never inside it (not an output)."""
    folder = Path(folder)
    return folder.with_name(folder.name + RUN_FACTS_SUFFIX)


def write_run_facts(folder: str | Path, manifest_sha256: str, facts: dict[str, Any]) -> Path:
    path = run_facts_path(folder)
    write_json(path, {"schema": RUN_FACTS_SCHEMA, "manifest_sha256": manifest_sha256, **facts})
    return path


def read_run_facts(folder: str | Path) -> dict[str, Any] | None:
    """The facts of the run that wrote the folder's current manifest, or None: no run facts, or
    facts of another run (the outputs were restored from DVC's cache, which holds no run facts,
    or a run was interrupted between its rename and its facts)."""
    folder = Path(folder)
    path, manifest = run_facts_path(folder), folder / MANIFEST
    if not path.is_file() or not manifest.is_file():
        return None
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(facts, dict) or facts.get("manifest_sha256") != sha256_file(manifest):
        return None
    return {k: v for k, v in facts.items() if k not in ("schema", "manifest_sha256")}


def read_stage_record(folder: str | Path) -> dict[str, Any] | None:
    """The manifest with its run's facts merged in (``wall_s``, ``peak_memory_mb``, ``started_at``,
    ``code_version``, ``environment``, ...), as status, tracking and the audit show a stage. A /1
    manifest holds them itself; a restored /2 one has none (``run_facts: None``)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    facts = read_run_facts(folder)
    if facts is not None:
        manifest = {**manifest, **facts}
    manifest["run_facts"] = "beside" if facts is not None else (
        "inline" if manifest.get("schema") == SCHEMAS[0] else None)
    return manifest


def load_artifact(stage: str, folder: str | Path, verify: bool = True) -> Artifact:
    """Read an upstream artifact, refusing anything unfinished, foreign or damaged."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactMismatchError(
            f"{folder}: no finished {stage} artifact (missing {MANIFEST}); run the {stage} stage first")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ArtifactMismatchError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    if manifest.get("schema") not in SCHEMAS:
        raise ArtifactMismatchError(f"{manifest_path}: not a stage manifest (schema {manifest.get('schema')!r})")
    if manifest.get("stage") != stage:
        raise ArtifactMismatchError(f"{folder}: holds a {manifest.get('stage')!r} artifact, expected {stage!r}")
    if verify:
        recorded = manifest.get("outputs", {})
        actual = output_digests(folder)
        if set(recorded) != set(actual):
            missing = sorted(set(recorded) - set(actual))
            extra = sorted(set(actual) - set(recorded))
            raise ArtifactMismatchError(
                f"{folder}: files differ from its manifest (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, digest in recorded.items():
            if actual[name] != digest:
                raise ArtifactMismatchError(f"{folder}/{name}: bytes changed since the {stage} stage wrote it "
                                            f"(sha256 {actual[name][:12]}, manifest says {digest[:12]})")
    return Artifact(stage, folder, manifest, sha256_file(manifest_path))


def check_lineage(inputs: dict[str, Artifact], keys: tuple[str, ...] | None = None) -> None:
    """Every lineage fact named by two inputs must agree (same base model, same tokens, ...);
    with ``keys``, only those facts (inputs that are meant to differ, like sweep points)."""
    seen: dict[str, tuple[str, str]] = {}
    for name, artifact in inputs.items():
        for key, value in artifact.lineage.items():
            if keys is not None and key not in keys:
                continue
            if key in seen and seen[key][1] != value:
                other, theirs = seen[key]
                raise ArtifactMismatchError(
                    f"inputs disagree on {key}: {name} ({artifact.path}) was made from {value[:16]}, "
                    f"{other} from {theirs[:16]}; re-run {name} for the current inputs")
            seen.setdefault(key, (name, value))


# ----------------------------------------------------------------------------- provenance


def code_version(spec: graph.StageSpec, root: Path) -> dict[str, Any]:
    """Git commit (and whether the tree was dirty) plus a digest of the stage's own code."""
    files: dict[str, str] = {}
    for rel in spec.code_files:
        path = root / rel
        candidates = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in candidates:
            if file.is_file() and "__pycache__" not in file.parts:
                files[file.relative_to(root).as_posix()] = sha256_file(file)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    commit, dirty = git_state(root)
    return {"git_commit": commit, "git_dirty": dirty, "code_digest": digest, "files": files}


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the repository holding ``root``; ``(None, None)`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty if commit else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in LIBRARIES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions


def peak_memory_mb() -> float:
    import resource

    # A stage runs in its own process (DVC starts it), so the process peak is the stage's peak.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def environment() -> dict[str, Any]:
    return {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}


# ----------------------------------------------------------------------------- running


def clean_leftovers(target: Path) -> None:
    """Remove temporary folders an interrupted run of this stage left (never read by anyone)."""
    if not target.parent.is_dir():
        return
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        log.info("removing %s left by an interrupted run", leftover)
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


Body = Callable[[StageContext], StageResult]


def run_stage(name: str, params: PipelineParams | None, body: Body, root: str | Path = ".", *,
              spec: graph.StageSpec | None = None, target: str | Path | None = None,
              inputs: dict[str, tuple[str, str | Path]] | None = None,
              record: dict[str, Any] | None = None,
              consistent: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run one stage end to end and return its manifest with the run's facts merged in (the file
    ``manifest.json`` holds only the manifest; the facts are in ``<folder>.run.json``).

    By default the stage's folder and its inputs' folders come from ``params.paths``; a stage
    outside the main graph (a sweep report) passes ``spec``, ``target`` and ``inputs``
    (``key -> (stage kind, folder)``), the parameters it used as ``record`` and the lineage
    facts its inputs must share as ``consistent`` (default: all of them).
    """
    root = Path(root).resolve()
    spec = spec or graph.stage(name)
    target = root / (target if target is not None else getattr(params.paths, name))
    if inputs is None:
        inputs = {upstream: (upstream, getattr(params.paths, upstream)) for upstream in spec.inputs}
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    loaded = {key: load_artifact(kind, root / folder) for key, (kind, folder) in inputs.items()}
    check_lineage(loaded, consistent)
    clean_leftovers(target)
    log.info("stage %s: writing %s", name, _rel(target, root))
    used = dict(record or {})
    if params is not None:
        used.update({section: getattr(params, section).model_dump(mode="json") for section in spec.sections})
    with atomic_dir(target) as work:
        context = StageContext(spec, params, root, work, loaded)
        result = body(context)
        manifest = {
            "schema": SCHEMA,
            "stage": name,
            "status": result.status,
            "reason": result.reason,
            "params": used,
            "inputs": {
                key: {
                    "path": _rel(artifact.path, root),
                    "manifest_sha256": artifact.manifest_sha256,
                    "outputs": artifact.manifest.get("outputs", {}),
                }
                for key, artifact in loaded.items()
            },
            "outputs": output_digests(work),
            "lineage": {**context.lineage(consistent), **result.lineage},
            "summary": result.summary,
            "versions": library_versions(),
        }
        write_json(work / MANIFEST, manifest)
        manifest_sha256 = sha256_file(work / MANIFEST)
    facts = {
        "stage": name,
        "started_at": started_at,
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_memory_mb": peak_memory_mb(),
        "code_version": code_version(spec, root),
        "environment": environment(),
        **result.run_facts,
    }
    # After the rename: facts that name a manifest no longer in place are never read.
    write_run_facts(target, manifest_sha256, facts)
    if result.status == "skipped":
        log.info("stage %s skipped: %s", name, result.reason)
    else:
        log.info("stage %s done in %.1fs (peak memory %.0f MiB)", name, facts["wall_s"], facts["peak_memory_mb"])
    return {**manifest, **facts}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


# ----------------------------------------------------------------------------- helpers for bodies


def torch_device(params: PipelineParams) -> str:
    device = params.runtime.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("runtime.device", f"{device} requested but no CUDA device is visible", "cpu")
    return device


def load_model_dir(folder: Path, params: PipelineParams, dtype: str | None = None, placed: bool = True):
    """``(model, tokenizer)`` from a materialized folder, on the configured device or, when
    ``placed``, spread by ``runtime.device_map``."""
    from wanda.model_io import load_model, read_materialized

    record = read_materialized(folder)
    return load_model(str(folder), dtype=dtype or record.dtype, device=torch_device(params),
                      device_map=params.runtime.device_map if placed else None)


def streamed(params: PipelineParams) -> bool:
    """True when stages keep one block in memory (``runtime.load: stream``)."""
    return params.runtime.load == "stream"


def open_streamed_dir(folder: Path, params: PipelineParams, dtype: str | None = None):
    """A streamed model (``wanda.block_source.StreamedBlocks``) over a materialized folder: the
    skeleton from its config, blocks read from its shards onto ``runtime.device`` on demand."""
    from wanda.block_source import open_streamed
    from wanda.model_io import read_materialized

    record = read_materialized(folder)
    return open_streamed(folder, dtype=dtype or record.dtype, device=torch_device(params))


@contextlib.contextmanager
def offload_dir(params: PipelineParams):
    """A scratch folder for activations offloaded to disk (under $TMPDIR), or None when not offloading.

    Never inside the stage folder: everything there is an output with a digest.
    """
    if not params.runtime.offload_activations:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="wanda-activations-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- entry point


def stage_entry(name: str, body: Body) -> tuple[Callable[..., dict], Callable[..., None]]:
    """A stage module's ``run(params, root)`` (the Prefect task calls it) and ``main()``
    (``python -m tasks.<name>``, what dvc.yaml runs)."""

    def run(params: PipelineParams, root: str | Path = ".") -> dict:
        return run_stage(name, params, body, root)

    def main(argv: list[str] | None = None) -> None:
        sys.exit(stage_main(name, run, argv))

    run.__doc__ = f"Run the {name} stage on ``params`` in the repository ``root``."
    for function in (run, main):  # they belong to the stage's module (logs, Prefect task names)
        function.__module__ = body.__module__
        function.__qualname__ = function.__name__
    return run, main


def stage_main(name: str, run: Callable[..., dict], argv: list[str] | None = None) -> int:
    """``python -m tasks.<name>``: exit 0 on success, 2 on bad parameters, 1 on other failures."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=graph.stage(name).description)
    parser.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="parameter file (default: params.yaml)")
    parser.add_argument("--point", help="a point of a sweep parameter file")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", default=".", help="repository root (default: current folder)")
    parser.add_argument("--log-level", default=os.environ.get("WANDA_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    apply_offline_env()
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        params = load_params(Path(args.root) / args.params, args.overrides, args.point)
        run(params, root=args.root)
    except (ConfigError, ArtifactMismatchError) as exc:
        log.error("%s failed: %s", name, exc)
        return 2 if isinstance(exc, ConfigError) else 1
    except WandaError as exc:
        log.error("%s failed: %s", name, exc)
        return 1
    return 0
