"""A 4-point sweep of the embedded model on a Dask cluster: 1 worker against 2 workers.

Each worker runs one point at a time on one thread (``dask worker --nthreads 1``, points pinned
to ``OMP_NUM_THREADS=1`` by ``sweep.resources.threads=1``). The shared stages (base model,
calibration, one-pass statistics, dense evaluation) run once, before either measurement, in a
repository both measurements copy (its DVC cache included), so the timings are the points alone:
workspace set-up, masks, prune, evaluate per point, adoption into the main dvc.lock, the report.
The driver and every worker talk to one Prefect server (``prefect server start`` on loopback,
started before any measurement, stopped by pid at the end), as a deployment's workers would:
a worker without ``PREFECT_API_URL`` would start a temporary server of its own for its first
point (about 15-25 s here, and a third Prefect process on two cores).

    .venv/bin/python benchmarks/bench_sweep_distributed.py [--work DIR] [--points 0.3,0.4,0.5,0.6]
        [--nsamples 16] [--seqlen 256] [--max-windows 8] [--json results.json]

Prints both wall times, the ratio (target: 2 workers at least 1.7x faster than 1) and the CPU
time the machine was busy during each run (/proc/stat: every process). Two workers cannot beat
the 1-worker run's CPU work spread over all cores, so that bound is printed too: on a machine
with as many cores as workers, whatever the driver, DVC and Prefect's server do beside the
points comes off the ratio. On a loaded machine it measures the load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_pipeline import make_repo  # noqa: E402
from benchmarks.cpu_accounting import CpuAccounting  # noqa: E402
from tasks.common import OFFLINE_ENV  # noqa: E402

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)


def _git_commit(root: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for argv in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "shared stages"]):
        subprocess.run(argv, cwd=root, check=True, env=env, stdout=subprocess.DEVNULL)


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy so far (every process: driver, scheduler, workers,
    DVC, the stages, Prefect's server), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wanda-bench-distributed"))
    parser.add_argument("--points", default="0.3,0.4,0.5,0.6")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration sequences (small: it is a benchmark "
                        "of the scheduling, not of the pruning)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-windows", type=int, default=8, help="perplexity windows per point")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    os.environ.setdefault("PREFECT_HOME", str(args.work / "prefect-home"))
    from tests.pipeline_project import prefect_api

    os.environ["PREFECT_API_URL"] = prefect_api()  # before Prefect reads its settings
    from wanda.data import shared_data_dir

    os.environ.setdefault("WANDA_SHARED_DATA", str(shared_data_dir()))
    from flows.pipeline import prune_pipeline
    from flows.sweep import sweep
    from tests.clusters import DaskCluster

    overrides = ["statistics.mode=one_pass", f"calibration.nsamples={args.nsamples}",
                 f"calibration.seqlen={args.seqlen}", f"evaluate.perplexity.max_windows={args.max_windows}"]
    base = make_repo(args.work / "base", overrides)
    started = time.perf_counter()
    prune_pipeline(repo=str(base), targets=["statistics", "dense_eval"], track=False)
    shared_s = time.perf_counter() - started
    _git_commit(base)
    print(f"shared stages (once, not timed below): {shared_s:.1f}s", flush=True)

    axis = [f"masks.sparsity={args.points}"]
    results: dict = {"points": args.points.split(","), "cpus": os.cpu_count(), "nsamples": args.nsamples,
                     "seqlen": args.seqlen, "max_windows": args.max_windows, "shared_s": round(shared_s, 1)}
    for workers in (1, 2):
        repo = args.work / f"workers-{workers}"
        shutil.copytree(base, repo, symlinks=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "WANDA_WORKSPACES": str(args.work / f"ws-{workers}")}
        names = [f"w{i + 1}" for i in range(workers)]
        cluster = DaskCluster(args.work, env, names)
        try:
            started, cpu_before = time.perf_counter(), busy_cpu_seconds()
            with CpuAccounting(workspaces=args.work / f"ws-{workers}") as accounting:
                result = sweep(axes=axis, name="bench", repo=str(repo), runner=cluster.address,
                               overrides=["sweep={resources: {threads: 1}}"])
            seconds, cpu = time.perf_counter() - started, busy_cpu_seconds() - cpu_before
        finally:
            cluster.stop()
        used = sorted({p["worker"] for p in result["placement"]})
        results[f"workers_{workers}_s"] = round(seconds, 1)
        results[f"workers_{workers}_cpu_s"] = round(cpu, 1)
        results[f"workers_{workers}_placement"] = result["placement"]
        results[f"workers_{workers}_cpu_by_kind"] = accounting.by_kind()
        print(f"{workers} worker(s) ({', '.join(used)}): {seconds:.1f}s; machine busy {cpu:.0f} CPU-s "
              f"({cpu / seconds:.2f} of {os.cpu_count()} cores on average)", flush=True)
        print("  CPU-s by process: " + ", ".join(f"{kind} {s:.1f}" for kind, s in accounting.by_kind().items()),
              flush=True)
    results["speedup"] = round(results["workers_1_s"] / results["workers_2_s"], 2)
    # Two workers cannot finish before the 1-worker run's CPU work spread over every core.
    cores = os.cpu_count() or 1
    results["ceiling"] = round(min(2.0, results["workers_1_s"] / (results["workers_1_cpu_s"] / cores)), 2)
    print(f"2 workers vs 1: {results['speedup']:.2f}x faster (target >= 1.7x); the most {cores} cores allow "
          f"for this work: {results['ceiling']:.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
