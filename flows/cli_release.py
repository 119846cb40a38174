"""``wanda-pipeline track | release | audit``: subcommand builders and handlers.

``flows/cli.py`` hooks them in with ``add_*_parser(sub)`` and ``COMMANDS``; ``main`` runs them
stand-alone (``python -m flows.cli_release``) with the same top-level ``--repo`` option.

Exit codes as in flows/cli.py: 0 success (release: promoted), 1 failure (release: rejected;
audit: a mismatch or a missing artifact), 2 invalid parameters.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

EXIT_OK, EXIT_FAILED, EXIT_PARAMS = 0, 1, 2

# CLI flag -> GateCriteria field (floats; "none" disables the criterion)
_CRITERIA_FLAGS = {
    "max_ppl_increase_rel": "relative perplexity increase over dense, e.g. 0.25",
    "max_ppl_increase_abs": "absolute perplexity increase over dense",
    "max_mean_acc_drop": "drop of mean zero-shot accuracy (0..1)",
    "min_sparsity": "actual overall sparsity",
    "min_speedup": "dense/sparse latency of the TensorRT-LLM engines (benchmark stage)",
    "min_param_reduction": "1 - pruned/dense parameter count (savings stage)",
    "min_decode_speedup": "pruned/dense decode tokens/s in transformers (savings stage)",
    "champion_margin": "perplexity may exceed the champion's by this fraction",
    "champion_acc_margin": "mean accuracy may trail the champion's by this much",
}


def _number_or_none(text: str) -> float | None:
    if text.strip().lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


def _tracking_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tracking (default: the tracking section of params.yaml)")
    group.add_argument("--params", metavar="FILE", default="params.yaml",
                       help="parameter file with the gate/tracking sections (default: params.yaml)")
    group.add_argument("--tracking-uri", help="MLflow tracking URI (else $MLFLOW_TRACKING_URI, else "
                       "sqlite:///<repo>/.mlflow/mlflow.db)")
    group.add_argument("--registered-model", help="registered model name")
    group.add_argument("--experiment", help="MLflow experiment name")
    group.add_argument("--json", action="store_true", help="machine-readable output")


def add_track_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("track", help="log the current pipeline run to MLflow and register its model")
    _tracking_options(parser)
    parser.add_argument("--no-register", action="store_true", help="log the run only")
    parser.add_argument("--flow-run-id", help="Prefect flow run id to tag the run with")
    return parser


def add_release_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("release", help="release gate: promote a registered version to champion or reject it")
    parser.add_argument("candidate", nargs="?", help="NAME/VERSION or NAME@ALIAS (default: the newest version "
                        "of the registered model)")
    _tracking_options(parser)
    criteria = parser.add_argument_group("criteria (default: the gate section of params.yaml; 'none' disables)")
    for name, text in _CRITERIA_FLAGS.items():
        # SUPPRESS: absent unless given, so "--min-speedup none" can disable what params.yaml sets
        criteria.add_argument(f"--{name.replace('_', '-')}", type=_number_or_none, metavar="X", help=text,
                              default=argparse.SUPPRESS)
    criteria.add_argument("--require-speed", action="store_true", default=argparse.SUPPRESS,
                          help="fail when no latency figure exists")
    criteria.add_argument("--require-zeroshot", action="store_true", default=argparse.SUPPRESS,
                          help="fail when no zero-shot accuracy exists")
    parser.add_argument("--decision", metavar="FILE", help="decision JSON (default: artifacts/gate/decision.json)")
    parser.add_argument("--lock-timeout", type=float, default=300.0, help="seconds to wait for another gate run")
    return parser


def add_audit_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("audit", help="trace a registered model version back to its inputs and verify "
                            "the artifacts still hash to what was recorded")
    parser.add_argument("model", help="NAME@ALIAS, NAME/VERSION or NAME (= NAME@champion)")
    _tracking_options(parser)
    parser.add_argument("--markdown", action="store_true", help="a markdown report to attach to a release ticket "
                        "(--json: the whole lineage and every check as JSON); exit codes as without")
    return parser


# ----------------------------------------------------------------------------- handlers


def _root(args) -> Path:
    try:
        from flows.dvc import find_root

        return find_root(getattr(args, "repo", "."))
    except Exception:  # noqa: BLE001 - auditing needs no dvc.yaml; the given folder is the root
        return Path(getattr(args, "repo", ".")).resolve()


def _config_error(section: str, exc: ValidationError):
    from wanda.errors import ConfigError

    from tasks.params import error_location

    err = exc.errors()[0]
    field = ".".join([section, *error_location(err)])
    return ConfigError(field, err["msg"].removeprefix("Value error, "))


def tracking_config(args, root: Path):
    """``tracking`` section of the params file, overridden by the command-line flags."""
    from flows.tracking import tracking_config_from_params
    from tasks.params import TrackingConfig

    config = tracking_config_from_params(root, args.params)
    values = {key: getattr(args, key) for key in ("tracking_uri", "registered_model", "experiment")
              if getattr(args, key, None)}
    try:
        return TrackingConfig(**{**config.model_dump(), **values})
    except ValidationError as exc:
        raise _config_error("tracking", exc) from None


def gate_criteria(args, root: Path):
    """``gate`` section of the params file, overridden by the command-line flags."""
    from flows.release import criteria_from_params
    from tasks.params import GateCriteria

    values = criteria_from_params(root, args.params).model_dump()
    given = vars(args)
    values.update({name: given[name] for name in (*_CRITERIA_FLAGS, "require_speed", "require_zeroshot")
                   if name in given})
    try:
        return GateCriteria(**values)
    except ValidationError as exc:
        raise _config_error("gate", exc) from None


def cmd_track(args) -> int:
    from flows.freshness import StaleState, check_trackable
    from flows.tracking import track_pipeline_run

    root = _root(args)
    config = tracking_config(args, root)  # bad tracking parameters fail first (exit 2)
    from flows.mlflow_uris import check_reachable, resolve_tracking

    check_reachable(resolve_tracking(config, root))  # a dead server: one line within 15 s
    try:  # before anything is logged: a stale or mismatched workspace is never registered
        check_trackable(root, args.params)
    except StaleState as exc:
        print("wanda-pipeline: track refused: the workspace is not the state dvc.lock records "
              "(run `wanda-pipeline run` first):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_FAILED
    logged = track_pipeline_run(root, args.params, args.flow_run_id, register=not args.no_register,
                                config=config)
    if args.json:
        print(logged.model_dump_json(indent=2))
    else:
        print(f"run {logged.run_id} in {logged.tracking_uri} (evaluation: {logged.evaluation_status})")
        if logged.duplicate_of:
            print(f"the pruned model is byte-identical to {logged.model_name} version {logged.duplicate_of}: "
                  "not registered again")
        elif logged.model_version:
            print(f"registered {logged.model_name} version {logged.model_version} from {logged.model_source}")
    return EXIT_OK


def cmd_release(args) -> int:
    from flows.release import run_release

    import signal
    import threading

    from flows.mlflow_uris import check_reachable, resolve_tracking

    if threading.current_thread() is threading.main_thread():  # SIGTERM stops it like Ctrl-C: one line
        signal.signal(signal.SIGTERM, _terminate)
    root = _root(args)
    config = tracking_config(args, root)
    check_reachable(resolve_tracking(config, root))  # a dead server: one line within 15 s
    outcome = run_release(args.candidate, gate_criteria(args, root), config, root,
                          args.decision, lock_timeout_s=args.lock_timeout)
    if threading.current_thread() is threading.main_thread():  # decided and recorded: only printing is left
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.json:
        print(outcome.model_dump_json(indent=2))
    else:
        rows = outcome.decision.rows()
        width = max(len(r["criterion"]) for r in rows)
        for row in rows:
            note = f"  ({row['note']})" if row["note"] else ""
            print(f"{row['result']:>4}  {row['criterion'].ljust(width)}  {row['value']:>14}  "
                  f"limit {row['threshold']}{note}")
        verdict = "PASSED" if outcome.passed else "REJECTED"
        print(f"{outcome.model} version {outcome.version}: {verdict}; champion {outcome.champion_before} -> "
              f"{outcome.champion_after}, previous {outcome.previous_after}; decision {outcome.decision_path}")
    return EXIT_OK if outcome.passed else EXIT_FAILED


def _terminate(signum, frame) -> None:
    import signal

    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def cmd_audit(args) -> int:
    from flows.audit import audit, format_markdown, format_report
    from wanda.errors import ConfigError

    if args.json and args.markdown:
        raise ConfigError("audit", "--json and --markdown exclude each other", "--json, --markdown or neither")
    root = _root(args)
    report = audit(args.model, root, tracking_config(args, root))
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(format_markdown(report) if args.markdown else format_report(report), end="")
    return EXIT_OK if report.ok else EXIT_FAILED


COMMANDS = {"track": cmd_track, "release": cmd_release, "audit": cmd_audit}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry with the same conventions as ``wanda-pipeline``."""
    from flows.redact import install
    from wanda.errors import ConfigError

    install()

    parser = argparse.ArgumentParser(prog="wanda-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="repository root or a folder inside it (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_track_parser(sub)
    add_release_parser(sub)
    add_audit_parser(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"wanda-pipeline: invalid parameters: {exc}", file=sys.stderr)
        return EXIT_PARAMS
    except KeyboardInterrupt as exc:
        print(f"wanda-pipeline: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user
        print(f"wanda-pipeline: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
