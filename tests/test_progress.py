"""Stage progress: tqdm bars on a terminal, nothing when not watched, Prefect artifacts in a flow run."""
from __future__ import annotations

import io

import pytest
import torch

import wanda
from tasks import progress
from tests.tiny import tiny_model


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_callback_when_nobody_watches(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal, no Prefect run
    assert progress.block_progress("masks") is None
    monkeypatch.setattr("sys.stderr", _Terminal())
    monkeypatch.setenv("WANDA_PROGRESS", "0")
    assert progress.block_progress("masks") is None


def test_bar_counts_blocks_pruned(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("WANDA_PROGRESS", raising=False)
    callback = progress.block_progress("masks: wanda")
    assert callback is not None
    wanda.prune_model(tiny_model(layers=3), torch.randint(3, 128, (2, 8)), wanda.PruneConfig(), progress=callback)
    drawn = terminal.getvalue()
    assert "masks: wanda" in drawn and "3/3" in drawn and "block" in drawn


@pytest.mark.integration
def test_progress_artifact_inside_a_flow_run(tmp_path_factory, monkeypatch):
    import os

    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.setattr("sys.stderr", io.StringIO())  # no bar: only the artifact

    @flow
    def prune_flow():
        callback = progress.block_progress("masks: wanda")
        assert callback is not None
        wanda.prune_model(tiny_model(layers=2), torch.randint(3, 128, (2, 8)), wanda.PruneConfig(), progress=callback)

    with prefect_test_harness(server_startup_timeout=120):
        prune_flow()
        with get_client(sync_client=True) as client:
            artifacts = [a for a in client.read_artifacts() if a.type == "progress"]
    assert artifacts and max(float(a.data) for a in artifacts) == 100.0
    assert any("block: 2 of 2" in (a.description or "") for a in artifacts)
