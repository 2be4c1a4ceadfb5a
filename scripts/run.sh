#!/usr/bin/env bash
# The main job: builds if needed, then applies the layer to generated data,
# first on one rank, then sharded over 4 ranks under mpirun (statistics merged
# in one collective per call), printing times beside the copy bandwidth, the
# time spent in the collective, and the largest difference from a float64
# single-rank run of the same data.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/distgn ] || scripts/build.sh >/dev/null
shape="${SHAPE:-8,64,64,320}"
echo "== one rank, all cores =="
build/distgn bench --shape "$shape" --iters 10 --warmup 2 --check
echo
ranks="${RANKS:-4}"
echo "== $ranks ranks under mpirun, x split along H (--shard-axis 1), one thread each =="
# --oversubscribe: more ranks than cores is fine for a demonstration;
# --allow-run-as-root: containers and CI run as root.
mpirun -np "$ranks" --oversubscribe --allow-run-as-root --bind-to none \
  build/distgn bench --shape "$shape" --shard-axis 1 --threads 1 --iters 10 --warmup 2 --check
