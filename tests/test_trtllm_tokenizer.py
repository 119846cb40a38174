"""The tokenizer handed to trtllm-bench loads under the transformers TensorRT-LLM 1.2 pins.

TensorRT-LLM 1.2's requirements.txt pins ``transformers==4.57.1``. The test installs exactly that
into a throwaway virtual environment, cached between runs under
``~/.cache/wanda-test-venvs/`` (the first install takes about a minute; skipped, with the reason,
when the package registry cannot be reached), and loads our folder there in a subprocess.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny import tiny_model, tiny_tokenizer
from wanda.export.tokenizer_compat import write_trtllm_model_dir
from wanda.model_io import save_model

TRTLLM_TRANSFORMERS = "4.57.1"  # TensorRT-LLM 1.2 requirements.txt: transformers==4.57.1
VENVS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wanda-test-venvs"
TEXTS = ["w1 w2 w3", "w17 w99 w5 w5", "w123 unknownword w0"]

LOAD = textwrap.dedent("""
    import json, sys
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    out = {"version": transformers.__version__}
    for key, path in (("compat", sys.argv[1]), ("original", sys.argv[2])):
        try:
            tok = AutoTokenizer.from_pretrained(path)
            out[key] = {"class": type(tok).__name__, "ids": [tok(t)["input_ids"] for t in json.loads(sys.argv[3])],
                        "eos": tok.eos_token_id, "pad": tok.pad_token_id}
        except Exception as exc:
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
    config = AutoConfig.from_pretrained(sys.argv[1]).to_dict()  # what TensorRT-LLM's ModelConfig is built from
    out["model_type"] = config["model_type"]
    out["dtype"] = str(config.get("dtype", config.get("torch_dtype")))
    print(json.dumps(out))
""")


def _venv_python() -> Path:
    """Python of the cached venv with transformers==4.57.1 (created once, under a lock)."""
    venv = VENVS / f"transformers-{TRTLLM_TRANSFORMERS}"
    python = venv / "bin" / "python"
    done = venv / ".complete"
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f".transformers-{TRTLLM_TRANSFORMERS}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions share one install
        if not done.exists():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
            proc = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                                   f"transformers=={TRTLLM_TRANSFORMERS}"], capture_output=True, text=True,
                                  timeout=900)
            if proc.returncode != 0:
                pytest.skip(f"cannot install transformers=={TRTLLM_TRANSFORMERS} from the package registry "
                            f"(unreachable?): {proc.stderr.strip()[-300:]}")
            done.write_text(TRTLLM_TRANSFORMERS + "\n")
    return python


def test_trtllm_bench_tokenizer_loads_under_transformers_4_57(tmp_path):
    python = _venv_python()
    save_model(tiny_model(), tiny_tokenizer(), tmp_path / "pruned")  # as the prune stage writes it
    assert json.loads((tmp_path / "pruned" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "TokenizersBackend"  # what transformers 5 writes
    compat = write_trtllm_model_dir(tmp_path / "pruned", tmp_path / "trtllm_model", dtype="float16")
    assert [p.name for p in compat.glob("*.safetensors")] == ["model.safetensors"]  # header only
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", LOAD, str(compat), str(tmp_path / "pruned"), json.dumps(TEXTS)],
                          capture_output=True, text=True, timeout=300, env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["version"] == TRTLLM_TRANSFORMERS and seen["model_type"] == "llama"
    assert seen["dtype"] == "float16"  # the engine's, not the pruned model's float32
    # The folder transformers 5 saved does not load there: this is what trtllm-bench would hit.
    assert "TokenizersBackend" in seen["original"].get("error", ""), seen["original"]
    ours = tiny_tokenizer()
    assert seen["compat"]["class"] == "PreTrainedTokenizerFast"
    assert seen["compat"]["ids"] == [ours(t)["input_ids"] for t in TEXTS]
    assert (seen["compat"]["eos"], seen["compat"]["pad"]) == (ours.eos_token_id, ours.pad_token_id)
