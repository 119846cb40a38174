#!/usr/bin/env bash
# GPU check of 2:4 sparsity (cuSPARSELt) against dense at LLaMA-3-8B shapes; see benchmarks/gpu_check.py.
# Writes header.txt, table.md, rows.jsonl, summary.json under $OUT when set (the device machine sends
# back only $OUT), else under artifacts/gpu_check; every row as soon as it is measured, unbuffered.
# Stops starting rows at 240 s and is killed at 300 s (rows done stay written). Without a CUDA GPU
# it says so in one line and exits 2.
#   OUT=$OUT bash benchmarks/gpu_check.sh [--tokens 1,16,128,2048] [--dtypes float16,bfloat16] [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
exec timeout -k 5 300 "$PYTHON" -u benchmarks/gpu_check.py --out-dir "${OUT:-artifacts/gpu_check}" "$@"
