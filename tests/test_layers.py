"""Clean layers and the small pieces under the release flows: one stage list, a typed
``tracking`` section, parameters parsed once, and the credential redaction. Fast: no model."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from tasks import graph
from wanda.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_library_knows_nothing_of_dvc_files_manifests_or_releases():
    offending = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "wanda").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"dvc\.lock|manifest\.json", line)]
    assert offending == []
    assert not (REPO / "wanda" / "lineage.py").exists() and not (REPO / "wanda" / "gate.py").exists()


def test_one_stage_list():
    from flows.run_inputs import DEFAULT_FOLDERS
    from tasks.lineage import build_lineage
    from tasks.params import PathsSection

    assert list(PathsSection.model_fields) == graph.order()
    assert DEFAULT_FOLDERS == {name: f"artifacts/{name}" for name in graph.order()}
    shuffled = {name: {"stage": name} for name in reversed(graph.order())}
    record = build_lineage(shuffled, DEFAULT_FOLDERS)
    assert list(record.stages) == graph.order()  # printed in the graph's order


def test_tracking_section_is_typed(tmp_path):
    from tasks.params import TrackingConfig, load_params

    path = tmp_path / "params.yaml"
    path.write_text("tracking:\n  experimnt: x\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert err.value.field == "tracking.experimnt" and "allowed: tracking_uri, registry_uri, experiment" in str(err.value)
    path.write_text("tracking:\n  experiment: mine\n")
    params = load_params(path)
    assert isinstance(params.tracking, TrackingConfig) and params.tracking.experiment == "mine"
    assert load_params(path) is params  # parsed once per process while the bytes are the same
    path.write_text("tracking:\n  experiment: yours\n")
    assert load_params(path).tracking.experiment == "yours"
    path.write_text("tracking:\n  tracking_uri: http://u:pw@host:5000\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert err.value.field == "tracking.tracking_uri" and "pw" not in str(err.value)


def test_redaction():
    from flows.redact import add_secret, redact, redact_value

    assert redact("at http://u:secret@127.0.0.1:5000/#/runs/1") == "at http://***@127.0.0.1:5000/#/runs/1"
    assert redact("postgresql://mlflow:p%40ss@db:5432/m") == "postgresql://***@db:5432/m"
    assert redact("s3://b/k?X-Amz-Signature=abc&part=1") == "s3://b/k?X-Amz-Signature=***&part=1"
    assert redact("https://h/x?token=t0k#frag") == "https://h/x?token=***#frag"
    assert redact("http://host/a@b and git@github.com:x") == "http://host/a@b and git@github.com:x"
    add_secret("hunter2-literal")
    assert redact("password is hunter2-literal") == "password is ***"
    assert redact_value({"uri": ["http://a:b@h"], "n": 1}) == {"uri": ["http://***@h"], "n": 1}


def test_log_records_are_redacted_when_made(caplog):
    from flows.redact import install_logging

    install_logging()
    logger = logging.getLogger("some.library")
    with caplog.at_level(logging.INFO):
        logger.info("connecting to %s", "http://user:topsecret@host:1")
        try:
            raise RuntimeError("failed: https://user:topsecret@host:2/api")
        except RuntimeError:
            logger.exception("request failed")
    text = caplog.text + json.dumps([r.getMessage() for r in caplog.records])
    assert "topsecret" not in text and text.count("://***@host") >= 3


def test_query_string_credentials_are_credentials(tmp_path):
    """Issue 25: ``?token=`` and the names a tracking section adds are refused like
    ``user:password@`` (the field named, the value never echoed) and redacted."""
    from flows.redact import add_query_keys, redact
    from tasks.params import TrackingConfig, load_params
    from tasks.uri_secrets import credential_parts

    assert credential_parts("sqlite:///x/mlflow.db?password=s3cret&mode=ro") == ["?password="]
    assert credential_parts("http://u:p@h/?Token=a&sig=b") == ["user:password@", "?Token=", "?sig="]
    assert credential_parts("http://h:5000/?my_tok=a", ["MY_TOK"]) == ["?my_tok="]
    assert credential_parts("http://h:5000/path?page=2") == [] and credential_parts(None) == []
    path = tmp_path / "params.yaml"
    for text, field in (("tracking:\n  tracking_uri: http://h/?access_token=abcdef\n", "tracking.tracking_uri"),
                        ("tracking:\n  secret_query_params: [my_tok]\n  registry_uri: http://h/?my_tok=abcdef\n",
                         "tracking.registry_uri")):
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_params(path)
        assert err.value.field == field and "abcdef" not in str(err.value) and "is refused" in str(err.value)
    assert TrackingConfig(tracking_uri="http://h:5000/?page=2").tracking_uri == "http://h:5000/?page=2"
    assert redact("http://h/?my_tok2=abc&x=1") == "http://h/?my_tok2=abc&x=1"
    add_query_keys(["my_tok2"])
    assert redact("http://h/?my_tok2=abc&x=1") == "http://h/?my_tok2=***&x=1"


def test_oversampling_note():
    from wanda.calibration import oversampling_note

    assert oversampling_note(10_000, 16, 256) is None
    note = oversampling_note(664, 16, 256)
    assert "664 tokens" in note and "16 x 256 = 4096" in note and "oversampling ratio 6.17x" in note
