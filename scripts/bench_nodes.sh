#!/usr/bin/env bash
# distgn across emulated hosts (scripts/cluster.sh: network namespaces on this
# machine, Open MPI over TCP between them, shared memory within one): JSON and
# PNG plots of
#   1. the forward's collective alone against ranks (2, 4, 8 ranks on 2, 4, 8
#      hosts, 1-4 ranks per host; one host over shared memory for reference)
#      and against payload (the forward's 1 + 3 doubles per cell, 32 to 32768
#      cells), with and without a rate limit per link: tests/cluster/coll_bench
#      (MPI_Allgather, what distgn's forward does, and MPI_Allreduce of the
#      same doubles, the constant-payload alternative), and `distgn bench`'s
#      own `lat us` (the layer's communicator);
#   2. distgn's forward and backward time per call against ranks (1, 2, 4, 8
#      ranks, one per host), weak (fixed shard) and strong (fixed global shape),
#      the forward split into compute and time inside its collective;
#   3. the layer's polled wait (the default DISTGN_COLLECTIVE_TIMEOUT) against
#      a blocking one (DISTGN_COLLECTIVE_TIMEOUT=0) on the same hosts.
#
#   scripts/bench_nodes.sh [OUT_DIR]        (default bench-results/nodes)
#   RATE=1gbit ITERS=20 REPS=60 ROUNDS=3 QUICK=1 scripts/bench_nodes.sh
#
# Every figure says what was emulated and what was shared: all "hosts" share
# this machine's cores (nproc) and memory bandwidth, and whatever else runs on
# it; the load average is recorded with each run. Where the kernel has no
# netem there is no added delay (said in the JSON and on the plots).
# Needs root (network namespaces); exits 77 where they cannot be made. The
# emulated hosts are removed on exit, failure or interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="${1:-bench-results/nodes}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py=/usr/bin/python3
rate="${RATE:-1gbit}"
iters="${ITERS:-20}"
reps="${REPS:-60}"
rounds="${ROUNDS:-3}"   # every measurement repeated; the plots and the model take the median over rounds
round=1
quick="${QUICK:-0}"
shard="${SHARD:-2,32,64,320}"
global="${GLOBAL:-2,64,64,320}"
cells_list="32,128,512,2048,8192,32768"
export DGN_PREFIX="${DGN_PREFIX:-dgn}"
export DGN_CLUSTER_DIR="$out/.cluster"
cluster="$root/scripts/cluster.sh"

$py -c "import matplotlib, numpy" 2>/dev/null || { echo "bench_nodes.sh: needs $py with matplotlib and numpy (scripts/setup.sh --bench)" >&2; exit 1; }
command -v mpicc >/dev/null || { echo "bench_nodes.sh: needs mpicc (Open MPI)" >&2; exit 1; }

# distgn: $DISTGN, else build/distgn, else a CPU build into build-nodes/.
distgn="${DISTGN:-}"
if [ -z "$distgn" ]; then
  if [ -x build/distgn ]; then distgn="$root/build/distgn"
  else
    [ -x build-nodes/distgn ] || {
      cmake -S . -B build-nodes -DDISTGN_CUDA=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
      cmake --build build-nodes -j2 --target distgn_cli >/dev/null
    }
    distgn="$root/build-nodes/distgn"
  fi
fi
distgn="$(realpath "$distgn")"
mpicc -O2 -o "$out/coll_bench" tests/cluster/coll_bench.c

trap 'rc=$?; trap - EXIT; "$cluster" down >/dev/null 2>&1 || { echo "bench_nodes.sh: cleanup failed" >&2; rc=1; }; exit $rc' EXIT
trap 'exit 130' INT TERM
"$cluster" down >/dev/null 2>&1 || true

raw="$out/raw.jsonl"
: >"$raw"
meta() {  # the context of a record: what is emulated, what is shared
  local DGN_RATE=none DGN_DELAY=none
  [ ! -f "$DGN_CLUSTER_DIR/env" ] || . "$DGN_CLUSTER_DIR/env"
  printf '"link_rate": "%s", "delay": "%s", "load_avg_1m": %s' "$DGN_RATE" "$DGN_DELAY" "$(cut -d' ' -f1 /proc/loadavg)"
}
# tag KIND HOSTS PPN EXTRA-JSON < json lines  -> raw.jsonl
tag() {
  local kind=$1 hosts=$2 ppn=$3 extra=$4 m line
  m=$(meta)
  while IFS= read -r line; do
    case "$line" in "{"*) echo "{\"kind\": \"$kind\", \"round\": $round, \"hosts\": $hosts, \"ranks_per_host\": $ppn, $m, $extra${extra:+, }${line#\{}" >>"$raw";; esac
  done
}
mpi() { timeout 300 "$cluster" mpirun "$@" 2> >(grep -v setpgid >&2); }
# distgn under mpi, up to 4 attempts: with more ranks than cores, ranks reach
# the first collective far apart, and a wait past 0.25 s there can crash the
# layer's MPI communicator (arrival notices sent on its private communicator
# before MPI_Comm_idup has completed: SIGSEGV in MPI_Isend). Each record says
# how many attempts it took; a point that never ran is recorded as failed.
attempts=0
mpi_distgn() {
  local rc=0
  for attempts in 1 2 3 4; do
    rm -f "$out/run.jsonl"
    if mpi "$@" >"$out/distgn.out" 2>"$out/distgn.err"; then tail -n 1 "$out/distgn.out"; return 0; fi
    rc=$?
    echo "bench_nodes.sh: attempt $attempts failed (status $rc): $(grep -m1 -E 'Signal:|error' "$out/distgn.err" || tail -n 1 "$out/distgn.err")" >&2
  done
  return $rc
}

# 1. the collective against ranks and payload
# (hosts, ranks per host): 2, 4, 8 ranks over 2, 4, 8 hosts, and one host.
# Waits: "nap" (coll_bench --nap: MPI_Test and a 10 us sleep) everywhere;
# "busy" (plain blocking MPI, busy polling) only where the ranks fit the
# cores: beyond that a busy rank holds the core its peer needs and each step
# costs a scheduler time slice (4-40 ms measured here), not the network.
configs="2:1 4:1 8:1 2:2 4:2 2:4 1:2 1:4 1:8"
[ "$quick" = 1 ] && configs="2:1 4:1 8:1 2:4 1:8"
cores=$(nproc)
latency_pass() {
  local label=$1 c h k p shapes n waits wait
  for c in $configs; do
    h=${c%:*}; k=${c#*:}; p=$((h * k))
    [ "$label" = rate ] && [ "$h" = 1 ] && continue   # one host: no link in the way
    waits="nap"; [ "$p" -le "$cores" ] && waits="nap busy"
    for wait in $waits; do
      echo "== collective, $label, $wait wait: $p ranks on $h host(s) x $k"
      mpi --hosts "$h" --ppn "$k" -- "$out/coll_bench" --cells "$cells_list" --reps "$reps" --ops allgather,allreduce \
        --nap "$([ "$wait" = nap ] && echo 10 || echo 0)" | tag coll "$h" "$k" "\"pass\": \"$label\", \"wait\": \"$wait\""
    done
    [ "$label" = rate ] && [ "$c" != 8:1 ] && [ "$c" != 2:1 ] && continue
    # the layer's own latency (distgn bench's lat us): forward payload of N*32
    # cells (G = 32, C = 32); its default polled wait everywhere, a blocking
    # one (DISTGN_COLLECTIVE_TIMEOUT=0: MPI_Waitall) where the ranks fit.
    shapes=""
    for n in 1 4 16 64 256 1024; do shapes="$shapes${shapes:+;}$n,$p,2,32"; done
    waits="polled"; [ "$p" -le "$cores" ] && waits="polled blocking"
    for wait in $waits; do
      if mpi_distgn --hosts "$h" --ppn "$k" -- -x OMP_NUM_THREADS=1 -x DISTGN_COLLECTIVE_TIMEOUT="$([ "$wait" = polled ] && echo 600 || echo 0)" \
        "$distgn" bench --shape "$shapes" --shard-axis 1 --threads 1 --iters 10 --warmup 3 --json "$out/run.jsonl" >/dev/null; then
        tag layer_latency "$h" "$k" "\"pass\": \"$label\", \"wait\": \"$wait\", \"attempts\": $attempts" <"$out/run.jsonl"
      else
        echo '{"failed": true}' | tag layer_latency "$h" "$k" "\"pass\": \"$label\", \"wait\": \"$wait\", \"attempts\": $attempts, \"ranks\": $p"
      fi
    done
  done
}
"$cluster" up 8
for round in $(seq "$rounds"); do latency_pass unlimited; done

# 2. weak and strong scaling, one rank per host: the layer's default
# (polled) wait, and the blocking one where the ranks fit the cores.
for round in $(seq "$rounds"); do
for p in 1 2 4 8; do
  IFS=, read -r n h w c <<<"$shard"
  for mode in weak strong; do
    if [ "$mode" = weak ]; then shape="$n,$((h * p)),$w,$c"; else shape="$global"; fi
    for wait in polled blocking; do
      [ "$wait" = blocking ] && [ "$p" -gt "$cores" ] && continue
      echo "== $mode scaling, $p rank(s) on $p host(s), global shape $shape, $wait wait"
      extra="\"mode\": \"$mode\", \"wait\": \"$wait\", \"oversubscribed\": $([ "$p" -gt "$cores" ] && echo true || echo false)"
      if mpi_distgn --hosts "$p" --ppn 1 -- -x OMP_NUM_THREADS=1 -x DISTGN_COLLECTIVE_TIMEOUT="$([ "$wait" = polled ] && echo 600 || echo 0)" \
        "$distgn" bench --shape "$shape" --shard-axis 1 --threads 1 --iters "$iters" --warmup 3 --json "$out/run.jsonl"; then
        tag scaling "$p" 1 "$extra, \"attempts\": $attempts" <"$out/run.jsonl"
      else
        echo '{"failed": true}' | tag scaling "$p" 1 "$extra, \"attempts\": $attempts, \"ranks\": $p"
      fi
    done
  done
done
done
"$cluster" down

# 1 again under a rate limit per link
"$cluster" up 8 --rate "$rate"
for round in $(seq "$rounds"); do latency_pass rate; done
"$cluster" down
rm -f "$out/run.jsonl" "$out/distgn.out" "$out/distgn.err"

# The host-side merge after the allgather (P*C Chan merges in rank order),
# timed on the library's own function for P up to 1024: the model's gamma.
libdir="$(dirname "$distgn")"
if [ -f "$libdir/libdistgn.a" ] && mpicxx -O2 -std=c++17 -fopenmp -I src -I include -I "$libdir/include" \
     -o "$out/merge_bench" tests/cluster/merge_bench.cpp "$libdir/libdistgn.a" 2>"$out/merge_bench.err"; then
  "$out/merge_bench" --ranks 2,8,64,256,1024 --cells 32,2048 | tag merge 1 1 ""
else
  echo "bench_nodes.sh: merge_bench not built (no $libdir/libdistgn.a or a compile error): the model uses its default gamma" >&2
fi
rm -f "$out/merge_bench.err"

# One JSON document and the plots.
$py - "$out" "$raw" "$(nproc)" "$rate" <<'PY'
import json, os, platform, subprocess, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, raw, cores, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
allrecs = [json.loads(l) for l in open(raw)]
rounds_recs = [r for r in allrecs if not r.get("failed")]
failed = [r for r in allrecs if r.get("failed")]
# One record per point: the median over rounds of each timing, the rounds' range kept.
TIMES = ["median_us", "p10_us", "p90_us", "min_us", "fwd_ms", "bwd_ms", "comm_us", "collective_latency_us",
         "copy_gbps", "fwd_gbps", "bwd_gbps", "ns_per_merge", "load_avg_1m"]
def point(r):
    return tuple((k, json.dumps(v)) for k, v in sorted(r.items()) if k not in TIMES + ["round", "attempts", "sink",
                                                                                     "link_rate", "delay"])
groups = {}
for r in rounds_recs:
    groups.setdefault(point(r), []).append(r)
recs = []
for rs in groups.values():
    a = dict(rs[0])
    a.pop("round", None)
    a["rounds"] = len(rs)
    a["attempts"] = sum(r.get("attempts", 1) for r in rs)
    for k in TIMES:
        vals = sorted(r[k] for r in rs if isinstance(r.get(k), (int, float)))
        if vals:
            a[k] = vals[len(vals) // 2] if len(vals) % 2 else 0.5 * (vals[len(vals) // 2 - 1] + vals[len(vals) // 2])
            if k in ("median_us", "fwd_ms", "bwd_ms", "comm_us", "collective_latency_us"):
                a[k + "_rounds"] = vals
    recs.append(a)
delay = sorted({r["delay"] for r in recs})
ompi = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
loads = [r["load_avg_1m"] for r in rounds_recs]
doc = {
    "what": "distgn across emulated hosts: network namespaces on one machine (scripts/cluster.sh), "
            "Open MPI (ob1) btl tcp between hosts, vader within a host",
    "shared": f"all hosts share this machine's {cores} cores and memory; other work ran on it too "
              f"(1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs)",
    "emulated": f"veth pairs to one bridge; rate limit: none, or tbf {rate} per link and direction; "
                f"added delay: {', '.join(delay)} ('unsupported': the kernel has no netem)",
    "waits": {"coll busy": "MPI_Allgather/MPI_Allreduce, Open MPI's busy polling (only where ranks <= cores)",
              "coll nap": "MPI_Iallgather/MPI_Iallreduce + MPI_Test and a 10 us sleep between tests",
              "layer polled": "distgn's communicator as shipped (DISTGN_COLLECTIVE_TIMEOUT default: spin 100 us, "
                              "then sleeps of 10 us doubling to 1 ms between MPI_Testsome)",
              "layer blocking": "DISTGN_COLLECTIVE_TIMEOUT=0: MPI_Waitall"},
    "machine": {"cores": cores, "kernel": platform.release(), "mpi": ompi},
    "records": recs,
    "rounds": rounds_recs,
    "failed": failed,
}
json.dump(doc, open(os.path.join(out, "nodes.json"), "w"), indent=1)
netem = "no added delay (kernel has no netem)" if "unsupported" in delay or delay == ["none"] else "netem delay " + ", ".join(delay)
note = (f"EMULATED: hosts = network namespaces on one machine, veth + bridge, Open MPI TCP between hosts, {netem}; "
        f"'tbf' = {rate} per link and direction\nSHARED: all ranks on the same {cores} cores and memory, "
        f"with other work (load avg {min(loads):.1f}-{max(loads):.1f}); ranks > {cores} oversubscribe")

def sel(**kw):
    return [r for r in recs if all(r.get(k) == v for k, v in kw.items())]

def lab(pass_):
    return "tbf " + rate if pass_ == "rate" else "no limit"

# Figure 1: collective latency against ranks, at 32 and 2048 cells.
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, cells in zip(axes, [32, 2048]):
    for pass_, style in [("unlimited", "-"), ("rate", "--")]:
        for op, color in [("allgather", "#4c72b0"), ("allreduce", "#dd8452")]:
            for ppn, marker in [(1, "o"), (2, "s"), (4, "^")]:
                rows = sorted((r for r in sel(kind="coll", op=op, cells=cells, ranks_per_host=ppn, wait="nap",
                                              **{"pass": pass_}) if r["hosts"] > 1), key=lambda r: r["ranks"])
                if rows:
                    ax.plot([r["ranks"] for r in rows], [r["median_us"] for r in rows], style, marker=marker,
                            color=color, label=f"{op}, {ppn}/host, {lab(pass_)}")
        rows = sel(kind="coll", op="allgather", cells=cells, wait="busy", hosts=2, ranks_per_host=1, **{"pass": pass_})
        for r in rows:
            ax.plot([r["ranks"]], [r["median_us"]], marker="*", ms=12, color="black" if pass_ == "unlimited" else "gray",
                    ls="none", label=f"allgather, busy wait, 2 hosts, {lab(pass_)}")
    rows = sorted(sel(kind="coll", op="allgather", cells=cells, hosts=1, wait="nap", **{"pass": "unlimited"}),
                  key=lambda r: r["ranks"])
    if rows:
        ax.plot([r["ranks"] for r in rows], [r["median_us"] for r in rows], ":", marker="x", color="gray",
                label="allgather, 1 host (shared memory)")
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("ranks"); ax.set_ylabel("median time per collective, slowest rank (us)")
    ax.set_title(f"{cells} cells: {8 * (1 + 3 * cells)} B per rank; nap wait unless marked busy", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
fig.suptitle("distgn forward's collective against ranks (tests/cluster/coll_bench)\n" + note, fontsize=8)
fig.tight_layout(); fig.savefig(os.path.join(out, "nodes_latency_ranks.png"), dpi=110); plt.close(fig)

# Figure 2: against payload, 8 ranks on 8 hosts (nap) and 2 on 2 (busy, nap, the layer).
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, (h, k) in zip(axes, [(2, 1), (8, 1)]):
    for pass_, style in [("unlimited", "-"), ("rate", "--")]:
        for op, color in [("allgather", "#4c72b0"), ("allreduce", "#dd8452")]:
            for wait, marker in [("busy", "o"), ("nap", "s")]:
                rows = sorted(sel(kind="coll", op=op, hosts=h, ranks_per_host=k, wait=wait, **{"pass": pass_}),
                              key=lambda r: r["cells"])
                if rows:
                    ax.plot([r["cells"] for r in rows], [r["median_us"] for r in rows], style, marker=marker,
                            color=color, label=f"{op}, {wait} wait, {lab(pass_)}")
        for wait, color in [("blocking", "#55a868"), ("polled", "#c44e52")]:
            rows = sorted(sel(kind="layer_latency", hosts=h, ranks_per_host=k, wait=wait, **{"pass": pass_}),
                          key=lambda r: r["shape"][0])
            if rows:
                ax.plot([32 * r["shape"][0] for r in rows], [r["collective_latency_us"] for r in rows], style,
                        marker="x", color=color, label=f"distgn lat us, {wait}, {lab(pass_)}")
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("cells (allgather payload 8(1 + 3 cells) B per rank)"); ax.set_ylabel("median time (us)")
    ax.set_title(f"{h * k} ranks on {h} hosts x {k}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=6)
fig.suptitle("distgn forward's collective against payload\n" + note, fontsize=8)
fig.tight_layout(); fig.savefig(os.path.join(out, "nodes_latency_payload.png"), dpi=110); plt.close(fig)

# Figure 3: weak and strong scaling, one rank per host.
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
print("%-6s %5s %-8s %-18s %9s %9s %9s %9s %8s" % ("mode", "ranks", "wait", "global shape", "fwd ms", "comm ms",
                                                    "bwd ms", "lat us", "load"))
for ax, mode in zip(axes, ["weak", "strong"]):
    for r in sorted(sel(kind="scaling", mode=mode), key=lambda r: (r["wait"], r["ranks"])):
        print("%-6s %5d %-8s %-18s %9.3f %9.3f %9.3f %9.1f %8.2f" % (mode, r["ranks"], r["wait"],
              "x".join(map(str, r["shape"])), r["fwd_ms"], r["comm_us"] / 1e3, r["bwd_ms"],
              r["collective_latency_us"], r["load_avg_1m"]))
    rows = sorted(sel(kind="scaling", mode=mode, wait="polled"), key=lambda r: r["ranks"])
    xs = range(len(rows))
    comm = [r["comm_us"] / 1e3 for r in rows]
    comp = [max(0.0, r["fwd_ms"] - c) for r, c in zip(rows, comm)]
    ax.bar([x - 0.2 for x in xs], comp, 0.4, color="#4c72b0", label="forward: compute")
    ax.bar([x - 0.2 for x in xs], comm, 0.4, bottom=comp, color="#dd8452", label="forward: in collective (waiting incl.)")
    ax.bar([x + 0.2 for x in xs], [r["bwd_ms"] for r in rows], 0.4, color="#55a868", label="backward (1 collective)")
    blk = {r["ranks"]: r for r in sel(kind="scaling", mode=mode, wait="blocking")}
    for x, r in zip(xs, rows):
        if r["ranks"] in blk and r["ranks"] > 1:
            ax.plot([x - 0.2], [blk[r["ranks"]]["fwd_ms"]], "k_", ms=18, mew=2)
    ax.plot([], [], "k_", ms=12, mew=2, label="forward, blocking wait (DISTGN_COLLECTIVE_TIMEOUT=0)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(["%d%s" % (r["ranks"], "*" if r["oversubscribed"] else "") for r in rows])
    ax.set_xlabel(f"ranks = emulated hosts (* more ranks than the {cores} cores)")
    ax.set_ylabel("ms per call (slowest rank's median)")
    if rows:
        first = "x".join(map(str, rows[0]["shape"]))
        ax.set_title(f"weak: per-rank shard = the 1-rank shape {first}" if mode == "weak" else f"strong: global {first}",
                     fontsize=9)
    ax.legend(fontsize=7)
fig.suptitle("distgn forward/backward against ranks, one rank per emulated host, float32, 1 thread per rank, "
             "the layer's default (polled) wait\n" + note, fontsize=8)
fig.tight_layout(); fig.savefig(os.path.join(out, "nodes_scaling.png"), dpi=110); plt.close(fig)

print("\ncollective latency, median us of the slowest rank, 'no limit / tbf %s':" % rate)
cols = [32, 512, 2048, 32768]
print("%5s %5s %5s %-5s %-9s" % ("ranks", "hosts", "/host", "wait", "op") + "".join("%18s" % ("%d cells" % c) for c in cols))
keys = sorted({(r["ranks"], r["hosts"], r["ranks_per_host"], r["wait"], r["op"]) for r in sel(kind="coll")},
              key=lambda k: (k[4], k[3], k[0], k[1]))
for P, h, k, wait, op in keys:
    line = "%5d %5d %5d %-5s %-9s" % (P, h, k, wait, op)
    for c in cols:
        a = sel(kind="coll", op=op, cells=c, hosts=h, ranks_per_host=k, wait=wait, **{"pass": "unlimited"})
        b = sel(kind="coll", op=op, cells=c, hosts=h, ranks_per_host=k, wait=wait, **{"pass": "rate"})
        line += "%18s" % ("%s / %s" % ("%.0f" % a[0]["median_us"] if a else "-", "%.0f" % b[0]["median_us"] if b else "-"))
    print(line)
print("\ndistgn's own lat us (forward payload alone):")
for r in sorted(sel(kind="layer_latency"), key=lambda r: (r["pass"], r["wait"], r["ranks"], r["hosts"], r["shape"][0])):
    if r["shape"][0] in (1, 64, 1024):
        print("  %-9s %-8s %d ranks on %d hosts x %d, %5d cells: %10.1f us" % (r["pass"], r["wait"], r["ranks"], r["hosts"],
              r["ranks_per_host"], 32 * r["shape"][0], r["collective_latency_us"]))
retried = [r for r in rounds_recs if r.get("attempts", 1) > 1]
print("\n%d distgn run(s) needed more than one attempt, %d never ran (SIGSEGV in the communicator's first collective, "
      "see the comment on mpi_distgn):" % (len(retried), len(failed)))
for r in retried + failed:
    print("  %s %s ranks %s: %d attempt(s)%s" % (r["kind"], r.get("mode", r.get("pass")), r["ranks"], r["attempts"],
                                             ", failed" if r.get("failed") else ""))
print("\nwrote", os.path.join(out, "nodes.json"), "and nodes_latency_ranks.png, nodes_latency_payload.png, nodes_scaling.png")
PY
