"""What every flow does before DVC starts: offline settings, parameters, cheap pre-flight checks."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from tasks.common import apply_offline_env, read_manifest
from tasks.params import DEFAULT_PARAMS_FILE, PipelineParams, load_params, write_params_file
from wanda.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_params_file(root: Path, params_file: str | Path | None) -> Path:
    """The repository's params.yaml by default; a given relative path as the shell sees it
    (from the current folder), else relative to the repository root."""
    if params_file is None:
        return root / DEFAULT_PARAMS_FILE
    path = Path(params_file)
    if path.is_absolute():
        return path
    return Path.cwd() / path if (Path.cwd() / path).exists() else root / path


def prepare_params(root: Path, params_file: str | Path | None = None,
                   overrides: list[str] | None = None) -> tuple[PipelineParams, str | None]:
    """Validate, then make ``params.yaml`` hold exactly the parameters to run.

    DVC reads stage parameters from ``params.yaml`` and records their values in ``dvc.lock``; so
    ``--params FILE`` and ``-S key=value`` are written there (comments kept), as
    ``dvc exp run -S`` does, and the lineage states what really ran. Nothing is written when the
    parameters do not validate. Returns the parameters and a note of what was written, if anything.
    """
    apply_offline_env()
    source = resolve_params_file(root, params_file)
    params = load_params(source, overrides)
    target = root / DEFAULT_PARAMS_FILE
    if source.resolve() == target.resolve() and not overrides:
        return params, None
    write_params_file(target, source.read_text(encoding="utf-8"), overrides)
    written = load_params(target)
    if written != params:  # pragma: no cover - a YAML round trip that changed a value
        raise ConfigError("params", f"writing {target} changed the parameters; check the overrides {overrides}")
    what = [] if source.resolve() == target.resolve() else [f"the contents of {source}"]
    what += [f"-S {item}" for item in overrides or []]
    note = f"params.yaml now holds {', '.join(what)} (DVC reads params.yaml; git diff shows the change)"
    return params, note


def open_run(repo: str | Path, params_file: str | Path | None, overrides: list[str] | None,
             logger: logging.Logger | logging.LoggerAdapter) -> tuple[Path, PipelineParams]:
    """What every flow does first: find the repository, write and validate its params.yaml,
    and log the fallback note and the preflight warnings. Returns (root, params)."""
    from . import dvc

    apply_offline_env()
    root = dvc.find_root(repo)
    # Every check passes before params.yaml is written: a bad -S value leaves it as it was.
    warnings = preflight(load_params(resolve_params_file(root, params_file), overrides), root)
    params, note = prepare_params(root, params_file, overrides)
    if note:
        logger.info("%s", note)
    for warning in warnings:
        logger.warning("%s", warning)
    return root, params


@contextlib.contextmanager
def locked_run(repo: str | Path, params_file: str | Path | None, overrides: list[str] | None,
               logger: logging.Logger | logging.LoggerAdapter):
    """:func:`open_run` holding the workspace (flows/run_lock.py): a second run is refused before
    it writes anything. Yields ``(root, params, guard)``; ``guard`` knows the bytes this run wrote
    to params.yaml (stages check them) and, when the body fails, puts back the file it found."""
    from . import dvc
    from .run_lock import ParamsGuard, workspace_lock

    root = dvc.find_root(repo)
    with workspace_lock(root):
        removed = dvc.clean_partial_cache_files(root)
        if removed:
            logger.warning("removed %d partial DVC cache file(s) (%.1f MB) left by an interrupted write: %s",
                           len(removed), sum(size for _, size in removed) / 1e6,
                           ", ".join(path.name for path, _ in removed[:3]))
        target = root / DEFAULT_PARAMS_FILE
        guard = ParamsGuard(target, target.read_bytes() if target.is_file() else None)
        try:
            root, params = open_run(root, params_file, overrides, logger)
            guard.written = target.read_bytes()
            yield root, params, guard
        except BaseException:
            guard.restore(logger)
            raise


def preflight(params: PipelineParams, root: Path | None = None) -> list[str]:
    """Fail before any stage runs on inputs that cannot exist here; return warnings.

    Relative paths in the parameters are relative to the repository root, where DVC runs the
    stages; so are the checks.
    """
    with contextlib.chdir(root or Path.cwd()):
        return _preflight(params, Path.cwd())


def _preflight(params: PipelineParams, root: Path) -> list[str]:
    from wanda.data import check_text_file
    from wanda.model_io import resolve_source

    warnings: list[str] = []
    _check_stage_folders(params, Path.cwd())
    source = resolve_source(params.model.source)  # ConfigError: missing package, path or offline hub id
    model_dir = _model_config_dir(params, source)
    context = _context_length(_read_model_config(model_dir / "config.json")) if model_dir else _gguf_context(source)
    if model_dir:
        _check_shards(model_dir)  # cheap (file listing), so never remembered
    # The checks that need transformers (and so torch: seconds of imports) run once per content.
    passed = _PassedChecks(root, _model_checks_key(params, model_dir)) if model_dir else None
    model_checks = passed is not None and not passed.seen()
    tokenizer = _tokenizer(model_dir) if model_checks else None
    if model_checks:  # encoders and encoder-decoders are refused from config.json alone
        from wanda.architecture import check_source_decoder_only

        check_source_decoder_only(str(model_dir))
    _config, note = params.calibration.resolve()
    if note:
        warnings.append(note)
    _check_seqlen("calibration.seqlen", _config.seqlen, context)
    check_text_file(_config.source, "calibration.source")
    if tokenizer is not None and _config.sampler == "wikitext":
        warnings.extend(_check_calibration_tokens(_config, tokenizer))
    if params.evaluate.perplexity is not None:
        ppl, note = params.evaluate.perplexity.resolve()
        if note:
            warnings.append(note)
        _check_seqlen("evaluate.perplexity.seqlen", ppl.seqlen, context)
        check_text_file(ppl.source, "evaluate.perplexity.source")
        if tokenizer is not None:
            _check_evaluation_tokens(ppl, tokenizer)
    if params.evaluate.zeroshot is not None:
        from wanda.evaluation.zeroshot import check_task_data

        check_task_data(params.evaluate.zeroshot)
    if params.runtime.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("runtime.device", f"{params.runtime.device} requested but no CUDA device is visible",
                              "cpu")
    if model_checks:
        passed.record()
    return warnings


# The code of the checks a remembered pass skips: a change to any of them checks again.
_CHECK_CODE = ("flows/prepare.py", "wanda/architecture.py", "wanda/calibration.py", "wanda/data.py")
# Files of a model folder the tokenizer and config checks do not read (weights).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")


def _model_checks_key(params: PipelineParams, model_dir: Path) -> str | None:
    """One digest of everything the transformers-based checks read: the model folder's files but
    its weights (config, tokenizer), the transformers/tokenizers versions, the calibration and
    evaluation texts' digests and the fields the checks use, and the code of the checks
    themselves. None when it cannot be computed (a missing text): then the checks run and name
    the problem."""
    import hashlib
    import json
    from importlib.metadata import version

    from wanda.data import load_text
    from wanda.hashing import sha256_file

    try:
        files = {path.name: sha256_file(path) for path in sorted(model_dir.iterdir())
                 if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES)}
        calibration, _ = params.calibration.resolve()
        code = [sha256_file(Path(__file__).resolve().parent.parent / rel) for rel in _CHECK_CODE]
        parts: dict = {"files": files, "code": code, "transformers": version("transformers"),
                       "tokenizers": version("tokenizers"),
                       "calibration": [load_text(calibration.source).digest, calibration.seqlen, calibration.sampler]}
        if params.evaluate.perplexity is not None:
            ppl, _ = params.evaluate.perplexity.resolve()
            parts["perplexity"] = [load_text(ppl.source).digest, ppl.seqlen]
    except Exception as exc:  # the checks themselves report what is wrong
        log.debug("preflight: no key for the model checks (%s: %s); running them", type(exc).__name__, exc)
        return None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class _PassedChecks:
    """Keys of model checks that passed in this workspace (``.cache/wanda-preflight.json``,
    git-ignored): the same bytes and fields give the same verdict, so a cached run does not load
    the tokenizer (transformers, torch) again."""

    FILE = Path(".cache") / "wanda-preflight.json"
    KEPT = 32

    def __init__(self, root: Path, key: str | None):
        self.path, self.key = root / self.FILE, key

    def _keys(self) -> list[str]:
        import json

        try:
            keys = json.loads(self.path.read_text(encoding="utf-8")).get("passed", [])
            return [k for k in keys if isinstance(k, str)]
        except (OSError, ValueError, AttributeError):
            return []

    def seen(self) -> bool:
        if self.key is not None and self.key in self._keys():
            log.debug("preflight: tokenizer and model config checks passed before on the same bytes (%s)",
                      self.key[:12])
            return True
        return False

    def record(self) -> None:
        import json

        from wanda.atomic import atomic_file

        if self.key is None:
            return
        keys = [k for k in self._keys() if k != self.key][-(self.KEPT - 1):] + [self.key]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.path, "w") as handle:
                handle.write(json.dumps({"passed": keys}, indent=1) + "\n")
        except OSError as exc:  # a read-only workspace checks again next time; nothing else changes
            log.warning("preflight: cannot record passed checks in %s: %s", self.path, exc)


# Texts up to this size are tokenized in the preflight (about a second); longer ones hold far
# more tokens than any window needs.
_TOKENIZED_CHARS = 1_000_000
_MODEL_CONFIG = "a transformers model directory with a valid config.json"


def _model_config_dir(params: PipelineParams, source) -> Path | None:
    """The folder whose config.json (and tokenizer) describe ``model.source``, without loading
    weights: the source folder itself, else the materialize stage's output when it was made from
    this source (a GGUF file or a hub id has no config.json of its own); None when neither."""
    if source.kind == "dir":
        return Path(source.location)
    folder = Path(params.paths.materialize)
    manifest = read_manifest(folder) or {}
    if (manifest.get("summary") or {}).get("source") == params.model.source and (folder / "model" / "config.json").is_file():
        return folder / "model"
    return None


def _check_stage_folders(params: PipelineParams, root: Path) -> None:
    """Each stage folder is a real folder of this workspace: no symbolic link on the way to it.
    DVC removes and re-creates a stage's outputs, and through a link it would act on the target
    outside the workspace (it changed a linked folder's mode to 777) before failing with its own
    "unable to remove ... without a confirmation"."""
    for stage, rel in params.paths.model_dump().items():
        current = root
        for part in Path(rel).parts:
            current = current / part
            if current.is_symlink():
                target = os.readlink(current)
                shown = current.relative_to(root).as_posix()
                raise ConfigError(f"paths.{stage}", f"{shown} is a symbolic link to {target}; DVC writes stage "
                                  "outputs in place and would change what the link points at, outside the workspace",
                                  f"a real folder inside the repository: remove the link (`rm {shown}`; its target "
                                  "is left as it is) and run again")
            if not current.exists():
                break
        folder = root / rel
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"paths.{stage}", f"{rel} is a {'file' if folder.is_file() else 'special file'}, "
                              "not a stage folder", f"a folder inside the repository: move {rel} away and run again")


def _gguf_context(source) -> int | None:
    """The context length a GGUF file declares (``<arch>.context_length``), read from its header
    without loading tensors; None for other sources or when unreadable."""
    if source.kind != "gguf" or not getattr(source, "gguf_file", None):
        return None
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(Path(source.location) / source.gguf_file)).fields
        arch = fields["general.architecture"].contents()
        value = fields[f"{arch}.context_length"].contents()
        return int(value) if int(value) > 0 else None
    except Exception as exc:  # noqa: BLE001 - the check is a convenience; materialize reads the file anyway
        log.debug("no context length from %s: %s", source.gguf_file, exc)
        return None


def _check_shards(model_dir: Path) -> None:
    """A sharded checkpoint's index names only files the folder holds (a missing or empty shard
    would otherwise fail in the materialize stage, after the model began to load)."""
    import json

    for index in sorted(model_dir.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise ConfigError("model.source", f"{index} is not a readable shard index ({type(exc).__name__})",
                              "a model folder whose *.index.json maps tensors to its shard files") from None
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [name for name in shards if not (model_dir / name).is_file()]
        empty = [name for name in shards if name not in missing and (model_dir / name).stat().st_size == 0]
        if missing or empty:
            what = "; ".join(part for part in (
                f"missing: {', '.join(missing)}" if missing else "", f"empty: {', '.join(empty)}" if empty else "")
                if part)
            raise ConfigError("model.source", f"{index.name} in {model_dir} names {len(shards)} shard(s), "
                              f"not all present ({what})", "a folder holding every shard its index names "
                              "(copy the missing files)")


def _read_model_config(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError("model.source", f"{path} is not a readable model config ({type(exc).__name__}: {exc})",
                          _MODEL_CONFIG) from None
    if not isinstance(data, dict):
        raise ConfigError("model.source", f"{path} holds a JSON {type(data).__name__}, not a model config",
                          _MODEL_CONFIG)
    return data


def _context_length(config: dict) -> int | None:
    from wanda.evaluation.perplexity_config import CONTEXT_ATTRS

    for section in (config, config.get("text_config") or {}):
        for attr in CONTEXT_ATTRS:
            value = section.get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _check_seqlen(field: str, seqlen: int, context: int | None) -> None:
    if context is not None and seqlen > context:
        raise ConfigError(field, f"{seqlen} exceeds the model's context of {context} tokens", f"2..{context}")


def _tokenizer(model_dir: Path):
    """The model's tokenizer (no weights), or None when the folder has none."""
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _check_calibration_tokens(config, tokenizer) -> list[str]:
    """The calibration stage's own token check (enough, not near-constant), before any stage;
    returns the oversampling warning when the windows need more tokens than the text has."""
    from wanda.calibration import MIN_DISTINCT_TOKENS, check_tokens, oversampling_note
    from wanda.data import load_text, tokenize
    from wanda.errors import CalibrationError

    loaded = load_text(config.source, "calibration.source")
    if len(loaded.text) > _TOKENIZED_CHARS:
        return []
    try:
        ids = tokenize(tokenizer, loaded.text)
        check_tokens(ids, config.seqlen, loaded.source)
        note = oversampling_note(ids.numel(), config.nsamples, config.seqlen)
        return [f"calibration.source {loaded.source}: {note}"] if note else []
    except CalibrationError as exc:
        raise ConfigError("calibration.source", str(exc).removeprefix("calibration.source: "),
                          f"a text of more than calibration.seqlen={config.seqlen} tokens, at least "
                          f"{MIN_DISTINCT_TOKENS} of them distinct") from None


def _check_evaluation_tokens(config, tokenizer) -> None:
    from wanda.data import load_text, tokenize

    loaded = load_text(config.source, "evaluate.perplexity.source")
    if len(loaded.text) > _TOKENIZED_CHARS:
        return
    count = tokenize(tokenizer, loaded.text).numel()
    if count < config.seqlen:
        raise ConfigError("evaluate.perplexity.source", f"{loaded.source} has {count} tokens, fewer than one "
                          f"window of evaluate.perplexity.seqlen={config.seqlen}",
                          f"a longer text, or evaluate.perplexity.seqlen in 2..{count}" if count >= 2
                          else "a longer text")


def content_force_reasons(root: Path, params: PipelineParams) -> dict[str, str]:
    """Stages DVC would call up to date although what they read changed underneath.

    DVC sees the parameter *names* of sources outside the repository (``model.source``, a text
    file under the shared data folder, ``builtin:`` text) and not the machine, so a stage is
    re-run when: the bytes behind ``model.source`` changed; the calibration or evaluation text
    now resolves to another file or other bytes (e.g. the shared data appeared, so the fallback
    is no longer used); a stage skipped for lack of a GPU/TensorRT-LLM now has them.
    """
    with contextlib.chdir(root):
        return _content_force_reasons(root, params)


def _content_force_reasons(root: Path, params: PipelineParams) -> dict[str, str]:
    reasons: dict[str, str] = {}
    checks = (("materialize", _model_source_changed), ("calibration", _calibration_text_changed),
              ("dense_eval", _evaluation_text_changed), ("engine", _engine_environment_changed))
    for stage, check in checks:
        manifest = read_manifest(root / getattr(params.paths, stage))
        if manifest is None:
            continue
        try:
            reason = check(root, params, manifest)
        except Exception as exc:  # a check must never block a run; DVC's own checks still apply
            log.debug("content check of %s failed: %s", stage, exc)
            reason = None
        if reason:
            reasons[stage] = reason
    return reasons


def _model_source_changed(root: Path, params: PipelineParams, manifest: dict) -> str | None:
    from tasks.materialize import source_digest

    summary = manifest.get("summary") or {}
    if summary.get("source") != params.model.source or summary.get("source_digest") is None:
        return None  # another source is a parameter change, which DVC sees itself
    now = source_digest(params.model.source)
    if now is not None and now != summary["source_digest"]:
        return f"the bytes behind model.source {params.model.source} changed (sha256 {now[:12]}, recorded " \
               f"{summary['source_digest'][:12]})"
    return None


def _calibration_text_changed(root: Path, params: PipelineParams, manifest: dict) -> str | None:
    from wanda.data import load_text

    summary = manifest.get("summary") or {}
    config, _ = params.calibration.resolve()
    if summary.get("source_description") != config.source.describe():
        return f"calibration text now resolves to {config.source.describe()} (recorded " \
               f"{summary.get('source_description')})"
    if summary.get("source_digest") and load_text(config.source).digest != summary["source_digest"]:
        return f"calibration text {config.source.describe()} has other bytes than when it was sampled"
    return None


def _evaluation_text_changed(root: Path, params: PipelineParams, manifest: dict) -> str | None:
    import json

    from wanda.evaluation.perplexity_config import source_digest

    if params.evaluate.perplexity is None:
        return None
    config, _ = params.evaluate.perplexity.resolve()
    result = json.loads((root / params.paths.dense_eval / "result.json").read_text())
    recorded = ((result.get("settings") or {}).get("perplexity") or {})
    if recorded.get("source") != config.source.model_dump(mode="json"):
        return f"evaluation text now resolves to {config.source.describe()}"
    if recorded.get("text_digest") and source_digest(config) != recorded["text_digest"]:
        return f"evaluation text {config.source.describe()} has other bytes than when it was evaluated"
    return None


def _engine_environment_changed(root: Path, params: PipelineParams, manifest: dict) -> str | None:
    from tasks.engine import gpu_environment, missing_gpu_reason

    if manifest.get("status") != "skipped":
        return None
    recorded = (manifest.get("summary") or {}).get("environment")
    now = gpu_environment(params.engine.container)
    if recorded is not None and recorded != now and missing_gpu_reason(recorded) and not missing_gpu_reason(now):
        return f"skipped on a machine without GPU/TensorRT-LLM ({recorded}); this one has them ({now})"
    return None
