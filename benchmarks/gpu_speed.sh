#!/usr/bin/env bash
# The GPU speed measurement (benchmarks/gpu_speed.py, issue 26), with what it needs set up first
# exactly as gpu_check.sh does it:
#   bash benchmarks/gpu_speed.sh [gpu_speed.py options, e.g. --sections compile,cudagraphs]
# On the lent GPU machine (Python 3.12 with torch, no ffcv, no network) bring .carry along (make
# carry): ffcv is then taken from .carry/activate.sh and our region decoder from .carry/lib. On a
# machine with the project's .venv, the .venv is used. Whole run: at most GPU_SPEED_BUDGET_S
# (default 450) + 30 seconds, under the GPU machine's 8 minutes per command.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${GPU_SPEED_BUDGET_S:-450}

# Python with ffcv: the project's .venv when it has it, else python3 (+ .carry's ffcv if needed).
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import ffcv' 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
  if ! "$py" -c 'import ffcv' 2>/dev/null; then
    if [ -f .carry/activate.sh ]; then
      source .carry/activate.sh  # unpacks to /tmp/ffcv-carry, sets PYTHONPATH, LD_LIBRARY_PATH
    else
      echo "gpu_speed.sh: ffcv is not importable and there is no .carry/ (run 'make carry' on" \
           "a machine with the project's .venv and bring .carry along)" >&2
    fi
  fi
fi

# Pinned dependencies the GPU machine lacks (safetensors, an abi3 wheel): .carry/python.
if [ -d .carry/python ] && ! "$py" -c 'import safetensors' 2>/dev/null; then
  export PYTHONPATH=$PWD/.carry/python${PYTHONPATH:+:$PYTHONPATH}
fi

# Our region decoder: decoders.library_path() looks for _jpeg_region*.so beside decoders.py (pip
# install builds it there); put the one built by make carry there, and its libjpeg on the library
# path, unless one is there already.
if [ -d .carry/lib ]; then
  export LD_LIBRARY_PATH=$PWD/.carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if ! ls imagenet_ffcv/_jpeg_region*.so >/dev/null 2>&1; then
    if ls .carry/lib/_jpeg_region*.so >/dev/null 2>&1; then
      cp .carry/lib/_jpeg_region*.so imagenet_ffcv/
    else
      echo "gpu_speed.sh: warning: .carry/lib has no _jpeg_region*.so (run make carry again);" \
           "the slower fallback runs" >&2
    fi
  fi
fi

echo "gpu_speed.sh: $("$py" --version 2>&1) at $(command -v "$py"); budget $budget s"
timeout -k 10 $((budget + 20)) "$py" benchmarks/gpu_speed.py --budget-s "$budget" "$@"
status=$?
[ $status -eq 124 ] && echo "gpu_speed.sh: killed after $((budget + 20)) s" \
  "(bench-results/gpu_speed.md holds the sections that finished)" >&2
exit $status
