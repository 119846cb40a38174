"""Which parts of a URI are credentials: its user info and credential-like query parameters.

One list for the two places that need it: the ``tracking`` section refuses a URI holding any
(a parameter file is committed, logged to MLflow and shown by Prefect), and
:mod:`flows.redact` masks them wherever text is printed or stored. Users add their own names
(``tracking.secret_query_params``) for servers whose token parameter has another name.
No imports beyond the standard library: the redaction loads it before anything else.
"""
from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

# Lower case; a query parameter matches case-insensitively.
CREDENTIAL_QUERY_KEYS = ("access_token", "api_key", "apikey", "auth", "authorization", "client_secret", "key",
                         "password", "passwd", "pwd", "secret", "sig", "signature", "token", "x-amz-credential",
                         "x-amz-security-token", "x-amz-signature", "x-goog-signature")


def query_keys(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The built-in names plus ``extra`` (lower-cased, without duplicates)."""
    names = [*CREDENTIAL_QUERY_KEYS, *(name.strip().lower() for name in extra if name and name.strip())]
    return tuple(dict.fromkeys(names))


def credential_parts(uri: str | None, extra: Iterable[str] = ()) -> list[str]:
    """What in ``uri`` is a credential, by name only (never the value): ``user:password@`` and
    each credential query parameter, e.g. ``["user:password@", "?token="]``."""
    if not uri or "://" not in uri and "?" not in uri:
        return []
    found: list[str] = []
    parts = urllib.parse.urlsplit(uri)
    if "://" in uri and (parts.username is not None or parts.password is not None):
        found.append("user:password@")
    keys = set(query_keys(extra))
    # A sqlite URI's query, or a bare path with "?", is parsed the same way.
    query = parts.query or (uri.partition("?")[2] if "?" in uri else "")
    for key, _value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key.lower() in keys and f"?{key}=" not in found:
            found.append(f"?{key}=")
    return found
