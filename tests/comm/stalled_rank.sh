#!/bin/sh
# A hung rank must end the job, not hang it: runs tests/comm/stalled_rank.cpp
# under mpirun with 2 ranks and a 3 s collective timeout (rank 1 stops itself
# with SIGSTOP) and checks that within a few seconds of the timeout the job has
# ended with a nonzero status and rank 0 said on stderr which call timed out
# and that rank 1 did not arrive. `timeout` keeps the test itself from hanging
# (the hang it guards against).
# Usage: stalled_rank.sh MPIEXEC STALLED_RANK_BINARY
set -u
mpiexec=$1 program=$2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
timeout -s KILL 40 "$mpiexec" -np 2 --allow-run-as-root --oversubscribe "$program" 3 >"$log" 2>&1
status=$?
elapsed=$(( $(date +%s) - start ))
cat "$log"
fail() { echo "stalled_rank.sh: $*" >&2; exit 1; }
[ "$status" -ne 137 ] || fail "the job hung: killed after 40 s"
[ "$status" -ne 0 ] || fail "the job exited 0 although rank 1 hung"
[ "$elapsed" -le 15 ] || fail "the job took ${elapsed} s to end after a 3 s timeout"
grep -q "collective allgather (forward statistics of GroupNorm) timed out after 3 s on rank 0 of 2; rank(s) 1 did not arrive" "$log" ||
  fail "rank 0 did not report that rank 1 missed the forward's allgather"
echo "stalled_rank.sh: the job ended after ${elapsed} s with status $status"
