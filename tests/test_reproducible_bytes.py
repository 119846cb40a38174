"""Artifacts are bit-reproducible: the same inputs give the same bytes in any process and whether
the masks were computed on the loaded or on the streamed model (issue 14, item 3)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline_stages import _params, project  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parent.parent

# Writes a masks file, a statistics file and a calibration file from seeded tensors, each with
# several metadata keys (the order of which safetensors' own writer takes from a per-process seed).
_WRITER = """
import sys, torch
from pathlib import Path
from wanda.calibration import CalibrationSet
from wanda.masks import MaskDict, save_masks
from wanda.statistics import ActivationStatistics, ChannelStats
out = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
masks = MaskDict({f"model.layers.{i}.mlp.{p}": torch.rand(8, 16, generator=g) > 0.5
                  for i in range(3) for p in ("up_proj", "down_proj")})
save_masks(out / "masks.safetensors", masks, {"recipe": "r", "base_model_fingerprint": "f", "calibration": "c"})
stats = ActivationStatistics(metadata={"mode": "one_pass", "model_type": "llama"})
for name in masks:
    stats.layers[name] = ChannelStats(torch.rand(16, generator=g), torch.rand(16, generator=g), 7)
stats.save(out / "statistics.safetensors", {"base_model_fingerprint": "f"})
CalibrationSet(torch.arange(64).reshape(4, 16), "d" * 64, {"b": 1, "a": 2}).save(
    out / "tokens.safetensors", {"source": "s", "seed": 0})
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_give_the_same_bytes_in_every_process(tmp_path):
    digests = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", _WRITER, str(out)], check=True, env=env, cwd=REPO)
        digests.append({p.name: _sha256(p) for p in sorted(out.iterdir())})
    assert len(digests[0]) == 3
    assert digests[0] == digests[1] == digests[2]


@pytest.mark.parametrize("mode", ["one_pass", "sequential"])
def test_loaded_and_streamed_masks_are_the_same_file(project, mode):  # noqa: F811 (the imported fixture)
    from tasks import calibration, masks, materialize, statistics

    files = {}
    for load in ("full", "stream"):
        params = _params(f"statistics.mode={mode}", f"runtime.load={load}",
                         *(f"paths.{s}=artifacts/{load}/{s}" for s in ("statistics", "masks")))
        if load == "full":
            materialize.run(params, project)
            calibration.run(params, project)
        statistics.run(params, project)
        masks.run(params, project)
        files[load] = project / params.paths.masks / "masks.safetensors"
    assert _sha256(files["full"]) == _sha256(files["stream"])
