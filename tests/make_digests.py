"""Digests of the embedded model's pruning results, to prove a refactor changes none of them.

``tests/test_digests.py`` recomputes every case and compares with ``tests/digests_reference.json``.
Per case: sha256 of the masks (tensor bytes in sorted layer order; the safetensors file is not
used because its metadata order is not part of the result), sha256 of the pruned target weights
(same order) and the perplexity as its exact float repr. Small settings keep it fast: 4 x 128
calibration tokens of the default calibration source (seed 0), two evaluation windows of 128
tokens, torch on :data:`DIGEST_THREADS` threads.

Float rounding depends on the CPU (MKL and ATen pick kernels by vendor and instruction set) and
on the thread count, so the reference holds one set of digests per machine kind
(:func:`machine_key`), each computed by the code *before* the core redesign
(:data:`REFERENCE_COMMIT`), never by the code under test. On a new kind of machine, record its
set once (minutes; a git checkout of that commit in a temporary worktree computes it):

    .venv/bin/python -m tests.make_digests [MODEL_DIR]

This is a tool for the next bit-identity migration (``make digests`` records this machine's set
when missing, then compares the current code with it); ``make test`` does not run it, because a
machine kind nobody recorded would fail. The suite checks what holds on any CPU instead
(``tests/test_regression_oracles.py``, ``tests/test_regression_figures.py``), and the latter reads
every recorded machine's perplexities to measure how far rounding moves them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REFERENCE = Path(__file__).with_name("digests_reference.json")
# The last commit before the core redesign: every machine's reference digests come from its code.
REFERENCE_COMMIT = "aed2ef492541ae6a3a963849dd865da51a564621"

# name -> (PruneConfig fields, streamed through prune_checkpoint)
CASES: dict[str, tuple[dict, bool]] = {
    "wanda_sequential_50": ({"sparsity": 0.5}, False),
    "wanda_one_pass_50": ({"sparsity": 0.5, "mode": "one_pass"}, False),
    "magnitude_50": ({"method": "magnitude", "sparsity": 0.5}, False),
    "sparsegpt_50": ({"method": "sparsegpt", "sparsity": 0.5}, False),
    "ria_50": ({"method": "ria", "sparsity": 0.5}, False),
    "owl_wanda_50": ({"sparsity": 0.5, "allocation": "owl"}, False),
    "dsnot_wanda_50": ({"sparsity": 0.5, "refine": "dsnot"}, False),
    "variant_wanda_50": ({"sparsity": 0.5, "variant": True}, False),
    "wanda_2_4": ({"pattern": "2:4"}, False),
    "wanda_4_8": ({"pattern": "4:8"}, False),
    "ria_permute_2_4": ({"method": "ria", "pattern": "2:4", "ria_permute": True}, False),
    "streamed_wanda_sequential_50": ({"sparsity": 0.5}, True),
    "streamed_sparsegpt_50": ({"method": "sparsegpt", "sparsity": 0.5}, True),
}
NSAMPLES, SEQLEN, SEED, BATCH = 4, 128, 0, 4
EVAL_SEQLEN, EVAL_WINDOWS = 128, 2


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.dtype != torch.bool
                      else tensor.to(torch.uint8).reshape(-1).numpy().tobytes())
    return digest.hexdigest()


def _calibration(tokenizer):
    from wanda.calibration import CalibrationConfig, sample_calibration

    return sample_calibration(tokenizer, CalibrationConfig(nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED)).tokens


def _perplexity(model, tokenizer) -> float:
    from wanda.evaluation.perplexity import PerplexityConfig, evaluate_perplexity

    return evaluate_perplexity(model, tokenizer, PerplexityConfig(seqlen=EVAL_SEQLEN, max_windows=EVAL_WINDOWS)).perplexity


# The sequential cases' forward passes round differently on another thread count (on 1 thread 5
# of 6 cases tried changed): pinned, so a machine with more cores checks, and records, the bits
# of a 2-core one.
DIGEST_THREADS = 2


def _cpu_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return "?"


def machine_key() -> str:
    """What decides the digests' rounding besides the code: CPU vendor, family and model, the
    instruction set torch dispatches to, torch's version, the thread count."""
    return (f"{platform.machine()} {_cpu_field('vendor_id')} family {_cpu_field('cpu family')} model "
            f"{_cpu_field('model')}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}; "
            f"{DIGEST_THREADS} threads")


def reference_for_this_machine() -> dict[str, dict] | None:
    """This machine kind's reference digests, or None when none were recorded for it."""
    entry = json.loads(REFERENCE.read_text())["machines"].get(machine_key())
    return entry["cases"] if entry else None


def compute_digests(model_dir: str | Path, cases: list[str] | None = None) -> dict[str, dict]:
    """Every case's digests, from the embedded model materialized at ``model_dir``, on
    :data:`DIGEST_THREADS` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(DIGEST_THREADS)
    try:
        return _compute_digests(model_dir, cases)
    finally:
        torch.set_num_threads(previous)


def _compute_digests(model_dir: str | Path, cases: list[str] | None) -> dict[str, dict]:
    results = {}
    for name, model, tokenizer, masks in pruned_cases(model_dir, cases):
        modules = dict(model.named_modules())
        weights = {n: modules[n].weight for n in masks}
        results[name] = {
            "masks": tensors_digest(dict(masks)),
            "weights": tensors_digest(weights),
            "perplexity": repr(_perplexity(model, tokenizer)),
            "permutations": tensors_digest(dict(getattr(masks, "permutations", {}))),
        }
    return results


def pruned_cases(model_dir: str | Path, cases: list[str] | None = None):
    """``(case, pruned model, tokenizer, masks)`` for each case in turn (one model, reset to the
    dense weights before each case)."""
    from safetensors.torch import load_file

    import wanda
    from wanda.config import PruneConfig

    model, tokenizer = wanda.load_model(str(model_dir))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = _calibration(tokenizer)
    for name in cases or list(CASES):
        fields, streamed = CASES[name]
        config = PruneConfig(batch_size=BATCH, **fields)
        model.load_state_dict(dense)
        if streamed:
            with tempfile.TemporaryDirectory() as tmp:
                wanda.prune_checkpoint(model_dir, Path(tmp) / "out", tokens, config, masks_path=Path(tmp) / "m.st")
                masks, _ = wanda.load_masks(Path(tmp) / "m.st")
                for shard in sorted((Path(tmp) / "out").glob("*.safetensors")):
                    model.load_state_dict(load_file(str(shard)), strict=False)
        elif config.mode == "one_pass":
            stats = wanda.collect_statistics(model, tokens, batch_size=BATCH)
            masks = wanda.compute_masks(model, stats, config)
            wanda.apply_masks(model, masks)
        else:
            masks = wanda.prune_model(model, tokens, config)
        yield name, model, tokenizer, masks


def compute_figures(model_dir: str | Path, cases: list[str] | None = None) -> dict[str, dict]:
    """Per case, on :data:`DIGEST_THREADS` threads: the perplexity, the overall mask sparsity and
    the masks' digest (equal between runs on one machine, not between machines)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(DIGEST_THREADS)
    try:
        figures = {}
        for name, model, tokenizer, masks in pruned_cases(model_dir, cases):
            pruned = sum(int(m.sum()) for m in masks.values())
            total = sum(m.numel() for m in masks.values())
            figures[name] = {"perplexity": _perplexity(model, tokenizer), "sparsity": pruned / total,
                             "masks": tensors_digest(dict(masks))}
        return figures
    finally:
        torch.set_num_threads(previous)


def digests_at_commit(commit: str, model_dir: Path) -> dict[str, dict]:
    """Every case's digests as the code of ``commit`` computes them on this machine: its own
    ``tests/make_digests.py`` in a temporary git worktree, in a child process whose imports
    resolve to that worktree (this checkout's code never runs)."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="wanda-digests-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(tree), commit], cwd=root, check=True)
        try:
            from wanda.data import shared_data_dir

            # the worktree is elsewhere: its ../shared/data default would not find the data
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(DIGEST_THREADS),
                   "WANDA_SHARED_DATA": str(shared_data_dir().resolve())}
            probe = subprocess.run([sys.executable, "-c", "import wanda; print(wanda.__file__)"], cwd=tree, env=env,
                                   capture_output=True, text=True, check=True).stdout.strip()
            if not Path(probe).resolve().is_relative_to(tree.resolve()):
                raise RuntimeError(f"the worktree of {commit} imports wanda from {probe}, not from itself")
            out = subprocess.run([sys.executable, "-m", "tests.make_digests", str(model_dir)], cwd=tree, env=env,
                                 stdout=subprocess.PIPE, text=True, check=True).stdout
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root, check=False)
    return json.loads(out[out.index("{"):])


def main() -> None:
    """``python -m tests.make_digests [--if-missing] [MODEL_DIR]``: this machine kind's reference digests,
    computed by :data:`REFERENCE_COMMIT`'s code from an already materialized embedded model, or
    a fresh one in a temporary folder, added to the reference file (other machines' kept)."""
    import logging

    from wanda.model_io import EMBEDDED_DEFAULT, materialize

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = [a for a in sys.argv[1:] if a != "--if-missing"]
    if "--if-missing" in sys.argv[1:] and reference_for_this_machine() is not None:
        logging.info("%s already holds digests for this machine kind (%s)", REFERENCE.name, machine_key())
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args[0]) if args else materialize(EMBEDDED_DEFAULT, Path(tmp) / "model").path
        logging.info("computing the digests with the code of %s on this machine (%s)", REFERENCE_COMMIT[:10],
                     machine_key())
        cases = digests_at_commit(REFERENCE_COMMIT, Path(model_dir).resolve())
    reference = json.loads(REFERENCE.read_text())
    reference["machines"][machine_key()] = {"recorded_with": REFERENCE_COMMIT, "cases": cases}
    REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    logging.info("recorded %d cases for this machine in %s", len(cases), REFERENCE)


if __name__ == "__main__":
    main()
