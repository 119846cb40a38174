"""End-to-end figures of every method on the whole embedded model, against values recorded on
several kinds of machine, within a tolerance measured from their spread.

Each case of ``tests/make_digests.py`` (the embedded SmolLM2-135M, 4 x 128 calibration tokens,
float32, two evaluation windows of 128 tokens) is pruned and evaluated as the digests did. What
must hold on any CPU:

- the overall mask sparsity is exact (every per-row and N:M selection prunes a fixed count);
- streamed and loaded pruning give the same masks, bit for bit, on one machine (the walk is one
  code path whatever the source);
- the perplexity is within the case's tolerance of the mean of the values recorded per machine
  kind in ``tests/digests_reference.json`` (by the pre-redesign code, ``python -m
  tests.make_digests``). Float rounding differs between CPUs, a sequential prune amplifies it
  block by block, and two windows of 128 tokens are a small sample, so the recorded values
  spread: see :func:`tolerance` for how much is allowed and why.

The exact, portable half of the guard is ``tests/test_regression_oracles.py``.
"""
from __future__ import annotations

import json
import math

import pytest

from tests.make_digests import CASES, REFERENCE, compute_figures

pytestmark = pytest.mark.integration

# A case may drift from the mean of the distinct recorded values by this many times their spread
# (max - min over the mean), and never by less than FLOOR. Measured (2026-12, tests/digests_reference
# .json, each set computed by the pre-redesign code): Intel family 6 model 207 (recorded twice, by
# the first VM and by this one, bit for bit the same) and AMD family 26 model 2. Their spread: 7e-7
# (magnitude), 4e-5 (Wanda one-pass), 1.8e-4 (SparseGPT), 0.2% (DSnoT), 0.6% (Wanda 2:4), about 1%
# (sequential Wanda, 4:8, RIA, OWL, the variant) and 17% for RIA with the channel permutation at
# 2:4, whose heuristic reorders channels on near-ties and so amplifies rounding. Sequential pruning
# carries rounding from block to block, and two windows of 128 tokens are a small sample; a band of
# twice the spread around the midpoint lets a third kind land up to four half-gaps away. A machine
# outside its case's band says the spread was underestimated (record that kind with `make digests`
# and the band widens) or that the code changed.
SPREAD_FACTOR = 2.0
FLOOR = 0.005


def recorded_perplexities() -> dict[str, list[float]]:
    """Per case, the distinct values recorded (a kind recorded twice counts once)."""
    machines = json.loads(REFERENCE.read_text())["machines"]
    return {case: sorted({float(entry["cases"][case]["perplexity"]) for entry in machines.values()})
            for case in CASES}


def tolerance(values: list[float]) -> float:
    """The relative band around the recorded mean: SPREAD_FACTOR times the measured spread, at least FLOOR."""
    mean = sum(values) / len(values)
    return max(SPREAD_FACTOR * (max(values) - min(values)) / mean, FLOOR)


@pytest.fixture(scope="module")
def figures(embedded_model_dir, shared_data):
    return compute_figures(embedded_model_dir)


def test_the_reference_holds_several_machine_kinds():
    recorded = recorded_perplexities()
    assert len(json.loads(REFERENCE.read_text())["machines"]) >= 2
    assert sum(len(values) >= 2 for values in recorded.values()) >= len(CASES) - 1  # two kinds measured


@pytest.mark.parametrize("case", sorted(CASES))
def test_perplexity_within_the_spread_between_machines(figures, case):
    values = recorded_perplexities()[case]
    mean, band = sum(values) / len(values), tolerance(values)
    got = figures[case]["perplexity"]
    assert math.isfinite(got)
    assert abs(got - mean) / mean <= band, (
        f"{case}: perplexity {got:.4f} is {abs(got - mean) / mean:.2%} from the recorded mean {mean:.4f} "
        f"(band {band:.2%}; recorded {', '.join(f'{v:.4f}' for v in values)})")


# OWL spreads the sparsity over blocks (each layer's count rounds down) and the Wanda variant
# adapts each row's count to a score share: their overall sparsity is 0.5 to within a rounding.
APPROXIMATE_SPARSITY = {"owl_wanda_50": 0.005, "variant_wanda_50": 0.01}


@pytest.mark.parametrize("case", sorted(CASES))
def test_overall_sparsity(figures, case):
    """Fixed per-row and N:M counts make it exact on any machine."""
    assert figures[case]["sparsity"] == pytest.approx(0.5, abs=APPROXIMATE_SPARSITY.get(case, 1e-12)), case


@pytest.mark.parametrize("loaded,streamed", [("wanda_sequential_50", "streamed_wanda_sequential_50"),
                                             ("sparsegpt_50", "streamed_sparsegpt_50")])
def test_streamed_and_loaded_masks_agree_bit_for_bit(figures, loaded, streamed):
    assert figures[loaded]["masks"] == figures[streamed]["masks"]
    assert figures[loaded]["perplexity"] == figures[streamed]["perplexity"]
