"""TensorRT-LLM engine builds: the sparse engine and its honest dense baselines.

``--weight_sparsity`` sets TensorRT's SPARSE_WEIGHTS builder flag, which lets TensorRT choose
sparse tensor-core tactics only for GEMMs it builds itself. With the GEMM plugin enabled the
GEMMs go to cuBLASLt and stay dense, so:

- ``sparse``: ``--weight_sparsity --gemm_plugin disable``;
- ``dense``: ``--gemm_plugin disable`` (same GEMM path as the sparse engine, minus sparsity);
- ``dense_gemm_plugin``: ``--gemm_plugin auto`` (cuBLASLt GEMMs: the dense engine most TensorRT-LLM
  examples build). ``trtllm-build``'s own default is ``gemm_plugin`` disabled (``PluginConfig.gemm_plugin``
  defaults to None in TensorRT-LLM 1.2), so ``disable`` is passed explicitly only to be unambiguous.

``--use_fused_mlp`` is on by default in 1.2: the gated MLP's two input GEMMs (checkpoint ``mlp.fc``
and ``mlp.gate``) are horizontally fused into one GEMM named ``mlp/fused_fc`` in the network, so the
build log names ``fused_fc`` layers instead of ``fc`` and ``gate``; both spellings are parsed.

All three get identical shape flags. TensorRT-LLM 1.2 is the last release with ``trtllm-build``;
its wheels need Python 3.10/3.12, CUDA and a driver, so the tool runs as a subprocess, from the
PATH or through a container command prefix (e.g. NVIDIA's ``tensorrt-llm/release`` image), and is
never imported here.

TensorRT reports sparsity in two INFO lines (TensorRT developer guide, "Structured Sparsity"):
``(Sparsity) Layers eligible for sparse math: A, B`` and
``(Sparsity) TRT inference plan picked sparse implementation for layers: A``.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..atomic import write_json
from ..errors import ConfigError, WandaError

log = logging.getLogger(__name__)

BUILD_TOOL = "trtllm-build"
BENCH_TOOL = "trtllm-bench"
CONTAINER_ENV = "WANDA_TRTLLM_CONTAINER"  # shell-quoted container command prefix
INSTALL_HINT = (
    "install tensorrt-llm 1.2.x (the last release with trtllm-build; Python 3.10/3.12, CUDA and an NVIDIA "
    "driver; wheels from https://pypi.nvidia.com, the PyPI package is a placeholder) or configure a container "
    f"command (argument container_command or ${CONTAINER_ENV}), e.g. "
    "'docker run --rm --gpus all --ipc=host -v /data:/data nvcr.io/nvidia/tensorrt-llm/release:<1.2.x tag>'"
)


def nvidia_gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to the tools (cheap: ``nvidia-smi`` on the PATH,
    no CUDA initialisation). One function, so every stage asks the same question."""
    return shutil.which("nvidia-smi") is not None


class EngineUnavailableError(WandaError, RuntimeError):
    """TensorRT-LLM's tools cannot be run here; says what is missing and where the checkpoint is."""


class EngineBuildError(WandaError, RuntimeError):
    """A ``trtllm-build`` / ``trtllm-bench`` run failed; names its command and log."""


# --------------------------------------------------------------------------- commands


class EngineShapes(BaseModel):
    """Shape flags shared by every engine of one comparison."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(1, ge=1)
    max_input_len: int = Field(128, ge=1)
    max_seq_len: int = Field(256, ge=2)
    max_num_tokens: int | None = Field(None, ge=1)  # default: max_batch_size * max_input_len
    max_beam_width: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _lengths(self) -> "EngineShapes":
        if self.max_seq_len <= self.max_input_len:
            raise ValueError(f"max_seq_len {self.max_seq_len} must exceed max_input_len {self.max_input_len} "
                             "(it counts prompt and generated tokens)")
        return self

    @property
    def num_tokens(self) -> int:
        return self.max_num_tokens or self.max_batch_size * self.max_input_len

    def flags(self) -> list[str]:
        return [
            "--max_batch_size", str(self.max_batch_size),
            "--max_input_len", str(self.max_input_len),
            "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.num_tokens),
            "--max_beam_width", str(self.max_beam_width),
        ]


class EngineVariant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    weight_sparsity: bool
    gemm_plugin: str  # "disable" | "auto" | "float16" | "bfloat16"

    @model_validator(mode="after")
    def _sparse_without_plugin(self) -> "EngineVariant":
        if self.weight_sparsity and self.gemm_plugin != "disable":
            raise ValueError(f"variant {self.name!r}: --weight_sparsity needs --gemm_plugin disable (with the "
                             "GEMM plugin the GEMMs run in cuBLASLt and stay dense)")
        return self


SPARSE = EngineVariant(name="sparse", weight_sparsity=True, gemm_plugin="disable")
DENSE = EngineVariant(name="dense", weight_sparsity=False, gemm_plugin="disable")
DENSE_GEMM_PLUGIN = EngineVariant(name="dense_gemm_plugin", weight_sparsity=False, gemm_plugin="auto")
DEFAULT_VARIANTS: tuple[EngineVariant, ...] = (SPARSE, DENSE, DENSE_GEMM_PLUGIN)


def build_command(checkpoint_dir: str | Path, output_dir: str | Path, variant: EngineVariant, shapes: EngineShapes,
                  *, log_level: str = "info", extra_args: Sequence[str] = ()) -> list[str]:
    """The ``trtllm-build`` argv (without any container prefix) for one engine variant.

    ``log_level`` must be at least ``info``: the ``(Sparsity)`` lines are TensorRT INFO messages.
    """
    if log_level not in ("info", "verbose"):
        raise ConfigError("engine.log_level", f"{log_level!r} hides TensorRT's (Sparsity) lines", "info, verbose")
    argv = [
        BUILD_TOOL,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(output_dir),
        "--gemm_plugin", variant.gemm_plugin,
        *shapes.flags(),
        "--log_level", log_level,
    ]
    if variant.weight_sparsity:
        argv.append("--weight_sparsity")
    return argv + list(extra_args)


def build_commands(checkpoint_dir: str | Path, engines_root: str | Path, shapes: EngineShapes,
                   variants: Sequence[EngineVariant] = DEFAULT_VARIANTS, **kwargs) -> dict[str, list[str]]:
    """One command per variant, each writing to ``engines_root/<variant>``, identical shapes."""
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError("engine.variants", f"duplicate variant names {names}")
    return {v.name: build_command(checkpoint_dir, Path(engines_root) / v.name, v, shapes, **kwargs) for v in variants}


# --------------------------------------------------------------------------- runner


def docker_prefix(image: str, mounts: Sequence[str | Path], *, runtime: str = "docker", gpus: str = "all",
                  extra: Sequence[str] = ()) -> list[str]:
    """A container prefix mounting each directory at the same path, so host paths work inside."""
    argv = [runtime, "run", "--rm", "--gpus", gpus, "--ipc=host",
            "--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]  # NVIDIA's recommended flags
    for mount in dict.fromkeys(str(Path(m).resolve()) for m in mounts):
        argv += ["-v", f"{mount}:{mount}"]
    return argv + list(extra) + [image]


class RunRecord(BaseModel):
    command: list[str]
    command_line: str
    returncode: int
    seconds: float
    log_path: Path


class ToolRunner:
    """Runs TensorRT-LLM's CLI tools: from the PATH, or behind a container command prefix."""

    def __init__(self, container_command: str | Sequence[str] | None = None, env: dict[str, str] | None = None):
        if container_command is None:
            container_command = os.environ.get(CONTAINER_ENV) or None
        if isinstance(container_command, str):
            container_command = shlex.split(container_command)
        self.prefix: list[str] = list(container_command or [])
        self.env = env

    def describe(self) -> str:
        return f"container: {shlex.join(self.prefix)}" if self.prefix else "host PATH"

    def resolve(self, tool: str, checkpoint_dir: str | Path | None = None) -> list[str]:
        """The argv prefix that runs ``tool``; raises :class:`EngineUnavailableError` if none can."""
        where = f"; the exported checkpoint is at {checkpoint_dir}" if checkpoint_dir else ""
        if self.prefix:
            if shutil.which(self.prefix[0]) is None:
                raise EngineUnavailableError(
                    f"container runtime {self.prefix[0]!r} (from the configured container command) is not on PATH"
                    f"{where}; {INSTALL_HINT}")
            return [*self.prefix, tool]
        path = shutil.which(tool)
        if path is None:
            raise EngineUnavailableError(f"{tool} not found on PATH and no container command configured{where}; "
                                         f"{INSTALL_HINT}")
        return [path]

    def run(self, argv: Sequence[str], log_path: str | Path, *, timeout: float | None = None,
            checkpoint_dir: str | Path | None = None) -> RunRecord:
        """Run ``argv`` (its first element is the tool name), stdout+stderr to ``log_path``."""
        full = self.resolve(argv[0], checkpoint_dir) + list(argv[1:])
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        line = shlex.join(full)
        log.info("running %s", line)
        start = time.monotonic()
        with open(log_path, "w") as handle:
            handle.write(f"$ {line}\n")
            handle.flush()
            try:
                proc = subprocess.run(full, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                      env={**os.environ, **(self.env or {})}, check=False)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = -9
                handle.write(f"\n[wanda] killed after {timeout} s\n")
        return RunRecord(command=full, command_line=line, returncode=code, seconds=time.monotonic() - start,
                         log_path=log_path)

    def capture(self, argv: Sequence[str], timeout: float = 120) -> str:
        """Output of a short probe command (through the container prefix when one is set)."""
        full = [*self.prefix, *argv] if self.prefix else list(argv)
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"
        text = (proc.stdout + proc.stderr).strip()
        return text if proc.returncode == 0 else f"failed (exit {proc.returncode}): {text[-500:]}"


def _interpreter(tool_path: str) -> str:
    """The Python a console script runs with (its shebang): the one that has tensorrt_llm."""
    try:
        first = Path(tool_path).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return "python3"
    return first[2:].strip().split()[0] if first.startswith("#!") and "python" in first else "python3"


_VERSION_PROBE = (
    "import importlib.metadata as m\n"
    "for p in ('tensorrt_llm', 'tensorrt', 'torch'):\n"
    "    try: print(p, m.version(p.replace('_', '-')))\n"
    "    except Exception as e: print(p, 'unavailable')\n"
)


def probe_versions(runner: ToolRunner) -> dict[str, str]:
    """TensorRT-LLM / TensorRT / torch versions and the GPU+driver, as the tools would see them."""
    python = "python3"
    if not runner.prefix and (path := shutil.which(BUILD_TOOL)):
        python = _interpreter(path)
    versions: dict[str, str] = {"runner": runner.describe()}
    out = runner.capture([python, "-c", _VERSION_PROBE])
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("tensorrt_llm", "tensorrt", "torch"):
            versions[parts[0]] = parts[1]
    if not any(k in versions for k in ("tensorrt_llm", "tensorrt")):
        versions["probe"] = out[-300:]
    versions["gpu"] = runner.capture(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap",
                                      "--format=csv,noheader"], timeout=30)
    return versions


# --------------------------------------------------------------------------- log parsing

_ELIGIBLE = re.compile(r"\(Sparsity\)\s*Layers\s+eligible\s+for\s+sparse\s+math\s*:?(.*)$", re.I)
_PICKED = re.compile(
    r"\(Sparsity\)\s*TRT\s+inference\s+plan\s+picked\s+sparse\s+implementation\s+for\s+layers\s*:?(.*)$", re.I)
# TRT-LLM names network layers after the module path, e.g.
# "LLaMAForCausalLM/transformer/layers/3/mlp/fc/MATMUL_0"; map them back to checkpoint modules.
# With --use_fused_mlp (the default) fc and gate are one GEMM, "mlp/fused_fc".
_MODULE = re.compile(r"layers[/.](\d+)[/.](attention[/.](?:qkv|dense)|mlp[/.](?:fused_fc|fc|gate|proj))(?![\w])")
_TRT_VERSION = re.compile(r"TensorRT[- ]LLM(?:\]\s*TensorRT-LLM)?\s+version\s*:?\s*([0-9][\w.+-]*)", re.I)


class SparsityLog(BaseModel):
    """What a build log says about sparse tactics."""

    sparsity_lines_found: bool  # TensorRT printed its (Sparsity) summary at all
    eligible: list[str]
    picked: list[str]  # layers that got a sparse implementation
    picked_modules: list[str]  # ... as checkpoint modules, e.g. transformer.layers.3.mlp.fc
    eligible_modules: list[str]
    warnings: list[str] = Field(default_factory=list)

    @property
    def has_sparse_layers(self) -> bool:
        return bool(self.picked)


def _layer_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _modules(layers: list[str]) -> list[str]:
    found = {f"transformer.layers.{m.group(1)}.{m.group(2).replace('/', '.')}" for name in layers
             for m in [_MODULE.search(name)] if m}
    return sorted(found, key=lambda s: (int(s.split(".")[2]), s))


def parse_sparsity_log(text: str) -> SparsityLog:
    """Collect the ``(Sparsity)`` lines of a build log (all of them: one per build profile)."""
    eligible: dict[str, None] = {}
    picked: dict[str, None] = {}
    found = False
    for raw in text.splitlines():
        if m := _ELIGIBLE.search(raw):
            found = True
            eligible.update(dict.fromkeys(_layer_list(m.group(1))))
        elif m := _PICKED.search(raw):
            found = True
            picked.update(dict.fromkeys(_layer_list(m.group(1))))
    warnings: list[str] = []
    if not found:
        warnings.append("the build log has no TensorRT '(Sparsity)' lines: TensorRT did not consider sparse "
                        "tactics (was --weight_sparsity passed and the log level at least info?)")
    elif not eligible:
        warnings.append("TensorRT found no layer eligible for sparse math: the weights it saw are not 2:4 or the "
                        "GEMMs are plugins (GEMM plugin enabled)")
    elif not picked:
        warnings.append(f"TensorRT picked no sparse implementation ({len(eligible)} layers were eligible): the "
                        "dense tactics were faster at these shapes, the 'sparse' engine is dense")
    return SparsityLog(sparsity_lines_found=found, eligible=list(eligible), picked=list(picked),
                       picked_modules=_modules(list(picked)), eligible_modules=_modules(list(eligible)),
                       warnings=warnings)


def parse_trtllm_version(text: str) -> str | None:
    m = _TRT_VERSION.search(text)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- builds


class EngineBuildRecord(BaseModel):
    variant: EngineVariant
    engine_dir: Path
    run: RunRecord
    engine_files: list[str]
    trtllm_version: str | None = None
    sparsity: SparsityLog | None = None  # parsed for every variant; expected empty for dense ones


class EngineBuildReport(BaseModel):
    checkpoint_dir: Path
    shapes: EngineShapes
    runner: str
    versions: dict[str, str]
    builds: list[EngineBuildRecord]
    warnings: list[str] = Field(default_factory=list)

    def engine_dirs(self) -> dict[str, Path]:
        return {b.variant.name: b.engine_dir for b in self.builds}


def _engine_version(engine_dir: Path) -> str | None:
    import json

    try:
        return str(json.loads((engine_dir / "config.json").read_text()).get("version")) or None
    except (OSError, ValueError):
        return None


def build_engines(checkpoint_dir: str | Path, out_dir: str | Path, shapes: EngineShapes, *,
                  variants: Sequence[EngineVariant] = DEFAULT_VARIANTS, runner: ToolRunner | None = None,
                  timeout: float | None = None, extra_args: Sequence[str] = (), probe: bool = True,
                  validate: bool = True) -> EngineBuildReport:
    """Build every variant from one checkpoint into ``out_dir/<variant>`` and record everything.

    Each engine is built into a temporary sibling and renamed on success, so a failed or killed
    build never leaves a directory that looks finished. Logs go to ``out_dir/logs/``; the report
    (commands, versions, sparse layers, warnings) to ``out_dir/engine_build.json``.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir).resolve(), Path(out_dir).resolve()
    runner = runner or ToolRunner()
    runner.resolve(BUILD_TOOL, checkpoint_dir)  # fail before any work when the tool is missing
    if validate:
        from .trtllm_checkpoint import validate_checkpoint

        validate_checkpoint(checkpoint_dir, verify_sparse=False)
    versions = probe_versions(runner) if probe else {"runner": runner.describe()}
    out_dir.mkdir(parents=True, exist_ok=True)
    builds: list[EngineBuildRecord] = []
    warnings: list[str] = []
    for variant in variants:
        final = out_dir / variant.name
        tmp = out_dir / f".{variant.name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        argv = build_command(checkpoint_dir, tmp, variant, shapes, extra_args=extra_args)
        record = runner.run(argv, out_dir / "logs" / f"build_{variant.name}.log", timeout=timeout,
                            checkpoint_dir=checkpoint_dir)
        text = record.log_path.read_text(errors="replace")
        if record.returncode != 0 or not tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            tail = "\n".join(text.splitlines()[-15:])
            raise EngineBuildError(f"{variant.name} engine build failed (exit {record.returncode}); command: "
                                   f"{record.command_line}; log: {record.log_path}\n{tail}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        sparsity = parse_sparsity_log(text)
        if variant.weight_sparsity:
            for w in sparsity.warnings:
                warnings.append(f"{variant.name}: {w}")
                log.warning("%s engine: %s", variant.name, w)
            if sparsity.picked:
                log.info("%s engine: sparse implementation for %d layers (%d modules)", variant.name,
                         len(sparsity.picked), len(sparsity.picked_modules))
        builds.append(EngineBuildRecord(
            variant=variant, engine_dir=final, run=record,
            engine_files=sorted(p.name for p in final.iterdir()),
            trtllm_version=_engine_version(final) or parse_trtllm_version(text), sparsity=sparsity))
    report = EngineBuildReport(checkpoint_dir=checkpoint_dir, shapes=shapes, runner=runner.describe(),
                               versions=versions, builds=builds, warnings=warnings)
    write_json(out_dir / "engine_build.json", report.model_dump(mode="json"))
    return report
