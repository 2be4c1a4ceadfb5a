#!/usr/bin/env bash
# Weak and strong scaling of distgn over 1, 2 and 4 ranks under mpirun on this
# machine: JSON lines per run and PNG plots of the time per call split into
# compute and collective, against ranks. The collective's own latency (its
# payload alone, ranks in step) is reported separately.
#
#   scripts/bench_scaling.sh [OUT_DIR]     (default: bench-results/)
#   SHARD=4,32,64,320 RANKS="1 2 4" ITERS=20 scripts/bench_scaling.sh
#
# Weak scaling: every rank holds a SHARD-sized piece (global H = P * shard H).
# Strong scaling: the global shape GLOBAL is split over P ranks along H.
# Runs with more ranks than cores oversubscribe them and are labelled so.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results}"
mkdir -p "$out"
[ -x build/distgn ] || scripts/build.sh >/dev/null
/usr/bin/python3 -c "import matplotlib" 2>/dev/null || scripts/setup.sh --bench
shard="${SHARD:-4,32,64,320}"
global="${GLOBAL:-4,64,64,320}"
ranks_list="${RANKS:-1 2 4}"
iters="${ITERS:-20}"
cores=$(nproc)
IFS=, read -r n h w c <<<"$shard"

rm -f "$out/scaling_weak.jsonl" "$out/scaling_strong.jsonl"
for p in $ranks_list; do
  threads=$(( cores / p )); [ "$threads" -ge 1 ] || threads=1
  label=""; [ "$p" -gt "$cores" ] && label=" (oversubscribed: $p ranks on $cores cores)"
  for mode in weak strong; do
    if [ "$mode" = weak ]; then shape="$n,$((h * p)),$w,$c"; else shape="$global"; fi
    echo "== $mode scaling, $p rank(s) x $threads thread(s), global shape $shape$label"
    mpirun -np "$p" --oversubscribe --allow-run-as-root --bind-to none \
      -x OMP_NUM_THREADS="$threads" \
      build/distgn bench --shape "$shape" --shard-axis 1 --threads "$threads" --iters "$iters" \
      --warmup 3 --json "$out/run.jsonl" | tail -n 1
    # Tag each record with the mode and the oversubscription.
    /usr/bin/python3 - "$out/run.jsonl" "$mode" "$cores" >>"$out/scaling_$mode.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    r["mode"] = sys.argv[2]
    r["oversubscribed"] = r["ranks"] > int(sys.argv[3])
    print(json.dumps(r))
PY
  done
done
rm -f "$out/run.jsonl"
/usr/bin/python3 scripts/plot_scaling.py "$out"
