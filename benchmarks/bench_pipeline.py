"""Pipeline cost on the embedded default: cold run, warm (all cached) re-run, sweep vs separate runs.

Everything runs in throwaway copies of the project (its own git + DVC repository each, never this
checkout), with the real params.yaml (SmolLM2-135M, WikiText-2 from the shared data folder when
present). Prefect runs in ephemeral mode; its server is started once before any measurement, so
the flow timings exclude Prefect's own start-up, which is reported separately.

    .venv/bin/python benchmarks/bench_pipeline.py [--work DIR] [--points 0.3,0.4,0.5,0.6,0.7]
        [--separate-runs 5] [--json results.json] [--skip-separate] [--skip-one-pass]

Measured:
- cold: ``prune_pipeline`` on a fresh repository (every stage runs);
- warm: the same call again (every stage cached; what remains is DVC's status check, the content
  checks and Prefect's task bookkeeping); ratio warm / cold;
- CLI warm: ``wanda-pipeline run`` as a fresh process (includes Prefect's start-up);
- sweep: ``sweep`` over the points on a fresh repository, in the default (sequential) mode and in
  one-pass mode, against the points run as separate cold pipelines.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.common import OFFLINE_ENV  # noqa: E402

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

COPIED = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")
PACKAGES = ("tasks", "flows", "wanda")


def make_repo(dest: Path, overrides: list[str] | None = None) -> Path:
    from tasks.params import write_params_file

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in COPIED:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if overrides:
        write_params_file(dest / "params.yaml", (REPO / "params.yaml").read_text(), overrides)
    git = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for argv in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "bench"]):
        subprocess.run(argv, cwd=dest, check=True, env={**os.environ, **git})
    return dest


def timed(label: str, fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.1f}s", flush=True)
    return result, seconds


def stage_seconds(result: dict) -> dict[str, float]:
    return {o["address"]: o["seconds"] for o in result["outcomes"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wanda-bench-pipeline"))
    parser.add_argument("--points", default="0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--separate-runs", type=int, default=5, help="how many of the points to run as separate "
                        "cold pipelines (the rest are extrapolated from their mean)")
    parser.add_argument("--skip-separate", action="store_true")
    parser.add_argument("--skip-one-pass", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("PREFECT_HOME", str(args.work / "prefect-home"))
    from wanda.data import shared_data_dir

    os.environ.setdefault("WANDA_SHARED_DATA", str(shared_data_dir()))
    from prefect import flow

    from flows.pipeline import prune_pipeline
    from flows.sweep import sweep

    points = [p.strip() for p in args.points.split(",") if p.strip()]
    results: dict = {"points": points, "shared_data": os.environ["WANDA_SHARED_DATA"],
                     "shared_data_present": Path(os.environ["WANDA_SHARED_DATA"]).is_dir(),
                     "cpus": os.cpu_count()}

    @flow(name="warm-up")
    def warm_up() -> None:
        return None

    _, results["prefect_startup_s"] = timed("prefect ephemeral server start-up", warm_up)

    main_repo = make_repo(args.work / "main")
    cold, results["cold_s"] = timed("cold run", prune_pipeline, repo=str(main_repo))
    results["cold_stages_s"] = stage_seconds(cold)
    results["perplexity"] = cold["metrics"].get("perplexity")
    results["dense_perplexity"] = cold["metrics"].get("dense.perplexity")
    warm, results["warm_s"] = timed("warm run (all cached)", prune_pipeline, repo=str(main_repo))
    assert all(o["action"] == "cached" for o in warm["outcomes"]), warm["outcomes"]
    results["warm_over_cold"] = results["warm_s"] / results["cold_s"]
    print(f"warm / cold = {results['warm_over_cold']:.2%}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "--repo", str(main_repo), "run"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    results["cli_warm_s"] = time.perf_counter() - started
    print(f"CLI warm run (fresh process, Prefect start-up included): {results['cli_warm_s']:.1f}s", flush=True)

    axis = [f"masks.sparsity={','.join(points)}"]
    sweep_repo = make_repo(args.work / "sweep")
    swept, results["sweep_sequential_s"] = timed(f"{len(points)}-point sweep, sequential mode, cold",
                                                 sweep, axes=axis, repo=str(sweep_repo), workers=1)
    results["sweep_sequential_points"] = [{k: r[k] for k in ("point", "sparsity", "perplexity")} for r in swept["points"]]
    results["sweep_sequential_stages_s"] = stage_seconds(swept)
    if not args.skip_one_pass:
        one_pass_repo = make_repo(args.work / "sweep-one-pass", ["statistics.mode=one_pass"])
        swept1, results["sweep_one_pass_s"] = timed(f"{len(points)}-point sweep, one-pass mode, cold",
                                                    sweep, axes=axis, repo=str(one_pass_repo), workers=1)
        results["sweep_one_pass_points"] = [{k: r[k] for k in ("point", "sparsity", "perplexity")}
                                            for r in swept1["points"]]
        results["sweep_one_pass_stages_s"] = stage_seconds(swept1)
        shutil.rmtree(one_pass_repo, ignore_errors=True)
    shutil.rmtree(sweep_repo, ignore_errors=True)

    if not args.skip_separate:
        separate = []
        for sparsity in points[: args.separate_runs]:
            repo = make_repo(args.work / f"separate-{sparsity}", [f"masks.sparsity={sparsity}"])
            _, seconds = timed(f"separate cold run at sparsity {sparsity}", prune_pipeline, repo=str(repo))
            separate.append(seconds)
            shutil.rmtree(repo, ignore_errors=True)
        results["separate_runs_s"] = separate
        mean = sum(separate) / len(separate)
        results["separate_total_s"] = sum(separate) + mean * (len(points) - len(separate))
        results["separate_extrapolated"] = len(separate) < len(points)
        print(f"{len(points)} separate cold runs: {results['separate_total_s']:.1f}s", flush=True)
        for key in ("sweep_sequential_s", "sweep_one_pass_s"):
            if key in results:
                results[key[: -len("_s")] + "_over_separate"] = results[key] / results["separate_total_s"]
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
