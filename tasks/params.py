"""The pipeline's parameters: one validated document with one section per stage.

``params.yaml`` is read with YAML 1.2 (ruamel, as DVC reads it), so ``pattern: 2:4`` stays the
string "2:4" instead of YAML 1.1's base-60 integer 124 and both tools see the same values.
Every value is validated (pydantic) before any stage runs; errors name the dotted field and,
where there is a closed set, the allowed values.

Sections reuse the library's own pydantic configs instead of restating their fields:
``calibration`` is a :class:`wanda.calibration_config.CalibrationConfig`, ``statistics`` and ``masks``
split the fields of :class:`wanda.config.PruneConfig` (what the statistics pass needs vs what
only the masks need, so a sparsity change cannot invalidate statistics), ``evaluate.perplexity``
is a :class:`wanda.evaluation.PerplexityConfig`, ``engine.shapes`` an
:class:`wanda.export.engine.EngineShapes`. All of them live in torch-free modules: reading and
validating parameters imports no torch (``tests/test_fast_start.py``).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from wanda.calibration_config import CalibrationConfig
from wanda.config import PruneConfig
from wanda.data import TextSource, resolve_path
from wanda.errors import ConfigError
from wanda.evaluation.perplexity_config import PerplexityConfig
from wanda.evaluation.zeroshot import ZeroShotConfig
from wanda.model_io import DTYPE_NAMES, EMBEDDED_DEFAULT

from . import graph

log = logging.getLogger(__name__)

DEFAULT_PARAMS_FILE = "params.yaml"
# PruneConfig fields that decide how statistics are collected; every other PruneConfig field
# belongs to the masks section, so changing it leaves the (expensive) statistics cached.
STATISTICS_FIELDS = ("mode", "batch_size", "targets", "ignore", "expert_policy")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _prune_fields(names) -> dict[str, tuple[Any, Any]]:
    fields = PruneConfig.model_fields
    return {name: (fields[name].annotation, fields[name]) for name in names}


def _masks_field_names() -> list[str]:
    return [name for name in PruneConfig.model_fields if name not in STATISTICS_FIELDS]


_StatisticsFields = create_model("_StatisticsFields", __base__=Section, **_prune_fields(STATISTICS_FIELDS))
_MasksFields = create_model("_MasksFields", __base__=Section, **_prune_fields(_masks_field_names()))


class ModelSection(Section):
    # Any source wanda.model_io accepts: embedded:NAME, a .gguf file, a model directory, a hub id.
    source: str = EMBEDDED_DEFAULT
    dtype: Literal[tuple(DTYPE_NAMES)] = "float32"  # type: ignore[valid-type]


class RuntimeSection(Section):
    """Where compute runs, and how much of the model is in memory at once. Part of the cache key
    of every stage that runs the model: CPU and GPU kernels round differently, so their masks
    and perplexities are different artifacts.

    ``load``: ``full`` loads the whole model; ``stream`` keeps only one decoder block in memory
    (read from the memory-mapped safetensors shards) for statistics, masks, the pruned model and
    perplexity, with the same results (models larger than memory; zero-shot evaluation needs
    ``full``). ``offload_activations`` keeps the calibration/evaluation activations between
    blocks in files instead of memory (streaming only). ``device`` is where blocks run (in
    streaming, each block is placed there); ``device_map`` is an accelerate device map ("auto",
    "balanced", "sequential", a device, or ``{module: device}``) that spreads a fully loaded
    model over several GPUs for the block walk and evaluation.
    """

    device: str = "cpu"
    load: Literal["full", "stream"] = "full"
    offload_activations: bool = False
    device_map: str | dict[str, int | str] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device {value!r} is not supported (allowed: cpu, cuda, cuda:N)")
        return value

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value):
        from wanda.placement import STRATEGIES

        if isinstance(value, str) and value not in STRATEGIES and value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"device_map {value!r} is not supported (allowed: {', '.join(STRATEGIES)}, cpu, "
                             "cuda:N, or a mapping module -> device)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RuntimeSection":
        if self.offload_activations and self.load != "stream":
            raise ValueError("offload_activations needs load 'stream' (allowed with load 'full': false)")
        if self.device_map is not None and self.load == "stream":
            raise ValueError("device_map places a fully loaded model; with load 'stream' each block goes to "
                             "runtime.device (allowed with stream: device_map null)")
        return self


def _resolve_source(source: TextSource, fallback: TextSource | None, field: str) -> tuple[TextSource, str | None]:
    """The source to read: ``source`` when its file exists, else ``fallback`` (with a note why)."""
    if source.path and not resolve_path(source.path).is_file() and fallback is not None:
        note = f"{field}.source {source.describe()} is absent; using {field}.fallback {fallback.describe()}"
        return fallback, note
    return source, None


class CalibrationSection(CalibrationConfig):
    # Used when ``source`` is a file that does not exist here (a fresh machine without the
    # shared data). The artifact records which one was used; tokens differ, so do digests.
    fallback: TextSource | None = None

    def resolve(self) -> tuple[CalibrationConfig, str | None]:
        source, note = _resolve_source(self.source, self.fallback, "calibration")
        fields = self.model_dump(exclude={"fallback", "source"})
        return CalibrationConfig(source=source, **fields), note


class StatisticsSection(_StatisticsFields):
    """How calibration statistics are taken: ``one_pass`` (dense model, shared by every mask
    configuration) or ``sequential`` (the paper's procedure: computed by the masks stage, block
    by block on the already-pruned prefix)."""


class MasksSection(_MasksFields):
    """The recipe's remaining fields (their validators come with PruneConfig's field types)."""


class PruneSection(Section):
    # dtype of the written pruned model; null keeps the materialized model's dtype.
    dtype: Literal[tuple(DTYPE_NAMES)] | None = None  # type: ignore[valid-type]


class PerplexitySection(PerplexityConfig):
    fallback: TextSource | None = None

    def resolve(self) -> tuple[PerplexityConfig, str | None]:
        source, note = _resolve_source(self.source, self.fallback, "evaluate.perplexity")
        return PerplexityConfig(source=source, **self.model_dump(exclude={"fallback", "source"})), note


class EvaluateSection(Section):
    perplexity: PerplexitySection | None = Field(default_factory=PerplexitySection)
    zeroshot: ZeroShotConfig | None = None

    @model_validator(mode="after")
    def _something(self) -> "EvaluateSection":
        if self.perplexity is None and self.zeroshot is None:
            raise ValueError("nothing to evaluate: set perplexity, zeroshot or both")
        return self


class Export24Section(Section):
    # The stage exports only when the pruned model is 2:4; otherwise it records why it skipped.
    enabled: bool = True
    dtype: Literal["float16", "bfloat16"] = "float16"


class EngineShapesSection(Section):
    max_batch_size: int = Field(1, ge=1)
    max_input_len: int = Field(128, ge=1)
    max_seq_len: int = Field(256, ge=2)


class EngineSection(Section):
    enabled: bool = True
    shapes: EngineShapesSection = Field(default_factory=EngineShapesSection)
    # A container command prefix for trtllm-build (e.g. "docker run --rm --gpus all ... image");
    # null: the tool on the PATH.
    container: str | None = None
    timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _shapes(self) -> "EngineSection":
        from wanda.export.engine import EngineShapes

        EngineShapes(**self.shapes.model_dump())  # the library's own consistency checks
        return self


class BenchmarkSection(Section):
    enabled: bool = True
    num_requests: int = Field(32, ge=1)
    input_len: int = Field(128, ge=1)
    output_len: int = Field(128, ge=1)
    seed: int = 0
    modes: list[Literal["latency", "throughput"]] = Field(default_factory=lambda: ["latency"], min_length=1)
    warmup: int = Field(2, ge=0)
    timeout_s: float | None = Field(None, gt=0)


class SavingsSection(Section):
    """The ``savings`` stage: how prefill and decode speed are measured (small defaults keep the
    embedded default fast; a release measures at its serving shapes)."""

    prefill_tokens: int = Field(128, ge=1, description="prompt tokens of the timed prefill")
    decode_tokens: int = Field(16, ge=1, description="greedy tokens of the timed decode, KV cache on")
    repetitions: int = Field(3, ge=1, description="interleaved timings per model; medians are reported")
    threads: int = Field(1, ge=1, description="torch CPU threads while timing")


class GateCriteria(BaseModel):
    """The ``gate`` section: release criteria for flows/gate_policy.py; ``None`` disables a
    criterion (the policy's hard rules still apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ppl_increase_rel: float | None = Field(0.25, ge=0.0, description="candidate/dense perplexity - 1")
    max_ppl_increase_abs: float | None = Field(None, ge=0.0, description="candidate - dense perplexity")
    max_mean_acc_drop: float | None = Field(0.05, ge=0.0, le=1.0, description="dense - candidate mean accuracy (0..1)")
    min_sparsity: float | None = Field(
        0.0, ge=0.0, le=1.0,
        description="actual sparsity: zeros among all decoder-block weights (the masked layers' figure when no "
                    "block-wide figure was recorded)")
    min_coverage: float | None = Field(
        0.95, ge=0.0, le=1.0, description="fraction of decoder-block weights that were pruning targets")
    min_speedup: float | None = Field(None, gt=0.0, description="dense latency / candidate latency")
    require_speed: bool = Field(False, description="fail when no latency figure exists")
    # The savings stage's figures (transformers on runtime.device, against the dense base in the
    # same run), beside min_speedup's TensorRT-LLM engine latency. Missing figures fail.
    min_param_reduction: float | None = Field(
        None, ge=0.0, lt=1.0, description="1 - pruned/dense parameter count (savings stage): removed weights only")
    min_decode_speedup: float | None = Field(
        None, gt=0.0, description="pruned/dense decode tokens/s in transformers (savings stage)")
    champion_margin: float | None = Field(
        0.0, ge=0.0, description="candidate perplexity may exceed the champion's by this fraction")
    champion_acc_margin: float | None = Field(
        0.0, ge=0.0, le=1.0, description="candidate mean accuracy may trail the champion's by this much")
    require_zeroshot: bool = Field(False, description="fail when no zero-shot accuracy exists")

    @model_validator(mode="after")
    def _speed(self) -> "GateCriteria":
        if self.require_speed and self.min_speedup is None:
            raise ValueError("gate.require_speed needs gate.min_speedup (allowed: a number > 0)")
        return self


class TrackingConfig(BaseModel):
    """The ``tracking`` section: where flows/tracking.py logs runs and registers models. Typed
    here with the other sections, so a typo inside ``tracking:`` fails before anything runs."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(None, description="None: $MLFLOW_TRACKING_URI, else the local sqlite default")
    registry_uri: str | None = Field(None, description="None: $MLFLOW_REGISTRY_URI, else the tracking URI")
    experiment: str = "wanda-pruning"
    registered_model: str = "wanda-pruned"
    artifact_root: str | None = Field(None, description="local backends only; None: <project>/.mlflow/artifacts")
    register_source: Literal["artifact", "dvc"] = "artifact"
    dvc_remote_url: str | None = Field(None, description="register_source=dvc: None reads the default DVC remote")

    secret_query_params: list[str] = Field(
        default_factory=list, description="query parameters that carry credentials on your servers, besides "
        "token, password, key, secret, sig, access_token...: refused in URIs here, redacted everywhere")

    @model_validator(mode="after")
    def _no_credentials(self) -> "TrackingConfig":
        # A parameter file is committed, logged to MLflow and shown by Prefect; a password or a
        # token in it would be everywhere. Credentials come from the environment, which nothing
        # records. The message names the parts, never their values.
        from pydantic_core import PydanticCustomError

        from .uri_secrets import credential_parts

        for name in ("tracking_uri", "registry_uri", "artifact_root", "dvc_remote_url"):
            found = credential_parts(getattr(self, name), self.secret_query_params)
            if found:
                raise PydanticCustomError(
                    "uri_credentials", "{parts} is refused here (credentials in a URI would be stored and "
                    "logged); allowed: the URI without them, with them in $MLFLOW_TRACKING_URI / "
                    "$MLFLOW_REGISTRY_URI or $MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD/"
                    "$MLFLOW_TRACKING_TOKEN", {"field": name, "parts": ", ".join(found)})
        return self


# One field per stage of tasks/graph.py (the one stage list), defaulting to artifacts/<stage>.
_PathFields = create_model("_PathFields", __base__=Section,
                           **{name: (str, f"artifacts/{name}") for name in graph.order()})


class PathsSection(_PathFields):
    """Where each stage writes its artifact folder (relative to the repository root).

    ``dvc.yaml`` reads these through templating, so declared outputs and written folders never
    disagree. Sweeps point some of them at per-point folders.
    """

    @field_validator("*")
    @classmethod
    def _relative(cls, value: str) -> str:
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not value.strip() or value.strip() in (".", "./"):
            raise ValueError(f"{value!r}: must be a relative folder inside the repository")
        return path.as_posix()

    @model_validator(mode="after")
    def _distinct(self) -> "PathsSection":
        values = list(self.model_dump().values())
        for a in values:
            for b in values:
                if a != b and (b.startswith(a + "/")):
                    raise ValueError(f"stage folders may not nest: {b!r} lies inside {a!r}")
        if len(set(values)) != len(values):
            raise ValueError("every stage needs its own folder (two paths are equal)")
        return self


class PipelineParams(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    statistics: StatisticsSection = Field(default_factory=StatisticsSection)
    masks: MasksSection = Field(default_factory=MasksSection)
    prune: PruneSection = Field(default_factory=PruneSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    export_24: Export24Section = Field(default_factory=Export24Section)
    engine: EngineSection = Field(default_factory=EngineSection)
    benchmark: BenchmarkSection = Field(default_factory=BenchmarkSection)
    savings: SavingsSection = Field(default_factory=SavingsSection)
    paths: PathsSection = Field(default_factory=PathsSection)
    # Read by the release flows (flows/release.py, flows/tracking.py), not by any stage here.
    gate: GateCriteria | None = None
    tracking: TrackingConfig | None = None
    # Read by the sweep flow (where points run, what each needs), validated by flows/runners.py.
    sweep: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _prune_config(self) -> "PipelineParams":
        # The library decides which combinations are valid (e.g. SparseGPT needs sequential
        # mode, N:M fixes the sparsity); checked here so it fails before any stage runs.
        self.prune_config()
        if self.runtime.load == "stream" and self.evaluate.zeroshot is not None:
            raise ValueError("runtime.load 'stream': zero-shot evaluation (lm-eval) needs the fully loaded model "
                             "(allowed with evaluate.zeroshot set: runtime.load 'full')")
        return self

    def prune_config(self) -> PruneConfig:
        return prune_config_of(self.statistics.model_dump(), self.masks.model_dump())


def prune_config_of(statistics: dict[str, Any], masks: dict[str, Any]) -> PruneConfig:
    """The one way the pipeline builds a ``PruneConfig``: the statistics fields (from the
    ``statistics`` section, or the statistics artifact's ``settings.json``) joined with the
    ``masks`` section. Combination errors are one ValueError naming the fields."""
    try:
        return PruneConfig(**statistics, **masks)
    except ValidationError as exc:
        messages = "; ".join(_clean(err["msg"]) for err in exc.errors())
        raise ValueError(f"{_PRUNE_PREFIX}{messages}") from None


_PRUNE_PREFIX = "masks/statistics: "


def _clean(message: str) -> str:
    return message.removeprefix("Value error, ")


# ----------------------------------------------------------------------------- YAML


def _yaml(typ: str = "safe"):
    from ruamel.yaml import YAML

    yaml = YAML(typ=typ, pure=True)
    yaml.default_flow_style = False
    return yaml


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("params", f"parameter file not found: {path}")
    try:
        data = _yaml().load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # ruamel raises many parser error types
        raise ConfigError("params", f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("params", f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


_DOCUMENTS: dict[tuple[str, str], dict[str, Any]] = {}
_VALIDATED: dict[tuple, "PipelineParams"] = {}


def _content_key(path: str | Path) -> tuple[str, str] | None:
    """``(path, sha256 of its bytes)``: a parameter file is small, and hashing it is far cheaper
    than parsing and validating it; unlike an mtime, the digest cannot miss a quick rewrite."""
    import hashlib

    path = Path(path).resolve()
    try:
        return (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    except OSError:
        return None


def cached_document(path: str | Path) -> dict[str, Any]:
    """:func:`read_yaml`, parsed once per process for as long as the file's bytes are the same;
    callers get their own copy, so editing it changes nothing cached."""
    import copy

    key = _content_key(path)
    if key is None:
        return read_yaml(path)  # absent: read_yaml names the file
    if key not in _DOCUMENTS:
        _DOCUMENTS[key] = read_yaml(path)
    return copy.deepcopy(_DOCUMENTS[key])


def parse_value(text: str) -> Any:
    """A ``-S key=value`` value, typed as YAML 1.2 types it (0.6 float, 2:4 string, null, [a, b])."""
    try:
        return _yaml().load(text) if text.strip() else ""
    except Exception:
        return text


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("override", f"{item!r} is not KEY=VALUE", "section.field=value, e.g. masks.sparsity=0.6")
    key, _, value = item.partition("=")
    keys = [k for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError("override", f"{key!r} is not a dotted parameter name", "e.g. masks.sparsity")
    return keys, parse_value(value)


def _model_at(keys: list[str]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``keys[:-1]`` (None past a non-model field)."""
    model: type[BaseModel] | None = PipelineParams
    for key in keys[:-1]:
        if model is None or key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
        model = _model_of(annotation)
    return model


def _model_of(annotation: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set; unknown names fail with the allowed ones."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides or []:
        keys, value = parse_override(item)
        model = _model_at(keys)
        if model is not None and keys[-1] not in model.model_fields:
            raise ConfigError(".".join(keys), "unknown parameter", ", ".join(model.model_fields))
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(keys), f"{key!r} holds a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def error_lines(exc: ValidationError) -> list[tuple[str, str]]:
    """``(dotted field, message)`` per error; unknown keys list the allowed ones."""
    lines = []
    for err in exc.errors():
        loc = ".".join(error_location(err))
        message = _clean(err["msg"])
        if not loc and message.startswith(_PRUNE_PREFIX):
            loc, message = "masks", message.removeprefix(_PRUNE_PREFIX)
        if err["type"] == "extra_forbidden":
            model = _model_at(list(map(str, err["loc"])))
            if model is not None:
                message += f" (allowed: {', '.join(model.model_fields)})"
        lines.append((loc or "params", message))
    return lines


def error_location(err: dict) -> list[str]:
    """The dotted location of one pydantic error; a model-level check names its field in
    ``ctx.field`` (the URI credential check sees the whole section, so its loc is the section)."""
    loc = [str(part) for part in err["loc"]]
    field = (err.get("ctx") or {}).get("field")
    return [*loc, field] if err["type"] == "uri_credentials" and field else loc


def validate_params(data: dict[str, Any]) -> PipelineParams:
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        errors = error_lines(exc)
        field, first = errors[0]
        rest = "; ".join(f"{loc}: {message}" for loc, message in errors[1:])
        raise ConfigError(field, first + (f"; {rest}" if rest else "")) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: list[str] | None = None,
                point: str | None = None) -> PipelineParams:
    """Read, override and validate (once per process for an unchanged file and the same
    overrides: the result is frozen). ``point`` selects one point of a sweep parameter file."""
    key = (_content_key(path), tuple(overrides or ()), point)
    if key[0] is not None and key in _VALIDATED:
        return _VALIDATED[key]
    data = cached_document(path)
    if point is not None:
        points = data.get("points") or {}
        if point not in points:
            raise ConfigError("point", f"{point!r} is not a point of {path}", ", ".join(points) or "none")
        data = points[point]["params"]
    params = validate_params(apply_overrides(data, overrides))
    if key[0] is not None:
        _VALIDATED[key] = params
    return params


def params_dict(params: PipelineParams) -> dict[str, Any]:
    """Plain JSON-able values, as a manifest records them and a parameter file holds them."""
    return params.model_dump(mode="json")


def write_params_file(target: str | Path, base_text: str, overrides: list[str] | None) -> None:
    """Write ``base_text`` with ``overrides`` applied, keeping its comments and order.

    DVC reads the stage parameters from this file and records their values in ``dvc.lock``, so
    an override must land here (as ``dvc exp run -S`` does) for the lineage to be true.
    """
    from wanda.atomic import atomic_file

    yaml = _yaml("rt")
    yaml.preserve_quotes = True
    data = yaml.load(base_text) or {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            if key not in node or node[key] is None:
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    with atomic_file(target, "w") as handle:
        handle.write(buffer.getvalue())
