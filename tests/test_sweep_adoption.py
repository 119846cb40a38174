"""How a distributed sweep brings finished points into the main workspace (flows.sweep._Adoption)
and what it says when the workers cannot reach its Prefect API. The real adoption through DVC is
covered end to end by tests/test_sweep_distributed.py; here only the order it is asked for."""
from __future__ import annotations

import logging

import flows.sweep as sweep_module
from flows import runners


def _result(point: str, actions=("ran", "ran", "ran")) -> dict:
    stages = ("masks", "prune", "evaluate")
    return {"point": point, "outcomes": [{"address": f"sweeps/s/dvc.yaml:{point}-{stage}", "action": action}
                                         for stage, action in zip(stages, actions)]}


def test_points_are_adopted_in_plan_order_as_soon_as_their_prefix_finished(monkeypatch, tmp_path):
    calls: list[list[str]] = []  # the adoptions that had stages to bring in
    monkeypatch.setattr(sweep_module, "adopt", lambda root, addresses, sink=None: addresses and calls.append(addresses))
    adoption = sweep_module._Adoption(tmp_path, ["p1", "p2", "p3", "p4"], sink=None)

    adoption.finished(_result("p2"))  # p1 still running: nothing may be adopted yet
    assert calls == []
    adoption.finished(_result("p1"))  # p1 and p2, in plan order
    assert calls[-1] == [f"sweeps/s/dvc.yaml:{p}-{s}" for p in ("p1", "p2") for s in ("masks", "prune", "evaluate")]
    adoption.finished(_result("p4", actions=("unchanged", "ran", "restored")))  # waits for p3
    assert len(calls) == 1
    adoption.finished(_result("p3"))
    assert calls[-1] == [f"sweeps/s/dvc.yaml:p3-{s}" for s in ("masks", "prune", "evaluate")] + \
        ["sweeps/s/dvc.yaml:p4-prune", "sweeps/s/dvc.yaml:p4-evaluate"]  # an unchanged stage has nothing to adopt


def test_remote_sweep_without_prefect_api_warns(caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    settings = runners.sweep_settings({"runner": "dask://127.0.0.1:8786"})
    with temporary_settings(restore_defaults={PREFECT_API_URL}), caplog.at_level(logging.WARNING, "flows.sweep"):
        sweep_module._warn_without_api(settings)
    assert "PREFECT_API_URL is not set" in caplog.text and "dask://127.0.0.1:8786" in caplog.text

    caplog.clear()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), \
            caplog.at_level(logging.WARNING, "flows.sweep"):
        sweep_module._warn_without_api(settings)
    assert "PREFECT_API_URL" not in caplog.text
