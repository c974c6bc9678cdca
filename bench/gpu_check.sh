#!/usr/bin/env bash
# The prepared device check (see bench/gpu_check.py): CUDA tests, kernels against their references and
# their share of the memory bandwidth, the interleaved step table, measured peak memory of llama_1b and of
# llama_7b capped at 24 GiB. One JSON and one Markdown table land in OUT (default bench/results).
#
#   bash bench/gpu_check.sh [OUT]
#
# Under 8 minutes on one H100/H200 (each part has its own limit inside that budget); on a machine without
# CUDA it runs end to end with the GPU parts skipped and named. Exit status 1 if any part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  limit=540  # the parts' own limits add up to 8 minutes; this one only catches a hang between them
else
  echo "no CUDA device: the GPU parts are skipped and named, the rest run reduced"
  limit=2400
fi
timeout "$limit" python3 bench/gpu_check.py --out "$out"
