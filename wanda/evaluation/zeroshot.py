"""Zero-shot accuracy through lm-eval on the in-memory model, offline by default.

Offline, the seven tasks of the paper are written as local lm-eval task definitions generated
from the files under ``shared:zeroshot`` (see its README). Each generated definition copies the
prompt, choices, target and metrics of lm-eval's built-in task; the data is converted to the
schema of the Hugging Face dataset the built-in task reads, in the original row order, so
``limit`` picks the same documents. Known gaps (the local data allows no better):

- hellaswag: the local file keeps ``activity_label: ctx`` already cleaned, not ``ctx_a`` and
  ``ctx_b``; lm-eval's cleaning is re-applied, but ``ctx_b`` is not capitalized.
- with ``num_fewshot > 0`` examples come from the evaluation split itself (there is no local
  train split); lm-eval never uses a document as its own example. The paper is zero-shot.
- boolq, rte and winogrande define only ``acc`` in lm-eval, so they report no ``acc_norm``.
"""
from __future__ import annotations

import bz2
import contextlib
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data import resolve_path
from ..errors import ConfigError, EvaluationError
from ..hashing import sha256_file, sha256_files

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The paper averages plain accuracy over the seven tasks.
MEAN_METRIC = "acc"


class ZeroShotConfig(BaseModel):
    """``task_source``: ``local`` generates task definitions from ``data_dir`` (offline);
    ``lm_eval`` uses lm-eval's built-in tasks (needs the hub or a warm datasets cache);
    ``include_path`` uses the task YAMLs found in ``include_path`` as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] = Field(default_factory=lambda: list(PAPER_TASKS), min_length=1)
    limit: int | float | None = Field(None, gt=0)
    num_fewshot: int = Field(0, ge=0)
    # lm-eval's requests are short: batching them measured ~1.8x faster even on 2 CPU cores.
    batch_size: int = Field(8, ge=1)
    seed: int = 1234
    task_source: Literal["local", "lm_eval", "include_path"] = "local"
    data_dir: str = "shared:zeroshot"
    include_path: str | None = None

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be unique, got {tasks}")
        return tasks

    @field_validator("limit")
    @classmethod
    def _limit(cls, limit: int | float | None) -> int | float | None:
        if isinstance(limit, float) and limit >= 1.0:
            if not limit.is_integer():
                raise ValueError(f"limit {limit}: a fraction must be < 1, a count an integer")
            return int(limit)
        return limit

    @model_validator(mode="after")
    def _include(self) -> "ZeroShotConfig":
        if (self.task_source == "include_path") != (self.include_path is not None):
            raise ValueError("include_path is required with task_source 'include_path' and only then")
        return self


class TaskScore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    acc: float
    acc_stderr: float | None = None
    acc_norm: float | None = None  # None where lm-eval's task defines no acc_norm
    acc_norm_stderr: float | None = None
    samples: int
    data_file: str | None = None
    data_digest: str | None = None  # sha256 of the source data file
    definition_digest: str | None = None  # sha256 of the task definition and converted data


class ZeroShotResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: dict[str, TaskScore]
    mean: float
    mean_metric: str = MEAN_METRIC
    limit: int | float | None
    num_fewshot: int
    batch_size: int
    seed: int
    task_source: str
    lm_eval_version: str
    wall_s: float | None  # a run fact (None in a record that leaves it out)


# ---------------------------------------------------------------------------- local tasks

def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _boolq_label(value: Any) -> int:
    # The shared copy stores "true"/"false" strings; the official file JSON booleans.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.lower() in {"true", "false"}:
        return int(value.lower() == "true")
    if value in (0, 1):
        return int(value)
    raise EvaluationError(f"boolq: unexpected label {value!r}")


def _boolq(path: Path) -> list[dict]:
    return [
        {"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": _boolq_label(r["label"])}
        for r in _read_jsonl(path)
    ]


def _rte(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [
        {"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": int(r["label"]), "idx": r["idx"]}
        for r in pq.read_table(path).to_pylist()
    ]


def _hellaswag(path: Path) -> list[dict]:
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise EvaluationError(
            f"hellaswag: {path} has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)"
        )
    return [
        {"ind": i // 6, "ctx": lines[i], "label": lines[i + 1].strip(), "endings": lines[i + 2 : i + 6]}
        for i in range(0, len(lines), 6)
    ]


def _winogrande(path: Path) -> list[dict]:
    return [{k: r[k] for k in ("qID", "sentence", "option1", "option2", "answer")} for r in _read_jsonl(path)]


def _choices(question: dict) -> dict:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def _arc(path: Path) -> list[dict]:
    return [
        {"id": r["id"], "question": r["question"]["stem"], "choices": _choices(r["question"]),
         "answerKey": r["answerKey"]}
        for r in _read_jsonl(path)
    ]


def _openbookqa(path: Path) -> list[dict]:
    return [
        {"id": r["id"], "question_stem": r["question"]["stem"], "choices": _choices(r["question"]),
         "answerKey": r["answerKey"]}
        for r in _read_jsonl(path)
    ]


# Verbatim copies of lm-eval's helpers (tasks/hellaswag/utils.py, tasks/winogrande/
# preprocess_winogrande.py); hellaswag's context is already "activity_label: ctx" here.
_HELLASWAG_UTILS = '''import re


def preprocess(text):
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    text = text.replace("  ", " ")
    return text


def process_docs(dataset):
    def _process_doc(doc):
        return {
            "query": preprocess(doc["ctx"]),
            "choices": [preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)
'''

_WINOGRANDE_UTILS = '''def doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
'''

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_ARC = {
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "should_decontaminate": True,
    "doc_to_decontamination_query": "Question: {{question}}\nAnswer:",
    "metric_list": _ACC_NORM,
}


@dataclass(frozen=True)
class LocalTask:
    """How one paper task is built from its shared file, mirroring lm-eval's built-in YAML."""

    name: str
    data_file: str  # relative to the zero-shot data folder
    split: str  # the split lm-eval's built-in task evaluates
    fields: dict
    convert: Callable[[Path], list[dict]]
    functions: dict[str, str] = field(default_factory=dict)  # YAML key -> "module.function"
    utils: str | None = None


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("boolq", "boolq/val.jsonl", "validation", {
            "output_type": "multiple_choice",
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"],
            "should_decontaminate": True,
            "doc_to_decontamination_query": "passage",
            "metric_list": [{"metric": "acc"}],
        }, _boolq),
        # lm-eval's "rte" is GLUE RTE (nyu-mll/glue), i.e. the parquet file, not SuperGLUE's.
        LocalTask("rte", "rte/validation.parquet", "validation", {
            "output_type": "multiple_choice",
            "doc_to_text": "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": ["True", "False"],
            "metric_list": [{"metric": "acc"}],
        }, _rte),
        LocalTask("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", "validation", {
            "output_type": "multiple_choice",
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
            "metric_list": _ACC_NORM,
        }, _hellaswag, {"process_docs": "utils.process_docs"}, _HELLASWAG_UTILS),
        # Partial evaluation: the two contexts differ, the scored continuation is shared.
        LocalTask("winogrande", "winogrande/dev.jsonl", "validation", {
            "output_type": "multiple_choice",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "sentence",
            "metric_list": _ACC,
        }, _winogrande, {"doc_to_text": "utils.doc_to_text", "doc_to_target": "utils.doc_to_target",
                         "doc_to_choice": "utils.doc_to_choice"}, _WINOGRANDE_UTILS),
        LocalTask("arc_easy", "arc_easy/ARC-Easy-Test.jsonl", "test", dict(_ARC), _arc),
        LocalTask("arc_challenge", "arc_challenge/ARC-Challenge-Test.jsonl", "test", dict(_ARC), _arc),
        LocalTask("openbookqa", "openbookqa/test.jsonl", "test", {
            "output_type": "multiple_choice",
            "doc_to_text": "question_stem",
            "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
            "doc_to_choice": "{{choices.text}}",
            "should_decontaminate": True,
            "doc_to_decontamination_query": "question_stem",
            "metric_list": _ACC_NORM,
        }, _openbookqa),
    )
}


def expected_data_files(config: ZeroShotConfig) -> dict[str, Path]:
    """Where each requested task's local data is expected (``local`` task source)."""
    unknown = [t for t in config.tasks if t not in LOCAL_TASKS]
    if unknown:
        raise ConfigError(
            "evaluation.zeroshot.tasks", f"no local definition for {unknown}", ", ".join(LOCAL_TASKS)
        )
    root = resolve_path(config.data_dir)
    return {t: root / LOCAL_TASKS[t].data_file for t in config.tasks}


def check_task_data(config: ZeroShotConfig) -> dict[str, str]:
    """sha256 of each task's data file; EvaluationError naming every missing one.

    Runs before any model work: a task without data must fail the evaluation, not quietly
    drop out of the mean.
    """
    if config.task_source != "local":
        return {}
    files = _existing_data_files(config)
    return {t: sha256_file(p) for t, p in files.items()}


def _existing_data_files(config: ZeroShotConfig) -> dict[str, Path]:
    files = expected_data_files(config)
    missing = {t: p for t, p in files.items() if not p.is_file()}
    if missing:
        listed = "; ".join(f"task {t!r} expects {p}" for t, p in missing.items())
        raise EvaluationError(
            f"zero-shot data missing: {listed} (data_dir {config.data_dir!r}; "
            "see ../shared/data/zeroshot/README.md, or set WANDA_SHARED_DATA)"
        )
    return files


def _yaml_text(name: str, task: LocalTask, data_path: Path, cache_dir: Path | None) -> str:
    import yaml

    kwargs: dict[str, Any] = {"data_files": {task.split: str(data_path)}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    head = {"task": name, "dataset_path": "json", "dataset_kwargs": kwargs, f"{task.split}_split": task.split}
    text = yaml.safe_dump({**head, **task.fields, "metadata": {"version": 1.0}}, sort_keys=False,
                          allow_unicode=True, width=10_000)
    # safe_dump cannot write lm-eval's !function tag; these lines are plain "key: !function ref".
    text += "".join(f"{key}: !function {ref}\n" for key, ref in task.functions.items())
    return text


def _write_if_changed(path: Path, data: bytes) -> None:
    # An unchanged file keeps its mtime, so the datasets cache of a reused work_dir stays valid.
    if not (path.is_file() and path.read_bytes() == data):
        path.write_bytes(data)


def write_local_tasks(
    config: ZeroShotConfig, out_dir: str | Path, cache_dir: str | Path | None = None
) -> dict[str, str]:
    """Write lm-eval task definitions for ``config.tasks`` into ``out_dir``.

    One sub-folder per task (YAML, converted ``data.jsonl``, helper module). With an integer
    ``limit`` and no few-shot examples only the first ``limit`` rows are written: lm-eval
    evaluates the first ``limit`` documents in order, so the numbers are the same and
    start-up is much faster. Returns each task's definition digest.
    """
    files = _existing_data_files(config)
    out_dir = Path(out_dir)
    truncate = config.limit if isinstance(config.limit, int) and config.num_fewshot == 0 else None
    digests: dict[str, str] = {}
    for name in config.tasks:
        task = LOCAL_TASKS[name]
        rows = task.convert(files[name])[:truncate]
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
        _write_if_changed(folder / "data.jsonl", data)
        yaml_text = _yaml_text(name, task, folder / "data.jsonl", Path(cache_dir) if cache_dir else None)
        _write_if_changed(folder / f"{name}.yaml", yaml_text.encode("utf-8"))
        if task.utils:
            _write_if_changed(folder / "utils.py", task.utils.encode("utf-8"))
        # Paths vary between runs; the digest covers what decides the numbers.
        identity = {"fields": task.fields, "split": task.split, "functions": task.functions, "utils": task.utils,
                    "data": hashlib.sha256(data).hexdigest()}
        digests[name] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digests


# ---------------------------------------------------------------------------- running

def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("evaluation.zeroshot", f"lm-eval is not installed ({exc})",
                          "pip install 'wanda-pipeline[eval]'") from exc
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def prepared_tasks(config: ZeroShotConfig, work_dir: str | Path | None = None) -> Iterator[tuple[Any, dict, dict]]:
    """Yield ``(task_manager, data_digests, definition_digests)`` with every task found.

    Fails (EvaluationError) before any model work when a task's data or definition is missing.
    Generated definitions live in ``work_dir`` when given (its datasets cache is then reused
    across runs), else in a temporary folder removed afterwards.
    """
    _, _, TaskManager = _lm_eval()
    data_digests = check_task_data(config)
    with contextlib.ExitStack() as stack:
        definition_digests: dict[str, str] = {}
        if config.task_source == "local":
            root = Path(work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="zeroshot-")))
            definition_digests = write_local_tasks(config, root / "tasks", root / "datasets-cache")
            manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
        elif config.task_source == "include_path":
            folder = Path(config.include_path)
            if not folder.is_dir():
                raise EvaluationError(f"zero-shot include_path {folder} is not a folder")
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            # Python's bytecode cache appears after the first run: it must not change the digest.
            files = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                     and not p.name.startswith(".")]
            digest = sha256_files(files, root=folder)
            definition_digests = {t: digest for t in config.tasks}
        else:
            manager = TaskManager()
        absent = [t for t in config.tasks if t not in manager.all_tasks]
        if absent:
            where = {"local": "generated definitions", "include_path": f"include_path {config.include_path}",
                     "lm_eval": "lm-eval's built-in tasks"}[config.task_source]
            raise EvaluationError(f"zero-shot tasks {absent} not found in {where}")
        yield manager, data_digests, definition_digests


class _RequestCounter:
    """Calls ``progress(done, total)`` as lm-eval answers requests.

    lm-eval hands all requests of one kind to one ``lm.loglikelihood(...)`` (or ``_rolling`` /
    ``generate_until``) call and, inside it, reports every answered request to the LM's cache
    hook exactly once; wrapping those calls (for the total) and that hook (for the count) gives
    a per-request count without touching lm-eval's batching. lm-eval's own tqdm bar is switched
    off then: the caller's callback draws one."""

    KINDS = ("loglikelihood", "loglikelihood_rolling", "generate_until")

    def __init__(self, lm, progress) -> None:
        self.inner, self.progress = lm.cache_hook, progress
        self.done = self.total = 0
        for kind in self.KINDS:
            setattr(lm, kind, self._counted(getattr(lm, kind)))
        lm.set_cache_hook(self)

    def _counted(self, call):
        def counted(requests, disable_tqdm: bool = False):
            self.total += len(requests)
            self.progress(self.done, self.total)
            return call(requests, disable_tqdm=True)
        return counted

    def add_partial(self, attr: str, req, res) -> None:
        self.inner.add_partial(attr, req, res)
        self.done += 1
        self.progress(min(self.done, self.total), self.total)


def run_lm_eval(model, tokenizer, config: ZeroShotConfig, task_manager, log_samples: bool = False,
                progress=None) -> dict:
    """lm-eval's raw output for ``config.tasks`` on the in-memory ``model``; ``progress(done,
    total)`` is called as requests are answered."""
    from .perplexity import eval_mode  # torch: ZeroShotConfig, a parameter, is read without it

    lm_eval, HFLM, _ = _lm_eval()
    with eval_mode(model), _preserved_rng():
        # An object, not a name: HFLM then loads nothing, from the hub or anywhere else.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        if progress is not None:
            _RequestCounter(lm, progress)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            task_manager=task_manager,
            limit=config.limit,
            num_fewshot=config.num_fewshot,
            log_samples=log_samples,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    if output is None:  # only on non-zero ranks of a distributed run
        raise EvaluationError("lm-eval returned no results")
    return output


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """lm-eval seeds the global random, numpy and torch generators; give the caller its own back."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a stderr it could not compute (e.g. one sample).
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def evaluate_zeroshot(model, tokenizer, config: ZeroShotConfig | None = None,
                      work_dir: str | Path | None = None, progress=None) -> ZeroShotResult:
    """Per-task acc/acc_norm and the paper's mean (of ``acc``) over ``config.tasks``;
    ``progress(done, total)`` counts lm-eval requests answered."""
    config = config or ZeroShotConfig()
    started = time.perf_counter()
    with prepared_tasks(config, work_dir) as (manager, data_digests, definition_digests):
        output = run_lm_eval(model, tokenizer, config, manager, progress=progress)
    files = expected_data_files(config) if config.task_source == "local" else {}
    scores: dict[str, TaskScore] = {}
    for name in config.tasks:
        metrics = output["results"].get(name)
        if metrics is None or _number(metrics.get("acc,none")) is None:
            raise EvaluationError(f"lm-eval reported no acc for task {name!r}")
        scores[name] = TaskScore(
            acc=_number(metrics["acc,none"]),
            acc_stderr=_number(metrics.get("acc_stderr,none")),
            acc_norm=_number(metrics.get("acc_norm,none")),
            acc_norm_stderr=_number(metrics.get("acc_norm_stderr,none")),
            samples=int(output.get("n-samples", {}).get(name, {}).get("effective", 0)),
            data_file=str(files[name]) if name in files else None,
            data_digest=data_digests.get(name),
            definition_digest=definition_digests.get(name),
        )
    mean = sum(s.acc for s in scores.values()) / len(scores)
    log.info("zero-shot mean %s over %d tasks: %.4f", MEAN_METRIC, len(scores), mean)
    return ZeroShotResult(
        tasks=scores, mean=mean, limit=config.limit, num_fewshot=config.num_fewshot, batch_size=config.batch_size,
        seed=config.seed, task_source=config.task_source, lm_eval_version=_version("lm_eval"),
        wall_s=time.perf_counter() - started,
    )


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"
