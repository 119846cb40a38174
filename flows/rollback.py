"""Roll a release back: move ``champion`` to the version before it (``previous``, or a chosen one).

Runs under the release gate's lock (:func:`flows.release.gate_lock`), so it cannot interleave
with a gate run. After it:
- ``champion`` names the restored version;
- ``previous`` names the newest gate-passed version older than the restored one that was never
  rolled back (so a second rollback goes one further step back), or is removed when none is left;
- the demoted version is tagged ``wanda.gate=rolled_back`` with the reason and the time, so the
  gate's history and ``wanda-pipeline audit`` show it; its weights and run stay untouched.
Only versions the gate passed (and that were not rolled back) can be restored.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from wanda.errors import ConfigError, WandaError

from .release import CHAMPION, PREVIOUS, _alias_version, gate_lock
from tasks.params import TrackingConfig

from .mlflow_uris import TAG, get_client, resolve_tracking
from .tracking import tracking_config_from_params

log = logging.getLogger(__name__)

ROLLED_BACK = "rolled_back"


class RollbackOutcome(BaseModel):
    model: str
    champion_before: str
    champion_after: str
    previous_after: str | None
    reason: str


def _restorable(version) -> bool:
    tags = version.tags or {}
    return tags.get(f"{TAG}gate") == "passed"


def run_rollback(config: TrackingConfig | None = None, root: str | Path = ".", to: str | None = None,
                 reason: str = "rolled back", lock_timeout_s: float = 300.0, client=None) -> RollbackOutcome:
    """Move ``champion`` of ``config.registered_model`` back (see the module docstring)."""
    root = Path(root).resolve()
    config = config or tracking_config_from_params(root)
    resolved = resolve_tracking(config, root)
    client = client or get_client(resolved)
    model = config.registered_model
    with gate_lock(client, resolved, model, timeout_s=lock_timeout_s):
        champion = _alias_version(client, model, CHAMPION)
        if champion is None:
            raise WandaError(f"{model} has no champion: nothing to roll back")
        if to is None:
            target = _alias_version(client, model, PREVIOUS)
            if target is None:
                raise WandaError(f"{model} has no previous version to roll back to (champion is version "
                                 f"{champion.version}); name one with --to VERSION")
        else:
            target = client.get_model_version(model, str(to))
        if str(target.version) == str(champion.version):
            raise ConfigError("to", f"version {target.version} is the champion already")
        if not _restorable(target):
            raise ConfigError("to", f"version {target.version} did not pass the release gate "
                              f"(wanda.gate={(target.tags or {}).get(f'{TAG}gate')})")
        before = str(champion.version)
        client.set_registered_model_alias(model, CHAMPION, str(target.version))
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        client.set_model_version_tag(model, before, f"{TAG}gate", ROLLED_BACK)
        client.set_model_version_tag(model, before, f"{TAG}gate.reasons", f"rolled back at {now}: {reason}"[:4000])
        client.set_model_version_tag(model, before, f"{TAG}rolled_back_at", now)
        older = _older_passed(client, model, int(target.version))
        if older is None:
            if _alias_version(client, model, PREVIOUS) is not None:
                client.delete_registered_model_alias(model, PREVIOUS)
        else:
            client.set_registered_model_alias(model, PREVIOUS, str(older.version))
    log.info("%s: champion %s -> %s (previous %s): %s", model, before, target.version,
             older.version if older else None, reason)
    return RollbackOutcome(model=model, champion_before=before, champion_after=str(target.version),
                           previous_after=str(older.version) if older else None, reason=reason)


def _older_passed(client, model: str, below: int):
    versions = [v for v in client.search_model_versions(f"name = '{model}'")
                if int(v.version) < below and _restorable(v)]
    return max(versions, key=lambda v: int(v.version), default=None)
