"""One JSON record per evaluated model, and the cache that computes the dense baseline once.

A record carries what makes two numbers comparable: the model fingerprint, the digests of the
evaluated data, the protocol settings (and their digest), and the library versions. Records
are written atomically and carry a digest of their own content, so a truncated, corrupted or
hand-edited file is detected on load and, in the cache, recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..atomic import write_json
from ..errors import ArtifactMismatchError, EvaluationError
from .perplexity import PerplexityConfig, PerplexityResult, evaluate_perplexity, source_digest
from .zeroshot import ZeroShotConfig, ZeroShotResult, check_task_data, evaluate_zeroshot

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def canonical_digest(data: Any) -> str:
    """sha256 of a JSON-serializable value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lm_eval", "transformers", "torch", "datasets", "wanda-pipeline"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions


class EvaluationResult(BaseModel):
    """Everything known about one model's evaluation; ``content_digest`` seals the rest."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    label: str  # how tables name the model: "dense", "wanda 50%", ...
    model_fingerprint: str
    model_source: str | None = None
    settings: dict[str, Any]  # protocol settings (configs as dumped, dtype, data digests, ...)
    settings_digest: str = ""
    dataset_digests: dict[str, str] = Field(default_factory=dict)
    perplexity: PerplexityResult | None = None
    zeroshot: ZeroShotResult | None = None
    # Facts of one run, not of the model and protocol: None in a record that left them out
    # (:meth:`without_run_facts`, what a cached stage output holds so a re-run writes equal bytes).
    wall_s: float | None = 0.0
    versions: dict[str, str] = Field(default_factory=library_versions)
    created_at: str | None = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    content_digest: str = ""

    def model_post_init(self, _context: Any) -> None:
        if not self.settings_digest:
            self.settings_digest = canonical_digest(self.settings)

    def sealed(self) -> "EvaluationResult":
        """A copy whose ``content_digest`` covers every other field."""
        return self.model_copy(update={"content_digest": _content_digest(self)})

    def run_facts(self) -> dict[str, Any]:
        """When and how fast this evaluation ran (differs between two runs of the same evaluation)."""
        facts: dict[str, Any] = {"created_at": self.created_at, "wall_s": self.wall_s}
        if self.perplexity:
            facts["perplexity.wall_s"] = self.perplexity.wall_s
            facts["perplexity.tokens_per_s"] = self.perplexity.tokens_per_s
        if self.zeroshot:
            facts["zeroshot.wall_s"] = self.zeroshot.wall_s
        return facts

    def without_run_facts(self) -> "EvaluationResult":
        """A sealed copy holding only what the model, data and protocol determine (every number
        and digest), with the run facts (:meth:`run_facts`) set to None."""
        update: dict[str, Any] = {"created_at": None, "wall_s": None}
        if self.perplexity:
            update["perplexity"] = self.perplexity.model_copy(update={"wall_s": None, "tokens_per_s": None})
        if self.zeroshot:
            update["zeroshot"] = self.zeroshot.model_copy(update={"wall_s": None})
        return self.model_copy(update=update).sealed()

    def metrics(self) -> dict[str, float]:
        """Flat metric names, as a tracker (MLflow) or a gate reads them."""
        out: dict[str, float] = {}
        if self.perplexity:
            out["perplexity"] = self.perplexity.perplexity
        if self.zeroshot:
            for task, score in self.zeroshot.tasks.items():
                out[f"{task}.acc"] = score.acc
                if score.acc_norm is not None:
                    out[f"{task}.acc_norm"] = score.acc_norm
            out[f"zeroshot.mean_{self.zeroshot.mean_metric}"] = self.zeroshot.mean
        return out


def _content_digest(result: EvaluationResult) -> str:
    return canonical_digest(result.model_dump(mode="json", exclude={"content_digest"}))


def dataset_digests(perplexity: PerplexityResult | None, zeroshot: ZeroShotResult | None) -> dict[str, str]:
    """The data digests a record names: evaluation text and tokens, each task's data file."""
    digests: dict[str, str] = {}
    if perplexity:
        digests["perplexity.text"] = perplexity.text_digest
        digests["perplexity.tokens"] = perplexity.tokens_digest
    if zeroshot:
        for task, score in zeroshot.tasks.items():
            if score.data_digest:
                digests[f"zeroshot.{task}"] = score.data_digest
    return digests


def make_result(
    label: str,
    model_fingerprint: str,
    settings: dict[str, Any],
    perplexity: PerplexityResult | None = None,
    zeroshot: ZeroShotResult | None = None,
    wall_s: float = 0.0,
    model_source: str | None = None,
) -> EvaluationResult:
    return EvaluationResult(
        label=label, model_fingerprint=model_fingerprint, model_source=model_source, settings=settings,
        dataset_digests=dataset_digests(perplexity, zeroshot), perplexity=perplexity, zeroshot=zeroshot,
        wall_s=wall_s,
    ).sealed()


def evaluation_settings(
    perplexity: PerplexityConfig | None, zeroshot: ZeroShotConfig | None, **extra: Any
) -> dict[str, Any]:
    """The protocol settings of an evaluation, with the digests of the data they name.

    Reads the data files (cheap) but no model, so a cache lookup costs no forward pass.
    ``extra`` holds anything else that decides the numbers, e.g. ``dtype="float32"``.
    """
    settings: dict[str, Any] = dict(extra)
    if perplexity is not None:
        settings["perplexity"] = {**perplexity.model_dump(mode="json"), "text_digest": source_digest(perplexity)}
    if zeroshot is not None:
        settings["zeroshot"] = {**zeroshot.model_dump(mode="json"), "data_digests": check_task_data(zeroshot)}
    return settings


def run_evaluation(
    model,
    tokenizer,
    label: str,
    model_fingerprint: str,
    perplexity: PerplexityConfig | None,
    zeroshot: ZeroShotConfig | None,
    settings: dict[str, Any] | None = None,
    model_source: str | None = None,
    *,
    blocks=None,
    offload_dir: str | None = None,
    progress=None,
    zeroshot_progress=None,
) -> EvaluationResult:
    """Perplexity and/or zero-shot accuracy of one in-memory model, as one sealed record.

    With ``blocks`` (a streamed source whose skeleton is ``model``) perplexity runs block by block
    from the shards; zero-shot accuracy needs the loaded model and is refused then.
    """
    if zeroshot is not None and getattr(blocks, "streamed", False):
        from ..errors import ConfigError

        raise ConfigError("runtime.load", "zero-shot evaluation (lm-eval) needs the fully loaded model",
                          "'full' when evaluate.zeroshot is set")
    if settings is None:
        settings = evaluation_settings(perplexity, zeroshot)
    elif zeroshot is not None:
        check_task_data(zeroshot)  # missing task data fails here, before the perplexity pass
    started = time.perf_counter()
    ppl = (evaluate_perplexity(model, tokenizer, perplexity, blocks=blocks, offload_dir=offload_dir,
                               progress=progress) if perplexity is not None else None)
    zs = evaluate_zeroshot(model, tokenizer, zeroshot, progress=zeroshot_progress) if zeroshot is not None else None
    return make_result(label, model_fingerprint, settings, ppl, zs, time.perf_counter() - started, model_source)


def save_result(path: str | Path, result: EvaluationResult) -> Path:
    """Write atomically: a reader sees the old file or the whole new one, never a half."""
    path = Path(path)
    if not result.content_digest:
        result = result.sealed()
    write_json(path, result.model_dump(mode="json"))
    return path


def load_result(path: str | Path) -> EvaluationResult:
    """Read and verify a record; ArtifactMismatchError when it is damaged or was edited."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = EvaluationResult.model_validate(data)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        raise ArtifactMismatchError(f"{path}: not a readable evaluation result ({type(exc).__name__}: {exc})") from exc
    if result.schema_version != SCHEMA_VERSION:
        raise ArtifactMismatchError(f"{path}: schema version {result.schema_version}, expected {SCHEMA_VERSION}")
    if result.content_digest != _content_digest(result):
        raise ArtifactMismatchError(f"{path}: content digest does not match its content (damaged or edited)")
    if result.settings_digest != canonical_digest(result.settings):
        raise ArtifactMismatchError(f"{path}: settings digest does not match its settings")
    return result


def cache_path(cache_dir: str | Path, model_fingerprint: str, settings: dict[str, Any]) -> Path:
    """``cache_dir/<model fingerprint>/<settings digest>.json``: content keys, not names."""
    return Path(cache_dir) / model_fingerprint / f"{canonical_digest(settings)}.json"


def cached_or_run(
    cache_dir: str | Path,
    model_fingerprint: str,
    settings: dict[str, Any],
    compute: Callable[[], EvaluationResult],
) -> tuple[EvaluationResult, bool]:
    """The stored result for ``(model_fingerprint, settings)``, or ``compute()`` stored anew.

    Returns ``(result, reused)``. Meant for the dense baseline: evaluated once per base model
    and evaluation setting, then read by every candidate's comparison. ``settings`` should
    hold everything that decides the numbers, data digests included, so changed data is a
    different key. A damaged file is logged and recomputed, never trusted.
    """
    path = cache_path(cache_dir, model_fingerprint, settings)
    key = canonical_digest(settings)
    if path.exists():
        try:
            result = load_result(path)
            if result.model_fingerprint == model_fingerprint and result.settings_digest == key:
                log.info("reusing evaluation %s (%s)", path, result.label)
                return result, True
            log.warning("%s holds another model's or setting's result; recomputing", path)
        except ArtifactMismatchError as exc:
            log.warning("damaged cached evaluation, recomputing: %s", exc)
    started = time.perf_counter()
    result = compute()
    if result.model_fingerprint != model_fingerprint or result.settings_digest != key:
        raise EvaluationError(
            f"computed result is for model {result.model_fingerprint[:12]} / settings {result.settings_digest[:12]}, "
            f"expected {model_fingerprint[:12]} / {key[:12]}: the cache key and the computation disagree"
        )
    save_result(path, result)
    log.info("stored evaluation %s in %.1fs", path, time.perf_counter() - started)
    return result, False
