"""Savings of two candidates of the embedded SmolLM2-135M against dense, through wanda.savings
(the savings stage's own measurement) at the stage's default settings; the README's table.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_savings.py [MODEL_DIR]

Candidates: 50% magnitude zeros per row in every decoder linear (stands in for unstructured
Wanda: same storage, same kernels) and 30% of the MLP channels removed (wanda.structure).
Writes /tmp/bench_savings/ (model folders, result.json).
"""
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from tasks.savings import savings_metrics, _sentences
from wanda.model_io import load_model, save_model
from wanda.savings import SpeedSettings, checkpoint_bytes, measure_memory, measure_speed, parameter_counts
from wanda.calibration import CalibrationConfig, sample_calibration
from wanda.data import TextSource
from wanda.structure import StructureConfig, apply_structure
logging.basicConfig(level=logging.WARNING)
base = sys.argv[1] if len(sys.argv) > 1 else "/tmp/base/model"
OUT = Path("/tmp/bench_savings")
dense, tok = load_model(base, dtype="float32")
settings = SpeedSettings()
# unstructured: 50% magnitude zeros per row in every decoder linear (stored dense, as Wanda's)
unstr, _ = load_model(base, dtype="float32")
with torch.no_grad():
    for name, mod in unstr.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight; k = w.shape[1] // 2
            idx = w.abs().argsort(dim=1)[:, :k]; w.scatter_(1, idx, 0.0)
save_model(unstr, tok, str(OUT / "unstructured"))
calib = sample_calibration(tok, CalibrationConfig(source=TextSource(path="shared:wikitext-2/valid.txt"), nsamples=8, seqlen=128, seed=0))
narrow, report = apply_structure(load_model(base, dtype="float32")[0], calib.tokens, StructureConfig(mlp_channels_removed=0.3), batch_size=4)
save_model(narrow, tok, str(OUT / "mlp30"))
out = {}
for label, model, folder in (("unstructured 50%", unstr, str(OUT / "unstructured")), ("30% MLP channels", narrow, str(OUT / "mlp30"))):
    figs = {}
    for who, m, f in (("dense", dense, base), ("pruned", model, folder)):
        t, nz = parameter_counts(m); figs[who] = {"params_total": t, "params_nonzero": nz, "bytes": checkpoint_bytes(f)}
    speed = measure_speed(dense, model, settings)
    mem = {"dense": measure_memory(base, "float32", settings), "pruned": measure_memory(folder, "float32", settings)}
    m = savings_metrics(figs["dense"], figs["pruned"], speed, mem)
    out[label] = {k: m[k] for k in ("param_reduction", "nonzero_reduction", "bytes_reduction", "prefill_speedup_cpu", "prefill_speedup_wall", "decode_speedup_cpu", "decode_speedup_wall", "peak_memory_ratio", "load_peak_mb", "dense.load_peak_mb", "generate_peak_mb", "dense.generate_peak_mb")}
    out[label]["sentences"] = _sentences(m, "unstructured")
    print(label, json.dumps(out[label], indent=1), flush=True)
json.dump(out, open(OUT / "result.json", "w"), indent=1)
