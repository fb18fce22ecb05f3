# Sourced by gpu_check.sh and gpu_speed.sh (from the repository root, with $name set to the
# caller's name): sets $py, a Python that imports ffcv, and the paths our region decoder needs. On
# the lent GPU machine (Python 3.12 with torch, no ffcv, no network) ffcv comes from .carry (make
# carry) and the decoder from .carry/lib; on a machine with the project's .venv, the .venv is used.

# Python with ffcv: the project's .venv when it has it, else python3 (+ .carry's ffcv if needed).
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import ffcv' 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
  if ! "$py" -c 'import ffcv' 2>/dev/null; then
    if [ -f .carry/activate.sh ]; then
      source .carry/activate.sh  # unpacks to /tmp/ffcv-carry, sets PYTHONPATH, LD_LIBRARY_PATH
      [ -d .carry/meta ] && export PYTHONPATH=$PYTHONPATH:$PWD/.carry/meta  # ffcv's version
    else
      echo "$name: ffcv is not importable and there is no .carry/ (run 'make carry' on" \
           "a machine with the project's .venv and bring .carry along)" >&2
    fi
  fi
fi

# Pinned dependencies the GPU machine lacks (safetensors, an abi3 wheel): .carry/python.
if [ -d .carry/python ] && ! "$py" -c 'import safetensors' 2>/dev/null; then
  export PYTHONPATH=$PWD/.carry/python${PYTHONPATH:+:$PYTHONPATH}
fi

# Our region decoder: jpeg_region.library_path() looks for _jpeg_region*.so beside jpeg_region.py
# (pip install builds it there); put the one built by make carry there, and its libjpeg on the
# library path, unless one is there already.
if [ -d .carry/lib ]; then
  export LD_LIBRARY_PATH=$PWD/.carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if ! ls imagenet_ffcv/_jpeg_region*.so >/dev/null 2>&1; then
    if ls .carry/lib/_jpeg_region*.so >/dev/null 2>&1; then
      cp .carry/lib/_jpeg_region*.so imagenet_ffcv/
    else
      echo "$name: warning: .carry/lib has no _jpeg_region*.so (run make carry again);" \
           "the slower fallback runs" >&2
    fi
  fi
fi
