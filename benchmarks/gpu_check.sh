#!/usr/bin/env bash
# One GPU check of 2:4 sparsity (cuSPARSELt): per-layer matmul and end-to-end ratios, sparse vs
# dense, as a markdown table. Needs one CUDA GPU (compute capability >= 8.0; H100/H200: under
# 8 minutes) and a CUDA build of PyTorch; nothing else. Without them it exits 2 and says why.
#   bash benchmarks/gpu_check.sh [--dry-run] [--skip-model] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
