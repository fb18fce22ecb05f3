#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py), with what it needs set up first:
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --only learn,eval_only,predict]
# (make gpu-check). On the lent GPU machine (Python 3.12 with torch, no ffcv, no network) bring
# .carry along (make carry): ffcv is then taken from .carry/activate.sh and our region decoder
# from .carry/lib. On a CUDA machine with the project's .venv, the .venv is used. Whole run: at
# most GPU_CHECK_BUDGET_S (default 440) + 30 seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${GPU_CHECK_BUDGET_S:-440}

name=gpu_check.sh
source benchmarks/carry_env.sh  # sets $py: Python with ffcv, .carry's decoder

echo "gpu_check.sh: $("$py" --version 2>&1) at $(command -v "$py"); budget $budget s"
timeout -k 10 $((budget + 20)) "$py" benchmarks/gpu_check.py --budget-s "$budget" "$@"
status=$?
[ $status -eq 124 ] && echo "gpu_check.sh: killed after $((budget + 20)) s" \
  "(bench-results/gpu.md holds the steps that finished)" >&2
exit $status
