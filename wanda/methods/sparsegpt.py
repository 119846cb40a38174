"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with OBS weight reconstruction.

Statistics: for each distinct layer input, H = sum over calibration tokens of x x^T (the
reference's 2/n scaling changes nothing: damping is relative to the mean diagonal and every
step below is invariant to a positive factor on H). Layers fed the same tensor share one H
(q/k/v, gate/up), collected by forward hooks in the same block walk as the channel statistics.

Solver (the reference ``fasterprune``): dampen H by ``damp`` times its mean diagonal, take the
upper Cholesky factor U of H^-1, and sweep the columns in blocks of ``blocksize``. At the start
of each block the mask of the block is chosen from the saliency w^2 / U_jj^2 of the current
(already updated) weights: unstructured, the ``int(numel * sparsity)`` lowest of the block's
rows x columns; N:M, the N lowest of every M columns as the sweep reaches them. Each column is
then quantized to its mask and the error is spread over the remaining columns (OBS update),
within the block immediately and to later blocks lazily.

Fallbacks, each logged and reported:
- dead input channels (H_jj = 0: the channel was zero on every calibration token) get H_jj = 1,
  which decouples them: their weights are ranked by magnitude with a unit Hessian, never
  updated and never used to update others (the reference also zeroes them; here they are pruned
  only when the mask selects them, so the sparsity is exact);
- if the Cholesky factorization fails, the damping is multiplied by 10 up to 3 times; if it
  still fails, the layer falls back to the diagonal of H: the mask ranks by w^2 H_jj (Wanda's
  score squared) and no weight is updated.

Deliberate difference from the reference: the unstructured block mask prunes exactly
``int(numel * sparsity)`` weights (the reference's ``<= threshold`` prunes one more, plus ties).
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from ..lazy import lazy_module, torch_no_grad
from .base import Layer, LayerResult, Method, register

if TYPE_CHECKING:
    import torch
else:  # imported on first use: the method registry, read when parameters are validated, needs no torch
    torch = lazy_module("torch")

log = logging.getLogger(__name__)

_DAMP_RETRIES = 3


class _Accumulator:
    __slots__ = ("hessian", "count", "last")

    def __init__(self, channels: int, dtype: torch.dtype, device: torch.device):
        self.hessian = torch.zeros(channels, channels, dtype=dtype, device=device)
        self.count = 0
        self.last: torch.Tensor | None = None

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).to(self.hessian.dtype)
        if flat.device != self.hessian.device:
            # Offloaded: reduce on the input's device, then move the [in, in] product.
            self.hessian += (flat.t() @ flat).to(self.hessian.device)
        else:
            self.hessian.addmm_(flat.t(), flat)
        self.count += flat.shape[0]


class HessianCollector:
    """A sink of observed input rows (``wanda.targets.observe``) accumulating H = X^T X per target,
    one per distinct input.

    Two targets share an accumulator when, on the first batch, the second receives the very rows
    the first did (q/k/v, gate/up); each accumulator adds every input once. H is float64 for
    float64 weights and float32 otherwise; ``offload`` keeps it in CPU memory. ``weights`` maps
    target names to their [out, in] weights (dtype, device and input size of each H).
    """

    def __init__(self, weights: dict[str, torch.Tensor], offload: bool = False):
        self.weights = weights
        self.offload = offload
        self.accumulators: dict[str, _Accumulator] = {}
        self._last: tuple | None = None

    def __call__(self, name: str, rows: torch.Tensor) -> None:
        acc = self.accumulators.get(name)
        if acc is None:
            if self._last is not None and self._last[0] is rows:
                acc = self._last[1]
            else:
                weight = self.weights[name]
                dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
                device = torch.device("cpu") if self.offload else weight.device
                acc = _Accumulator(weight.shape[1], dtype, device)
            self.accumulators[name] = acc
        if acc.last is not rows:
            acc.add(rows)
            acc.last = rows
        self._last = (rows, acc)

    def close(self) -> None:
        """Forget the last inputs seen (the block walk is over)."""
        self._last = None
        for acc in self.accumulators.values():
            acc.last = None

    def hessian(self, name: str) -> torch.Tensor:
        if name not in self.accumulators:
            raise KeyError(f"no Hessian collected for {name!r} (was the layer called?)")
        return self.accumulators[name].hessian

    def groups(self) -> list[list[str]]:
        """Layer names grouped by shared Hessian."""
        seen: dict[int, list[str]] = {}
        for name, acc in self.accumulators.items():
            seen.setdefault(id(acc), []).append(name)
        return list(seen.values())

    def release(self, name: str) -> None:
        """Drop a layer's reference to its Hessian (freed once no layer of its group needs it)."""
        self.accumulators.pop(name, None)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + d I)^-1, retrying with 10x damping; None when all fail."""
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    mean_diag = float(hessian.diagonal().mean())
    factor = damp
    for attempt in range(_DAMP_RETRIES + 1):
        damped = hessian.clone()
        damped[diag, diag] += factor * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, factor
        factor *= 10.0
    return None, factor


@contextlib.contextmanager
def _small_op_threads(device: torch.device):
    """One intra-op thread on CPU for the column sweep: its operations are tiny (rows x <= blocksize),
    and synchronizing threads costs more than they save (50x more on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch_no_grad
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(pruned and updated weight in the input dtype, mask with True = pruned, report).

    ``weight`` is not modified. Computation runs in float64 for float64 weights, else float32,
    on the weight's device.
    """
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    device = weight.device
    W = weight.detach().to(work).clone()
    H = hessian.to(device=device, dtype=work).clone()
    rows, cols = W.shape
    if not torch.isfinite(H).all():
        raise ValueError(f"{name}: Hessian has NaN or infinity (non-finite activations in calibration)")
    report: dict = {"dead_channels": 0, "damp": damp, "fallback": None}
    dead = H.diagonal() == 0
    if bool(dead.any()):
        report["dead_channels"] = int(dead.sum())
        H[dead, dead] = 1.0
        log.info("%s: %d dead input channels (zero on all calibration tokens) decoupled", name, int(dead.sum()))
    upper, used = _inverse_cholesky(H, damp)
    report["damp"] = used
    if used != damp and upper is not None:
        report["fallback"] = f"damping raised to {used:g}"
        log.warning("%s: Cholesky failed at damping %g; succeeded at %g", name, damp, used)
    if upper is None:
        report["fallback"] = "diagonal Hessian (no weight update)"
        log.warning("%s: Cholesky failed up to damping %g; falling back to the diagonal Hessian, no update", name, used)
        upper = torch.diag(1.0 / H.diagonal().clamp_min(torch.finfo(work).tiny).sqrt())
        # With a diagonal H the OBS updates vanish: off-diagonal entries of U are zero.
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    with _small_op_threads(device):
        _sweep(W, upper, mask, sparsity, nm, blocksize)
    W[mask] = 0.0  # exact +0.0 for every pruned weight
    return W.to(weight.dtype), mask, report


def _sweep(W: torch.Tensor, upper: torch.Tensor, mask: torch.Tensor, sparsity: float,
           nm: tuple[int, int] | None, blocksize: int) -> None:
    """The blocked OBS sweep over the columns, in place on ``W`` and ``mask``."""
    from ..masks import unstructured_layer_mask

    rows, cols = W.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = upper[i1:i2, i1:i2]
        d1 = U1.diagonal()
        if nm is None:
            # The block's lowest saliencies, ties to the lower flat index (a stable sort's order).
            mask1 = unstructured_layer_mask(W1.pow(2) / d1.reshape(1, -1).pow(2), sparsity)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = U1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = W1[:, i:i + m].pow(2) / d1[i:i + m].reshape(1, -1).pow(2)
                lowest = torch.sort(saliency, dim=1, stable=True).indices[:, :n]
                mask1[:, i:i + m].scatter_(1, lowest, True)
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:].sub_(torch.outer(err, U1[i, i:]))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:] -= Err1 @ upper[i1:i2, i2:]


@register
class SparseGPT(Method):
    """Hessians from the walk, the OBS solver per layer; the kept weights are updated, so the
    calibration must see the pruned prefix (sequential only) and no plain-score recipe applies."""

    name = "sparsegpt"
    calibration = "hessian"
    one_pass = False
    updates_weights = True
    allocation_score = "wanda"  # OWL outlier ratios from Wanda's score, as the OWL reference

    def validate(self, config) -> None:
        if config.tie_break != "stable":
            raise ValueError("tie_break: selects among equal scores of the score methods; SparseGPT's solver "
                             "ranks by its own saliency (allowed with method 'sparsegpt': 'stable')")
        nm = config.nm
        if nm is not None and config.sparsegpt_blocksize % nm[1]:
            raise ValueError(
                f"sparsegpt_blocksize {config.sparsegpt_blocksize} must be a multiple of M={nm[1]} of pattern "
                f"{config.pattern} (N:M groups may not straddle column blocks)"
            )

    def prune_layer(self, layer: Layer, sparsity: float, config) -> LayerResult:
        weight, mask, report = sparsegpt_prune(layer.weight, layer.hessian, sparsity, config.nm,
                                               config.sparsegpt_blocksize, config.sparsegpt_damp, layer.name)
        return LayerResult(mask.cpu(), weight=weight, report=report)
