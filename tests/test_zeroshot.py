"""Zero-shot accuracy through lm-eval, offline: hand-checked local task, paper tasks, failures."""
from __future__ import annotations

import bz2
import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from tests.tiny import VOCAB, tiny_model, tiny_tokenizer
from wanda.errors import ConfigError, EvaluationError
from wanda.evaluation.zeroshot import (
    LOCAL_TASKS,
    PAPER_TASKS,
    ZeroShotConfig,
    evaluate_zeroshot,
    prepared_tasks,
    run_lm_eval,
    write_local_tasks,
)

lm_eval = pytest.importorskip("lm_eval")
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


# ---------------------------------------------------------------- a local task written here

def mc_docs(count: int = 15, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    phrase = lambda n: " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n))  # noqa: E731
    docs = []
    for i in range(count):
        choices = [phrase(rng.randint(1, 3)) for _ in range(2 + i % 3)]
        docs.append({"query": phrase(rng.randint(2, 6)), "choices": choices, "gold": i % len(choices)})
    return docs


def write_mc_task(folder: Path, docs: list[dict], name: str = "tiny_mc") -> Path:
    """An lm-eval multiple-choice task over ``docs`` with local data, as a user would write one."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder.parent / "hf-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }))
    return folder


def hand_loglikelihoods(model, tokenizer, docs: list[dict]) -> list[list[float]]:
    """log p(" " + choice | query), summed over the choice's tokens, by direct forward passes."""
    out = []
    with torch.no_grad():
        for doc in docs:
            context = tokenizer(doc["query"]).input_ids
            row = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["query"] + " " + choice).input_ids
                assert whole[:len(context)] == context
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
                row.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(context), len(whole))))
            out.append(row)
    return out


@pytest.fixture(scope="module")
def model64():
    return tiny_model("llama", dtype=torch.float64, seed=4)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_local_task_accuracy_equals_hand_computation(tmp_path, model64, tok):
    docs = mc_docs()
    folder = write_mc_task(tmp_path / "tasks", docs)
    config = ZeroShotConfig(tasks=["tiny_mc"], task_source="include_path", include_path=str(folder), batch_size=3)
    result = evaluate_zeroshot(model64, tok, config)

    lls = hand_loglikelihoods(model64, tok, docs)
    acc = np.mean([int(np.argmax(ll)) == d["gold"] for ll, d in zip(lls, docs)])
    lengths = [np.array([len(c) for c in d["choices"]], dtype=float) for d in docs]
    acc_norm = np.mean([int(np.argmax(np.array(ll) / n)) == d["gold"] for ll, n, d in zip(lls, lengths, docs)])
    assert 0 < acc < 1 and acc != acc_norm  # the data separates the metrics, so the check means something
    score = result.tasks["tiny_mc"]
    assert score.samples == len(docs)
    assert score.acc == pytest.approx(acc, abs=1e-12)
    assert score.acc_norm == pytest.approx(acc_norm, abs=1e-12)
    assert result.mean == score.acc and result.mean_metric == "acc"
    assert score.acc_stderr == pytest.approx(np.std([int(np.argmax(ll)) == d["gold"] for ll, d in zip(lls, docs)],
                                                    ddof=1) / np.sqrt(len(docs)), rel=1e-9)


def test_lm_eval_loglikelihoods_equal_direct_forward(tmp_path, model64, tok):
    docs = mc_docs(count=6, seed=1)
    folder = write_mc_task(tmp_path / "tasks", docs)
    config = ZeroShotConfig(tasks=["tiny_mc"], task_source="include_path", include_path=str(folder), batch_size=4)
    with prepared_tasks(config) as (manager, _, _):
        output = run_lm_eval(model64, tok, config, manager, log_samples=True)
    expected = hand_loglikelihoods(model64, tok, docs)
    samples = sorted(output["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for sample, row in zip(samples, expected):
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(row, abs=1e-9)


def test_progress_counts_every_request_and_changes_no_result(tmp_path, model64, tok):
    docs = mc_docs(count=5, seed=2)
    folder = write_mc_task(tmp_path / "tasks", docs)
    config = ZeroShotConfig(tasks=["tiny_mc"], task_source="include_path", include_path=str(folder), batch_size=2)
    calls: list[tuple[int, int]] = []
    watched = evaluate_zeroshot(model64, tok, config, progress=lambda done, total: calls.append((done, total)))
    plain = evaluate_zeroshot(model64, tok, config)
    requests = sum(len(d["choices"]) for d in docs)  # one loglikelihood request per choice
    assert calls[0] == (0, requests) and calls[-1] == (requests, requests)
    assert [done for done, _ in calls] == list(range(requests + 1))  # every request, once, in order
    assert watched.tasks == plain.tasks


def test_limit_seed_and_determinism(tmp_path, model64, tok):
    folder = write_mc_task(tmp_path / "tasks", mc_docs())
    config = ZeroShotConfig(tasks=["tiny_mc"], task_source="include_path", include_path=str(folder), limit=5, seed=7)
    random.seed(99)
    expected_next = random.random()
    random.seed(99)
    first, second = evaluate_zeroshot(model64, tok, config), evaluate_zeroshot(model64, tok, config)
    assert random.random() == expected_next  # lm-eval's seeding did not leak into the caller
    assert first.tasks == second.tasks and first.mean == second.mean
    assert first.tasks["tiny_mc"].samples == 5 and first.limit == 5 and first.seed == 7


def test_missing_task_data_names_task_and_file_before_model_work(tmp_path):
    present = tmp_path / "zeroshot" / "boolq"
    present.mkdir(parents=True)
    (present / "val.jsonl").write_text("")
    config = ZeroShotConfig(tasks=["boolq", "hellaswag", "arc_easy"], data_dir=str(tmp_path / "zeroshot"))
    # model=None: any model work before the check would fail with another error.
    with pytest.raises(EvaluationError) as info:
        evaluate_zeroshot(None, None, config)
    message = str(info.value)
    assert "'hellaswag'" in message and str(tmp_path / "zeroshot/hellaswag/hellaswag_val_full.txt.bz2") in message
    assert "'arc_easy'" in message and "ARC-Easy-Test.jsonl" in message
    assert "'boolq'" not in message


def test_task_absent_from_include_path(tmp_path):
    folder = write_mc_task(tmp_path / "tasks", mc_docs(3))
    config = ZeroShotConfig(tasks=["tiny_mc", "other"], task_source="include_path", include_path=str(folder))
    with pytest.raises(EvaluationError, match=r"\['other'\]"):
        evaluate_zeroshot(None, None, config)


def test_config_validation():
    assert ZeroShotConfig().tasks == list(PAPER_TASKS)
    with pytest.raises(ConfigError) as info:
        evaluate_zeroshot(None, None, ZeroShotConfig(tasks=["boolq", "mmlu"]))
    assert info.value.field == "evaluation.zeroshot.tasks" and "mmlu" in str(info.value)
    for bad in ({"limit": 1.5}, {"limit": 0}, {"tasks": []}, {"tasks": ["rte", "rte"]},
                {"task_source": "include_path"}, {"include_path": "/x"}, {"num_fewshot": -1}):
        with pytest.raises(ValidationError):
            ZeroShotConfig(**bad)
    assert ZeroShotConfig(limit=5.0).limit == 5 and ZeroShotConfig(limit=0.25).limit == 0.25


# ---------------------------------------------------------------- fidelity to lm-eval's built-ins

class _Tagged(yaml.SafeLoader):
    pass


_Tagged.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")

BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_easy.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_definitions_mirror_builtin_tasks(task):
    builtin = yaml.load((LM_EVAL_TASKS / BUILTIN_YAML[task]).read_text(), Loader=_Tagged)
    local = LOCAL_TASKS[task]
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "doc_to_decontamination_query",
                "should_decontaminate"):
        if key in local.functions:
            assert builtin[key] == f"!function preprocess_winogrande.{local.functions[key].split('.')[1]}"
        else:
            assert local.fields.get(key) == builtin.get(key), key
    assert [m["metric"] for m in local.fields["metric_list"]] == [m["metric"] for m in builtin["metric_list"]]
    assert f"{local.split}_split" in builtin


def test_helper_functions_are_lm_evals():
    namespace: dict = {}
    exec(LOCAL_TASKS["winogrande"].utils, namespace)
    from lm_eval.tasks.winogrande import preprocess_winogrande as builtin

    for doc in ({"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"},
                {"sentence": "_ was late, so the bus left.", "option1": "Tom", "option2": "The car", "answer": "2"}):
        for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert namespace[name](doc) == getattr(builtin, name)(doc)
    exec(LOCAL_TASKS["hellaswag"].utils, namespace)
    from lm_eval.tasks.hellaswag.utils import preprocess

    for text in ("A man [title] sits.  [step] He [header] waves ", "plain text", " x [substeps] y"):
        assert namespace["preprocess"](text) == preprocess(text)


def _doc0(manager, task: str) -> tuple:
    from lm_eval.tasks import get_task_dict

    obj = get_task_dict([task], manager)[task]
    doc = next(iter(obj.test_docs() if obj.has_test_docs() else obj.validation_docs()))
    return obj.doc_to_text(doc), obj.doc_to_choice(doc), obj.doc_to_target(doc)


def test_generated_tasks_render_the_shared_data(shared_data, tmp_path):
    root = shared_data / "zeroshot"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    config = ZeroShotConfig(limit=2)
    digests = write_local_tasks(config, tmp_path / "tasks", tmp_path / "cache")
    assert set(digests) == set(PAPER_TASKS)
    assert all(len((tmp_path / "tasks" / t / "data.jsonl").read_text().splitlines()) == 2 for t in PAPER_TASKS)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    first = lambda rel: json.loads((root / rel).read_text().splitlines()[0])  # noqa: E731

    boolq = first("boolq/val.jsonl")
    assert _doc0(manager, "boolq") == (f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:", ["no", "yes"],
                                       int(boolq["label"] == "true"))
    import pyarrow.parquet as pq

    rte = pq.read_table(root / "rte/validation.parquet").slice(0, 1).to_pylist()[0]
    assert _doc0(manager, "rte") == (f"{rte['sentence1']}\nQuestion: {rte['sentence2']} True or False?\nAnswer:",
                                     ["True", "False"], rte["label"])
    with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        lines = [next(handle).rstrip("\n") for _ in range(6)]
    assert _doc0(manager, "hellaswag") == (lines[0], lines[2:6], int(lines[1]))
    wino = first("winogrande/dev.jsonl")
    blank = wino["sentence"].index("_")
    assert _doc0(manager, "winogrande") == (int(wino["answer"]) - 1,
                                           [wino["sentence"][:blank] + wino[o] for o in ("option1", "option2")],
                                           wino["sentence"][blank + 1:].strip())
    for task, rel in (("arc_easy", "arc_easy/ARC-Easy-Test.jsonl"), ("openbookqa", "openbookqa/test.jsonl")):
        row = first(rel)
        labels = [c["label"] for c in row["question"]["choices"]]
        text = f"Question: {row['question']['stem']}\nAnswer:" if task == "arc_easy" else row["question"]["stem"]
        assert _doc0(manager, task) == (text, [c["text"] for c in row["question"]["choices"]],
                                        labels.index(row["answerKey"]))


def test_all_paper_tasks_on_tiny_model_offline(shared_data, monkeypatch, tmp_path):
    if not (shared_data / "zeroshot").is_dir():
        pytest.skip("shared zero-shot data absent")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = tiny_model("llama", seed=5)
    result = evaluate_zeroshot(model, tiny_tokenizer(), ZeroShotConfig(limit=2), work_dir=tmp_path)
    assert list(result.tasks) == list(PAPER_TASKS)
    assert result.mean == pytest.approx(sum(s.acc for s in result.tasks.values()) / 7)
    for task, score in result.tasks.items():
        assert score.samples == 2 and score.data_digest and score.definition_digest
        assert (score.acc_norm is None) == (task in {"boolq", "rte", "winogrande"})


# ---------------------------------------------------------------- the embedded model

@pytest.mark.integration
def test_embedded_model_two_tasks(embedded_model_dir, shared_data):
    if not (shared_data / "zeroshot").is_dir():
        pytest.skip("shared zero-shot data absent")
    from wanda.model_io import load_model

    model, tokenizer = load_model(str(embedded_model_dir))
    config = ZeroShotConfig(tasks=["arc_easy", "winogrande"], limit=5, batch_size=4)
    result = evaluate_zeroshot(model, tokenizer, config)
    assert [s.samples for s in result.tasks.values()] == [5, 5]
    assert result.mean == pytest.approx((result.tasks["arc_easy"].acc + result.tasks["winogrande"].acc) / 2)

    # ARC-e by hand, with lm-eval's encoding: the whole string, split after the context's tokens.
    rows = [json.loads(line) for line in
            (shared_data / "zeroshot/arc_easy/ARC-Easy-Test.jsonl").read_text().splitlines()[:5]]
    correct, correct_norm = [], []
    with torch.no_grad():
        for row in rows:
            context = f"Question: {row['question']['stem']}\nAnswer:"
            ctx_ids = tokenizer(context).input_ids
            lls = []
            choices = [c["text"] for c in row["question"]["choices"]]
            for choice in choices:
                whole = tokenizer(context + " " + choice).input_ids
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
                lls.append(sum(float(logprobs[t - 1, whole[t]]) for t in range(len(ctx_ids), len(whole))))
            gold = [c["label"] for c in row["question"]["choices"]].index(row["answerKey"])
            correct.append(int(np.argmax(lls)) == gold)
            correct_norm.append(int(np.argmax(np.array(lls) / [len(c) for c in choices])) == gold)
    assert result.tasks["arc_easy"].acc == pytest.approx(np.mean(correct))
    assert result.tasks["arc_easy"].acc_norm == pytest.approx(np.mean(correct_norm))
