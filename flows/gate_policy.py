"""Release gate policy: may a pruned candidate replace the current champion? Pure logic, no MLflow.

It lives beside the release code (``flows/release.py``); the criteria are the ``gate`` section of
the parameters (:class:`tasks.params.GateCriteria`), validated with the rest before anything runs.

The gate compares three sets of figures: the candidate's, the dense baseline's (same base model,
same evaluation data) and, when there is one, the current champion's. Every criterion becomes a
:class:`Check` with its value, threshold and verdict, so the decision explains itself.

Rules that hold whatever the criteria say:
- a missing or failed evaluation, a NaN/inf metric, or lineage that does not match the artifacts
  never passes;
- figures evaluated on other data than the dense baseline's (different token digest) never pass,
  because their deltas mean nothing;
- the speed criterion reads "not measured" when there is no latency figure and then passes,
  unless ``require_speed`` is set: engines are built only where a GPU exists, and a CPU-only
  pipeline must still be able to release; teams that release for serving set ``require_speed``.
  Likewise zero-shot accuracy when neither the candidate nor the dense baseline has any
  (``require_zeroshot``); when only one of them has it, the evaluation is incomplete and fails;
- ``min_param_reduction`` and ``min_decode_speedup`` read the savings stage (transformers on the
  pipeline's device, every machine has it), so a missing figure fails when they are set.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.params import GateCriteria

__all__ = ["Check", "GateCriteria", "GateDecision", "GateMetrics", "decide"]

# Flat metric names as the tracker logs them (``EvaluationResult.metrics()`` naming).
PPL_KEYS = ("perplexity",)
MEAN_ACC_PREFIX = "zeroshot.mean_"
SPARSITY_KEYS = ("sparsity", "sparsity.overall", "actual_sparsity")
# Whole-model accounting (``sparsity_report(..., accounting=)``): zeros among all decoder-block
# weights and the fraction of those weights that were pruning targets.
BLOCK_SPARSITY_KEYS = ("sparsity.block", "block_sparsity")
COVERAGE_KEYS = ("sparsity.coverage", "coverage")
LATENCY_KEYS = ("latency_ms", "latency.mean_ms", "latency.p50_ms")
SPEEDUP_KEYS = ("speedup",)
# The savings stage's figures as the tracker logs them (flows/run_metrics.py savings_figures).
PARAM_REDUCTION_KEYS = ("savings.param_reduction", "param_reduction")
DECODE_SPEEDUP_KEYS = ("savings.decode_speedup", "decode_speedup")


class GateMetrics(BaseModel):
    """The figures the gate reads for one model. ``evaluation_ok=False`` marks a failed run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    perplexity: float | None = None
    mean_acc: float | None = None
    sparsity: float | None = None
    block_sparsity: float | None = None  # zeros among all decoder-block weights
    coverage: float | None = None  # fraction of decoder-block weights that were targets
    latency_ms: float | None = None
    speedup: float | None = None  # when measured directly against the dense engine
    param_reduction: float | None = None  # savings stage: 1 - pruned/dense parameter count
    decode_speedup: float | None = None  # savings stage: pruned/dense decode tokens/s in transformers
    eval_tokens_digest: str | None = None  # perplexity tokens: equal digests => comparable
    evaluation_ok: bool = True

    @classmethod
    def from_flat(cls, metrics: Mapping[str, Any] | None, **extra: Any) -> "GateMetrics":
        """Read tracker-style flat metrics (``perplexity``, ``zeroshot.mean_acc``, ``sparsity``...)."""
        metrics = dict(metrics or {})

        def first(keys: tuple[str, ...]) -> float | None:
            for key in keys:
                if key in metrics and metrics[key] is not None:
                    return float(metrics[key])
            return None

        mean_keys = sorted(k for k in metrics if k.startswith(MEAN_ACC_PREFIX))
        # prefer plain "acc" (the paper's mean) over acc_norm when both exist
        mean_keys.sort(key=lambda k: (k != f"{MEAN_ACC_PREFIX}acc", k))
        values = dict(
            perplexity=first(PPL_KEYS),
            mean_acc=float(metrics[mean_keys[0]]) if mean_keys else None,
            sparsity=first(SPARSITY_KEYS),
            block_sparsity=first(BLOCK_SPARSITY_KEYS),
            coverage=first(COVERAGE_KEYS),
            latency_ms=first(LATENCY_KEYS),
            speedup=first(SPEEDUP_KEYS),
            param_reduction=first(PARAM_REDUCTION_KEYS),
            decode_speedup=first(DECODE_SPEEDUP_KEYS),
        )
        values.update(extra)
        return cls(**values)


class Check(BaseModel):
    """One criterion's verdict; ``value``/``threshold`` are what was compared."""

    model_config = ConfigDict(frozen=True)

    criterion: str
    value: float | str | None
    threshold: float | str | None
    ok: bool
    note: str = ""

    def line(self) -> str:
        mark = "PASS" if self.ok else "FAIL"
        text = f"[{mark}] {self.criterion}: {_fmt(self.value)} vs {_fmt(self.threshold)}"
        return text + (f" ({self.note})" if self.note else "")


class GateDecision(BaseModel):
    passed: bool
    reasons: list[Check]
    criteria: GateCriteria
    candidate: GateMetrics
    dense: GateMetrics | None
    champion: GateMetrics | None
    lineage_ok: bool
    decided_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.reasons if not c.ok]

    def summary(self) -> str:
        """One line: the verdict and the failed criteria (tag values have length limits)."""
        if self.passed:
            return "passed: " + ", ".join(c.criterion for c in self.reasons)
        return "rejected: " + "; ".join(c.line() for c in self.failures)

    def rows(self) -> list[dict[str, str]]:
        """Table rows (criterion, value, threshold, result, note) for reports and Prefect."""
        return [{"criterion": c.criterion, "value": _fmt(c.value), "threshold": _fmt(c.threshold),
                 "result": "pass" if c.ok else "FAIL", "note": c.note} for c in self.reasons]


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _speedup(candidate: GateMetrics, dense: GateMetrics | None) -> float | None:
    if candidate.speedup is not None:
        return candidate.speedup
    if dense is not None and _finite(dense.latency_ms) and _finite(candidate.latency_ms) and candidate.latency_ms > 0:
        return dense.latency_ms / candidate.latency_ms
    return None


def decide(
    candidate: GateMetrics | Mapping[str, Any] | None,
    dense: GateMetrics | Mapping[str, Any] | None,
    champion: GateMetrics | Mapping[str, Any] | None,
    criteria: GateCriteria | None = None,
    lineage_ok: bool = True,
    lineage_problems: list[str] | None = None,
) -> GateDecision:
    """Judge a candidate. Passing requires every check to pass; all checks run regardless, so
    a rejection lists every reason at once rather than the first one found."""
    criteria = criteria or GateCriteria()
    cand = _as_metrics(candidate)
    base = _as_metrics(dense) if dense is not None else None
    champ = _as_metrics(champion) if champion is not None else None
    checks: list[Check] = []

    # Hard rules first: evaluation present and healthy, figures finite, lineage intact.
    evaluated = candidate is not None and cand.evaluation_ok and cand.perplexity is not None
    checks.append(Check(criterion="evaluation", value="present" if evaluated else "missing or failed",
                        threshold="present", ok=evaluated))
    present = {k: v for k, v in cand.model_dump().items() if isinstance(v, float)}
    bad = sorted(k for k, v in present.items() if not math.isfinite(v))
    checks.append(Check(criterion="finite_metrics", value=", ".join(bad) or "all finite", threshold="all finite",
                        ok=not bad, note="NaN/inf figures are never released" if bad else ""))
    checks.append(Check(criterion="lineage", value="verified" if lineage_ok else "mismatch", threshold="verified",
                        ok=lineage_ok, note="; ".join(lineage_problems or [])[:500]))
    base_ok = base is not None and base.evaluation_ok and _finite(base.perplexity)
    checks.append(Check(criterion="dense_baseline", value="present" if base_ok else "missing, failed or NaN",
                        threshold="present", ok=base_ok))
    if base_ok and cand.eval_tokens_digest and base.eval_tokens_digest:
        same = cand.eval_tokens_digest == base.eval_tokens_digest
        checks.append(Check(criterion="comparable_to_dense", value=cand.eval_tokens_digest[:12],
                            threshold=base.eval_tokens_digest[:12], ok=same,
                            note="" if same else "evaluated on other tokens than the dense baseline"))

    ppl_ok = _finite(cand.perplexity)
    if criteria.max_ppl_increase_rel is not None:
        if ppl_ok and base_ok:
            rel = cand.perplexity / base.perplexity - 1.0
            checks.append(Check(criterion="ppl_increase_rel", value=rel, threshold=criteria.max_ppl_increase_rel,
                                ok=rel <= criteria.max_ppl_increase_rel))
        else:
            checks.append(Check(criterion="ppl_increase_rel", value=None, threshold=criteria.max_ppl_increase_rel,
                                ok=False, note="perplexity unavailable"))
    if criteria.max_ppl_increase_abs is not None:
        if ppl_ok and base_ok:
            inc = cand.perplexity - base.perplexity
            checks.append(Check(criterion="ppl_increase_abs", value=inc, threshold=criteria.max_ppl_increase_abs,
                                ok=inc <= criteria.max_ppl_increase_abs))
        else:
            checks.append(Check(criterion="ppl_increase_abs", value=None, threshold=criteria.max_ppl_increase_abs,
                                ok=False, note="perplexity unavailable"))

    if criteria.max_mean_acc_drop is not None or criteria.require_zeroshot:
        checks.append(_accuracy_check(cand, base, criteria))

    if criteria.min_sparsity is not None:
        checks.append(_sparsity_check(cand, criteria.min_sparsity))
    if criteria.min_coverage is not None:
        checks.append(_coverage_check(cand, criteria.min_coverage))

    if criteria.min_speedup is not None:
        speedup = _speedup(cand, base)
        if speedup is None:
            checks.append(Check(criterion="min_speedup", value="not measured", threshold=criteria.min_speedup,
                                ok=not criteria.require_speed,
                                note="no latency figure" + ("; gate.require_speed is set" if criteria.require_speed
                                                            else "; not required")))
        else:
            checks.append(Check(criterion="min_speedup", value=speedup, threshold=criteria.min_speedup,
                                ok=math.isfinite(speedup) and speedup >= criteria.min_speedup))

    if criteria.min_param_reduction is not None:
        checks.append(_savings_check("min_param_reduction", cand.param_reduction, criteria.min_param_reduction,
                                     "parameters removed (unstructured zeros are stored dense and count as kept)"))
    if criteria.min_decode_speedup is not None:
        checks.append(_savings_check("min_decode_speedup", cand.decode_speedup, criteria.min_decode_speedup,
                                     "decode tokens/s against dense in transformers"))

    checks += _champion_checks(cand, champ, criteria)
    passed = all(c.ok for c in checks)
    return GateDecision(passed=passed, reasons=checks, criteria=criteria, candidate=cand, dense=base,
                        champion=champ, lineage_ok=lineage_ok)


def _sparsity_check(cand: GateMetrics, threshold: float) -> Check:
    """The block-wide figure when recorded: a report over the masked layers alone says 0.5 for a
    MoE model whose experts were never pruned."""
    if cand.block_sparsity is not None:
        value, note = cand.block_sparsity, "zeros among all decoder-block weights"
    elif cand.sparsity is not None:
        value, note = cand.sparsity, "masked layers only: no block-wide figure recorded"
    else:
        value, note = None, "actual sparsity not recorded"
    return Check(criterion="min_sparsity", value=value, threshold=threshold,
                 ok=_finite(value) and value >= threshold - 1e-9, note=note)


def _savings_check(criterion: str, value: float | None, threshold: float, what: str) -> Check:
    """A savings figure that was asked for but never measured fails: unlike the engine latency,
    the savings stage runs on every machine, so a missing figure means the run is incomplete."""
    if value is None:
        return Check(criterion=criterion, value="not measured", threshold=threshold, ok=False,
                     note=f"{what}: no savings figure recorded (run the savings stage)")
    return Check(criterion=criterion, value=value, threshold=threshold,
                 ok=_finite(value) and value >= threshold - 1e-9, note=what)


def _coverage_check(cand: GateMetrics, threshold: float) -> Check:
    """Rejects a candidate that pruned only part of the decoder. Candidates recorded before the
    whole-model accounting have no coverage: the check says so and passes."""
    if cand.coverage is None:
        return Check(criterion="min_coverage", value="not recorded", threshold=threshold, ok=True,
                     note="no coverage figure (recorded before whole-model accounting); not checked")
    return Check(criterion="min_coverage", value=cand.coverage, threshold=threshold,
                 ok=_finite(cand.coverage) and cand.coverage >= threshold - 1e-9,
                 note="fraction of decoder-block weights that were pruning targets")


def _accuracy_check(cand: GateMetrics, base: GateMetrics | None, criteria: GateCriteria) -> Check:
    """Mean zero-shot accuracy drop. Zero-shot is optional in the protocol (minutes per task on
    CPU): when neither the candidate nor the dense baseline was evaluated zero-shot the check
    reads "not measured" and passes unless ``require_zeroshot``; when only one side has it, or
    a figure is NaN, the evaluation is incomplete and fails."""
    threshold = criteria.max_mean_acc_drop
    base_acc = base.mean_acc if base is not None else None
    if cand.mean_acc is None and base_acc is None:
        return Check(criterion="mean_acc_drop", value="not measured", threshold=threshold,
                     ok=not criteria.require_zeroshot,
                     note="no zero-shot evaluation" + ("; gate.require_zeroshot is set" if criteria.require_zeroshot
                                                       else "; not required"))
    if not (_finite(cand.mean_acc) and _finite(base_acc)):
        return Check(criterion="mean_acc_drop", value=None, threshold=threshold, ok=False,
                     note="zero-shot accuracy missing or NaN for the candidate or the dense baseline")
    drop = base_acc - cand.mean_acc
    return Check(criterion="mean_acc_drop", value=drop, threshold=threshold,
                 ok=threshold is None or drop <= threshold + 1e-12)


def _champion_checks(cand: GateMetrics, champ: GateMetrics | None, criteria: GateCriteria) -> list[Check]:
    if criteria.champion_margin is None and criteria.champion_acc_margin is None:
        return []
    if champ is None:
        return [Check(criterion="vs_champion", value="no champion", threshold=None, ok=True,
                      note="first release: nothing to compare with")]
    checks: list[Check] = []
    if cand.eval_tokens_digest and champ.eval_tokens_digest and cand.eval_tokens_digest != champ.eval_tokens_digest:
        # Deltas across evaluation data mean nothing: refuse rather than guess.
        return [Check(criterion="vs_champion", value=cand.eval_tokens_digest[:12],
                      threshold=champ.eval_tokens_digest[:12], ok=False,
                      note="champion was evaluated on other tokens; re-evaluate it before comparing")]
    if criteria.champion_margin is not None:
        if _finite(champ.perplexity) and _finite(cand.perplexity):
            limit = champ.perplexity * (1.0 + criteria.champion_margin)
            checks.append(Check(criterion="ppl_vs_champion", value=cand.perplexity, threshold=limit,
                                ok=cand.perplexity <= limit,
                                note=f"champion {champ.perplexity:.6g} x (1 + {criteria.champion_margin:g})"))
        else:
            checks.append(Check(criterion="ppl_vs_champion", value=cand.perplexity, threshold=champ.perplexity,
                                ok=False, note="perplexity missing or NaN for candidate or champion"))
    if criteria.champion_acc_margin is not None and champ.mean_acc is not None:
        if _finite(champ.mean_acc) and _finite(cand.mean_acc):
            limit = champ.mean_acc - criteria.champion_acc_margin
            checks.append(Check(criterion="acc_vs_champion", value=cand.mean_acc, threshold=limit,
                                ok=cand.mean_acc >= limit - 1e-12,
                                note=f"champion {champ.mean_acc:.6g} - {criteria.champion_acc_margin:g}"))
        else:
            checks.append(Check(criterion="acc_vs_champion", value=cand.mean_acc, threshold=champ.mean_acc,
                                ok=False, note="mean accuracy missing or NaN for candidate or champion"))
    return checks


def _as_metrics(value: GateMetrics | Mapping[str, Any] | None) -> GateMetrics:
    if value is None:
        return GateMetrics(evaluation_ok=False)
    if isinstance(value, GateMetrics):
        return value
    return GateMetrics.from_flat(value)
