"""A throwaway copy of the project in its own git repository, on a tiny random model.

The pipeline tests run DVC and Prefect against this copy, never against the checkout: the copy
has the project's dvc.yaml, tasks/, flows/ and wanda/ (DVC hashes them as code dependencies), a
tiny LLaMA saved as a model folder, and word-level text its tokenizer can read.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")
PACKAGES = ("tasks", "flows", "wanda")

# Small enough that a cold run of all ten stages takes seconds (mostly interpreter start-up).
TINY_OVERRIDES = [
    "model.source=fixtures/tiny-model",
    "calibration.source={path: fixtures/calib.txt}",
    "calibration.fallback=null",
    "calibration.nsamples=4",
    "calibration.seqlen=32",
    "statistics.batch_size=2",
    "evaluate.perplexity={source: {path: fixtures/eval.txt}, fallback: null, seqlen: 32, max_windows: 4, batch_size: 2}",
]


def env() -> dict[str, str]:
    values = dict(os.environ)
    values.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
                   "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                   "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    values["PATH"] = str(Path(sys.executable).parent) + os.pathsep + values.get("PATH", "")
    values.pop("PYTHONPATH", None)
    return values


def sh(root: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """``argv`` in ``root``; a ``flows.cli`` command talks to the session's Prefect server
    (:func:`prefect_api`) instead of starting a temporary one of its own."""
    values = env()
    if "flows.cli" in argv and "PREFECT_API_URL" not in values:
        values["PREFECT_API_URL"] = prefect_api()
    result = subprocess.run(list(argv), cwd=root, env=values, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


_PREFECT_API: str | None = None


def prefect_api() -> str:
    """One Prefect server per test session (``prefect server start`` on loopback, SQLite in a
    temporary folder, stopped by pid at exit) for the CLI runs of the pipeline tests: without
    it every run starts, migrates and stops a temporary server of its own, about 9 s a run
    here. Tests of that temporary server itself (kill -9, leaked secrets) start the CLI
    without :func:`sh`, so they still get one."""
    global _PREFECT_API
    if _PREFECT_API is None:
        import atexit
        import tempfile

        from tests.servers import Servers, start_prefect

        servers = Servers(base=Path(tempfile.mkdtemp(prefix="wanda-prefect-")))
        servers.cleanup.append(servers.base)
        atexit.register(servers.stop_all)
        try:
            _PREFECT_API = start_prefect(servers)
        except BaseException:
            servers.stop_all()
            raise
    return _PREFECT_API


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(root, sys.executable, "-m", "dvc", *args, check=check)


def make_project(dest: Path, overrides: list[str] | None = None) -> Path:
    from tasks.params import write_params_file
    from tests.tiny import tiny_model, tiny_tokenizer
    from wanda.model_io import save_model

    dest.mkdir(parents=True, exist_ok=True)
    for rel in COPIED:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    save_model(tiny_model(), tiny_tokenizer(), dest / "fixtures" / "tiny-model")
    rng = random.Random(0)
    for name, words in (("calib", 3000), ("eval", 2000)):
        (dest / "fixtures" / f"{name}.txt").write_text(" ".join(f"w{rng.randrange(124)}" for _ in range(words)))
    write_params_file(dest / "params.yaml", (REPO / "params.yaml").read_text(), TINY_OVERRIDES + list(overrides or []))
    sh(dest, "git", "init", "-q")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-q", "-m", "project copy")
    return dest


def set_params(root: Path, *overrides: str) -> None:
    from tasks.params import write_params_file

    write_params_file(root / "params.yaml", (root / "params.yaml").read_text(), list(overrides))


_RAN = re.compile(r"Running stage '([^']+)'")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")


def repro(root: Path, *args: str) -> tuple[set[str], set[str]]:
    """``dvc repro``; returns (stages that ran, stages restored from the run cache)."""
    out = dvc(root, "repro", *args)
    text = out.stdout + out.stderr
    return set(_RAN.findall(text)), set(_RESTORED.findall(text))


def drop_from_cache(root: Path, stage: str) -> None:
    """Delete a stage's outputs from DVC's cache (as `dvc gc` or a clone without the remote
    would), so DVC cannot restore them and must recompute."""
    import json

    from tasks.params import read_yaml

    cache = root / ".dvc" / "cache" / "files" / "md5"
    for out in read_yaml(root / "dvc.lock")["stages"][stage]["outs"]:
        md5 = out["md5"]
        obj = cache / md5[:2] / md5[2:]
        if md5.endswith(".dir"):
            for entry in json.loads(obj.read_text()):
                (cache / entry["md5"][:2] / entry["md5"][2:]).unlink(missing_ok=True)
        obj.unlink(missing_ok=True)


def status(root: Path) -> dict:
    import json

    out = dvc(root, "status", "--json").stdout
    return json.loads(out[out.find("{"):] or "{}")


_COLD: Path | None = None


def cold_project() -> Path:
    """One project per test session on which `dvc repro` ran cold (one-pass statistics, so
    sweeps can share them). Tests copy it: copies share nothing, not even the DVC cache."""
    global _COLD
    if _COLD is None:
        import atexit
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="wanda-pipeline-"))
        atexit.register(shutil.rmtree, base, True)
        project = make_project(base / "cold", ["statistics.mode=one_pass"])
        repro(project)
        sh(project, "git", "add", "-A")
        sh(project, "git", "commit", "-q", "-m", "cold run")
        _COLD = project
    return _COLD


def copy_project(dest: Path) -> Path:
    shutil.copytree(cold_project(), dest, symlinks=True)
    return dest
