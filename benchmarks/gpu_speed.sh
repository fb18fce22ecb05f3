#!/usr/bin/env bash
# The GPU speed measurement (benchmarks/gpu_speed.py, issue 26), with what it needs set up first
# exactly as gpu_check.sh does it:
#   bash benchmarks/gpu_speed.sh [gpu_speed.py options, e.g. --sections compile,cudagraphs]
# On the lent GPU machine (Python 3.12 with torch, no ffcv, no network) bring .carry along (make
# carry): ffcv is then taken from .carry/activate.sh and our region decoder from .carry/lib. On a
# machine with the project's .venv, the .venv is used. Whole run: at most GPU_SPEED_BUDGET_S
# (default 450) + 30 seconds, under the GPU machine's 10 minutes per command.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${GPU_SPEED_BUDGET_S:-450}

name=gpu_speed.sh
source benchmarks/carry_env.sh  # sets $py: Python with ffcv, .carry's decoder

echo "gpu_speed.sh: $("$py" --version 2>&1) at $(command -v "$py"); budget $budget s"
timeout -k 10 $((budget + 20)) "$py" benchmarks/gpu_speed.py --budget-s "$budget" "$@"
status=$?
[ $status -eq 124 ] && echo "gpu_speed.sh: killed after $((budget + 20)) s" \
  "(bench-results/gpu_speed.md holds the sections that finished)" >&2
exit $status
