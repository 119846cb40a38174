"""The embedded model's masks, pruned weights and perplexity per method, against digests the code
before the core redesign computed on this kind of machine (``tests/make_digests.py``): a refactor
must not move a bit.

A tool for a bit-identity migration, not part of ``make test`` (marker ``digests``, deselected
by default in pyproject.toml): digests hold on one kind of CPU only. ``make digests`` records this
machine kind's set when it has none, then runs these tests. The suite's portable guard is
``tests/test_regression_oracles.py`` (exact, against oracles) and ``tests/test_regression_figures.py``
(perplexities within the spread measured between machine kinds)."""
from __future__ import annotations

import pytest

from tests.make_digests import CASES, REFERENCE, compute_digests, machine_key, reference_for_this_machine

pytestmark = [pytest.mark.integration, pytest.mark.digests]


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    cases = reference_for_this_machine()
    if cases is None:  # not a pass: without a reference nothing proves the bits unchanged
        pytest.fail(f"{REFERENCE.name} has no digests for this machine kind ({machine_key()}); float rounding "
                    "differs between CPUs, so record them once with the pre-redesign code: "
                    ".venv/bin/python -m tests.make_digests", pytrace=False)
    return cases


@pytest.fixture(scope="module")
def digests(reference, embedded_model_dir, shared_data):
    return compute_digests(embedded_model_dir)


@pytest.mark.parametrize("case", sorted(CASES))
def test_digest_unchanged(digests, reference, case):
    assert digests[case] == reference[case]


def test_every_reference_comes_from_the_pre_redesign_code_and_covers_every_case():
    import json

    from tests.make_digests import REFERENCE_COMMIT

    machines = json.loads(REFERENCE.read_text())["machines"]
    assert machines
    for key, entry in machines.items():
        assert entry["recorded_with"] == REFERENCE_COMMIT, key
        assert set(entry["cases"]) == set(CASES), key
