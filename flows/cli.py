"""``wanda-pipeline``: run the pipeline, run a sweep, show what is cached, show the graph.

Exit codes: 0 success; 2 invalid parameters (the message names the field and the allowed
values); 1 any other failure (a stage, DVC, Prefect). Failures print one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks.offline import apply_offline_env

apply_offline_env()  # before anything imports the Hugging Face libraries

from flows.cli_release import (add_audit_parser, add_release_parser, add_track_parser,  # noqa: E402
                               cmd_audit, cmd_release, cmd_track)
from flows.cli_deploy import COMMANDS as DEPLOY_COMMANDS  # noqa: E402
from flows.cli_deploy import add_deploy_parser, add_rollback_parser, add_serve_parser  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_PARAMS = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanda-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="repository root or a folder inside it (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)

    def params_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", metavar="FILE", help="parameter file (default: params.yaml); its contents, "
                       "with the overrides, become params.yaml, which DVC reads")
        p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one parameter, e.g. -S masks.sparsity=0.6 (YAML-typed value)")
        p.add_argument("--no-run-cache", action="store_true", help="recompute stale stages even when DVC's run "
                       "cache holds their outputs")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    run = sub.add_parser("run", help="run the whole pipeline (cached stages do no work)")
    params_options(run)
    run.add_argument("--force", action="store_true", help="re-run every stage")
    run.add_argument("--target", action="append", metavar="STAGE", help="run only up to these stages")
    run.add_argument("--no-track", action="store_true", help="do not log the run to MLflow nor register the model")
    run.add_argument("--release", action="store_true", help="then judge the registered version with the release "
                     "gate (the gate section of the parameters); a rejection exits 1")

    sweep = sub.add_parser("sweep", help="several sparsities / patterns / methods / calibration sizes")
    params_options(sweep)
    sweep.add_argument("--sparsity", help="comma-separated, e.g. 0.3,0.4,0.5,0.6,0.7")
    sweep.add_argument("--pattern", help="comma-separated, e.g. unstructured,4:8,2:4 (N:M fixes the sparsity)")
    sweep.add_argument("--method", help="comma-separated, e.g. wanda,magnitude")
    sweep.add_argument("--nsamples", help="comma-separated calibration sizes, e.g. 8,16,32")
    sweep.add_argument("-A", "--axis", action="append", default=[], metavar="KEY=V1,V2",
                       help="any calibration.*, statistics.* or masks.* parameter")
    sweep.add_argument("--name", default="sweep", help="sweep name: sweeps/NAME/dvc.yaml (default: sweep)")
    sweep.add_argument("--workers", type=int, help="local points run in parallel (default: one per 4 cores)")
    sweep.add_argument("--runner", metavar="RUNNER", help="where points run: local, dask://HOST:PORT (a Dask "
                       "scheduler) or ray://HOST:PORT (a Ray cluster's client port); default: sweep.runner of "
                       "the parameters, else local")

    status = sub.add_parser("status", help="which stages are cached, stale or missing, and why")
    status.add_argument("--json", action="store_true")
    status.add_argument("--exit-code", action="store_true", help="exit 1 unless every stage is cached")

    dag = sub.add_parser("dag", help="the stage graph (dvc dag)")
    dag.add_argument("target", nargs="?", help="a stage; default: every pipeline")
    fmt = dag.add_mutually_exclusive_group()
    fmt.add_argument("--mermaid", action="store_const", const="mermaid", dest="fmt")
    fmt.add_argument("--dot", action="store_const", const="dot", dest="fmt")
    fmt.add_argument("--md", action="store_const", const="md", dest="fmt")

    gen = sub.add_parser("dvc-yaml", help="regenerate dvc.yaml from tasks/graph.py")
    gen.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs from the generated one")
    add_track_parser(sub)
    add_release_parser(sub)
    add_audit_parser(sub)
    add_rollback_parser(sub)
    add_deploy_parser(sub)
    add_serve_parser(sub)
    return parser


def _axes(args) -> list[str]:
    axes = list(args.axis)
    for flag, key in (("sparsity", "masks.sparsity"), ("pattern", "masks.pattern"), ("method", "masks.method"),
                      ("nsamples", "calibration.nsamples")):
        value = getattr(args, flag)
        if value:
            axes.append(f"{key}={value}")
    return axes


def _print_outcomes(result: dict) -> None:
    from flows.execution import StageOutcome, outcomes_table

    rows = outcomes_table([StageOutcome(**o) for o in result["outcomes"]])
    width = max(len(r["stage"]) for r in rows)
    for row in rows:
        extra = (f"  on {row['worker']}" if row["worker"] else "") + (f"  ({row['reason']})" if row["reason"] else "")
        print(f"{row['stage'].ljust(width)}  {row['action']:<9}  {row['task s']:>7.2f}s{extra}")


def _validate_first(args):
    """Parameters are checked before Prefect or DVC start: bad input fails in a second.
    Returns ``(root, params)``."""
    from flows import dvc
    from flows.prepare import preflight, resolve_params_file
    from tasks.params import load_params

    root = dvc.find_root(args.repo)
    params = load_params(resolve_params_file(root, args.params), args.overrides)
    _check_targets(getattr(args, "target", None))
    preflight(params, root)
    _check_tracking(args, params, root)
    if args.command == "sweep":
        from flows.runners import sweep_settings
        from flows.sweep import parse_axes
        from flows.sweep_plan import plan_sweep
        from tasks.params import apply_overrides, read_yaml

        data = apply_overrides(read_yaml(resolve_params_file(root, args.params)), args.overrides)
        plan_sweep(args.name, parse_axes(_axes(args)), params, data)
        sweep_settings(params.sweep, args.runner)
    return root, params


def _nothing_to_run(args, root, params) -> bool:
    """A plain ``run --no-track`` whose stages are all current does no work, so it answers
    without starting Prefect (its temporary server alone takes 10-20 s on 2 cores): true when no
    flag asks for work (``--force``, overrides, tracking, ``--release``, ``--json``), DVC finds
    every stage needed up to date, and no content check forces one (a model source or text
    changed behind an unchanged path)."""
    from flows import dvc
    from flows.prepare import content_force_reasons
    from tasks import graph

    if args.force or args.overrides or args.release or not args.no_track or args.json:
        return False
    wanted = set(graph.order()) if not args.target else {
        name for target in args.target for name in (target, *graph.ancestors(target))}
    if set(content_force_reasons(root, params)) & wanted:
        return False
    return not dvc.status(root, [name for name in graph.order() if name in wanted])


def _check_tracking(args, params, root: Path) -> None:
    """A run that will log to MLflow reaches its server before any stage runs (one line within
    15 s, not minutes of retries after the work); the section's own secret names are redacted."""
    from flows.redact import add_query_keys

    if params.tracking is not None:
        add_query_keys(params.tracking.secret_query_params)
    if args.command == "run" and (not args.no_track or args.release):
        from flows.mlflow_uris import check_reachable, resolve_tracking

        check_reachable(resolve_tracking(params.tracking, root))


def _check_targets(targets: list[str] | None) -> None:
    from tasks import graph
    from wanda.errors import ConfigError

    for target in targets or []:
        if target not in graph.by_name():
            raise ConfigError("--target", f"unknown stage {target!r}", ", ".join(graph.order()))


def cmd_run(args) -> int:
    from flows import dvc
    from flows.run_lock import workspace_lock

    started = time.perf_counter()
    with workspace_lock(dvc.find_root(args.repo)):  # a second run is refused before anything is written
        root, params = _validate_first(args)
        if _nothing_to_run(args, root, params):
            print(f"every stage is cached: nothing to run (Prefect not started); done in "
                  f"{time.perf_counter() - started:.1f}s")
            return EXIT_OK
        from flows.pipeline import prune_pipeline  # Prefect: seconds of imports, after the parameters are checked

        result = prune_pipeline(params_file=args.params, overrides=args.overrides, repo=args.repo,
                                force=args.force, run_cache=not args.no_run_cache, targets=args.target,
                                track=not args.no_track, release=args.release)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return EXIT_OK
    _print_outcomes(result)
    metrics = result.get("metrics") or {}
    if "perplexity" in metrics:
        dense = metrics.get("dense.perplexity")
        print(f"perplexity {metrics['perplexity']:.3f}" + (f" (dense {dense:.3f})" if dense else ""))
    tracked = result.get("tracking")
    if tracked and tracked.get("duplicate_of"):
        print(f"MLflow run {tracked['run_id']}; the pruned model is byte-identical to {tracked['model_name']} "
              f"version {tracked['duplicate_of']}: not registered again")
    elif tracked:
        print(f"MLflow run {tracked['run_id']}; registered {tracked['model_name']} version {tracked['model_version']}")
    if result.get("release"):
        decision = result["release"]
        print(f"release gate: PASSED; champion is now version {decision['champion_after']}")
    print(f"done in {result['seconds']:.1f}s")
    return EXIT_OK


def cmd_sweep(args) -> int:
    from flows import dvc
    from flows.run_lock import workspace_lock

    with workspace_lock(dvc.find_root(args.repo)):  # one run at a time in a workspace
        _validate_first(args)
        from flows.sweep import sweep  # Prefect: seconds of imports, after the parameters are checked

        result = sweep(axes=_axes(args), name=args.name, params_file=args.params, overrides=args.overrides,
                       repo=args.repo, workers=args.workers, run_cache=not args.no_run_cache, runner=args.runner)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return EXIT_OK
    _print_outcomes(result)
    print(result["table"])
    from flows.sweep import placement_table

    print(placement_table(result["placement"]), end="")
    print(f"plot: {result['plot']}")
    print(f"where the points ran: {result['placement_file']}")
    print(f"done in {result['seconds']:.1f}s")
    return EXIT_OK


def cmd_status(args) -> int:
    from flows.status import UP_TO_DATE, as_json, pipeline_status, render

    states = pipeline_status(args.repo)
    print(json.dumps(as_json(states), indent=2) if args.json else render(states))
    if args.exit_code and any(s.state != UP_TO_DATE for s in states):
        return EXIT_FAILED
    return EXIT_OK


def cmd_dag(args) -> int:
    from flows import dvc

    print(dvc.dag(dvc.find_root(args.repo), args.fmt, args.target), end="")
    return EXIT_OK


def cmd_dvc_yaml(args) -> int:
    from flows import dvc
    from tasks.graph import main_dvc_yaml
    from wanda.atomic import atomic_file

    try:
        root = dvc.find_root(args.repo)
    except dvc.DvcError:
        root = Path(args.repo).resolve()
    path = root / "dvc.yaml"
    text = main_dvc_yaml()
    if args.check:
        if not path.is_file() or path.read_text() != text:
            from tasks.graph import dvc_yaml_differences

            print(f"{path} differs from tasks/graph.py; run `wanda-pipeline dvc-yaml`", file=sys.stderr)
            for line in dvc_yaml_differences(path.read_text()) if path.is_file() else []:
                print(f"  {line}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    with atomic_file(path, "w") as handle:
        handle.write(text)
    print(f"wrote {path}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "status": cmd_status, "dag": cmd_dag, "dvc-yaml": cmd_dvc_yaml,
            "track": cmd_track, "release": cmd_release, "audit": cmd_audit, **DEPLOY_COMMANDS}


# Commands that start DVC, stage processes and Prefect's temporary server.
GUARDED = ("run", "sweep")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    from flows.redact import install
    from flows.run_lock import WorkspaceBusy
    from wanda.errors import ConfigError

    install()  # every print and log line of this process goes through the credential redaction
    args = _parser().parse_args(argv)
    if argv is None and args.command in GUARDED:  # a program of its own, not a call from Python
        from flows.processes import guard

        guard()  # DVC, the stages and Prefect's server die with this process
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"wanda-pipeline: invalid parameters: {_one_line(exc)}", file=sys.stderr)
        return EXIT_PARAMS
    except WorkspaceBusy as exc:
        print(f"wanda-pipeline: {args.command} refused: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        if type(exc).__name__ == "ReleaseInterrupted":  # flows.release: says which state the release left
            print(f"wanda-pipeline: {_one_line(exc)}", file=sys.stderr)
            return 130
        print("wanda-pipeline: interrupted (finished stages are kept; unfinished ones left nothing)", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback is in the Prefect logs
        print(f"wanda-pipeline: {args.command} failed: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
