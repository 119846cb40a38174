"""Perplexity protocol: equal to a direct NLL loop, end-of-text windows, determinism, failures."""
from __future__ import annotations

import json
import logging
import math
import random

import pytest
import torch
from pydantic import ValidationError

from tests.tiny import VOCAB, tiny_model, tiny_tokenizer
from wanda.data import TextSource, load_text, tokenize
from wanda.errors import ConfigError, EvaluationError
from wanda.evaluation.perplexity import PerplexityConfig, evaluate_perplexity
from wanda.hashing import sha256_tensor

SEQLEN = 16


def words(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    # Line breaks too: the protocol evaluates the concatenated text, whatever its layout.
    return "".join(f"w{rng.randrange(VOCAB - 4)}" + ("\n" if i % 11 == 10 else " ") for i in range(count))


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64, seed=1)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def source_of(tmp_path, text: str, name: str = "eval.txt") -> TextSource:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return TextSource(path=str(path))


def direct_nll(model, ids: torch.Tensor, seqlen: int, windows: int) -> tuple[float, int]:
    """Token by token, one window at a time: sum of -log p(next token) and how many."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = ids[w * seqlen:(w + 1) * seqlen]
            logprobs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= float(logprobs[t, window[t + 1]])
                count += 1
    return total, count


def reference_eval_ppl(model, ids: torch.Tensor, seqlen: int, bs: int) -> float:
    """The reference implementation's formula (Wanda ``eval_ppl_wikitext``)."""
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(0, nsamples, bs):
            j = min(i + bs, nsamples)
            inputs = ids[i * seqlen:j * seqlen].reshape(j - i, seqlen)
            logits = model(inputs).logits
            loss = torch.nn.CrossEntropyLoss()(logits[:, :-1].reshape(-1, logits.size(-1)), inputs[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen * (j - i))
    return float(torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)))


def test_equals_direct_nll_loop(tmp_path, model64, tok):
    text = words(5 * SEQLEN + 7)
    result = evaluate_perplexity(model64, tok, PerplexityConfig(source=source_of(tmp_path, text), seqlen=SEQLEN,
                                                                batch_size=2))
    ids = tokenize(tok, text)
    total, count = direct_nll(model64, ids, SEQLEN, 5)
    assert result.windows == 5 and result.predicted_tokens == count == 5 * (SEQLEN - 1)
    assert result.nll == pytest.approx(total / count, rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-12)
    # Same number as the paper's code (float32 loss there, hence the looser tolerance).
    assert result.perplexity == pytest.approx(reference_eval_ppl(model64, ids, SEQLEN, 2), rel=1e-6)


def test_end_of_text_window_is_dropped(tmp_path, model64, tok):
    text = words(3 * SEQLEN + 9)
    ids = tokenize(tok, text)
    assert ids.numel() == 3 * SEQLEN + 9
    result = evaluate_perplexity(model64, tok, PerplexityConfig(source=source_of(tmp_path, text), seqlen=SEQLEN))
    assert (result.windows, result.windows_available, result.text_tokens) == (3, 3, 3 * SEQLEN + 9)
    assert result.tokens == 3 * SEQLEN
    assert result.tokens_digest == sha256_tensor(ids[:3 * SEQLEN].reshape(3, SEQLEN))
    # The tail never reaches the model: the text cut at the last full window gives the same number.
    exact = " ".join(text.split()[:3 * SEQLEN])
    cut = evaluate_perplexity(model64, tok, PerplexityConfig(source=source_of(tmp_path, exact, "cut.txt"),
                                                             seqlen=SEQLEN))
    assert cut.perplexity == result.perplexity and cut.tokens_digest == result.tokens_digest
    assert cut.text_digest != result.text_digest


def test_max_windows_takes_the_first_windows(tmp_path, model64, tok):
    text = words(4 * SEQLEN)
    source = source_of(tmp_path, text)
    two = evaluate_perplexity(model64, tok, PerplexityConfig(source=source, seqlen=SEQLEN, max_windows=2))
    total, count = direct_nll(model64, tokenize(tok, text), SEQLEN, 2)
    assert (two.windows, two.windows_available) == (2, 4)
    assert two.perplexity == pytest.approx(math.exp(total / count), rel=1e-12)
    more = evaluate_perplexity(model64, tok, PerplexityConfig(source=source, seqlen=SEQLEN, max_windows=99))
    assert more.windows == 4


def test_batching_and_repeats_give_the_same_number(tmp_path, model64, tok):
    source = source_of(tmp_path, words(7 * SEQLEN + 3))
    runs = [evaluate_perplexity(model64, tok, PerplexityConfig(source=source, seqlen=SEQLEN, batch_size=b))
            for b in (1, 3, 3, 8)]
    assert len({r.tokens_digest for r in runs}) == 1
    assert runs[1].perplexity == runs[2].perplexity  # same settings: bit-identical
    for run in runs:
        assert run.perplexity == pytest.approx(runs[0].perplexity, rel=1e-12)
        assert run.windows == 7


def test_float32_model_matches_loop(tmp_path, tok):
    model = tiny_model("llama", dtype=torch.float32, seed=2)
    text = words(3 * SEQLEN)
    result = evaluate_perplexity(model, tok, PerplexityConfig(source=source_of(tmp_path, text), seqlen=SEQLEN))
    total, count = direct_nll(model, tokenize(tok, text), SEQLEN, 3)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_dropout_is_off_and_the_mode_restored(tmp_path, tok):
    model = tiny_model("opt", dtype=torch.float64, seed=8)  # OPT has dropout 0.1 by default
    assert model.config.dropout > 0
    config = PerplexityConfig(source=source_of(tmp_path, words(3 * SEQLEN)), seqlen=SEQLEN)
    expected = evaluate_perplexity(model, tok, config).perplexity
    model.train()
    assert evaluate_perplexity(model, tok, config).perplexity == expected
    assert model.training


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_is_an_error(tmp_path, tok, value):
    model = tiny_model("llama", dtype=torch.float32, seed=3)
    with torch.no_grad():
        model.model.norm.weight[0] = value
    with pytest.raises(EvaluationError, match="non-finite loss"):
        evaluate_perplexity(model, tok, PerplexityConfig(source=source_of(tmp_path, words(2 * SEQLEN)), seqlen=SEQLEN))


def test_seqlen_beyond_context_fails_before_reading(tmp_path, model64, tok):
    # The source does not exist: the seqlen check must come first, before any reading.
    config = PerplexityConfig(source=TextSource(path=str(tmp_path / "absent.txt")), seqlen=512)
    with pytest.raises(ConfigError) as info:
        evaluate_perplexity(model64, tok, config)
    assert info.value.field == "evaluation.seqlen" and "256" in str(info.value)


def test_too_little_text_and_missing_file(tmp_path, model64, tok):
    with pytest.raises(ConfigError) as info:
        evaluate_perplexity(model64, tok, PerplexityConfig(source=source_of(tmp_path, words(10)), seqlen=SEQLEN))
    assert info.value.field == "evaluation.source" and "10 tokens" in str(info.value)
    with pytest.raises(ConfigError) as info:
        evaluate_perplexity(model64, tok, PerplexityConfig(source=TextSource(path=str(tmp_path / "no.txt")),
                                                           seqlen=SEQLEN))
    assert info.value.field == "evaluation.source.path"


def test_config_validation_and_default_source():
    assert PerplexityConfig().source.path == "shared:wikitext-2-raw/wiki.test.raw"
    for bad in ({"seqlen": 1}, {"batch_size": 0}, {"max_windows": 0}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            PerplexityConfig(**bad)


def test_jsonl_source_and_progress_log(tmp_path, model64, tok, caplog):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": words(SEQLEN, seed=s)}) + "\n" for s in range(3)))
    source = TextSource(path=str(path), text_field="body")
    with caplog.at_level(logging.INFO, logger="wanda.evaluation.perplexity"):
        result = evaluate_perplexity(model64, tok, PerplexityConfig(source=source, seqlen=SEQLEN, batch_size=2))
    assert result.text_digest == load_text(source).digest
    assert result.windows == tokenize(tok, load_text(source).text).numel() // SEQLEN
    assert any(f"windows {result.windows}/{result.windows}" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_embedded_model_first_windows(embedded_model_dir, shared_data):
    from wanda.model_io import load_model

    model, tokenizer = load_model(str(embedded_model_dir))
    config = PerplexityConfig(seqlen=128, max_windows=2, batch_size=2)
    batched = evaluate_perplexity(model, tokenizer, config)
    single = evaluate_perplexity(model, tokenizer, config.model_copy(update={"batch_size": 1}))
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r", "")
    ids = tokenize(tokenizer, text)
    assert batched.tokens_digest == single.tokens_digest == sha256_tensor(ids[:256].reshape(2, 128))
    assert batched.windows == 2 and batched.windows_available == ids.numel() // 128
    assert 5 < batched.perplexity < 200, batched.perplexity
    assert batched.perplexity == pytest.approx(single.perplexity, rel=1e-4)
