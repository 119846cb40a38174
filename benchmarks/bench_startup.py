"""Start-up cost of the commands that do little work, beside the same measurement of an older commit.

Issue 20, item 4: ``import wanda``, ``wanda-pipeline --help``, a parameter error, a stage process
that only decides to skip, ``status`` and a fully cached ``run --no-track`` on the tiny project
(tests/pipeline_project.py), each measured in ONE run for this checkout and for ``--base`` (default
the commit before the fast-start work), so both figures share the machine and its load.

    .venv/bin/python benchmarks/bench_startup.py [--base 1fb4895] [--reps 5] [--slow-reps 3]
        [--json results.json] [--keep DIR]

How: the base commit is checked out in a temporary ``git worktree``; each tree builds its own tiny
project with its own ``tests/pipeline_project.py`` (its own copy of tasks/, flows/, wanda/ and
dvc.yaml, in its own git + DVC repository), whose imports are verified to resolve inside that
project; ``dvc repro`` runs it cold once, and one unmeasured ``run --no-track`` proves every stage
cached. Then each figure is the wall time of a fresh process (``subprocess``, cwd the project),
repeated with the trees alternating (base, current, base, ...) so that load drifts hit both; the
table gives the median, and current / base. The skipped stage is ``python -m tasks.export_24`` in a
copy of the project (pruning is unstructured, so it writes "skipped"; the copy keeps the measured
project cached). No ``PREFECT_API_URL``: ``run`` starts Prefect's temporary server each time, as a
user without a server has it; a second ``run`` row uses one Prefect server started for the
benchmark (as the tests and a deployment do), which isolates what the pipeline's own start costs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_BASE = "1fb4895"  # main before the fast-start work
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE", "GIT_AUTHOR_NAME": "bench",
           # Prefect's default (20 s) for its temporary server to answer is too short on a loaded machine.
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@b"}

# (key, label, argv after the interpreter, expected exit code, slow)
FIGURES = [
    ("import", "import wanda", ["-c", "import wanda"], 0, False),
    ("help", "wanda-pipeline --help", ["-m", "flows.cli", "--help"], 0, False),
    ("param_error", "parameter error (-S masks.sparsity=2)", ["-m", "flows.cli", "run", "--no-track", "-S",
                                                             "masks.sparsity=2"], 2, False),
    ("skipped_stage", "skipped stage (python -m tasks.export_24)", ["-m", "tasks.export_24"], 0, False),
    ("status", "wanda-pipeline status", ["-m", "flows.cli", "status"], 0, True),
    ("cached_run", "cached run --no-track (temporary Prefect server)", ["-m", "flows.cli", "run", "--no-track"], 0,
     True),
    ("cached_run_server", "cached run --no-track (Prefect server running)", ["-m", "flows.cli", "run",
                                                                             "--no-track"], 0, True),
]


def environment(prefect_api: str | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for key in ("PYTHONPATH", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "WANDA_LOG_LEVEL"):
        env.pop(key, None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def sh(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env or environment(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {cwd} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-3000:]}")
    return result


def check_imports_resolve(root: Path, env: dict[str, str] | None = None) -> None:
    """The project's own copies of wanda/tasks/flows are what runs there (not an installed checkout)."""
    probe = "import wanda, tasks, flows; print(wanda.__file__); print(tasks.__file__); print(flows.__file__)"
    for line in sh([sys.executable, "-c", probe], root, env).stdout.split():
        if not Path(line).resolve().is_relative_to(root.resolve()):
            raise RuntimeError(f"{root}: imports {line}, not its own copy")


def build_project(tree: Path, dest: Path) -> Path:
    """The tiny project as ``tree``'s code builds it, run cold once and committed."""
    env = {**environment(), "PYTHONPATH": str(tree)}
    check_imports_resolve(tree, env)
    sh([sys.executable, "-c", "import sys; from pathlib import Path; from tests.pipeline_project import make_project; "
        "make_project(Path(sys.argv[1]))", str(dest)], tree, env)
    check_imports_resolve(dest)
    sh([sys.executable, "-m", "dvc", "repro", "--quiet"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "cold run"], dest)
    return dest


def warm(project: Path, env: dict[str, str]) -> None:
    """One unmeasured cached run; every stage must say cached (else the figure measures work)."""
    out = sh([sys.executable, "-m", "flows.cli", "run", "--no-track"], project, env).stdout
    if "every stage is cached: nothing to run" in out:  # the CLI's answer without Prefect (since 348e4f6)
        return
    lines = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in STAGES]
    if len(lines) != len(STAGES) or any(parts[1] != "cached" for parts in lines):
        raise RuntimeError(f"{project}: not every stage is cached:\n{out}")


STAGES = ("materialize", "calibration", "statistics", "masks", "prune", "dense_eval", "evaluate", "export_24",
          "engine", "benchmark")


def timed(argv: list[str], cwd: Path, env: dict[str, str], expected: int) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != expected:
        raise RuntimeError(f"{' '.join(argv)} in {cwd}: exit {result.returncode}, expected {expected}:\n"
                           f"{result.stderr[-3000:]}")
    return seconds


def start_prefect_server(base: Path):
    from tests.servers import Servers, start_prefect

    base.mkdir(parents=True, exist_ok=True)
    servers = Servers(base=base)
    return servers, start_prefect(servers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"the commit to compare with (default {DEFAULT_BASE})")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the quick figures (default 5)")
    parser.add_argument("--slow-reps", type=int, default=3, help="repetitions of status and the runs (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", type=Path, help="build under this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    base_commit = sh(["git", "rev-parse", args.base], REPO).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="wanda-startup-", dir=args.keep))
    tree = work / "base-tree"
    sh(["git", "worktree", "add", "--quiet", "--detach", str(tree), base_commit], REPO)
    servers = None
    try:
        print(f"# building the tiny projects under {work} (base {base_commit[:10]}, current {REPO})", flush=True)
        projects = {"base": build_project(tree, work / "base"), "current": build_project(REPO, work / "current")}
        skip_copies = {}
        for name, project in projects.items():
            skip_copies[name] = work / f"{name}-skip"
            shutil.copytree(project, skip_copies[name], symlinks=True)
        servers, api = start_prefect_server(work / "prefect")
        plain, served = environment(), environment(api)
        for project in projects.values():
            warm(project, plain)
            warm(project, served)
        load_before = os.getloadavg()
        samples: dict[str, dict[str, list[float]]] = {key: {"base": [], "current": []} for key, *_ in FIGURES}
        for key, label, argv, expected, slow in FIGURES:
            env = served if key == "cached_run_server" else plain
            for _ in range(args.slow_reps if slow else args.reps):
                for name in ("base", "current"):
                    cwd = skip_copies[name] if key == "skipped_stage" else projects[name]
                    samples[key][name].append(timed(argv, cwd, env, expected))
            print(f"# {label}: base {samples[key]['base']}, current {samples[key]['current']}", flush=True)
        load_after = os.getloadavg()
    finally:
        if servers is not None:
            servers.stop_all()
        sh(["git", "worktree", "remove", "--force", str(tree)], REPO, check=False)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for key, label, *_ in FIGURES:
        base, current = (statistics.median(samples[key][name]) for name in ("base", "current"))
        rows.append({"figure": key, "label": label, "base_s": round(base, 2), "current_s": round(current, 2),
                     "ratio": round(current / base, 2), "samples": samples[key]})
    machine = (f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
               f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    width = max(len(row["label"]) for row in rows)
    print(f"\nStart-up, median wall seconds of a fresh process ({machine})")
    print(f"base = {base_commit[:10]}, current = {sh(['git', 'rev-parse', '--short=10', 'HEAD'], REPO).stdout.strip()}"
          f"{' (+ uncommitted changes)' if sh(['git', 'status', '--porcelain'], REPO).stdout.strip() else ''}")
    print(f"| {'figure'.ljust(width)} | base s | current s | current/base |")
    print(f"|{'-' * (width + 2)}|-------:|----------:|-------------:|")
    for row in rows:
        print(f"| {row['label'].ljust(width)} | {row['base_s']:6.2f} | {row['current_s']:9.2f} "
              f"| {row['ratio']:12.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"base": base_commit, "machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
