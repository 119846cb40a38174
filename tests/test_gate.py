"""Release gate decisions (pure logic, no MLflow) and lineage hashing against DVC's own."""
from __future__ import annotations

import json
import math

import pytest

from flows.gate_policy import GateCriteria, GateMetrics, decide
from tasks.lineage import LineageRecord, build_lineage, dvc_md5, listing_md5, verify_chain

DENSE = {"perplexity": 10.0, "zeroshot.mean_acc": 0.60}
GOOD = {"perplexity": 11.0, "zeroshot.mean_acc": 0.58, "sparsity": 0.5}
STRICT = GateCriteria(max_ppl_increase_rel=0.2, max_ppl_increase_abs=1.5, max_mean_acc_drop=0.03, min_sparsity=0.5,
                      champion_margin=0.02, champion_acc_margin=0.01)


def failed(decision) -> set[str]:
    return {c.criterion for c in decision.failures}


def test_good_candidate_passes_every_criterion():
    decision = decide(GOOD, DENSE, None, STRICT)
    assert decision.passed, decision.summary()
    values = {c.criterion: c.value for c in decision.reasons}
    assert values["ppl_increase_rel"] == pytest.approx(0.1)
    assert values["ppl_increase_abs"] == pytest.approx(1.0)
    assert values["mean_acc_drop"] == pytest.approx(0.02)
    assert values["vs_champion"] == "no champion"
    assert decision.summary().startswith("passed")


@pytest.mark.parametrize("change, criterion", [
    ({"perplexity": 12.5}, "ppl_increase_rel"),
    ({"perplexity": 11.8}, "ppl_increase_abs"),
    ({"zeroshot.mean_acc": 0.55}, "mean_acc_drop"),
    ({"sparsity": 0.45}, "min_sparsity"),
])
def test_each_criterion_rejects(change, criterion):
    decision = decide({**GOOD, **change}, DENSE, None, STRICT)
    assert not decision.passed and criterion in failed(decision)
    assert criterion in decision.summary()


def test_every_reason_is_listed_not_just_the_first():
    decision = decide({"perplexity": 20.0, "zeroshot.mean_acc": 0.3, "sparsity": 0.1}, DENSE, None, STRICT)
    assert {"ppl_increase_rel", "ppl_increase_abs", "mean_acc_drop", "min_sparsity"} <= failed(decision)


def test_champion_margin():
    champion = {"perplexity": 10.5, "zeroshot.mean_acc": 0.59}
    assert not decide(GOOD, DENSE, champion, STRICT).passed  # 11.0 > 10.5 * 1.02
    assert "ppl_vs_champion" in failed(decide(GOOD, DENSE, champion, STRICT))
    assert decide(GOOD, DENSE, champion, STRICT.model_copy(update={"champion_margin": 0.05})).passed
    worse_acc = {"perplexity": 11.0, "zeroshot.mean_acc": 0.60}
    relaxed = STRICT.model_copy(update={"champion_margin": 0.05})
    assert "acc_vs_champion" in failed(decide(GOOD, DENSE, worse_acc, relaxed))  # 0.58 < 0.60 - 0.01
    off = relaxed.model_copy(update={"champion_margin": None, "champion_acc_margin": None})
    assert decide(GOOD, DENSE, worse_acc, off).passed


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_never_passes(bad):
    decision = decide({**GOOD, "perplexity": bad}, DENSE, None, GateCriteria())
    assert not decision.passed and "finite_metrics" in failed(decision)
    decision = decide({**GOOD, "sparsity": bad}, DENSE, None, GateCriteria(min_sparsity=None))
    assert not decision.passed and "finite_metrics" in failed(decision)
    decision = decide(GOOD, {**DENSE, "perplexity": bad}, None, GateCriteria())
    assert not decision.passed and "dense_baseline" in failed(decision)


def test_missing_or_failed_evaluation_never_passes():
    assert "evaluation" in failed(decide(None, DENSE, None, GateCriteria()))
    no_ppl = {k: v for k, v in GOOD.items() if k != "perplexity"}
    assert "evaluation" in failed(decide(no_ppl, DENSE, None, GateCriteria()))
    failed_run = GateMetrics.from_flat(GOOD, evaluation_ok=False)
    assert "evaluation" in failed(decide(failed_run, DENSE, None, GateCriteria()))
    assert "dense_baseline" in failed(decide(GOOD, None, None, GateCriteria()))
    # Criteria cannot switch the hard rules off.
    none = GateCriteria(max_ppl_increase_rel=None, max_mean_acc_drop=None, min_sparsity=None, champion_margin=None,
                        champion_acc_margin=None)
    assert not decide(None, DENSE, None, none).passed


def test_lineage_mismatch_never_passes():
    decision = decide(GOOD, DENSE, None, GateCriteria(), lineage_ok=False,
                      lineage_problems=["artifacts/prune: mismatch"])
    assert not decision.passed and failed(decision) == {"lineage"}
    assert "artifacts/prune" in decision.failures[0].note


def test_speed_not_measured_passes_unless_required():
    criteria = GateCriteria(min_speedup=1.2)
    decision = decide(GOOD, DENSE, None, criteria)
    speed = next(c for c in decision.reasons if c.criterion == "min_speedup")
    assert decision.passed and speed.value == "not measured" and "not required" in speed.note
    required = GateCriteria(min_speedup=1.2, require_speed=True)
    assert "min_speedup" in failed(decide(GOOD, DENSE, None, required))
    with pytest.raises(ValueError, match="require_speed needs gate.min_speedup"):
        GateCriteria(require_speed=True)


def test_speedup_from_latencies_or_measured():
    criteria = GateCriteria(min_speedup=1.2)
    assert decide({**GOOD, "latency_ms": 8.0}, {**DENSE, "latency_ms": 10.0}, None, criteria).passed
    slow = decide({**GOOD, "latency_ms": 9.0}, {**DENSE, "latency_ms": 10.0}, None, criteria)
    assert "min_speedup" in failed(slow)
    assert decide({**GOOD, "speedup": 1.5}, DENSE, None, criteria).passed


def test_savings_criteria_pass_and_reject_and_a_missing_figure_fails():
    """min_param_reduction / min_decode_speedup read the savings stage's figures (as tracked:
    ``savings.*``); unlike the engine latency they exist on every machine, so missing fails."""
    criteria = GateCriteria(min_param_reduction=0.2, min_decode_speedup=1.1)
    smaller = {**GOOD, "savings.param_reduction": 0.3, "savings.decode_speedup": 1.25}
    decision = decide(smaller, DENSE, None, criteria)
    assert decision.passed, decision.summary()
    values = {c.criterion: c.value for c in decision.reasons}
    assert values["min_param_reduction"] == pytest.approx(0.3) and values["min_decode_speedup"] == pytest.approx(1.25)
    # Unstructured 50%: nothing removed, dense speed.
    unstructured = {**GOOD, "savings.param_reduction": 0.0, "savings.decode_speedup": 0.98}
    assert failed(decide(unstructured, DENSE, None, criteria)) == {"min_param_reduction", "min_decode_speedup"}
    missing = decide(GOOD, DENSE, None, criteria)
    assert failed(missing) == {"min_param_reduction", "min_decode_speedup"}
    assert all(c.value == "not measured" for c in missing.failures)
    # Off by default; the engine criterion keeps its own name and meaning.
    assert GateCriteria().min_param_reduction is None and GateCriteria().min_decode_speedup is None
    assert "min_param_reduction" not in {c.criterion for c in decide(GOOD, DENSE, None, GateCriteria()).reasons}
    with pytest.raises(ValueError):
        GateCriteria(min_param_reduction=1.0)


def test_zeroshot_optional_only_when_nobody_measured_it():
    no_zs = {"perplexity": 11.0, "sparsity": 0.5}
    decision = decide(no_zs, {"perplexity": 10.0}, None, GateCriteria())
    assert decision.passed
    assert "mean_acc_drop" in failed(decide(no_zs, DENSE, None, GateCriteria()))  # dense has it, candidate not
    assert "mean_acc_drop" in failed(decide(no_zs, {"perplexity": 10.0}, None, GateCriteria(require_zeroshot=True)))


def test_incomparable_evaluations_never_pass():
    cand = GateMetrics.from_flat(GOOD, eval_tokens_digest="a" * 64)
    dense = GateMetrics.from_flat(DENSE, eval_tokens_digest="b" * 64)
    assert "comparable_to_dense" in failed(decide(cand, dense, None, GateCriteria()))
    champion = GateMetrics.from_flat({"perplexity": 12.0}, eval_tokens_digest="c" * 64)
    same = GateMetrics.from_flat(DENSE, eval_tokens_digest="a" * 64)
    assert failed(decide(cand, same, champion, GateCriteria())) == {"vs_champion"}


def test_flat_metric_names_and_criteria_validation():
    m = GateMetrics.from_flat({"perplexity": 5, "zeroshot.mean_acc_norm": 0.4, "zeroshot.mean_acc": 0.5,
                               "sparsity": 0.5, "latency_ms": 3})
    assert (m.perplexity, m.mean_acc, m.sparsity, m.latency_ms) == (5.0, 0.5, 0.5, 3.0)
    with pytest.raises(ValueError):
        GateCriteria(min_sparsity=1.5)
    with pytest.raises(ValueError):
        GateCriteria(unknown=1)


def test_decision_serializes_for_json_and_tables():
    decision = decide({**GOOD, "perplexity": float("nan")}, DENSE, None, STRICT)
    text = decision.model_dump_json()
    assert json.loads(text)["passed"] is False
    rows = decision.rows()
    assert {"criterion", "value", "threshold", "result", "note"} == set(rows[0])
    assert any(r["result"] == "FAIL" for r in rows)


# ----------------------------------------------------------------------------- lineage hashing


def test_dvc_hashes_match_dvc(tmp_path, monkeypatch):
    """File and directory hashes as DVC computes them (``dvc add`` writes them to a .dvc file)."""
    dvc_repo = pytest.importorskip("dvc.repo")
    import yaml

    monkeypatch.chdir(tmp_path)
    dvc_repo.Repo.init(str(tmp_path), no_scm=True)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("hello\n")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"x\r\ny\x00")  # DVC 3 hashes bytes as they are
    (tmp_path / "f.txt").write_text("hi\n")
    with dvc_repo.Repo(str(tmp_path)) as repo:
        repo.add(["d", "f.txt"])
    for name in ("d", "f.txt"):
        recorded = yaml.safe_load((tmp_path / f"{name}.dvc").read_text())["outs"][0]["md5"]
        assert dvc_md5(tmp_path / name) == recorded
    dir_md5 = dvc_md5(tmp_path / "d")
    listing = json.loads((tmp_path / ".dvc/cache/files/md5" / dir_md5[:2] / dir_md5[2:]).read_text())
    assert listing_md5(listing) == dir_md5


def _manifest(stage, inputs=None, lineage=None, outputs=None):
    return {"schema": "wanda-stage-manifest/1", "stage": stage, "status": "completed", "params": {stage: {"x": 1}},
            "inputs": inputs or {}, "outputs": outputs or {}, "lineage": lineage or {},
            "code_version": {"git_commit": "abc", "code_digest": "d" * 64}, "versions": {"torch": "2"},
            "wall_s": 1.0, "peak_memory_mb": 10.0}


def test_lineage_record_seal_and_chain():
    manifests = {
        "materialize": _manifest("materialize", lineage={"base_model_fingerprint": "f" * 64}),
        "calibration": _manifest("calibration", inputs={"materialize": {"path": "artifacts/materialize",
                                                                         "manifest_sha256": "m1"}},
                                 lineage={"base_model_fingerprint": "f" * 64, "calibration_token_digest": "t" * 64}),
    }
    folders = {"materialize": "artifacts/materialize", "calibration": "artifacts/calibration"}
    record = build_lineage(manifests, folders, None, None, {"materialize": "m1", "calibration": "m2"})
    assert record.base_model_fingerprint == "f" * 64 and record.calibration_token_digest == "t" * 64
    assert record.code_commit == "abc" and record.digest == record.compute_digest()
    assert all(c.status == "ok" for c in verify_chain(record))
    # a stage made from another version of its input is caught
    stale = build_lineage(manifests, folders, None, None, {"materialize": "OTHER", "calibration": "m2"})
    assert [c.status for c in verify_chain(stale)] == ["mismatch"]
    # any edit to a sealed record changes its digest
    edited = LineageRecord.model_validate_json(record.model_dump_json())
    edited.calibration_token_digest = "u" * 64
    assert edited.compute_digest() != record.digest
    assert math.isfinite(record.stages["calibration"].wall_s)
