#!/usr/bin/env bash
# The prepared GPU check: on a machine with one NVIDIA GPU, the CUDA toolkit,
# PyTorch and no network, in under 8 minutes:
#   1. builds distgn (Release, sm_90, no -march=native) into build-gpu/;
#   2. runs every GPU test (ctest -L gpu): the CUDA backend against the CPU
#      backend on every Flax golden case and a matrix of shapes, dtypes, masks
#      and reduction axes, tensors beyond 2^31 elements, the NCCL communicator
#      with one rank, the MPI communicator with 2 ranks sharing the GPU;
#   3. `distgn bench --backend cuda --comm nccl` under mpirun with one rank
#      (NCCL bootstrapped over MPI), a smoke run;
#   4. `distgn bench --backend cuda` on NHWC 2x64x64x320, 2x32x32x640,
#      8x64x64x320, 1x128x128x128 and 1x20x256x256x128, G=32, in bfloat16,
#      float16 and float32 (parameters in the same dtype), and the same shapes
#      through torch.nn.functional.group_norm with channels_last input;
#   5. prints the table (forward and backward GB/s, the fraction of the
#      device-to-device copy bandwidth measured in the same run, torch's time
#      over distgn's) and, when $OUT is set, writes gpu_check.json and the
#      logs there.
#
# Usage: scripts/gpu_check.sh            (the check; GPU_CHECK_MPI=carried|system|none
#                                         forces where MPI comes from)
#        scripts/gpu_check.sh --fetch    (on a Debian 12 machine with network:
#                                         download the packages below first)
#
# What the GPU machine may lack, and nothing can be downloaded there: Open MPI
# and the header-only build dependencies (Catch2 v2, CLI11, nlohmann-json).
# They travel as Debian 12 (bookworm) packages in the git-ignored folder
# third_party/debs; this script unpacks them with `dpkg -x` into
# third_party/prefix and uses them when the system has none. To fetch them,
# from the repository root on a Debian 12 machine (what --fetch runs):
#
#   mkdir -p third_party/debs && cd third_party/debs && apt-get download \
#     openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev libhwloc15 \
#     libevent-2.1-7 libevent-core-2.1-7 libevent-pthreads-2.1-7 libpmix2 \
#     libfabric1 libucx0 libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200 \
#     libpsm2-2 libpsm-infinipath1 libnuma1 libltdl7 libmunge2 libxnvctrl0 \
#     catch2 libcli11-dev nlohmann-json3-dev
#
# (about 8 MB). Without MPI the script says so and skips the MPI parts; NCCL
# comes from the CUDA toolkit or from PyTorch's nvidia-nccl wheel.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TP="$ROOT/third_party"
DEBS=(openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev libhwloc15 libevent-2.1-7 libevent-core-2.1-7
      libevent-pthreads-2.1-7 libpmix2 libfabric1 libucx0 libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200
      libpsm2-2 libpsm-infinipath1 libnuma1 libltdl7 libmunge2 libxnvctrl0 catch2 libcli11-dev nlohmann-json3-dev)

if [[ "${1:-}" == "--fetch" ]]; then
  mkdir -p "$TP/debs"
  (cd "$TP/debs" && apt-get download "${DEBS[@]}")
  echo "fetched $(ls "$TP/debs" | wc -l) packages into $TP/debs (git-ignored); carry third_party to the GPU machine"
  exit 0
fi

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds, the whole script
BUILD="$ROOT/build-gpu"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
: >"$RESULTS/steps.jsonl"

log() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - START)); }
# Seconds left for a step: its own cap, or what remains of the budget minus a reserve.
left() {
  local cap=$1 reserve=${2:-20} remaining
  remaining=$((BUDGET - (SECONDS - START) - reserve))
  ((remaining < 5)) && remaining=5
  ((remaining < cap)) && echo "$remaining" || echo "$cap"
}
step_result() {  # name status seconds [note]
  printf '{"step":"%s","status":"%s","seconds":%s,"note":"%s"}\n' "$1" "$2" "$3" "${4:-}" >>"$RESULTS/steps.jsonl"
}
run_step() {  # name cap command...: runs under timeout, tees the log, records the status
  local name=$1 cap=$2
  shift 2
  local t0=$SECONDS status=ok limit
  limit=$(left "$cap")
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  set -e
  if ((rc == 124 || rc == 137)); then status="timeout after ${limit}s"; elif ((rc != 0)); then status="failed ($rc)"; fi
  step_result "$name" "$status" $((SECONDS - t0))
  echo "-- $name: $status"
  return 0
}

log "machine"
nvidia-smi -L || echo "nvidia-smi: not available"
nvcc --version | tail -2 || true
NCPU=$(nproc)

# ---- dependencies carried in third_party ------------------------------------------
PREFIX="$TP/prefix"
if [[ -d "$TP/debs" && ! -f "$PREFIX/.unpacked" ]]; then
  log "unpacking third_party/debs into third_party/prefix"
  mkdir -p "$PREFIX"
  for deb in "$TP"/debs/*.deb; do dpkg -x "$deb" "$PREFIX"; done
  touch "$PREFIX/.unpacked"
fi
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 -DDISTGN_NATIVE=OFF)
if [[ -d "$PREFIX/usr" ]]; then
  # Header-only build dependencies and their CMake packages.
  export CMAKE_PREFIX_PATH="$PREFIX/usr${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
fi
MPI_NOTE=""
USE_MPI=${GPU_CHECK_MPI:-auto}  # auto | system | carried | none
if [[ "$USE_MPI" != carried && "$USE_MPI" != none ]] && command -v mpirun >/dev/null 2>&1 &&
   command -v mpicxx >/dev/null 2>&1; then
  MPIRUN=$(command -v mpirun)
  MPI_NOTE="system MPI ($MPIRUN)"
elif [[ "$USE_MPI" != system && "$USE_MPI" != none && -x "$PREFIX/usr/bin/orterun" ]]; then
  # Open MPI unpacked from the carried packages: relocated with OPAL_PREFIX.
  export OPAL_PREFIX="$PREFIX/usr"
  export PATH="$PREFIX/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$PREFIX/usr/lib/x86_64-linux-gnu:$PREFIX/usr/lib/x86_64-linux-gnu/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  MPIRUN="$PREFIX/usr/bin/orterun"
  CMAKE_ARGS+=(-DMPI_CXX_COMPILER="$PREFIX/usr/bin/mpicxx.openmpi" -DMPIEXEC_EXECUTABLE="$MPIRUN")
  MPI_NOTE="Open MPI from third_party/debs ($MPIRUN)"
else
  MPIRUN=""
  MPI_NOTE="none"
  CMAKE_ARGS+=(-DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON)
  echo "MPI: NOT FOUND. No mpirun/mpicxx on this machine and no third_party/debs (see this script's header:"
  echo "     run 'scripts/gpu_check.sh --fetch' on a Debian 12 machine with network and carry third_party)."
  echo "     The 2-rank MPI test and the NCCL-over-MPI run are skipped; everything else runs."
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
echo "MPI: $MPI_NOTE"

# NCCL: the toolkit's, else PyTorch's nvidia-nccl wheel.
if [[ -z "${NCCL_HOME:-}" ]] && ! ls /usr/local/cuda/include/nccl.h >/dev/null 2>&1; then
  NCCL_DIR=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null ||
             python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
  if [[ -n "$NCCL_DIR" && -f "$NCCL_DIR/include/nccl.h" ]]; then
    export NCCL_HOME="$NCCL_DIR"
    export LD_LIBRARY_PATH="$NCCL_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
echo "NCCL: ${NCCL_HOME:-from the CUDA toolkit if it has one}"

# ---- build ----------------------------------------------------------------------------
log "configure and build (Release, sm_90) into build-gpu"
run_step configure 120 cmake -S "$ROOT" -B "$BUILD" "${CMAKE_ARGS[@]}"
CONFIG="$BUILD/include/distgn/build_config.hpp"
TARGETS=(distgn_cli distgn_cuda_tests)
grep -q "^#define DISTGN_WITH_MPI 1" "$CONFIG" 2>/dev/null && TARGETS+=(distgn_cuda_mpi_tests)
grep -q "^#define DISTGN_WITH_CUDA 1" "$CONFIG" 2>/dev/null ||
  echo "WARNING: the build has no CUDA backend (no nvcc found by CMake)"
run_step build 300 cmake --build "$BUILD" -j "$NCPU" --target "${TARGETS[@]}"
DISTGN="$BUILD/distgn"

# ---- tests ------------------------------------------------------------------------------
log "GPU tests (ctest -L gpu)"
run_step ctest_gpu 240 sh -c "cd '$BUILD' && ctest -L gpu --output-on-failure"

if [[ -n "$MPIRUN" && -x "$DISTGN" ]] && grep -q "^#define DISTGN_WITH_NCCL 1" "$CONFIG"; then
  log "NCCL bootstrapped over MPI, one rank"
  run_step nccl_over_mpi 60 "$MPIRUN" -np 1 "$DISTGN" bench --backend cuda --comm nccl --shape "2,32,32,640;4,64,16,16" \
    --dtype bf16 --param-dtype bf16 --iters 3 --warmup 1 --check
else
  step_result nccl_over_mpi skipped 0 "no MPI or no NCCL"
fi

# ---- benchmarks ---------------------------------------------------------------------------
SHAPES="2,64,64,320;2,32,32,640;8,64,64,320;1,128,128,128;1,20,256,256,128"
for dtype in bf16 f16 f32; do
  log "distgn bench --backend cuda, $dtype"
  run_step "bench_$dtype" 90 "$DISTGN" bench --backend cuda --shape "$SHAPES" --num-groups 32 --dtype "$dtype" \
    --param-dtype "$dtype" --iters 20 --warmup 5 --json "$RESULTS/bench_$dtype.jsonl"
done
log "torch.nn.functional.group_norm, channels_last"
run_step torch 150 python3 "$ROOT/scripts/compare_torch_gpu.py" torch --shapes "$SHAPES" --dtypes bf16,f16,f32 \
  --groups 32 --iters 20 --warmup 5 --json "$RESULTS/torch.jsonl"

# ---- the table ------------------------------------------------------------------------------
log "results"
python3 "$ROOT/scripts/compare_torch_gpu.py" table --distgn "$RESULTS"/bench_*.jsonl --torch "$RESULTS/torch.jsonl" \
  --json "$RESULTS/table.json" | tee "$RESULTS/table.txt"
echo
echo "steps:"
cat "$RESULTS/steps.jsonl"
echo "total: $((SECONDS - START)) s"

python3 - "$RESULTS" "$MPI_NOTE" <<'EOF'
import json, os, subprocess, sys
results, mpi = sys.argv[1], sys.argv[2]
steps = [json.loads(l) for l in open(os.path.join(results, "steps.jsonl")) if l.strip()]
table = json.load(open(os.path.join(results, "table.json"))) if os.path.exists(os.path.join(results, "table.json")) else {}
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""
summary = {
    "gpu": run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
    "nvcc": run(["nvcc", "--version"]).splitlines()[-1:] ,
    "mpi": mpi,
    "steps": steps,
    "cases": table.get("cases", []),
}
with open(os.path.join(results, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=1)
EOF
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$RESULTS/gpu_check.json" "$OUT/"
  # Logs (the largest first to go if $OUT's file count is limited).
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$RESULTS" . 2>/dev/null || true
  cp "$RESULTS/table.txt" "$OUT/" 2>/dev/null || true
  echo "results written to $OUT"
fi
# Fail when a step failed, so callers see it; the table is printed either way.
if grep -q '"status":"failed\|"status":"timeout' "$RESULTS/steps.jsonl"; then exit 1; fi
