"""``wanda-pipeline deploy | serve | rollback``: subcommand builders and handlers.

``flows/cli.py`` hooks them in with ``add_*_parser(sub)`` and its ``COMMANDS``. Exit codes as
there: 0 success, 1 failure, 2 invalid parameters.
"""
from __future__ import annotations

import argparse

from flows.cli_release import EXIT_OK, _root, _tracking_options, tracking_config


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _deploy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefect-file", default="deploy/prefect.yaml",
                        help="deployments file, relative to the repository (default: deploy/prefect.yaml)")
    parser.add_argument("--name", action="append", metavar="DEPLOYMENT",
                        help="only these deployments (default: all in the file)")
    parser.add_argument("--paused", action="store_true", help="register the schedules inactive")


def add_deploy_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("deploy", help="register the Prefect deployments of deploy/prefect.yaml on the "
                            "server in $PREFECT_API_URL (schedules, parameters, work pool)")
    _deploy_options(parser)
    parser.add_argument("--pool", help="work pool (default: the file's); it must exist")
    parser.add_argument("--env", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="non-secret environment for the flow runs, e.g. MLFLOW_TRACKING_URI=http://... "
                        "(secrets belong in the worker's environment)")
    parser.add_argument("--json", action="store_true")
    return parser


def add_serve_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("serve", help="run the deployments' schedules in this process (no work pool or "
                            "worker; one box)")
    _deploy_options(parser)
    return parser


def add_rollback_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("rollback", help="move the champion alias back to the previous released version")
    parser.add_argument("--to", metavar="VERSION", help="restore this version (it must have passed the gate); "
                        "default: the one the previous alias names")
    parser.add_argument("--reason", default="rolled back by an operator", help="recorded on the demoted version")
    _tracking_options(parser)
    return parser


def _specs(args):
    from flows.deployments import read_specs

    root = _root(args)
    return root, read_specs(root / args.prefect_file, args.name)


def cmd_deploy(args) -> int:
    import json

    from flows.deployments import register

    root, specs = _specs(args)
    ids = register(specs, root, args.pool, dict(args.env), args.paused)
    if args.json:
        print(json.dumps(ids, indent=2))
    else:
        for name, deployment_id in ids.items():
            print(f"{name}  {deployment_id}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from flows.deployments import serve

    root, specs = _specs(args)
    serve(specs, root, args.paused)
    return EXIT_OK


def cmd_rollback(args) -> int:
    from flows.rollback import run_rollback

    root = _root(args)
    outcome = run_rollback(tracking_config(args, root), root, args.to, args.reason)
    if args.json:
        print(outcome.model_dump_json(indent=2))
    else:
        print(f"{outcome.model}: champion {outcome.champion_before} -> {outcome.champion_after}; "
              f"previous {outcome.previous_after}; version {outcome.champion_before} tagged rolled_back")
    return EXIT_OK


COMMANDS = {"deploy": cmd_deploy, "serve": cmd_serve, "rollback": cmd_rollback}
