"""The embedded model's masks, pruned weights and perplexity per method, against digests recorded
with the code before the core redesign (``tests/make_digests.py``): a refactor must not move a bit."""
from __future__ import annotations

import json

import pytest

from tests.make_digests import CASES, REFERENCE, compute_digests

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digests(embedded_model_dir, shared_data):
    return compute_digests(embedded_model_dir)


@pytest.mark.parametrize("case", sorted(CASES))
def test_digest_unchanged(digests, case):
    reference = json.loads(REFERENCE.read_text())
    assert digests[case] == reference[case]
