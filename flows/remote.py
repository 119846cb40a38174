"""The DVC remote of scheduled runs: configured per machine, pulled at the start, pushed at the end.

A scheduled run starts on whatever checkout the worker has, so it first pulls what earlier runs
(on this or another machine) pushed: stage outputs and DVC's run cache, which lets ``dvc repro``
restore a stage computed elsewhere instead of recomputing it. At the end it pushes what it made,
also when the run failed (a rejected candidate's artifacts are kept for inspection).

Where the remote comes from: the ``dvc_remote`` parameter, else ``$WANDA_DVC_REMOTE``, else a
remote already configured in the repository (``dvc remote add -d``). A URL given by parameter or
environment is written to ``.dvc/config.local`` (git-ignored by DVC), never to ``.dvc/config``.
Credentials never go through here: S3 keys come from the worker's environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or an AWS profile), SSH keys from its agent or
``~/.ssh``; options that hold secrets are refused.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wanda.errors import ConfigError

from . import dvc

log = logging.getLogger(__name__)

REMOTE_ENV = "WANDA_DVC_REMOTE"
# scheme -> (DVC plugin module, pip requirement that provides it); local paths need none
SCHEMES: dict[str, tuple[str, str] | None] = {
    "": None, "file": None,
    "s3": ("dvc_s3", "dvc[s3]"), "ssh": ("dvc_ssh", "dvc[ssh]"),
    "gs": ("dvc_gs", "dvc[gs]"), "azure": ("dvc_azure", "dvc[azure]"),
}
# Options that carry secrets: they belong in the worker's environment or credential files.
SECRET_OPTIONS = frozenset({"access_key_id", "secret_access_key", "session_token", "password", "passphrase",
                            "key_file", "account_key", "sas_token", "connection_string", "client_secret",
                            "credentialpath", "keyfile"})


class RemoteParams(BaseModel):
    """The remote part of a scheduled flow's parameters (field names are the flow's)."""

    model_config = ConfigDict(extra="forbid")

    dvc_remote: str | None = Field(None, description=f"URL or path; None: ${REMOTE_ENV}, else the "
                                   "repository's default remote")
    dvc_remote_name: str = Field("wanda", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    dvc_remote_options: dict[str, str] = Field(default_factory=dict, description="non-secret options, e.g. "
                                               "endpointurl, region, user, port")
    pull: bool = True
    push: bool = True
    run_cache: bool = Field(True, description="also pull/push DVC's run cache (stage results by content)")

    @field_validator("dvc_remote")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else check_url(value.strip())

    @field_validator("dvc_remote_options")
    @classmethod
    def _options(cls, value: dict[str, str]) -> dict[str, str]:
        secret = sorted(k for k in value if k.lower() in SECRET_OPTIONS)
        if secret:
            raise ValueError(f"{', '.join(secret)} hold secrets: give them to the worker's environment "
                             "(AWS_ACCESS_KEY_ID, ...) or credential files, never as parameters")
        return value


def check_url(url: str) -> str:
    """The URL if DVC can use it here; ValueError naming what is wrong or missing."""
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme if len(parsed.scheme) > 1 else ""  # "C:" is a drive, not a scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}; allowed: a local path, file://, "
                         f"{', '.join(s + '://' for s in SCHEMES if s and s != 'file')}")
    if parsed.password:
        raise ValueError("the URL holds a password; give credentials to the worker's environment instead")
    plugin = SCHEMES[scheme]
    if plugin and importlib.util.find_spec(plugin[0]) is None:
        raise ValueError(f"{scheme}:// remotes need the {plugin[0]} package, which is not installed here "
                         f"(pip install '{plugin[1]}')")
    return url


def validated(model: type[BaseModel], values: dict) -> BaseModel:
    """``model(**values)``; a ConfigError naming the field instead of pydantic's report."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"])) or model.__name__
        raise ConfigError(field, err["msg"].removeprefix("Value error, ")) from None


def _absolute(url: str) -> str:
    # DVC reads a relative path in config.local relative to .dvc/, not to where the user stood.
    parsed = urllib.parse.urlparse(url)
    if len(parsed.scheme) > 1:
        return url
    return str(Path(url).expanduser().resolve())


def configure(root: Path, params: RemoteParams, sink: Callable[[str], None] | None = None) -> str:
    """Make ``params.dvc_remote_name`` the repository's default remote, in ``.dvc/config.local``
    when the URL comes from a parameter or the environment. Returns the remote's name."""
    url = params.dvc_remote or os.environ.get(REMOTE_ENV, "").strip() or None
    name = params.dvc_remote_name
    if url is None:
        from .dvc_places import dvc_remote_url

        if dvc_remote_url(root) is None:
            raise ConfigError("dvc_remote", f"no DVC remote: pass dvc_remote, set ${REMOTE_ENV}, or configure "
                              "one in the repository (dvc remote add -d NAME URL)")
        return _default_remote_name(root)
    try:
        url = check_url(url)
    except ValueError as exc:
        raise ConfigError("dvc_remote", str(exc)) from None
    dvc.run(["remote", "add", "--local", "--force", "--default", name, _absolute(url)], root, sink)
    for key, value in params.dvc_remote_options.items():
        dvc.run(["remote", "modify", "--local", name, key, value], root, sink)
    return name


def _default_remote_name(root: Path) -> str:
    from dvc.config import Config

    return Config(dvc_dir=str(root / ".dvc"))["core"]["remote"]


def pull(root: Path, name: str, run_cache: bool = True, sink: Callable[[str], None] | None = None) -> None:
    """``dvc pull``; outputs the remote does not hold yet (a first run) are not an error."""
    remote_dir = _local_dir(root, name)
    if remote_dir is not None and not remote_dir.exists():
        log.info("DVC remote %s (%s) is empty: nothing to pull", name, remote_dir)
        return
    dvc.run(["pull", "--remote", name, "--allow-missing", "--run-cache" if run_cache else "--no-run-cache"],
            root, sink)


def push(root: Path, name: str, run_cache: bool = True, sink: Callable[[str], None] | None = None) -> None:
    dvc.run(["push", "--remote", name, "--run-cache" if run_cache else "--no-run-cache"], root, sink)


def _local_dir(root: Path, name: str) -> Path | None:
    from dvc.config import Config

    url = str(Config(dvc_dir=str(root / ".dvc"))["remote"][name]["url"])
    parsed = urllib.parse.urlparse(url)
    if len(parsed.scheme) > 1 and parsed.scheme != "file":
        return None
    path = Path(parsed.path if parsed.scheme == "file" else url)
    return path if path.is_absolute() else root / ".dvc" / path


@contextmanager
def synced(root: Path, params: RemoteParams, sink: Callable[[str], None] | None = None,
           on_push_failure: Callable[[str], None] | None = None) -> Iterator[str]:
    """Pull before the body, push after it, also when it raised (its error then wins over a
    failed push, which goes to ``on_push_failure``)."""
    name = configure(root, params, sink)
    if params.pull:
        pull(root, name, params.run_cache, sink)
    try:
        yield name
    except BaseException:
        if params.push:
            try:
                push(root, name, params.run_cache, sink)
            except Exception as exc:  # noqa: BLE001 - the body's error is the one to report
                (on_push_failure or log.warning)(f"dvc push after the failed run failed too: {exc}")
        raise
    if params.push:
        push(root, name, params.run_cache, sink)


def redact(url: str) -> str:
    """A URL fit for a log line: no user information."""
    return re.sub(r"//[^/@]*@", "//", url)
