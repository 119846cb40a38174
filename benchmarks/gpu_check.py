"""GPU check of 2:4 semi-structured sparsity (cuSPARSELt) against dense, at LLaMA-3-8B shapes.

Where 2:4 can show a speedup: random-weight linear layers of LLaMA-3-8B's shapes (out x in:
4096x4096 q/o, 14336x4096 gate/up, 4096x14336 down, 1024x4096 k/v) at 1, 16, 128 and 2048 tokens,
in float16 and bfloat16, dense ``F.linear`` against ``torch.sparse.to_sparse_semi_structured`` on
cuSPARSELt (``SparseSemiStructuredTensor._FORCE_CUTLASS = False``), with cuSPARSELt's default
algorithm and with the one ``torch._cslt_sparse_mm_search`` picks for that exact matmul; then a
stack of LLaMA-3-8B decoder layers' linears end to end (q, k, v, o, gate, up, down with RMS norms,
residuals and SiLU; attention itself replaced by an elementwise mix of q, k and v, so the stack's
ratio is that of the layers' matmuls, not of a whole model). Dense and 2:4 run the *same* 2:4
weights, and their outputs must agree within the dtype's tolerance.

Timing: every variant is captured in a CUDA graph (``torch.cuda.CUDAGraph``) after a warm-up on
a side stream, ``calls`` back-to-back calls per graph (enough for about 2 ms per replay); the
variants of one row are replayed interleaved, each replay between CUDA events, and the median per
call is reported. Where a layer's weights fit in L2, the calls cycle through several weight copies
(together at least 3x the L2 size), so weights stream from memory as they do in a model. If a
graph cannot be captured, an eager loop is timed and the row says so.

Needs one CUDA GPU (compute capability >= 8.0) and a CUDA build of torch with cuSPARSELt; imports
nothing but torch and the standard library (the device machine has no registry access). Without
them it says so in ONE line and exits 2 within seconds, after writing ``header.txt`` (versions and
what is missing).

Output (``--out-dir``, which ``gpu_check.sh`` sets to ``$OUT`` when set): ``header.txt`` first
(GPU, driver, torch, CUDA, cuSPARSELt), then ``table.md`` and ``rows.jsonl`` one row at a time as
measured (a run cut short keeps the rows done), ``summary.json`` at the end. Everything printed is
flushed at once. Exit status: 0 all rows agree, 1 some output disagrees (or is not finite),
2 no usable GPU or bad arguments, 3 the time budget ran out before every row was measured.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# (name, out_features, in_features): LLaMA-3-8B (hidden 4096, intermediate 14336, 8 KV heads of 128).
LLAMA3_8B_SHAPES = (("q_proj/o_proj", 4096, 4096), ("gate_proj/up_proj", 14336, 4096),
                    ("down_proj", 4096, 14336), ("k_proj/v_proj", 1024, 4096))
LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "kv": 1024}
TOKENS = (1, 16, 128, 2048)
DTYPES = ("float16", "bfloat16")
# max |2:4 output - dense output| / max |dense output|: both accumulate in fp32; what differs is the
# summation order and the final rounding (float16 keeps 11 significant bits, bfloat16 8).
TOLERANCE = {"float16": 1e-2, "bfloat16": 3e-2}
MIN_CAPABILITY = (8, 0)
FILES = ("header.txt", "table.md", "rows.jsonl", "summary.json")
EXIT_OK, EXIT_MISMATCH, EXIT_UNUSABLE, EXIT_BUDGET = 0, 1, 2, 3
TARGET_REPLAY_US = 2000.0  # calls per graph: about this long per replay
MAX_CALLS = 64
clock = time.monotonic  # the budget's clock (a test advances it by hand)
DEVICE = "cuda"  # a test runs the control flow on "cpu" with torch.cuda's timing calls emulated


# --------------------------------------------------------------------------- environment


def driver_version(proc_file: Path = Path("/proc/driver/nvidia/version")) -> str:
    """The NVIDIA driver's version, from the kernel module or nvidia-smi; says where from."""
    try:
        first = proc_file.read_text().splitlines()[0]
        match = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+(?:\.\d+)+)", first)
        return f"{match.group(1) if match else first.strip()} ({proc_file})"
    except (OSError, IndexError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10)
            if proc.returncode == 0 and proc.stdout.strip():
                return f"{proc.stdout.strip().splitlines()[0]} (nvidia-smi)"
            return f"unknown (nvidia-smi exit {proc.returncode}: {proc.stderr.strip()[:80]})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown (nvidia-smi: {type(exc).__name__})"
    return "none found (no /proc/driver/nvidia/version, no nvidia-smi on PATH)"


def cusparselt_version(number: int | None) -> str:
    """cuSPARSELt's version int (e.g. 602) as major.minor.patch (0.6.2)."""
    if number is None:
        return "none"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def environment() -> tuple[dict, list[str]]:
    """Versions of everything the figures depend on, and what is missing for the check to run."""
    env: dict = {"python": platform.python_version(), "torch": torch.__version__,
                 "torch_cuda": torch.version.cuda or "none (CPU build)", "driver": driver_version()}
    missing: list[str] = []
    with warnings.catch_warnings(record=True) as caught:  # its reason goes into the one line, not stderr
        warnings.simplefilter("always")
        usable_cuda = torch.version.cuda is not None and torch.cuda.is_available()
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch ({torch.__version__} is built without CUDA)")
    elif not usable_cuda:
        why = " ".join(str(w.message).split())[:200] if caught else "no device"
        missing.append(f"a visible CUDA device (torch.cuda.is_available() is False: {why})")
    if usable_cuda:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_detail"] = (f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
                             f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB")
        env["l2_bytes"] = int(getattr(props, "L2_cache_size", 0))
        try:
            env["cuda_driver_api"] = int(torch._C._cuda_getDriverVersion())
        except Exception:  # noqa: BLE001 - a private call; its absence only costs this field
            env["cuda_driver_api"] = "unknown"
        if (props.major, props.minor) < MIN_CAPABILITY:
            missing.append(f"compute capability >= 8.0 for 2:4 sparse tensor cores ({props.name} is "
                           f"{props.major}.{props.minor})")
    else:
        env["gpu"] = "none visible"
    backend = getattr(torch.backends, "cusparselt", None)
    number = backend.version() if backend is not None else None
    env["cusparselt"] = cusparselt_version(number)
    env["cusparselt_int"] = number
    env["cusparselt_max_alg_id"] = backend.get_max_alg_id() if number is not None else None
    if backend is None or not backend.is_available():
        missing.append("cuSPARSELt in torch (torch.backends.cusparselt.is_available() is False)")
    env["alg_search"] = ("torch._cslt_sparse_mm_search" if hasattr(torch, "_cslt_sparse_mm_search")
                         else "not exposed by this torch (default algorithm only)")
    return env, missing


def header_text(env: dict, missing: list[str], plan: str) -> str:
    gpu = env["gpu"] if env["gpu"] == "none visible" else \
        f"{env['gpu']} (sm {env['capability']}, {env['gpu_detail']})"
    lines = [f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
             f"GPU: {gpu}",
             f"driver: {env['driver']}" + (f"; CUDA driver API {env['cuda_driver_api']}" if "cuda_driver_api" in env
                                           else ""),
             f"torch: {env['torch']} (CUDA {env['torch_cuda']}), Python {env['python']}",
             f"cuSPARSELt: {env['cusparselt']} (torch.backends.cusparselt.version() = {env['cusparselt_int']}, "
             f"max alg id {env['cusparselt_max_alg_id']}); algorithm search: {env['alg_search']}",
             f"plan: {plan}",
             "missing: " + ("; ".join(missing) if missing else "nothing")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- 2:4


def magnitude_24_(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest-|w| of every 4 consecutive inputs, in place. The same rule as
    ``wanda.export.sparse24.magnitude_24_`` (a test keeps them equal), repeated here because that
    module imports pydantic, which the bare GPU machine may lack."""
    rows, cols = weight.shape
    drop = torch.topk(weight.reshape(rows, cols // 4, 4).abs().float(), 2, dim=-1, largest=False).indices
    with torch.no_grad():
        weight.view(rows, cols // 4, 4).scatter_(-1, drop, 0.0)
    return weight


def to_cusparselt(weight: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt's compressed 2:4 form (never CUTLASS: its kernels do not run on sm 9.x)."""
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = False
    sparse = torch.sparse.to_sparse_semi_structured(weight)
    if type(sparse).__name__ != "SparseSemiStructuredTensorCUSPARSELT":
        raise RuntimeError(f"to_sparse_semi_structured gave {type(sparse).__name__}, not cuSPARSELt")
    return sparse


def search_alg(sparse: torch.Tensor, x: torch.Tensor) -> tuple[int, str]:
    """cuSPARSELt's best algorithm for ``F.linear(x, sparse)`` as torch runs it (x padded to the
    dense minimum, transposed, result transposed: torch/sparse/semi_structured.py cusparselt_mm)."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        return 0, "no search in this torch"
    limits = sparse._DTYPE_SHAPE_CONSTRAINTS[x.dtype]
    pad_m, pad_n = (-x.shape[0]) % limits.dense_min_rows, (-x.shape[1]) % limits.dense_min_cols
    padded = F.pad(x, (0, pad_n, 0, pad_m)) if pad_m or pad_n else x
    try:
        found = search(sparse.packed, padded.t(), transpose_result=True)
    except Exception as exc:  # noqa: BLE001 - report it in the row and time the default algorithm
        return 0, f"search failed ({type(exc).__name__}: {str(exc)[:60]})"
    if isinstance(found, (tuple, list)):  # some versions also return split-k settings
        found = found[0]
    return int(found), "searched"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref32 = ref.float()
    return float((got.float() - ref32).abs().max() / ref32.abs().max().clamp_min(1e-12))


# --------------------------------------------------------------------------- the layer stack


def make_stack(layers: int, hidden: int, intermediate: int, kv: int, dtype: torch.dtype, device: str,
               generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """``layers`` decoder layers' linears, random N(0, 1/in) weights pruned 2:4 by magnitude."""
    shapes = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
              "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    return [{name: magnitude_24_(torch.randn(*shape, device=device, dtype=dtype, generator=generator)
                                 / math.sqrt(shape[1]))
             for name, shape in shapes.items()} for _ in range(layers)]


def rms(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def stack_forward(x: torch.Tensor, stack: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """LLaMA decoder layers without attention's softmax/KV cache: q, k and v are mixed
    elementwise (so none is dead work), o projects back; then the SwiGLU MLP; residuals."""
    for w in stack:
        a = rms(x)
        q, k, v = F.linear(a, w["q"]), F.linear(a, w["k"]), F.linear(a, w["v"])
        mixed = q + (k * v).repeat(1, q.shape[-1] // k.shape[-1])
        x = x + F.linear(mixed, w["o"])
        m = rms(x)
        x = x + F.linear(F.silu(F.linear(m, w["gate"])) * F.linear(m, w["up"]), w["down"])
    return x


# --------------------------------------------------------------------------- timing


def capture(fn: Callable[[int], object], calls: int):
    """A CUDA graph of ``fn(0) .. fn(calls - 1)``, warmed up on a side stream; None if it cannot
    be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                fn(i)
    except Exception:  # noqa: BLE001 - the row is then timed eagerly and says so
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    return graph


def calls_for(fn: Callable[[int], object]) -> int:
    """Calls per graph replay: about TARGET_REPLAY_US of work (eager estimate, launch cost included)."""
    for i in range(3):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fn(i)
    end.record()
    end.synchronize()
    per_call_us = start.elapsed_time(end) * 1e3 / 5
    return max(1, min(MAX_CALLS, math.ceil(TARGET_REPLAY_US / max(per_call_us, 1e-3))))


def runner(fn: Callable[[int], object], calls: int) -> tuple[Callable[[], object], str, object]:
    """(replay, method, graph to keep alive): the captured graph, or an eager loop if capture fails."""
    graph = capture(fn, calls)
    if graph is not None:
        return graph.replay, "graph", graph
    return (lambda: [fn(i) for i in range(calls)]), "eager", None


def time_runners(runners: dict[str, tuple], calls: int, repetitions: int) -> dict[str, dict]:
    """Median µs per call of every variant, replayed interleaved (drift hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repetitions):
        for name, (run, _, _) in runners.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) * 1e3 / calls)
    return {name: {"us": statistics.median(samples[name]), "timing": runners[name][1]} for name in runners}


# --------------------------------------------------------------------------- report


class Report:
    """Rows to stdout, ``table.md`` and ``rows.jsonl`` the moment they are measured."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.table = open(out_dir / "table.md", "w", buffering=1)
        self.jsonl = open(out_dir / "rows.jsonl", "w", buffering=1)
        self.rows: list[dict] = []

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.table.write(text + "\n")
        self.table.flush()

    def row(self, record: dict, text: str) -> None:
        self.rows.append(record)
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()
        self.line(text)


TABLE_HEAD = ("| dtype | {what} | tokens | dense µs | 2:4 µs (default alg) | 2:4 µs (searched alg) | "
              "speedup default | speedup searched | max rel err | timing |\n|---|---|---:|---:|---:|---:|---:|---:|---|---|")


def row_text(r: dict) -> str:
    ok = "ok" if r["agree"] else f"**MISMATCH** (tol {r['tolerance']:g})"
    return (f"| {r['dtype']} | {r['what']} | {r['tokens']} | {r['dense_us']:.1f} | {r['sparse_default_us']:.1f} | "
            f"{r['sparse_searched_us']:.1f} ({r['alg']}) | {r['speedup_default']:.2f} | {r['speedup_searched']:.2f} | "
            f"{r['max_rel_err']:.1e} {ok} | {r['timing']} |")


def measure_row(dtype: str, what: str, tokens: int, dense_fn, sparse_fn, set_alg: Callable[[bool], str],
                check: Callable[[], float], repetitions: int) -> dict:
    """Dense, 2:4 with the default algorithm and 2:4 with the searched one, for one matmul set.
    ``set_alg(searched)`` sets the 2:4 weights' algorithm (a graph keeps the one set at capture)."""
    calls = calls_for(dense_fn)
    set_alg(False)
    err_default = check()
    runners = {"dense": runner(dense_fn, calls), "sparse_default": runner(sparse_fn, calls)}
    alg = set_alg(True)
    err = max(err_default, check())
    if alg != "alg 0":
        runners["sparse_searched"] = runner(sparse_fn, calls)
    # All variants captured first, then replayed interleaved. (An eager fallback would run with the
    # algorithm set last; its rows say "eager".)
    timed = time_runners(runners, calls, repetitions)
    timed.setdefault("sparse_searched", timed["sparse_default"])
    methods = sorted({t["timing"] for t in timed.values()})
    record = {"dtype": dtype, "what": what, "tokens": tokens, "calls_per_replay": calls, "repetitions": repetitions,
              "dense_us": timed["dense"]["us"], "sparse_default_us": timed["sparse_default"]["us"],
              "sparse_searched_us": timed["sparse_searched"]["us"], "alg": alg,
              "max_rel_err": err, "tolerance": TOLERANCE[dtype], "timing": "/".join(methods)}
    record["speedup_default"] = record["dense_us"] / record["sparse_default_us"]
    record["speedup_searched"] = record["dense_us"] / record["sparse_searched_us"]
    record["agree"] = bool(math.isfinite(err) and err <= TOLERANCE[dtype])
    return record


def report_error(report: Report, dtype: str, what: str, tokens: int, exc: Exception) -> None:
    message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    report.row({"dtype": dtype, "what": what, "tokens": tokens, "agree": False, "error": message},
               f"| {dtype} | {what} | {tokens} | error: {message} |")
    torch.cuda.synchronize()


def layer_rows(report: Report, dtype_name: str, tokens: list[int], repetitions: int, deadline: float, l2: int,
               algs: dict) -> list[str]:
    """One row per (shape, tokens); returns the rows skipped for lack of time."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    skipped = []
    for name, out_f, in_f in LLAMA3_8B_SHAPES:
        if clock() > deadline:
            skipped += [f"{dtype_name} {out_f}x{in_f} x {t}" for t in tokens]
            continue
        copies = max(1, min(32, math.ceil(3 * l2 / (out_f * in_f * dtype.itemsize)))) if l2 else 1
        dense = [magnitude_24_(torch.randn(out_f, in_f, device=DEVICE, dtype=dtype, generator=gen) / math.sqrt(in_f))
                 for _ in range(copies)]
        sparse = [to_cusparselt(w) for w in dense]
        for t in tokens:
            if clock() > deadline:
                skipped.append(f"{dtype_name} {out_f}x{in_f} x {t}")
                continue
            x = torch.randn(t, in_f, device=DEVICE, dtype=dtype, generator=gen)

            def set_alg(searched, x=x, key=(out_f, in_f, dtype_name, t)):
                if not searched:
                    for s in sparse:
                        s.alg_id_cusparselt = 0
                    return "alg 0"
                alg, how = search_alg(sparse[0], x)
                algs[key] = alg
                for s in sparse:
                    s.alg_id_cusparselt = alg
                return f"alg {alg}" if how == "searched" else f"alg 0, {how}"

            what = f"{name} {out_f}x{in_f}"
            try:
                record = measure_row(
                    dtype_name, what, t,
                    lambda i, x=x: F.linear(x, dense[i % copies]), lambda i, x=x: F.linear(x, sparse[i % copies]),
                    set_alg, lambda x=x: rel_err(F.linear(x, sparse[0]), F.linear(x, dense[0])), repetitions)
            except Exception as exc:  # noqa: BLE001 - one broken row must not cost the device run
                report_error(report, dtype_name, what, t, exc)
                continue
            record.update(kind="layer", shape=[out_f, in_f], weight_copies=copies)
            record["timing"] += f", {copies} weight cop{'y' if copies == 1 else 'ies'}"
            report.row(record, row_text(record))
        del dense, sparse
        torch.cuda.empty_cache()
    return skipped


def stack_rows(report: Report, dtype_name: str, tokens: list[int], layers: int, repetitions: int, deadline: float,
               algs: dict) -> list[str]:
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    if clock() > deadline:
        return [f"{dtype_name} stack x {t}" for t in tokens]
    dense = make_stack(layers, **LLAMA3_8B, dtype=dtype, device=DEVICE, generator=gen)
    sparse = [{k: to_cusparselt(w) for k, w in layer.items()} for layer in dense]
    skipped = []
    for t in tokens:
        if clock() > deadline:
            skipped.append(f"{dtype_name} stack x {t}")
            continue
        x = torch.randn(t, LLAMA3_8B["hidden"], device=DEVICE, dtype=dtype, generator=gen)

        def set_alg(searched, t=t):
            chosen = set()
            for layer in sparse:
                for w in layer.values():
                    if not searched:
                        w.alg_id_cusparselt = 0
                        continue
                    key = (w.shape[0], w.shape[1], dtype_name, t)
                    if key not in algs:  # a shape the layer rows did not reach: search it here
                        probe = torch.randn(t, w.shape[1], device=DEVICE, dtype=dtype)
                        algs[key] = search_alg(w, probe)[0]
                    w.alg_id_cusparselt = algs[key]
                    chosen.add(algs[key])
            return "alg 0" if chosen <= {0} else "algs " + ",".join(map(str, sorted(chosen)))

        what = f"{layers} decoder layers' linears"
        try:
            record = measure_row(dtype_name, what, t,
                                 lambda i, x=x: stack_forward(x, dense), lambda i, x=x: stack_forward(x, sparse),
                                 set_alg, lambda x=x: rel_err(stack_forward(x, sparse), stack_forward(x, dense)),
                                 repetitions)
        except Exception as exc:  # noqa: BLE001 - one broken row must not cost the device run
            report_error(report, dtype_name, what, t, exc)
            continue
        record.update(kind="stack", layers=layers)
        report.row(record, row_text(record))
    del dense, sparse
    torch.cuda.empty_cache()
    return skipped


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("artifacts/gpu_check"),
                        help="where header.txt, table.md, rows.jsonl, summary.json go (gpu_check.sh: $OUT)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per matmul, comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--stack-layers", type=int, default=4, help="decoder layers in the end-to-end stack")
    parser.add_argument("--repetitions", type=int, default=30, help="timed replays per variant; the median counts")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="stop starting rows after this many seconds (gpu_check.sh kills at 300)")
    parser.add_argument("--dry-run", action="store_true", help="write the header and the plan; measure nothing")
    args = parser.parse_args(argv)
    raw = args.tokens
    try:
        args.tokens = [int(t) for t in raw.split(",")]
        if min(args.tokens) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--tokens: {raw!r} is not a comma-separated list of positive integers")
    args.dtypes = args.dtypes.split(",")
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        parser.error(f"--dtypes: {','.join(args.dtypes)!r}; allowed: {', '.join(DTYPES)}")
    if args.stack_layers < 0:
        parser.error(f"--stack-layers: {args.stack_layers} (allowed: 0 to skip the stack, or more)")
    if args.repetitions < 3:
        parser.error(f"--repetitions: {args.repetitions} (allowed: 3 or more)")
    if not 10 <= args.budget_s <= 290:
        parser.error(f"--budget-s: {args.budget_s} (allowed: 10 to 290; gpu_check.sh kills the run at 300 s)")
    return args


def main(argv: list[str] | None = None) -> int:
    started = clock()
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # never leave an earlier run's rows beside this run's header
        (args.out_dir / name).unlink(missing_ok=True)
    rows_planned = len(LLAMA3_8B_SHAPES) * len(args.tokens) * len(args.dtypes)
    plan = (f"{rows_planned} layer rows (LLaMA-3-8B shapes {', '.join(f'{o}x{i}' for _, o, i in LLAMA3_8B_SHAPES)} "
            f"x tokens {args.tokens} x {', '.join(args.dtypes)})"
            + (f" + {len(args.tokens) * len(args.dtypes)} rows of a {args.stack_layers}-layer stack"
               if args.stack_layers else "")
            + f"; dense vs cuSPARSELt 2:4 (default and searched algorithm), CUDA graphs, median of "
              f"{args.repetitions}; budget {args.budget_s:.0f} s")
    env, missing = environment()
    header = header_text(env, missing, plan)
    (args.out_dir / "header.txt").write_text(header)
    if missing:
        print(f"gpu_check: stand-in mode, nothing measured: needs {'; '.join(missing)} (GPU: {env['gpu']}, torch "
              f"{env['torch']}); header written to {args.out_dir / 'header.txt'}", file=sys.stderr, flush=True)
        return EXIT_UNUSABLE
    print(header, flush=True)
    if args.dry_run:
        return EXIT_OK
    deadline = started + args.budget_s
    report = Report(args.out_dir)
    algs: dict = {}
    skipped: list[str] = []
    for dtype in args.dtypes:
        report.line(f"\nPer layer, {dtype} (µs per call; speedup = dense / 2:4):\n")
        report.line(TABLE_HEAD.format(what="layer (out x in)"))
        skipped += layer_rows(report, dtype, args.tokens, args.repetitions, deadline, env.get("l2_bytes", 0), algs)
    if args.stack_layers:
        for dtype in args.dtypes:
            report.line(f"\nEnd to end, {dtype}: {args.stack_layers} LLaMA-3-8B decoder layers' linears (q, k, v, o, "
                        "gate, up, down; RMS norms, SiLU, residuals; attention replaced by an elementwise mix):\n")
            report.line(TABLE_HEAD.format(what="stack"))
            skipped += stack_rows(report, dtype, args.tokens, args.stack_layers, args.repetitions, deadline, algs)
    seconds = clock() - started
    disagree = [r for r in report.rows if not r["agree"]]  # beyond tolerance, or the row failed
    status = EXIT_MISMATCH if disagree else EXIT_BUDGET if skipped else EXIT_OK
    summary = {"environment": env, "plan": plan, "seconds": seconds, "rows": report.rows, "skipped": skipped,
               "disagree": [f"{r['dtype']} {r['what']} x {r['tokens']}" for r in disagree], "exit_status": status}
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    best = max((r for r in report.rows if "speedup_searched" in r), key=lambda r: r["speedup_searched"], default=None)
    verdict = (f"{len(disagree)} rows DISAGREE beyond tolerance or failed" if disagree else "all outputs agree")
    print(f"\ngpu_check: {len(report.rows)} rows in {seconds:.0f} s, {verdict}"
          + (f"; best 2:4 speedup {best['speedup_searched']:.2f}x ({best['dtype']} {best['what']} x {best['tokens']})"
             if best else "")
          + (f"; budget reached, {len(skipped)} rows not measured: {', '.join(skipped[:6])}" if skipped else "")
          + f"; files in {args.out_dir}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
