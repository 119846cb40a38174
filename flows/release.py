"""Release gate: ``release_gate`` (Prefect flow) and ``run_release`` (plain function).

One gate run: take the lock for the registered model, read the current ``champion``, verify the
candidate's lineage against the bytes, decide with :func:`flows.gate_policy.decide`, then either move
``champion`` to the candidate (the old champion becomes ``previous``) or tag the candidate
``rejected``. The decision is written as JSON (and logged to the candidate's run) and, in the
flow, as a Prefect table artifact; a rejection raises :class:`GateRejected`, so a scheduled flow
run ends Failed and the CLI exits non-zero.

Concurrency. MLflow has no compare-and-set on aliases, so the read-decide-move sequence runs
under a lock per registered model:
- local backends (sqlite/file): ``fcntl.flock`` on a file next to the store; the kernel drops it
  when a holder dies, so a crash never leaves it held;
- servers: a registry mutex, i.e. a registered model named ``<model>.gate-lock``; creating a
  registered model is atomic and unique by name in every backend, so exactly one gate succeeds.
  A lock older than ``stale_after_s`` (a holder that died) is broken.
Aliases move ``previous`` first, then ``champion``: a crash in between leaves both pointing at
the old champion (consistent, and the next gate run repairs it), never a ``previous`` that skips
a version. After the move both aliases are read back and compared.
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import BaseModel, Field

from tasks.lineage import ArtifactCheck, lineage_ok
from tasks.params import GateCriteria, TrackingConfig
from wanda.atomic import write_json
from wanda.errors import WandaError

from .audit import ModelRef, get_version, parse_ref, verify_version
from .gate_policy import GateDecision, GateMetrics, decide
from .mlflow_uris import TAG, ResolvedTracking, get_client, resolve_tracking, safe_name
from .redact import install_logging, redact, redact_value
from .tracking import params_section, tracking_config_from_params

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
REJECTED_TAG = "rejected"
DEFAULT_DECISION = Path("artifacts") / "gate" / "decision.json"
_TAG_LIMIT = 4000  # well below MLflow's registry tag limit; the JSON carries everything


class GateRejected(WandaError):
    """The candidate failed the gate; ``outcome`` holds the decision and its reasons."""

    def __init__(self, outcome: "ReleaseOutcome"):
        self.outcome = outcome
        super().__init__(f"{outcome.model} version {outcome.version} {outcome.decision.summary()}")


class AliasConflict(WandaError):
    """Aliases read back differently from what the gate set: something bypassed the lock."""


class ReleaseOutcome(BaseModel):
    model: str
    version: str
    run_id: str | None
    decision: GateDecision
    champion_before: str | None
    champion_after: str | None
    previous_after: str | None
    lineage_checks: list[ArtifactCheck] = Field(default_factory=list)
    decision_path: str | None = None

    @property
    def passed(self) -> bool:
        return self.decision.passed


def criteria_from_params(root: str | Path, params_file: str | Path = "params.yaml") -> GateCriteria:
    """The ``gate`` section of the parameter file (defaults when absent); errors name the field."""
    return params_section(root, params_file, "gate", GateCriteria)


# ----------------------------------------------------------------------------- lock

@contextmanager
def gate_lock(client: "MlflowClient", resolved: ResolvedTracking, model: str, timeout_s: float = 300.0,
              stale_after_s: float = 900.0) -> Iterator[None]:
    """Serialize gate runs for ``model`` (see the module docstring)."""
    if resolved.local and resolved.store_dir is not None:
        with _file_lock(resolved.store_dir / f".gate-{safe_name(model)}.lock", timeout_s):
            yield
    else:
        with _registry_lock(client, f"{model}.gate-lock", timeout_s, stale_after_s):
            yield


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gate lock {path} still held after {timeout_s:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def _registry_lock(client: "MlflowClient", name: str, timeout_s: float, stale_after_s: float) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    holder = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(name, tags={f"{TAG}lock_holder": holder},
                                           description="release gate lock (transient)")
            break
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
            _break_if_stale(client, name, stale_after_s)
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate lock {name!r} still held after {timeout_s:.0f} s") from None
            time.sleep(0.2)
    try:
        yield
    finally:
        try:
            current = client.get_registered_model(name)
            if (current.tags or {}).get(f"{TAG}lock_holder") == holder:
                client.delete_registered_model(name)
        except MlflowException as exc:
            log.warning("could not release gate lock %s: %s", name, exc)


def _break_if_stale(client: "MlflowClient", name: str, stale_after_s: float) -> None:
    from mlflow.exceptions import MlflowException

    try:
        lock = client.get_registered_model(name)
    except MlflowException:
        return  # released meanwhile
    age = time.time() - (lock.creation_timestamp or 0) / 1000.0
    if age > stale_after_s:
        log.warning("breaking stale gate lock %s (%.0f s old, holder %s)", name, age,
                    (lock.tags or {}).get(f"{TAG}lock_holder"))
        try:
            client.delete_registered_model(name)
        except MlflowException:
            pass


# ----------------------------------------------------------------------------- metrics

def version_metrics(client: "MlflowClient", version) -> tuple[GateMetrics, GateMetrics | None]:
    """``(candidate, dense)`` figures of a version, from its run's metrics and tags."""
    if not version.run_id:
        return GateMetrics(evaluation_ok=False), None
    run = client.get_run(version.run_id)
    metrics, tags = dict(run.data.metrics), dict(run.data.tags)
    own = {k: v for k, v in metrics.items() if not k.startswith(("dense.", "delta."))}
    candidate = GateMetrics.from_flat(
        own, eval_tokens_digest=tags.get(f"{TAG}eval_tokens_digest"),
        evaluation_ok=tags.get(f"{TAG}evaluation_status") == "ok",
    )
    dense_flat = {k[len("dense."):]: v for k, v in metrics.items() if k.startswith("dense.")}
    dense = None
    if dense_flat:
        dense = GateMetrics.from_flat(
            dense_flat, eval_tokens_digest=tags.get(f"{TAG}dense_eval_tokens_digest"),
            evaluation_ok=tags.get(f"{TAG}dense_evaluation_status", "ok") == "ok",
        )
    return candidate, dense


def _alias_version(client: "MlflowClient", model: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException:
        return None  # no such alias yet


# ----------------------------------------------------------------------------- gate

def run_release(
    candidate: str | ModelRef | None = None,
    criteria: GateCriteria | dict[str, Any] | None = None,
    config: TrackingConfig | None = None,
    root: str | Path = ".",
    decision_path: str | Path | None = None,
    lock_timeout_s: float = 300.0,
    verify_lineage: bool = True,
    client: "MlflowClient | None" = None,
) -> ReleaseOutcome:
    """Judge one registered version and move the aliases. Never raises on a rejection: the
    caller decides how to fail (the flow raises, the CLI exits 1). ``candidate``: a reference
    (``NAME/VERSION``, ``NAME@ALIAS``) or None for the newest version of the configured model;
    ``criteria``/``config`` default to the ``gate``/``tracking`` sections of ``root/params.yaml``."""
    root = Path(root).resolve()
    config = config or tracking_config_from_params(root)
    if criteria is None:
        criteria = criteria_from_params(root)
    elif not isinstance(criteria, GateCriteria):
        criteria = GateCriteria(**criteria)
    resolved = resolve_tracking(config, root)
    client = client or get_client(resolved)
    if candidate is None:
        ref = ModelRef(name=config.registered_model)
    else:
        ref = candidate if isinstance(candidate, ModelRef) else parse_ref(candidate, default_alias=None)
    version = get_version(client, ref)
    model, number = version.name, str(version.version)

    # Lineage is verified before the lock: it only reads, and it is the slow part (hashing).
    checks: list[ArtifactCheck] = []
    if verify_lineage:
        _, checks = verify_version(client, version, root)
    ok, problems = lineage_ok(checks) if verify_lineage else (True, [])
    if verify_lineage and not checks:
        ok, problems = False, ["nothing to verify"]
    cand_metrics, dense_metrics = version_metrics(client, version)

    path = Path(decision_path) if decision_path else root / DEFAULT_DECISION
    state = {"before": None, "committed": False}
    try:
        with gate_lock(client, resolved, model, timeout_s=lock_timeout_s):
            recover_cut_short(client, model, path)
            champion = _alias_version(client, model, CHAMPION)
            champion_metrics = None
            if champion is not None and str(champion.version) != number:
                champion_metrics, _ = version_metrics(client, champion)
            decision = decide(cand_metrics, dense_metrics, champion_metrics, criteria, ok, problems)
            before = str(champion.version) if champion is not None else None
            state["before"] = before
            previous = _alias_version(client, model, PREVIOUS)
            moves = decision.passed and before != number
            outcome = ReleaseOutcome(
                model=model, version=number, run_id=version.run_id, decision=decision, champion_before=before,
                champion_after=number if decision.passed else before,
                previous_after=before if moves and before is not None else (
                    str(previous.version) if previous else None),
                lineage_checks=checks, decision_path=str(path))
            # The commit, with SIGTERM/SIGINT held until it is whole: the decision record first
            # (hidden), then the alias move (the commit point), then the tags and the record's
            # final name. A crash (SIGKILL) in between is finished or undone by the next gate run.
            with signals_deferred():
                write_json(_pending(path), outcome.model_dump(mode="json"))
                if moves:
                    if before is not None:
                        client.set_registered_model_alias(model, PREVIOUS, before)
                    client.set_registered_model_alias(model, CHAMPION, number)
                    _verify_aliases(client, model, number, before)
                state["committed"] = True
                _finish(client, outcome, path)
        if version.run_id:
            try:
                client.log_dict(version.run_id, outcome.model_dump(mode="json"), f"gate/decision-v{number}.json")
            except Exception as exc:  # noqa: BLE001 - the decision stands; the copy in the run is a convenience
                log.warning("could not log the decision to run %s: %s", version.run_id, exc)
    except KeyboardInterrupt as exc:
        if not state["committed"] and state["before"] is None:
            try:  # interrupted before the gate read it: the champion as it stands (unchanged by this run)
                now = _alias_version(client, model, CHAMPION)
                state["before"] = str(now.version) if now is not None else None
            except Exception:  # noqa: BLE001 - the line is said either way
                pass
        raise ReleaseInterrupted(_interrupted_line(exc, model, number, state, path)) from None
    log.info("gate %s/%s: %s", model, number, decision.summary())
    return outcome


class ReleaseInterrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT during a gate run; the message says which of the two states it left."""


def _interrupted_line(exc: BaseException, model: str, number: str, state: dict, path: Path) -> str:
    cause = str(exc) or "interrupted"
    if state["committed"]:
        return (f"release interrupted ({cause}) after its commit: {model} champion is version {number}, "
                f"decision {path}")
    return (f"release interrupted ({cause}) before its commit: {model} champion unchanged "
            f"(version {state['before'] or 'none'}); nothing recorded for version {number}")


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT wait until the block is done, then raise KeyboardInterrupt (main thread
    only: elsewhere Python cannot change handlers, and the next gate run repairs a cut)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {signal.Signals(caught[0]).name}")


def _pending(path: Path) -> Path:
    return path.parent / f".{path.name}.pending"


def _finish(client: "MlflowClient", outcome: ReleaseOutcome, path: Path) -> None:
    """The rest of a committed decision: the version's tags, then the record under its name."""
    _tag_version(client, outcome.model, outcome.version, outcome.decision)
    os.replace(_pending(path), path)


def recover_cut_short(client: "MlflowClient", model: str, path: Path) -> None:
    """Under the gate lock: finish or undo a gate run that died mid-commit (its hidden decision
    record is still there), and remove temporary files of interrupted writes."""
    import json

    strays = [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{_pending(path).name}.tmp-*")]
    for stray in strays:
        stray.unlink(missing_ok=True)
        log.warning("removed %s, left by an interrupted write of the decision record", stray)
    pending = _pending(path)
    if not pending.is_file():
        return
    try:
        outcome = ReleaseOutcome.model_validate(json.loads(pending.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        pending.unlink(missing_ok=True)
        log.warning("removed the unreadable decision record %s of a gate run cut short (%s)", pending, exc)
        return
    if outcome.model != model:
        return
    champion = _alias_version(client, model, CHAMPION)
    now = str(champion.version) if champion is not None else None
    if now == outcome.champion_after:  # the commit happened (or a rejection left it as it was)
        _finish(client, outcome, path)
        log.warning("finished the gate decision on %s version %s that was cut short after its commit",
                    model, outcome.version)
    else:
        pending.unlink(missing_ok=True)
        log.warning("discarded the gate decision on %s version %s that was cut short before its commit "
                    "(champion is still version %s)", model, outcome.version, now)


def _verify_aliases(client: "MlflowClient", model: str, champion: str, previous: str | None) -> None:
    now_champion = _alias_version(client, model, CHAMPION)
    now_previous = _alias_version(client, model, PREVIOUS)
    if now_champion is None or str(now_champion.version) != champion or (
            previous is not None and (now_previous is None or str(now_previous.version) != previous)):
        raise AliasConflict(
            f"{model}: aliases read back champion={getattr(now_champion, 'version', None)}, "
            f"previous={getattr(now_previous, 'version', None)}; expected {champion}/{previous}. "
            "Another writer moved them outside the gate lock.")


def _tag_version(client: "MlflowClient", model: str, version: str, decision: GateDecision) -> None:
    reasons = "; ".join(c.line() for c in decision.reasons)[:_TAG_LIMIT]
    client.set_model_version_tag(model, version, f"{TAG}gate", "passed" if decision.passed else "rejected")
    client.set_model_version_tag(model, version, f"{TAG}gate.reasons", reasons)
    client.set_model_version_tag(model, version, f"{TAG}gate.decided_at", decision.decided_at)
    if decision.passed:
        try:  # a version that failed before and passes now is no longer rejected
            client.delete_model_version_tag(model, version, REJECTED_TAG)
        except Exception:  # noqa: BLE001 - tag absent
            pass
    else:
        client.set_model_version_tag(model, version, REJECTED_TAG, decision.summary()[:_TAG_LIMIT])


# ----------------------------------------------------------------------------- Prefect

def decision_markdown(outcome: ReleaseOutcome) -> str:
    verdict = "PASSED" if outcome.passed else "REJECTED"
    return (f"**{outcome.model} v{outcome.version}: {verdict}** (champion before: {outcome.champion_before}, "
            f"after: {outcome.champion_after}, previous: {outcome.previous_after})")


def _artifact_key(model: str) -> str:
    from .reporting import artifact_key

    return artifact_key("gate", model)


def _table_rows(outcome: ReleaseOutcome) -> list[dict[str, str]]:
    rows = outcome.decision.rows()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = str(value)
    return rows


try:
    from prefect import flow
    from prefect.artifacts import create_table_artifact
except ImportError:  # pragma: no cover - Prefect is an optional extra; run_release works without it
    flow = None

if flow is not None:
    @flow(name="release-gate", log_prints=True)
    def release_gate(
        candidate: str | None = None,
        criteria: dict[str, Any] | None = None,
        tracking: dict[str, Any] | None = None,
        root: str = ".",
        decision_path: str | None = None,
    ) -> dict[str, Any]:
        """The gate as a Prefect flow: a table artifact per decision; a rejection fails the run.
        ``criteria``/``tracking`` default to the sections of ``root/params.yaml``."""
        install_logging()
        outcome = run_release(candidate, criteria, TrackingConfig(**tracking) if tracking else None, root,
                              decision_path)
        create_table_artifact(key=_artifact_key(outcome.model), table=redact_value(_table_rows(outcome)),
                              description=redact(decision_markdown(outcome)))
        if not outcome.passed:
            raise GateRejected(outcome)
        return redact_value(outcome.model_dump(mode="json"))
