#!/usr/bin/env bash
# Emulated hosts on one machine: N network namespaces joined by veth pairs to
# a bridge, so that Open MPI launched across them really talks TCP between
# "nodes" (shared memory only within one). Needs root (or CAP_NET_ADMIN and
# CAP_SYS_ADMIN) and `ip netns`.
#
#   scripts/cluster.sh up N [--rate R] [--delay D] [--mtu M]
#   scripts/cluster.sh down
#   scripts/cluster.sh status
#   scripts/cluster.sh exec HOST CMD...        HOST: h0, h1, ..., sw, or a full name
#   scripts/cluster.sh mpirun --hosts H [--ppn K] [--btl LIST] -- PROGRAM ARGS...
#   scripts/cluster.sh run N [--rate R] [--delay D] -- CMD...   up, CMD, down (always)
#
# What `up` makes, every name starting with $DGN_PREFIX- (default `dgn-`):
#   - namespace dgn-sw: the "switch" and head node, bridge dgn-br holding the
#     address 198.18.0.1/24; mpirun runs here (`cluster.sh mpirun`);
#   - namespaces dgn-h0 .. dgn-h<N-1>: one host each, interface dgn-e<i> with
#     198.18.0.<10+i>/24 (and lo), its peer dgn-p<i> a port of the bridge.
#   Addresses come only from 198.18.0.0/15 (RFC 2544's benchmark range), no
#   namespace has a default route and nothing connects to the root namespace,
#   whose interfaces, routes and qdiscs are never touched.
#   - --rate R: a tbf qdisc of rate R (tc units: 1gbit, 100mbit) on both ends
#     of every host's link, i.e. R per direction per host, like a NIC port;
#   - --delay D: a netem qdisc adding D (tc units: 50us, 1ms) each way on the
#     host side of every link, where the kernel has netem. Where it has not,
#     `up` says so and goes on without a delay (the state records it: see
#     `status`), since the model in scripts/scaling_model.py carries latency.
#
# State (hostfile, the mpirun options, what was emulated) is kept in
# $DGN_CLUSTER_DIR (default /tmp/<prefix>-cluster), removed by `down`.
# `down` first ends the processes still inside the namespaces (by their pids,
# as `ip netns pids` lists them), then deletes the namespaces, which takes
# their veths, bridge and qdiscs with them, then checks nothing is left.
# A failed `up` and an interrupted `run` clean up the same way (trap).
#
# Exit statuses: 0 done; 1 error; 2 usage; 77 namespaces cannot be made here
# (not root, no `ip netns`, no veth or bridge support): tests turn it into
# "skipped".
set -euo pipefail

prefix="${DGN_PREFIX:-dgn}"
case "$prefix" in *[!a-z0-9]*|'') echo "cluster.sh: DGN_PREFIX must be [a-z0-9]+" >&2; exit 2;; esac
[ "${#prefix}" -le 6 ] || { echo "cluster.sh: DGN_PREFIX at most 6 characters (interface names)" >&2; exit 2; }
state="${DGN_CLUSTER_DIR:-/tmp/$prefix-cluster}"
here="$(cd "$(dirname "$0")" && pwd)"
sw="$prefix-sw"
subnet=198.18.0
SKIP=77

die() { echo "cluster.sh: $*" >&2; exit 1; }
skip() { echo "cluster.sh: cannot emulate hosts here: $* (exit $SKIP: skipped)" >&2; exit $SKIP; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Our namespaces, exactly: <prefix>-sw and <prefix>-h<digits>.
our_namespaces() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-(sw|h[0-9]+)\$" || true
}

host_name() {  # h3 or 3 -> dgn-h3; sw -> dgn-sw; full names pass through
  case "$1" in
    "$prefix"-*) echo "$1";;
    sw) echo "$sw";;
    h[0-9]*) echo "$prefix-$1";;
    [0-9]*) echo "$prefix-h$1";;
    *) die "unknown host '$1' (h0..h<N-1>, sw, or $prefix-...)";;
  esac
}

cmd_down() {
  local ns pids left
  for ns in $(our_namespaces); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
  done
  for ns in $(our_namespaces); do
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      pids=$(ip netns pids "$ns" 2>/dev/null || true)
      [ -n "$pids" ] || break
      sleep 0.2
    done
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$state"
  left=$(our_namespaces)
  [ -z "$left" ] || die "namespaces left after down: $left"
  # veths and bridges die with their namespace; none was ever in the root one.
  if ip -o link show 2>/dev/null | grep -q " $prefix-"; then
    die "links named $prefix-* in the root namespace after down"
  fi
  return 0
}

# tc rate (e.g. 1gbit, 100mbit, 500kbit, 1000000bit) -> bytes per second
rate_bytes() {
  local r="$1" n u
  n="${r%%[a-zA-Z]*}"; u="${r#"$n"}"
  [ -n "$n" ] || die "bad rate '$r'"
  case "$u" in
    bit|'') awk -v n="$n" 'BEGIN{printf "%d", n/8}';;
    kbit) awk -v n="$n" 'BEGIN{printf "%d", n*1000/8}';;
    mbit) awk -v n="$n" 'BEGIN{printf "%d", n*1e6/8}';;
    gbit) awk -v n="$n" 'BEGIN{printf "%d", n*1e9/8}';;
    *) die "rate '$r': use bit, kbit, mbit or gbit";;
  esac
}

# Whether namespace $1 reaches address $2: a TCP connection to a closed port
# is refused (an RST came back) when it does, times out when it does not.
reachable() {
  ip netns exec "$1" /usr/bin/python3 - "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=3).close()
except ConnectionRefusedError:
    pass
except OSError:
    sys.exit(1)
PY
}

cmd_up() {
  local n="${1:-}"; shift || true
  local rate="" delay="" mtu=1500
  case "$n" in ''|*[!0-9]*) usage;; esac
  [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "N must be 1..200"
  while [ $# -gt 0 ]; do
    case "$1" in
      --rate) rate="${2:?}"; shift 2;;
      --delay) delay="${2:?}"; shift 2;;
      --mtu) mtu="${2:?}"; shift 2;;
      *) usage;;
    esac
  done
  [ "$(id -u)" -eq 0 ] || skip "not root"
  command -v ip >/dev/null || skip "no ip (iproute2)"
  [ -z "$(our_namespaces)" ] || die "a cluster with prefix $prefix- exists: scripts/cluster.sh down first"

  # From here on, any failure removes whatever was made.
  trap 'rc=$?; trap - EXIT; if [ $rc -ne 0 ]; then echo "cluster.sh: up failed (status $rc), removing what it made" >&2; cmd_down || true; fi; exit $rc' EXIT
  trap 'exit 130' INT TERM

  if ! ip netns add "$sw" 2>/tmp/$prefix-netns.err; then
    local why; why=$(cat /tmp/$prefix-netns.err); rm -f /tmp/$prefix-netns.err
    trap - EXIT; cmd_down || true; skip "ip netns add failed: $why"
  fi
  rm -f /tmp/$prefix-netns.err
  ip -n "$sw" link set lo up
  if ! ip -n "$sw" link add "$prefix-br" type bridge 2>/dev/null; then
    trap - EXIT; cmd_down || true; skip "no bridge support in this kernel"
  fi
  ip -n "$sw" link set "$prefix-br" mtu "$mtu" 2>/dev/null || true
  ip -n "$sw" addr add "$subnet.1/24" dev "$prefix-br"
  ip -n "$sw" link set "$prefix-br" up

  local netem="none" netem_note=""
  local rbytes burst i ns
  if [ -n "$rate" ]; then
    rbytes=$(rate_bytes "$rate")
    # 1 ms worth of tokens, at least 128 KiB (a 64 KiB GSO segment must fit):
    # a bucket much deeper than the payloads would let them pass unshaped.
    burst=$(( rbytes / 1000 )); [ "$burst" -ge 131072 ] || burst=131072
  fi
  mkdir -p "$state/tmp"
  : >"$state/hostfile"
  for ((i = 0; i < n; i++)); do
    ns="$prefix-h$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    if ! ip link add "$prefix-e$i" netns "$ns" mtu "$mtu" type veth peer name "$prefix-p$i" netns "$sw" mtu "$mtu" 2>/dev/null; then
      trap - EXIT; cmd_down || true; skip "no veth support in this kernel"
    fi
    ip -n "$sw" link set "$prefix-p$i" master "$prefix-br"
    ip -n "$sw" link set "$prefix-p$i" up
    ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev "$prefix-e$i"
    ip -n "$ns" link set "$prefix-e$i" up
    if [ -n "$delay" ]; then
      if [ "$netem" != unsupported ] && ip netns exec "$ns" tc qdisc add dev "$prefix-e$i" root handle 1: netem delay "$delay" 2>"$state/netem.err"; then
        netem="$delay"
        [ -z "$rate" ] || ip netns exec "$ns" tc qdisc add dev "$prefix-e$i" parent 1:1 handle 10: \
          tbf rate "$rate" burst "$burst" latency 100ms
      else
        if [ "$netem" != unsupported ]; then
          netem_note=$(tr '\n' ' ' <"$state/netem.err")
          echo "cluster.sh: NO DELAY EMULATED: this kernel has no netem qdisc ($netem_note)." >&2
          echo "cluster.sh: the links have only the veth/bridge path's own latency; scripts/scaling_model.py adds the network's." >&2
        fi
        netem=unsupported
        [ -z "$rate" ] || ip netns exec "$ns" tc qdisc add dev "$prefix-e$i" root tbf rate "$rate" burst "$burst" latency 100ms
      fi
    elif [ -n "$rate" ]; then
      ip netns exec "$ns" tc qdisc add dev "$prefix-e$i" root tbf rate "$rate" burst "$burst" latency 100ms
    fi
    [ -z "$rate" ] || ip netns exec "$sw" tc qdisc add dev "$prefix-p$i" root tbf rate "$rate" burst "$burst" latency 100ms
    echo "$ns slots=64" >>"$state/hostfile"
  done
  rm -f "$state/netem.err"
  # Every host reaches every other one (and the head) before we say done.
  for ((i = 0; i < n; i++)); do
    reachable "$prefix-h$i" "$subnet.1" || die "host $prefix-h$i cannot reach the head $subnet.1"
  done
  cat >"$state/env" <<EOF
DGN_PREFIX=$prefix
DGN_HOSTS=$n
DGN_RATE=${rate:-none}
DGN_DELAY_ASKED=${delay:-none}
DGN_DELAY=$netem
DGN_MTU=$mtu
DGN_SUBNET=$subnet.0/24
EOF
  trap - EXIT INT TERM
  echo "cluster.sh: $n host(s) $prefix-h0..$prefix-h$((n - 1)) on bridge $prefix-br ($subnet.0/24) in $sw;" \
       "rate ${rate:-unlimited}, delay $( [ "$netem" = unsupported ] && echo "none (netem unavailable)" || echo "${delay:-none}" ); state in $state"
}

cmd_status() {
  local ns
  [ -f "$state/env" ] && cat "$state/env" || echo "no state in $state"
  for ns in $(our_namespaces); do
    echo "== $ns"
    ip -n "$ns" -br addr
    ip netns exec "$ns" tc qdisc show | grep -v -E 'noqueue|pfifo_fast' || true
  done
}

cmd_exec() {
  local host; host=$(host_name "${1:?exec HOST CMD...}"); shift
  [ $# -gt 0 ] || usage
  ip netns list | awk '{print $1}' | grep -qx "$host" || die "no namespace $host (cluster.sh up first)"
  exec ip netns exec "$host" "$@"
}

# mpirun from the head node, ranks on the first H hosts, K per host, TCP
# between hosts (btl tcp), shared memory within one (vader) unless --btl says
# otherwise; oob and btl only on the emulated interfaces.
cmd_mpirun() {
  local hosts="" ppn=1 btl="tcp,vader,self" i list=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --hosts) hosts="${2:?}"; shift 2;;
      --ppn) ppn="${2:?}"; shift 2;;
      --btl) btl="${2:?}"; shift 2;;
      --) shift; break;;
      *) break;;
    esac
  done
  [ -f "$state/env" ] || die "no cluster (scripts/cluster.sh up N first)"
  # shellcheck disable=SC1091
  . "$state/env"
  [ -n "$hosts" ] || hosts="$DGN_HOSTS"
  [ "$hosts" -le "$DGN_HOSTS" ] || die "--hosts $hosts: the cluster has $DGN_HOSTS"
  for ((i = 0; i < hosts; i++)); do list="$list${list:+,}$prefix-h$i:$ppn"; done
  # The ranks start through the rsh agent, which does not pass this shell's
  # environment on: export what a sanitized run (scripts/test.sh --sanitize)
  # sets for its ranks, where it is set (LSan's suppressions, Open MPI keeping
  # its components loaded so that their allocations have names).
  local v forward=()
  for v in ASAN_OPTIONS UBSAN_OPTIONS LSAN_OPTIONS OMPI_MCA_mca_base_component_disable_dlclose \
           PMIX_MCA_mca_base_component_disable_dlclose; do
    if [ -n "${!v:-}" ]; then forward+=(-x "$v"); fi
  done
  exec ip netns exec "$sw" env TMPDIR="$state/tmp" mpirun --allow-run-as-root --oversubscribe --bind-to none \
    -np $((hosts * ppn)) --host "$list" -wdir "$PWD" "${forward[@]}" \
    --mca plm_rsh_agent "$here/netns_rsh" --mca plm_rsh_no_tree_spawn 1 \
    --mca pml ob1 --mca btl "$btl" \
    --mca btl_tcp_if_include "$DGN_SUBNET" --mca oob_tcp_if_include "$DGN_SUBNET" \
    "$@"
}

cmd_run() {
  local up_args=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do up_args+=("$1"); shift; done
  [ "${1:-}" = -- ] || usage; shift
  [ $# -gt 0 ] || usage
  trap 'rc=$?; trap - EXIT; cmd_down || rc=1; exit $rc' EXIT
  trap 'exit 130' INT TERM
  ( cmd_up "${up_args[@]}" ) || exit $?
  DGN_CLUSTER_DIR="$state" DGN_PREFIX="$prefix" "$@"
}

case "${1:-}" in
  up) shift; cmd_up "$@";;
  down) shift; cmd_down;;
  status) shift; cmd_status;;
  exec) shift; cmd_exec "$@";;
  mpirun) shift; cmd_mpirun "$@";;
  run) shift; cmd_run "$@";;
  *) usage;;
esac
