"""Result records, the dense-baseline cache, and the dense-vs-candidates table and plot."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_perplexity import words
from tests.test_zeroshot import mc_docs, write_mc_task
from tests.tiny import tiny_model, tiny_tokenizer
from wanda.data import TextSource
from wanda.errors import ArtifactMismatchError, EvaluationError
from wanda.evaluation import (
    EvaluationResult,
    PerplexityConfig,
    PerplexityResult,
    TaskScore,
    ZeroShotConfig,
    ZeroShotResult,
    cached_or_run,
    comparison_plot,
    comparison_table,
    evaluation_settings,
    load_result,
    make_result,
    run_evaluation,
    save_result,
)
from wanda.evaluation.results import cache_path


def fake_ppl(value: float, digest: str = "t" * 64) -> PerplexityResult:
    return PerplexityResult(
        perplexity=value, nll=0.0, seqlen=128, windows=2, windows_available=10, tokens=256, predicted_tokens=254,
        text_tokens=1300, tokens_digest=digest, text_digest="x" * 64, source="/data/wiki.test.raw", batch_size=2,
        wall_s=1.0, tokens_per_s=256.0,
    )


def fake_zs(accs: dict[str, float], limit: int | None = 5) -> ZeroShotResult:
    tasks = {t: TaskScore(acc=a, acc_norm=a + 0.01 if t != "boolq" else None, samples=5, data_digest="d" * 64,
                          definition_digest=f"def-{t}") for t, a in accs.items()}
    return ZeroShotResult(tasks=tasks, mean=sum(accs.values()) / len(accs), limit=limit, num_fewshot=0, batch_size=4,
                          seed=1234, task_source="local", lm_eval_version="0.4.13", wall_s=2.0)


SETTINGS = {"perplexity": {"seqlen": 128}, "zeroshot": {"limit": 5}}


def result(label: str, ppl: float, accs: dict[str, float], fingerprint: str = "f" * 64, **kw) -> EvaluationResult:
    return make_result(label, fingerprint, SETTINGS, fake_ppl(ppl, **kw), fake_zs(accs))


DENSE = {"boolq": 0.60, "rte": 0.55, "hellaswag": 0.40}


# ---------------------------------------------------------------- records

def test_record_round_trip_and_digests(tmp_path):
    record = result("dense", 29.18, DENSE)
    assert record.dataset_digests == {"perplexity.text": "x" * 64, "perplexity.tokens": "t" * 64,
                                      "zeroshot.boolq": "d" * 64, "zeroshot.rte": "d" * 64,
                                      "zeroshot.hellaswag": "d" * 64}
    assert set(record.versions) >= {"lm_eval", "transformers", "torch"}
    assert record.metrics()["perplexity"] == 29.18 and record.metrics()["zeroshot.mean_acc"] == pytest.approx(0.5167,
                                                                                                             abs=1e-4)
    path = save_result(tmp_path / "r.json", record)
    assert load_result(path) == record


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage", "settings"])
def test_damaged_record_is_detected(tmp_path, damage):
    path = save_result(tmp_path / "r.json", result("dense", 29.18, DENSE))
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "edit":
        data = json.loads(text)
        data["perplexity"]["perplexity"] = 12.0
        path.write_text(json.dumps(data))
    elif damage == "settings":
        data = json.loads(text)
        data["settings"]["perplexity"]["seqlen"] = 64
        data.pop("content_digest")
        path.write_text(json.dumps({**data, "content_digest": ""}))
    else:
        path.write_bytes(b"\x00\xff" * 10)
    with pytest.raises(ArtifactMismatchError):
        load_result(path)


def test_dense_baseline_computed_once_and_recomputed_when_damaged(tmp_path):
    calls = []

    def compute() -> EvaluationResult:
        calls.append(1)
        return make_result("dense", "f" * 64, SETTINGS, fake_ppl(29.18))

    first, reused = cached_or_run(tmp_path, "f" * 64, SETTINGS, compute)
    assert not reused and len(calls) == 1
    second, reused = cached_or_run(tmp_path, "f" * 64, SETTINGS, compute)
    assert reused and len(calls) == 1 and second == first
    path = cache_path(tmp_path, "f" * 64, SETTINGS)
    assert path.parent.name == "f" * 64 and path.stem == first.settings_digest

    path.write_text(path.read_text()[:100])  # a crash mid-copy, a bad disk
    third, reused = cached_or_run(tmp_path, "f" * 64, SETTINGS, compute)
    assert not reused and len(calls) == 2 and load_result(path) == third

    other = {**SETTINGS, "perplexity": {"seqlen": 256}}
    with pytest.raises(EvaluationError, match="cache key"):
        cached_or_run(tmp_path, "f" * 64, other, compute)  # the result does not belong to this key
    assert not cache_path(tmp_path, "f" * 64, other).exists()


def test_end_to_end_tiny_model_with_cache(tmp_path):
    model, tok = tiny_model("llama", seed=6), tiny_tokenizer()
    (tmp_path / "eval.txt").write_text(words(3 * 16 + 5))
    ppl = PerplexityConfig(source=TextSource(path=str(tmp_path / "eval.txt")), seqlen=16, batch_size=2)
    folder = write_mc_task(tmp_path / "tasks", mc_docs(6))
    zs = ZeroShotConfig(tasks=["tiny_mc"], task_source="include_path", include_path=str(folder))
    settings = evaluation_settings(ppl, zs, dtype="float32")
    assert len(settings["perplexity"]["text_digest"]) == 64

    runs = []

    def compute() -> EvaluationResult:
        runs.append(1)
        return run_evaluation(model, tok, "dense", "e" * 64, ppl, zs, settings=settings)

    dense, reused = cached_or_run(tmp_path / "cache", "e" * 64, settings, compute)
    again, reused_again = cached_or_run(tmp_path / "cache", "e" * 64, evaluation_settings(ppl, zs, dtype="float32"),
                                        compute)
    assert (reused, reused_again, len(runs)) == (False, True, 1) and again == dense
    assert dense.perplexity.windows == 3 and dense.zeroshot.tasks["tiny_mc"].samples == 6
    assert dense.dataset_digests["perplexity.tokens"] == dense.perplexity.tokens_digest

    # Changed evaluation text: another key, so the baseline is evaluated again.
    (tmp_path / "eval.txt").write_text(words(3 * 16 + 5, seed=9))
    changed = evaluation_settings(ppl, zs, dtype="float32")
    assert changed != settings
    _, reused = cached_or_run(tmp_path / "cache", "e" * 64, changed,
                              lambda: run_evaluation(model, tok, "dense", "e" * 64, ppl, zs, settings=changed))
    assert not reused


def test_missing_zeroshot_data_fails_before_perplexity(tmp_path):
    ppl = PerplexityConfig(source=TextSource(path=str(tmp_path / "eval.txt")), seqlen=16)
    (tmp_path / "eval.txt").write_text(words(40))
    zs = ZeroShotConfig(tasks=["rte"], data_dir=str(tmp_path / "nothing"))
    with pytest.raises(EvaluationError, match="rte/validation.parquet"):
        run_evaluation(None, None, "dense", "e" * 64, ppl, zs, settings={"any": 1})


# ---------------------------------------------------------------- table and plot

def candidates() -> list[EvaluationResult]:
    return [
        result("wanda 50%", 35.40, {"boolq": 0.58, "rte": 0.56, "hellaswag": 0.37}),
        result("magnitude 50%", 120.5, {"boolq": 0.50, "rte": 0.47, "hellaswag": 0.30}),
    ]


def test_comparison_table():
    table = comparison_table(result("dense", 29.18, DENSE), candidates())
    lines = table.splitlines()
    assert lines[0] == "| Model | Perplexity | BoolQ | RTE | HellaSwag | Mean (acc) |"
    assert lines[2] == "| dense | 29.18 | 60.00 | 55.00 | 40.00 | 51.67 |"
    assert lines[3] == "| wanda 50% | 35.40 (+6.22) | 58.00 (-2.00) | 56.00 (+1.00) | 37.00 (-3.00) | 50.33 (-1.33) |"
    assert lines[4].startswith("| magnitude 50% | 120.50 (+91.32) | 50.00 (-10.00)")
    assert "limit 5 per task" in table and "2 windows of 128 tokens of wiki.test.raw" in table
    assert "Not comparable" not in table
    norm = comparison_table(result("dense", 29.18, DENSE), candidates(), metric="acc_norm")
    assert "| dense | 29.18 | — | 56.00 | 41.00 | 51.67 |" in norm


def test_table_flags_incomparable_candidates():
    odd = make_result("odd", "g" * 64, {"other": 1}, fake_ppl(31.0, digest="u" * 64), fake_zs({"boolq": 0.5}, limit=9))
    table = comparison_table(result("dense", 29.18, DENSE), [odd])
    assert "Not comparable: odd: perplexity evaluated on other tokens" in table
    assert "limit/num_fewshot 9/0 differ" in table and "so the means average different tasks" in table
    assert "settings digest" in table
    assert "| odd | 31.00 (+1.82) | 50.00 (-10.00) | — | — | 50.00 (-1.67) |" in table


def test_comparison_plot(tmp_path):
    path = comparison_plot(result("dense", 29.18, DENSE), candidates(), tmp_path / "cmp.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    only_ppl = [make_result(n, "f" * 64, SETTINGS, fake_ppl(v)) for n, v in (("dense", 20.0), ("x", 25.0))]
    assert comparison_plot(only_ppl[0], only_ppl[1:], tmp_path / "ppl.png").is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_float64_model_is_fine_for_records(tmp_path):
    # Records hold plain floats: a float64 evaluation serializes and verifies like any other.
    model = tiny_model("llama", dtype=torch.float64, seed=7)
    (tmp_path / "e.txt").write_text(words(40))
    ppl = PerplexityConfig(source=TextSource(path=str(tmp_path / "e.txt")), seqlen=16)
    record = run_evaluation(model, tiny_tokenizer(), "dense", "a" * 64, ppl, None)
    assert load_result(save_result(tmp_path / "r.json", record)) == record
