"""Calibration samplers: the reference WikiText sampler exactly, C4-style, digests, bad input."""
from __future__ import annotations

import json
import random

import pytest
import torch

from tests.tiny import tiny_tokenizer
from wanda.calibration import CalibrationConfig, CalibrationSet, sample_calibration
from wanda.data import TextSource
from wanda.errors import ArtifactMismatchError, CalibrationError, ConfigError


def _write(tmp_path, text, name="calib.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _words(n, seed=0):
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(120)}" for _ in range(n))


def test_wikitext_sampler_is_the_reference(tmp_path):
    tok = tiny_tokenizer()
    text = _words(2000)
    cfg = CalibrationConfig(source=TextSource(path=_write(tmp_path, text)), nsamples=5, seqlen=32, seed=7)
    calib = sample_calibration(tok, cfg)
    # The reference: tokenize once, random.seed(seed), randint(0, ntokens - seqlen - 1) per sample.
    ids = tok(text, return_tensors="pt").input_ids[0]
    random.seed(7)
    expected = []
    for _ in range(5):
        i = random.randint(0, ids.shape[0] - 32 - 1)
        expected.append(ids[i:i + 32])
    assert torch.equal(calib.tokens, torch.stack(expected))
    assert calib.tokens.dtype == torch.int64 and calib.tokens.shape == (5, 32)


def test_c4_sampler_picks_long_documents(tmp_path):
    tok = tiny_tokenizer()
    records = [{"text": _words(5, s)} for s in range(20)] + [{"text": _words(100, 99)}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    cfg = CalibrationConfig(source=TextSource(path=str(path)), nsamples=4, seqlen=40, sampler="c4")
    calib = sample_calibration(tok, cfg)
    long_doc = tok(records[-1]["text"], return_tensors="pt").input_ids[0]
    for row in calib.tokens:
        assert any(torch.equal(row, long_doc[i:i + 40]) for i in range(long_doc.numel() - 40))


def test_c4_sampler_without_long_documents_fails(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": _words(5, s)}) for s in range(30)))
    cfg = CalibrationConfig(source=TextSource(path=str(path)), nsamples=2, seqlen=40, sampler="c4")
    with pytest.raises(CalibrationError, match="no document longer"):
        sample_calibration(tiny_tokenizer(), cfg)


def test_same_seed_same_digest_other_seed_other(tmp_path):
    src = TextSource(path=_write(tmp_path, _words(3000)))
    a = sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, nsamples=4, seqlen=16, seed=0))
    b = sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, nsamples=4, seqlen=16, seed=0))
    c = sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, nsamples=4, seqlen=16, seed=1))
    assert a.digest == b.digest != c.digest
    assert len(a.digest) == 64


def test_quality_report(tmp_path):
    src = TextSource(path=_write(tmp_path, _words(3000)))
    calib = sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, nsamples=8, seqlen=16))
    report = calib.report
    assert report["nsamples"] == 8 and report["seqlen"] == 16 and report["source_tokens"] == 3000
    assert 0 < report["distinct_token_ratio"] <= 1
    assert report["fraction_of_source_used"] == pytest.approx(8 * 16 / 3000, rel=1e-4)
    assert report["repeated_windows"] == 0


def test_too_little_text(tmp_path):
    src = TextSource(path=_write(tmp_path, _words(20)))
    with pytest.raises(CalibrationError, match="too little calibration text"):
        sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, nsamples=2, seqlen=32))


def test_empty_and_near_constant_text(tmp_path):
    with pytest.raises(CalibrationError, match="empty"):
        sample_calibration(tiny_tokenizer(), CalibrationConfig(source=TextSource(path=_write(tmp_path, "")), seqlen=4))
    constant = TextSource(path=_write(tmp_path, "w1 w2 " * 500, "constant.txt"))
    with pytest.raises(CalibrationError, match="near-constant"):
        sample_calibration(tiny_tokenizer(), CalibrationConfig(source=constant, nsamples=2, seqlen=16))


def test_seqlen_above_context(tmp_path):
    src = TextSource(path=_write(tmp_path, _words(3000)))
    with pytest.raises(ConfigError, match="calibration.seqlen"):
        sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, seqlen=512), max_context=256)


def test_nsamples_below_one_and_missing_file():
    with pytest.raises(Exception, match="nsamples"):
        CalibrationConfig(nsamples=0)
    with pytest.raises(ConfigError, match="source.path"):
        sample_calibration(tiny_tokenizer(), CalibrationConfig(source=TextSource(path="/nonexistent/file.txt")))


def test_builtin_text_is_disjoint_and_offline():
    from wanda.data import load_text

    calib = load_text(TextSource(builtin="pydoc_topics", part="calibration"))
    evaluation = load_text(TextSource(builtin="pydoc_topics", part="evaluation"))
    assert len(calib.text) > 100_000 and len(evaluation.text) > 100_000
    assert not set(calib.documents) & set(evaluation.documents)


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    src = TextSource(path=_write(tmp_path, _words(3000)))
    calib = sample_calibration(tiny_tokenizer(), CalibrationConfig(source=src, nsamples=3, seqlen=16))
    calib.save(tmp_path / "calib.safetensors", {"model": "tiny"})
    loaded = CalibrationSet.load(tmp_path / "calib.safetensors")
    assert torch.equal(loaded.tokens, calib.tokens) and loaded.digest == calib.digest
    assert loaded.report == calib.report
    from safetensors.torch import save_file

    save_file({"tokens": calib.tokens + 1}, str(tmp_path / "bad.safetensors"), metadata={"digest": calib.digest})
    with pytest.raises(ArtifactMismatchError):
        CalibrationSet.load(tmp_path / "bad.safetensors")
