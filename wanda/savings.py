"""What a pruned model saves against its dense base, measured the way a deployment would see it.

- parameters: total (what a dense runtime stores and multiplies) and nonzero (what a sparse
  kernel could skip); unstructured zeros change the second, never the first;
- checkpoint bytes: the ``*.safetensors`` files of the folder;
- peak memory to load and to generate: each model in a fresh Python process (so one model's
  freed memory cannot hide the other's), as the peak resident set (Linux ``VmHWM``) minus the
  resident set after importing torch and transformers; for generation the peak is reset
  (``/proc/self/clear_refs``) after loading and the figure is the load peak plus what generating
  adds. Safetensors weights are memory-mapped: they become resident when first used, so the
  load figure is small and the generate figure is the peak a server reaches. On CUDA,
  ``torch.cuda.max_memory_allocated`` instead;
- prefill tokens/s (one forward of ``prefill_tokens``, logits of the last position only, as
  ``generate`` does) and decode tokens/s (``decode_tokens`` greedy steps with the KV cache), the
  two models interleaved (dense, candidate, dense, ...) after a warm-up each, medians of
  ``repetitions``. Per clock: CPU time of this process (``process_time``, what the model costs,
  robust on a shared machine) and wall time (what a user waits, including other work's load).

The library measures; it does not decide what a figure means for a release (the gate does).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

PROBE_MARK = "WANDA_SAVINGS_PROBE "


@dataclass(frozen=True)
class SpeedSettings:
    prefill_tokens: int = 128
    decode_tokens: int = 16
    repetitions: int = 3
    threads: int = 1
    device: str = "cpu"
    seed: int = 0


def parameter_counts(model) -> tuple[int, int]:
    """``(total, nonzero)`` over the model's distinct parameters (tied weights counted once)."""
    import torch

    total = nonzero = 0
    with torch.no_grad():
        for p in model.parameters():
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def checkpoint_bytes(folder: str | Path) -> int:
    """Bytes of the weights on disk: every ``*.safetensors`` file of the folder."""
    return sum(f.stat().st_size for f in sorted(Path(folder).glob("*.safetensors")))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _clocks(device: str) -> tuple[float, float]:
    _sync(device)
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], device: str) -> tuple[float, float]:
    wall, cpu = _clocks(device)
    return wall - start[0], cpu - start[1]


def _prompt(vocab_size: int, tokens: int, seed: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(min(10, vocab_size - 1), vocab_size, (1, tokens), generator=generator).to(device)


def prefill(model, ids, device: str) -> tuple[float, float]:
    import torch

    with torch.no_grad():
        start = _clocks(device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return _since(start, device)


def decode(model, ids, steps: int, device: str) -> tuple[float, float]:
    """``steps`` greedy tokens after the prompt ``ids`` (prefilled outside the clock)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # transformers 5 names it ``cache``
        start = _clocks(device)
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return _since(start, device)


def _interleaved(dense, candidate, fn: Callable, repetitions: int) -> dict[str, dict[str, float]]:
    fn(dense), fn(candidate)  # warm-up: first calls pay for allocations and kernel selection
    times: dict[str, list[tuple[float, float]]] = {"dense": [], "candidate": []}
    for _ in range(repetitions):
        times["dense"].append(fn(dense))
        times["candidate"].append(fn(candidate))
    return {who: {"wall_s": statistics.median(t[0] for t in runs), "cpu_s": statistics.median(t[1] for t in runs)}
            for who, runs in times.items()}


def measure_speed(dense, candidate, settings: SpeedSettings) -> dict[str, Any]:
    """Prefill and decode tokens/s of both models, interleaved, by CPU and wall clock."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        ids = _prompt(dense.config.vocab_size, settings.prefill_tokens, settings.seed, settings.device)
        short = ids[:, : min(16, settings.prefill_tokens)]
        phases = {
            "prefill": (_interleaved(dense, candidate, lambda m: prefill(m, ids, settings.device),
                                     settings.repetitions), settings.prefill_tokens),
            "decode": (_interleaved(dense, candidate, lambda m: decode(m, short, settings.decode_tokens,
                                                                         settings.device),
                                    settings.repetitions), settings.decode_tokens),
        }
    finally:
        torch.set_num_threads(previous)
    figures: dict[str, Any] = {}
    for phase, (medians, tokens) in phases.items():
        for who, clocks in medians.items():
            for clock, seconds in clocks.items():
                figures[f"{who}.{phase}_tokens_per_s_{clock.removesuffix('_s')}"] = (
                    tokens / seconds if seconds > 0 else float("inf"))
    return figures


# ----------------------------------------------------------------------------- memory probe


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        return True
    except OSError:
        return False


def _probe(folder: str, dtype: str, settings: SpeedSettings) -> dict[str, Any]:
    """Runs in the fresh process: load, then prefill and decode once; peaks in MiB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from wanda.model_io import load_model

    torch.set_num_threads(settings.threads)
    # The model's code is imported before the baseline (a skeleton on the meta device costs no
    # memory), so the load figure is the weights and the loader's buffers, not Python modules.
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    cuda = settings.device.startswith("cuda")
    before = _status_kb("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, _ = load_model(folder, dtype=dtype, device=settings.device)
    model.eval()
    result: dict[str, Any] = {}
    if cuda:
        result["load_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if before is None or _status_kb("VmHWM") is None:
            return {"error": "no /proc/self/status: peak memory is measured on Linux only"}
        result["load_peak_mb"] = (_status_kb("VmHWM") - before) / 1024
        loaded = _status_kb("VmRSS")
        if not _reset_peak():
            return {**result, "error": "/proc/self/clear_refs not writable: generation peak not measured"}
    ids = _prompt(model.config.vocab_size, settings.prefill_tokens, settings.seed, settings.device)
    prefill(model, ids, settings.device)
    decode(model, ids, settings.decode_tokens, settings.device)
    if cuda:
        result["generate_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20 + result["load_peak_mb"]
    else:
        # What generation adds on top of the loaded weights, plus the load figure: the peak a
        # process serving this model reaches.
        result["generate_peak_mb"] = (_status_kb("VmHWM") - loaded) / 1024 + result["load_peak_mb"]
    return result


def measure_memory(folder: str | Path, dtype: str, settings: SpeedSettings, timeout_s: float = 600.0) -> dict[str, Any]:
    """Peak memory to load ``folder`` and to generate with it, in a fresh process (see the module
    docstring); ``{"error": ...}`` when it cannot be measured here (the caller says so)."""
    payload = json.dumps({"folder": str(folder), "dtype": dtype, "settings": settings.__dict__})
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
    try:
        done = subprocess.run([sys.executable, "-m", "wanda.savings", payload], capture_output=True, text=True,
                              timeout=timeout_s, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe ran past {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(PROBE_MARK):
            return json.loads(line[len(PROBE_MARK):])
    return {"error": f"memory probe failed (exit {done.returncode}): {done.stderr.strip()[-400:]}"}


if __name__ == "__main__":  # the probe process: one JSON line on stdout, the protocol with measure_memory
    request = json.loads(sys.argv[1])
    figures = _probe(request["folder"], request["dtype"], SpeedSettings(**request["settings"]))
    sys.stdout.write(PROBE_MARK + json.dumps(figures) + "\n")
