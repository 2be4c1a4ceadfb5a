#!/usr/bin/env bash
# The main job: builds if needed, then applies the layer to generated data
# and prints timings beside the copy bandwidth and the error against a
# float64 single-rank reference.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/distgn ] || scripts/build.sh >/dev/null
echo "== distgn: GroupNorm (G=32) forward and backward on the CPU, float32 =="
build/distgn bench --shape "8,64,64,320;2,16,16,1280" --iters 10 --warmup 2 --check "$@"
