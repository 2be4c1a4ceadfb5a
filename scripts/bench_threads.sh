#!/usr/bin/env bash
# The CPU backend against the thread count: `distgn bench` on the six shapes
# of docs/performance.md (three channels-last, three channels-first) at
# 1, 2, ... threads, alternating the thread counts round by round so that
# every count sees the same machine state. Prints per shape and thread count
# the median forward and backward time and their fraction of the copy that
# bench times between its own calls, and writes every run's JSON line (with
# its `cpu` object: the CPU model, caches and tuning) to OUT_DIR.
#
#   scripts/bench_threads.sh [OUT_DIR]          (default: bench-results/threads)
#   THREADS="1 2 4 8 16" ROUNDS=5 ITERS=30 DTYPE=f32 scripts/bench_threads.sh
#
# THREADS defaults to 1 up to the processors this process may use, doubling.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results/threads}"
mkdir -p "$out"
[ -x build/distgn ] || scripts/build.sh >/dev/null
procs=$(nproc)
if [ -z "${THREADS:-}" ]; then
  THREADS=""
  for ((t = 1; t < procs; t *= 2)); do THREADS="$THREADS $t"; done
  THREADS="$THREADS $procs"
fi
rounds="${ROUNDS:-5}"
iters="${ITERS:-30}"
dtype="${DTYPE:-f32}"
rm -f "$out"/threads-*.jsonl
for ((r = 1; r <= rounds; r++)); do
  for t in $THREADS; do
    build/distgn bench --shape "8,64,64,320;16,56,56,64;2,16,16,1280" --threads "$t" --iters "$iters" \
      --dtype "$dtype" --json "$out/threads-$t-nhwc-$r.jsonl" >/dev/null 2>&1
    build/distgn bench --shape "8,320,64,64;16,64,56,56;2,1280,16,16" --layout nchw --threads "$t" \
      --iters "$iters" --dtype "$dtype" --json "$out/threads-$t-nchw-$r.jsonl" >/dev/null 2>&1
  done
  echo "bench_threads: round $r of $rounds done" >&2
done
/usr/bin/python3 - "$out" <<'PY'
import glob, json, re, statistics, sys
out = sys.argv[1]
runs = {}
cpu = None
for path in glob.glob(f"{out}/threads-*.jsonl"):
    threads = int(re.search(r"threads-(\d+)-", path).group(1))
    for line in open(path):
        j = json.loads(line)
        cpu = j["cpu"]
        key = (j["layout"], "x".join(map(str, j["shape"])), threads)
        runs.setdefault(key, []).append(j)
print(f"cpu: {cpu['model']}, L2 {cpu['l2_bytes'] >> 10} KiB per core, {cpu['processors']} processor(s); "
      f"{cpu['tuning']}")
print(f"{'shape':<16} {'layout':<6} {'threads':>7} {'fwd ms':>8} {'fwd/copy':>8} {'bwd ms':>8} {'bwd/copy':>8}  runs")
for layout, shape, threads in sorted(runs, key=lambda k: (k[0] != "nhwc", k[1], k[2])):
    v = runs[(layout, shape, threads)]
    med = lambda f: statistics.median(f(j) for j in v)
    print(f"{shape:<16} {layout:<6} {threads:>7} {med(lambda j: j['fwd_ms']):8.3f} "
          f"{med(lambda j: j['fwd_gbps'] / j['copy_gbps']):8.2f} {med(lambda j: j['bwd_ms']):8.3f} "
          f"{med(lambda j: j['bwd_gbps'] / j['copy_gbps']):8.2f}  {len(v)}")
PY
