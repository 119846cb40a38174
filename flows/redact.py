"""Credentials never reach a log, a print, or Prefect: one redaction that all output passes.

``MLFLOW_TRACKING_URI=http://user:secret@host:5000`` is a normal way to reach a server behind
basic auth, and the URI travels far: our own log lines and prints, MLflow's "View run at" line
(written straight to ``sys.stdout``), error messages, Prefect's log records (stored in its
database) and artifacts. Instead of remembering to redact at each of them, :func:`install`
puts :func:`redact` where they all pass:

- the log record factory, so every record of every logger (root, ``prefect.*``, ``mlflow.*``,
  ours) has its message, arguments and traceback redacted when it is created, before any
  handler (console, Prefect's API handler) sees it; plus :class:`RedactingFilter` on the
  handlers of the root, ``prefect`` and ``mlflow`` loggers for records made elsewhere
  (``logging.makeLogRecord``);
- ``sys.stdout`` and ``sys.stderr`` (the CLI's output and whatever libraries print);
- values handed to Prefect (artifacts, results): :func:`redact_value`.

What is redacted: the user info of any URL (``scheme://user:password@`` -> ``scheme://***@``),
credential-like query parameters (``?token=``, ``password=``, ``X-Amz-Signature=``...), and the
literal secrets found in the environment at install time (the passwords of the tracking and
registry URIs, ``MLFLOW_TRACKING_PASSWORD``/``_TOKEN``), wherever they appear.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"
# scheme://userinfo@ ; userinfo stops at the first "/", whitespace or "@" (a literal "@" in a
# password must be percent-encoded in a URL).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
from tasks.uri_secrets import CREDENTIAL_QUERY_KEYS as _QUERY_KEYS, query_keys  # noqa: E402 (stdlib only)


def _query_pattern(keys) -> re.Pattern:
    return re.compile(r"(?P<key>[?&;](?:%s)=)[^&\s#'\"<>]*" % "|".join(re.escape(k) for k in keys), re.IGNORECASE)


_QUERY = _query_pattern(_QUERY_KEYS)
_extra_keys: tuple[str, ...] = ()
_ENV_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "WANDA_DVC_REMOTE", "PREFECT_API_URL")
_ENV_SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY")
_MIN_SECRET = 4  # shorter literals would mask ordinary words

_secrets: set[str] = set()


def add_secret(value: str | None) -> None:
    """Redact this literal everywhere from now on (and its percent-decoded form)."""
    for item in {value or "", urllib.parse.unquote(value or "")}:
        if len(item) >= _MIN_SECRET:
            _secrets.add(item)


def add_query_keys(names) -> None:
    """Also redact these query parameters (``tracking.secret_query_params``), and the values the
    environment's URIs give them."""
    global _QUERY, _extra_keys
    extra = tuple(k for k in query_keys(names) if k not in _QUERY_KEYS and k not in _extra_keys)
    if extra:
        _extra_keys += extra
        _QUERY = _query_pattern((*_QUERY_KEYS, *_extra_keys))
        secrets_from_env()


def secrets_from_env(environ: Mapping[str, str] | None = None) -> None:
    environ = os.environ if environ is None else environ
    keys = set(query_keys(_extra_keys))
    for name in _ENV_URIS:
        value = environ.get(name, "")
        parsed = urllib.parse.urlsplit(value)
        if parsed.password:
            add_secret(parsed.password)
        query = parsed.query or value.partition("?")[2]  # sqlite:///path?token=... too
        for key, item in urllib.parse.parse_qsl(query):
            if key.lower() in keys:
                add_secret(item)
    for name in _ENV_SECRETS:
        add_secret(environ.get(name))


def redact(text: str) -> str:
    """``text`` without URL credentials, credential query values or known secrets."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m.group('key')}{MASK}", text)
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_value(value: Any) -> Any:
    """:func:`redact` applied to every string inside dicts, lists and tuples."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redact_value(k): redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def has_credentials(uri: str | None) -> bool:
    """A URI that holds a password, user info or a credential query parameter."""
    return bool(uri) and redact(uri) != uri


# ----------------------------------------------------------------------------- logging


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_wanda_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is the logging module's to report
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._wanda_redacted = True
    return record


class RedactingFilter(logging.Filter):
    """Redacts a record in place; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


class RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written, then passes it to the wrapped stream."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_FILTER = RedactingFilter()
_installed_factory = False


def install_logging() -> None:
    """Redact every log record of this process (idempotent; safe to call from every flow)."""
    global _installed_factory
    secrets_from_env()
    if not _installed_factory:
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            return _redact_record(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed_factory = True
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "mlflow"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)


def install(streams: bool = True) -> None:
    """:func:`install_logging`, and with ``streams`` also wrap ``sys.stdout``/``sys.stderr``."""
    install_logging()
    if streams:
        if not isinstance(sys.stdout, RedactingStream):
            sys.stdout = RedactingStream(sys.stdout)
        if not isinstance(sys.stderr, RedactingStream):
            sys.stderr = RedactingStream(sys.stderr)
