"""Stand-ins for TensorRT-LLM's ``trtllm-build`` and ``trtllm-bench`` (which need a GPU).

They accept exactly the real tools' options (``trtllm_flags.json``, copied from TensorRT-LLM
1.2's argparse/click definitions), fail like the real tools on anything else, and write what
the real tools write: an engine folder with ``config.json`` and TensorRT's ``(Sparsity)`` build
log lines; a ``--report_json`` report and the console report. ``site/sitecustomize.py`` makes a
subprocess see a GPU (``wanda.export.engine.nvidia_gpu_visible``) when ``site/`` is on its
PYTHONPATH: the tests put it there, nothing else does.
"""
from __future__ import annotations

import stat
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = HERE / "trtllm_flags.json"
SITE = HERE / "site"
TOOLS = {"trtllm-build": "trtllm_build.py", "trtllm-bench": "trtllm_bench.py"}


def install(bin_dir: Path) -> Path:
    """Executables ``trtllm-build`` and ``trtllm-bench`` in ``bin_dir`` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool, script in TOOLS.items():
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv[0] = {tool!r}\n"
                        f"runpy.run_path({str(HERE / script)!r}, run_name='__main__')\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir
