#!/usr/bin/env bash
# The distributed layer across emulated hosts over TCP (scripts/cluster.sh):
# `distgn apply` forward and backward with x split along a reduced axis over
#   - 3 hosts x 1 rank: every exchange crosses the emulated network (btl tcp);
#   - 3 hosts x 2 ranks: TCP between hosts, shared memory within one;
# against (a) the single-process run, within the bar tests/cli holds for
# --shard-axis (1e-5, relative to max(1, max|want|) for dx, dscale, dbias),
# and (b) the same rank count on one host over shared memory, bitwise: the
# moments are merged in rank order, so the transport cannot change a bit.
# It also checks that each rank ran on its own host (hostname) and that the
# hosts' links carried the traffic (their rx byte counters grew).
#
#   run_cluster_test.sh DISTGN_CLI CLUSTER_SH
#
# Exit 77 (CTest: skipped) with the reason when namespaces cannot be made or
# there is no mpirun; the emulated hosts are removed on any exit.
set -euo pipefail
distgn="$(realpath "$1")"
cluster="$(realpath "$2")"
py=/usr/bin/python3
export DGN_PREFIX=dgnt
work="$(mktemp -d /tmp/dgnt-test.XXXXXX)"
export DGN_CLUSTER_DIR="$work/cluster"
cleanup() { "$cluster" down >/dev/null 2>&1 || echo "cluster test: cleanup failed" >&2; rm -rf "$work"; }
trap 'rc=$?; trap - EXIT; cleanup; exit $rc' EXIT
trap 'exit 130' INT TERM

command -v mpirun >/dev/null || { echo "SKIPPED: no mpirun"; exit 77; }
$py -c 'import numpy' 2>/dev/null || { echo "SKIPPED: no numpy for $py"; exit 77; }
"$cluster" down >/dev/null 2>&1 || true   # a cluster of this prefix left by a killed run
set +e
"$cluster" up 3 2>"$work/up.err"
rc=$?
set -e
if [ $rc -eq 77 ]; then echo "SKIPPED: $(cat "$work/up.err")"; exit 77; fi
[ $rc -eq 0 ] || { cat "$work/up.err" >&2; exit $rc; }

cd "$work"
$py - <<'PY'
import numpy as np
rng = np.random.default_rng(15)
# nhwc, H = 13 split 5/4/4 over 3 ranks (3/2/2/2/2/2 over 6), a full bool mask
x = (rng.standard_normal((2, 13, 6, 16)) * 2.0 + 1.5).astype(np.float32)
np.save("a_x.npy", x)
np.save("a_dy.npy", rng.standard_normal(x.shape).astype(np.float32))
np.save("a_mask.npy", rng.random(x.shape) < 0.8)
np.save("a_scale.npy", (1 + 0.3 * rng.standard_normal(16)).astype(np.float32))
np.save("a_bias.npy", rng.standard_normal(16).astype(np.float32))
# nchw, exact variance, large mean, split along W (axis 3, 11 = 4/4/3)
x = (rng.standard_normal((2, 8, 5, 11)) * 0.5 + 300.0).astype(np.float32)
np.save("b_x.npy", x)
np.save("b_dy.npy", rng.standard_normal(x.shape).astype(np.float32))
PY
opts_a="--x a_x.npy --dy a_dy.npy --mask a_mask.npy --scale a_scale.npy --bias a_bias.npy --num-groups 4 --shard-axis 1"
opts_b="--x b_x.npy --dy b_dy.npy --num-groups 2 --layout nchw --exact-variance --shard-axis 3"
outs() { echo "--y $1_y.npy --dx $1_dx.npy --dscale $1_dscale.npy --dbias $1_dbias.npy"; }

rx_total() {
  local i t=0
  for i in 0 1 2; do
    t=$((t + $(ip netns exec "dgnt-h$i" cat "/sys/class/net/dgnt-e$i/statistics/rx_bytes")))
  done
  echo "$t"
}

# on_cluster HOSTS PPN BTL TAG OPTS: apply on the emulated hosts; each rank
# writes its hostname to TAG.host.<rank>.
on_cluster() {
  local hosts=$1 ppn=$2 btl=$3 tag=$4; shift 4
  timeout 40 "$cluster" mpirun --hosts "$hosts" --ppn "$ppn" --btl "$btl" -- -x OMP_NUM_THREADS=1 \
    sh -c 'hostname > '"$tag"'.host.$OMPI_COMM_WORLD_RANK; exec "$0" "$@"' "$distgn" apply "$@" \
    2> >(grep -v 'setpgid' >&2)
}

$distgn apply --comm local $opts_a $(outs a_ref)
$distgn apply --comm local $opts_b $(outs b_ref)

before=$(rx_total)
on_cluster 3 1 tcp,self a_tcp3 $opts_a $(outs a_tcp3)
after=$(rx_total)
on_cluster 3 1 tcp,self b_tcp3 $opts_b $(outs b_tcp3)
on_cluster 3 2 tcp,vader,self a_tcp6 $opts_a $(outs a_tcp6)
on_cluster 1 3 vader,self a_shm3 $opts_a $(outs a_shm3)
on_cluster 1 6 vader,self a_shm6 $opts_a $(outs a_shm6)
on_cluster 1 3 vader,self b_shm3 $opts_b $(outs b_shm3)
echo "cluster test: the 3 hosts' links received $((after - before)) bytes during the 3-host run"
[ $((after - before)) -gt 10000 ] || { echo "FAIL: no traffic crossed the emulated links" >&2; exit 1; }

$py - <<'PY'
import glob, sys
import numpy as np
fail = []
def hosts(tag):
    return [open(f).read().strip() for f in sorted(glob.glob(tag + ".host.*"))]
for tag, want in [("a_tcp3", ["dgnt-h0", "dgnt-h1", "dgnt-h2"]), ("b_tcp3", ["dgnt-h0", "dgnt-h1", "dgnt-h2"]),
                  ("a_tcp6", ["dgnt-h0"] * 2 + ["dgnt-h1"] * 2 + ["dgnt-h2"] * 2)]:
    got = hosts(tag)
    print(f"{tag}: ranks on {got}")
    if got != want: fail.append(f"{tag}: ranks ran on {got}, expected {want}")
for case, runs, bitwise in [("a", ["tcp3", "tcp6"], {"tcp3": "shm3", "tcp6": "shm6"}), ("b", ["tcp3"], {"tcp3": "shm3"})]:
    for run in runs:
        for key in ["y", "dx", "dscale", "dbias"]:
            ref = np.load(f"{case}_ref_{key}.npy").astype(np.float64)
            got = np.load(f"{case}_{run}_{key}.npy")
            twin = np.load(f"{case}_{bitwise[run]}_{key}.npy")
            scale = 1.0 if key == "y" else max(1.0, float(np.abs(ref).max()))
            err = float(np.abs(got.astype(np.float64) - ref).max()) / scale
            same = got.dtype == twin.dtype and got.shape == twin.shape and got.tobytes() == twin.tobytes()
            print(f"{case} {run} {key}: shape {got.shape}, max |diff| vs single process {err:.2e} (bar 1e-5), "
                  f"bitwise equal to {bitwise[run]}: {same}")
            if got.shape != ref.shape or not err <= 1e-5: fail.append(f"{case} {run} {key}: error {err:.3e}")
            if not same: fail.append(f"{case} {run} {key}: differs from {bitwise[run]}")
if fail:
    print("FAIL:\n  " + "\n  ".join(fail))
    sys.exit(1)
print("PASS")
PY
