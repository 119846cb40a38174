"""The second inference backend, needing no TensorRT-LLM: PyTorch semi-structured sparsity.

``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 weight for sparse tensor cores
(cuSPARSELt, or CUTLASS kernels when cuSPARSELt is absent or forced), on CUDA GPUs of compute
capability 8.0 or newer, in float16/bfloat16. ``nn.Linear`` then runs on it unchanged once its
weight is replaced, which is the route PyTorch documents ("Accelerating BERT with semi-structured
sparsity" tutorial).

We measure, on one GPU and against the same weights dense:

- per linear layer, the matmul ``F.linear(x, W)`` for a few token counts (CUDA events around a
  loop of calls, warmup first, median over repetitions);
- end to end, greedy decoding of N tokens with the KV cache (prefill, then one token per step),
  dense model vs the same model with its 2:4 linears converted.

Everything that decides *what* to measure (layer selection, 2:4 and shape checks, requirements)
runs on CPU; only the timing needs the GPU.
"""
from __future__ import annotations

import logging
import statistics
from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from ..architecture import discover
from ..errors import ConfigError, WandaError
from .sparse24 import check_24

log = logging.getLogger(__name__)

Backend = Literal["auto", "cusparselt", "cutlass"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_CAPABILITY = (8, 0)

# (min_rows, min_cols) a dense weight must be a multiple of, per backend and dtype, as in
# torch/sparse/semi_structured.py (sparse_min_rows/cols); read from torch when available.
_FALLBACK_SHAPES = {
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
}


class SemiStructuredUnavailableError(WandaError, RuntimeError):
    """No GPU/PyTorch combination here can run semi-structured sparse kernels; says what is missing."""


class DeviceInfo(BaseModel):
    name: str
    capability: tuple[int, int]
    torch_version: str
    cuda_version: str | None
    cusparselt_available: bool
    cusparselt_version: int | None = None


def require_semistructured_support(device: int | str | torch.device | None = None) -> DeviceInfo:
    """Check for a CUDA GPU with compute capability >= 8.0 and a PyTorch that has the API."""
    need = "CUDA GPU with compute capability >= 8.0 required for semi-structured sparsity"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise SemiStructuredUnavailableError(f"{need}, and a PyTorch with torch.sparse.to_sparse_semi_structured "
                                             f"(this is torch {torch.__version__})")
    if torch.version.cuda is None:
        raise SemiStructuredUnavailableError(f"{need}: this PyTorch ({torch.__version__}) is built without CUDA")
    if not torch.cuda.is_available():
        raise SemiStructuredUnavailableError(f"{need}: no CUDA device is visible (PyTorch {torch.__version__}, "
                                             f"CUDA {torch.version.cuda}; check the driver and CUDA_VISIBLE_DEVICES)")
    index = torch.device(device if device is not None else "cuda").index or 0
    capability = tuple(torch.cuda.get_device_capability(index))
    name = torch.cuda.get_device_name(index)
    if capability < MIN_CAPABILITY:
        raise SemiStructuredUnavailableError(
            f"{need}: {name} has compute capability {capability[0]}.{capability[1]}")
    cusparselt = _cusparselt_available()
    version = None
    if cusparselt:
        try:
            version = int(torch.backends.cusparselt.version())
        except Exception:  # noqa: BLE001 - version is informative only
            version = None
    return DeviceInfo(name=name, capability=capability, torch_version=torch.__version__,
                      cuda_version=torch.version.cuda, cusparselt_available=cusparselt, cusparselt_version=version)


def _cusparselt_available() -> bool:
    backend = getattr(torch.backends, "cusparselt", None)
    try:
        return bool(backend is not None and backend.is_available())
    except Exception:  # noqa: BLE001
        return False


# torch's CUTLASS 2:4 kernels (torch/sparse/semi_structured.py, _sparse_semi_structured_linear)
# are compiled for SM 8.x only: on 9.x (H100/H200) they fail at the first matmul.
CUTLASS_MAJOR = 8


def resolve_backend(backend: Backend, cusparselt_available: bool | None = None,
                    capability: tuple[int, int] | None = None) -> str:
    """``auto``: cuSPARSELt when this PyTorch has it, else CUTLASS where its kernels run (8.x).
    ``capability`` (the GPU's compute capability) is checked when given."""
    if backend not in ("auto", "cusparselt", "cutlass"):
        raise ConfigError("semistructured.backend", f"unknown backend {backend!r}", "auto, cusparselt, cutlass")
    available = _cusparselt_available() if cusparselt_available is None else cusparselt_available
    cutlass_ok = capability is None or capability[0] == CUTLASS_MAJOR
    where = f"compute capability {capability[0]}.{capability[1]}" if capability else ""
    if backend == "auto":
        if available:
            return "cusparselt"
        if not cutlass_ok:
            raise SemiStructuredUnavailableError(
                f"no semi-structured backend for {where}: this PyTorch has no cuSPARSELt "
                "(torch.backends.cusparselt.is_available() is False) and torch's CUTLASS 2:4 kernels run only on "
                "compute capability 8.x; install a PyTorch build with cuSPARSELt")
        return "cutlass"
    if backend == "cusparselt" and not available:
        hint = "use 'cutlass'" if cutlass_ok else "install a PyTorch build with cuSPARSELt"
        raise SemiStructuredUnavailableError("backend 'cusparselt' requested but this PyTorch has no cuSPARSELt "
                                             f"(torch.backends.cusparselt.is_available() is False); {hint}")
    if backend == "cutlass" and not cutlass_ok:
        raise ConfigError("semistructured.backend",
                          f"'cutlass' cannot run on {where}: torch's CUTLASS 2:4 kernels run only on compute "
                          "capability 8.x (A100, A10, L4, L40, RTX 30/40)", "cusparselt, auto")
    return backend


def shape_constraint(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, cols) multiples the dense weight needs for ``backend``."""
    cls_name = {"cutlass": "SparseSemiStructuredTensorCUTLASS", "cusparselt": "SparseSemiStructuredTensorCUSPARSELT"}
    cls = getattr(torch.sparse, cls_name[backend], None)
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", None) or {}
    if dtype in table:
        entry = table[dtype]
        rows = getattr(entry, "sparse_min_rows", None) or getattr(entry, "min_rows", None)
        cols = getattr(entry, "sparse_min_cols", None) or getattr(entry, "min_cols", None)
        if rows and cols:
            return int(rows), int(cols)
    if dtype not in _FALLBACK_SHAPES[backend]:
        raise ConfigError("semistructured.dtype", f"{dtype} is not supported", "float16, bfloat16")
    return _FALLBACK_SHAPES[backend][dtype]


class LayerSelection(BaseModel):
    name: str
    out_features: int
    in_features: int
    selected: bool
    reason: str | None = None  # why a layer is skipped


def select_semistructured_layers(model: nn.Module, dtype: str = "float16", backend: str = "cutlass", *,
                                 targets: list[str] | None = None,
                                 ignore: list[str] | None = None) -> list[LayerSelection]:
    """Which decoder-block linears can run semi-structured: 2:4 along inputs and a shape the
    backend accepts (``backend`` already resolved: ``cutlass`` or ``cusparselt``)."""
    if dtype not in DTYPES:
        raise ConfigError("semistructured.dtype", f"unsupported dtype {dtype!r}", ", ".join(DTYPES))
    rows_mult, cols_mult = shape_constraint(backend, DTYPES[dtype])
    out: list[LayerSelection] = []
    for name in discover(model, targets, ignore).all_targets():
        module = model.get_submodule(name)
        out_f, in_f = module.weight.shape
        reason = None
        compliance = check_24(module.weight, name)
        if not compliance.compliant:
            reason = f"not 2:4: {compliance.describe()}"
        elif out_f % rows_mult or in_f % cols_mult:
            reason = (f"shape ({out_f}, {in_f}) is not a multiple of ({rows_mult}, {cols_mult}) required by "
                      f"{backend} for {dtype}")
        out.append(LayerSelection(name=name, out_features=out_f, in_features=in_f, selected=reason is None,
                                  reason=reason))
    return out


# --------------------------------------------------------------------------- timing (GPU)


class LayerTiming(BaseModel):
    name: str
    shape: tuple[int, int]
    tokens: int  # rows of the activation x [tokens, in]
    dense_ms: float
    sparse_ms: float
    speedup: float  # dense / sparse
    max_abs_diff: float  # sparse vs dense output, same inputs


class DecodeTiming(BaseModel):
    prompt_len: int
    new_tokens: int
    dense_prefill_ms: float
    sparse_prefill_ms: float
    dense_ms_per_token: float  # median decode step
    sparse_ms_per_token: float
    dense_total_ms: float  # median over repetitions of prefill + all steps
    sparse_total_ms: float
    speedup_per_token: float
    speedup_total: float
    token_agreement: float  # fraction of generated tokens equal between dense and sparse


class SemiStructuredResult(BaseModel):
    device: DeviceInfo
    backend: str
    dtype: str
    warmup: int
    repetitions: int
    layers: list[LayerTiming]
    skipped: list[LayerSelection]
    decode: DecodeTiming | None = None
    median_speedup_by_tokens: dict[int, float] = Field(default_factory=dict)


def _time_ms(fn, warmup: int, repetitions: int, inner: int) -> float:
    """Median over ``repetitions`` of the mean time of ``inner`` back-to-back calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


@contextmanager
def _backend(name: str) -> Iterator[None]:
    cls = torch.sparse.SparseSemiStructuredTensor
    previous = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = name == "cutlass"
    try:
        yield
    finally:
        cls._FORCE_CUTLASS = previous


@contextmanager
def sparse_weights(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Temporarily replace the weights of ``names`` by semi-structured sparse tensors."""
    originals: dict[str, nn.Parameter] = {}
    try:
        for name in names:
            module = model.get_submodule(name)
            originals[name] = module.weight
            module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(module.weight.detach()),
                                         requires_grad=False)
        yield
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight = weight


@torch.no_grad()  # not inference_mode: its tensors would be unusable as weights afterwards
def _decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float, list[float]]:
    """Greedy decode with the KV cache: (tokens, prefill ms, per-step ms)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens + 1)]
    tokens: list[torch.Tensor] = []
    events[0].record()
    out = model(input_ids=prompt, use_cache=True)
    past = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens.append(token)
    events[1].record()
    for step in range(1, new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        events[step + 1].record()
    events[-1].synchronize()
    times = [events[i].elapsed_time(events[i + 1]) for i in range(new_tokens)]
    return torch.cat(tokens, dim=1)[0].tolist(), times[0], times[1:]


def _decode_stats(model, prompt, new_tokens, repetitions) -> tuple[list[int], float, float, float]:
    _decode(model, prompt, min(new_tokens, 4))  # warm caches, allocator and kernels
    totals, prefills, steps = [], [], []
    tokens: list[int] = []
    for _ in range(repetitions):
        tokens, prefill, step_times = _decode(model, prompt, new_tokens)
        prefills.append(prefill)
        steps.extend(step_times)
        totals.append(prefill + sum(step_times))
    per_token = statistics.median(steps) if steps else float("nan")
    return tokens, statistics.median(prefills), per_token, statistics.median(totals)


def benchmark_semistructured(model: nn.Module, *, dtype: str = "float16", backend: Backend = "auto",
                             token_counts: Sequence[int] = (1, 16, 128), warmup: int = 10, repetitions: int = 30,
                             inner: int = 10, decode_tokens: int = 64, prompt_len: int = 32,
                             decode_repetitions: int = 3, max_layers: int | None = None,
                             targets: list[str] | None = None, ignore: list[str] | None = None,
                             seed: int = 0) -> SemiStructuredResult:
    """Per-layer matmul and end-to-end decode timings, 2:4 semi-structured vs dense, on one GPU.

    ``model`` must already be 2:4-pruned; it is moved to the GPU in ``dtype`` and its weights
    are restored to dense afterwards. ``decode_tokens=0`` skips the end-to-end measurement.
    """
    if dtype not in DTYPES:
        raise ConfigError("semistructured.dtype", f"unsupported dtype {dtype!r}", ", ".join(DTYPES))
    if not token_counts or min(token_counts) < 1:
        raise ConfigError("semistructured.token_counts", f"need positive token counts, got {list(token_counts)}")
    if decode_tokens == 1 or decode_tokens < 0:
        raise ConfigError("semistructured.decode_tokens", f"got {decode_tokens}: the per-token time needs at least "
                          "one step after the first token", "0 (skip) or >= 2")
    device_info = require_semistructured_support()
    resolved = resolve_backend(backend, device_info.cusparselt_available, device_info.capability)
    selection = select_semistructured_layers(model, dtype, resolved, targets=targets, ignore=ignore)
    chosen = [s for s in selection if s.selected][: max_layers or None]
    skipped = [s for s in selection if not s.selected]
    for s in skipped:
        log.warning("semi-structured: skipping %s: %s", s.name, s.reason)
    if not chosen:
        raise ConfigError("semistructured.targets", f"no linear layer can run semi-structured "
                          f"({len(skipped)} skipped, first: {skipped[0].reason if skipped else 'none found'})")
    torch_dtype = DTYPES[dtype]
    device = torch.device("cuda")
    model = model.to(device=device, dtype=torch_dtype).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    layers: list[LayerTiming] = []
    with _backend(resolved), torch.no_grad():
        for s in chosen:
            weight = model.get_submodule(s.name).weight.detach()
            sparse = torch.sparse.to_sparse_semi_structured(weight)
            for tokens in token_counts:
                x = torch.randn(tokens, s.in_features, device=device, dtype=torch_dtype, generator=generator)
                dense_ms = _time_ms(lambda: F.linear(x, weight), warmup, repetitions, inner)
                sparse_ms = _time_ms(lambda: F.linear(x, sparse), warmup, repetitions, inner)
                diff = float((F.linear(x, sparse) - F.linear(x, weight)).abs().max())
                layers.append(LayerTiming(name=s.name, shape=(s.out_features, s.in_features), tokens=tokens,
                                          dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms,
                                          max_abs_diff=diff))
        decode = None
        if decode_tokens > 0:
            vocab = model.get_input_embeddings().weight.shape[0]
            prompt = torch.randint(vocab, (1, prompt_len), device=device, generator=generator)
            dense_tokens, d_prefill, d_step, d_total = _decode_stats(model, prompt, decode_tokens, decode_repetitions)
            with sparse_weights(model, [s.name for s in chosen]):
                sparse_tokens, s_prefill, s_step, s_total = _decode_stats(model, prompt, decode_tokens,
                                                                          decode_repetitions)
            agree = sum(a == b for a, b in zip(dense_tokens, sparse_tokens)) / max(len(dense_tokens), 1)
            decode = DecodeTiming(prompt_len=prompt_len, new_tokens=decode_tokens, dense_prefill_ms=d_prefill,
                                  sparse_prefill_ms=s_prefill, dense_ms_per_token=d_step, sparse_ms_per_token=s_step,
                                  dense_total_ms=d_total, sparse_total_ms=s_total,
                                  speedup_per_token=d_step / s_step, speedup_total=d_total / s_total,
                                  token_agreement=agree)
    by_tokens = {t: statistics.median([lt.speedup for lt in layers if lt.tokens == t]) for t in token_counts}
    for t, speedup in by_tokens.items():
        log.info("semi-structured %s/%s: median per-layer matmul speedup at %d tokens: x%.2f", resolved, dtype, t,
                 speedup)
    if decode is not None:
        log.info("semi-structured decode: %.3f ms/token sparse vs %.3f dense (x%.2f), token agreement %.0f%%",
                 decode.sparse_ms_per_token, decode.dense_ms_per_token, decode.speedup_per_token,
                 100 * decode.token_agreement)
    return SemiStructuredResult(device=device_info, backend=resolved, dtype=dtype, warmup=warmup,
                                repetitions=repetitions, layers=layers, skipped=skipped, decode=decode,
                                median_speedup_by_tokens=by_tokens)
