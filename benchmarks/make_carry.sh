#!/usr/bin/env bash
# Builds .carry/ (git-ignored) for the one-shot check on the lent GPU machine (make carry):
#   bash benchmarks/make_carry.sh          # then bring .carry along; there: bash benchmarks/gpu_check.sh
# - ffcv and its companions and native libraries, packed by ../shared/device/make-carry.sh
#   (ffcv-carry.tar.gz + activate.sh);
# - lib/: our region decoder (imagenet_ffcv/_jpeg_region*.so, built here by make setup's
#   pip install -e .) and the libjpeg it links, for a machine without a C compiler or libjpeg
#   headers;
# - data/: the JPEGs of ../shared/data/imagenette (1,500 train + 500 val, 224 x 224) and
#   imagewoof320 (160); the .beton files are written there (16 cores: seconds), since betons of
#   these images are bigger than the JPEGs (imagenette train alone: 42 MB);
# - meta/: ffcv's package metadata (its version, for the reports);
# - COMMIT: the git commit (and uncommitted changes) the .carry was made from.
# Everything that travels must stay under 64 MiB; the total is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
shared=${SHARED:-../shared}
out=.carry

rm -rf "$out"
mkdir -p "$out/lib" "$out/data"
"$shared/device/make-carry.sh" "$py" "$out"

# safetensors (a pinned dependency; abi3 wheel, so it loads under 3.12 as well): python/
mkdir -p "$out/python"
cp -r "$("$py" -c 'import safetensors, os; print(os.path.dirname(safetensors.__file__))')" "$out/python/"

# ffcv's metadata (the carried ffcv has none): meta/, so that the reports name its version
ffcv_meta=$("$py" -c 'from importlib.metadata import distribution as d
print(d("ffcv").read_text("METADATA"))')
ffcv_version=$(sed -n 's/^Version: //p' <<< "$ffcv_meta" | head -n 1)
mkdir -p "$out/meta/ffcv-$ffcv_version.dist-info"
printf '%s\n' "$ffcv_meta" > "$out/meta/ffcv-$ffcv_version.dist-info/METADATA"

find_so='from imagenet_ffcv import jpeg_region as j; j.load_library(); print(j.library_path())'
so=$("$py" -c "$find_so")
cp "$so" "$out/lib/"
ldd "$so" | awk '/libjpeg/ {print $3}' | while read -r lib; do cp -L "$lib" "$out/lib/"; done
echo "region decoder: $(cd "$out/lib" && ls)"

for set in imagenette imagewoof320; do
  cp -r "$shared/data/$set" "$out/data/"
done
echo "data: $(find "$out/data" -name '*.JPEG' | wc -l) JPEGs"

{ git rev-parse --short HEAD
  git status --porcelain --untracked-files=no | sed 's/^/  changed: /'; } > "$out/COMMIT"

tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
carry=$(du -sb "$out" | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "$out: $(mib "$carry"); with the tracked files ($(mib "$tree")): $(mib $((carry + tree)))" \
     "of the 64 MiB that travel"
du -sh "$out"/*
