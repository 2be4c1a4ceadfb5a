#!/usr/bin/env bash
# Builds the CUDA backend for the CPU emulator and runs the GPU tests with it:
# the kernels' real sources (src/cuda) with blocks run one after another and
# each block's threads as fibers that switch at __syncthreads and warp
# shuffles. No GPU, no CUDA toolkit needed. Usage, from the repository root:
#   tests/cuda/emulator/run.sh   # builds into $EMU_BUILD (default build/emu), runs every emulated suite
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
BUILD="${EMU_BUILD:-$ROOT/build/emu}"
make -s -f "$ROOT/tests/cuda/emulator/Makefile" ROOT="$ROOT" BUILD="$BUILD" -j"${JOBS:-2}"
status=0
# Few SMs and a small L2 (many waves, few blocks), and an H100's (many blocks per slab).
for config in "4 1048576" "132 52428800"; do
  set -- $config
  echo "== emulated GPU tests: $1 SMs, $(($2 >> 10)) KB L2"
  EMU_SMS=$1 EMU_L2=$2 "$BUILD/emu_cuda_tests" "[backend],[golden],[nccl]" || status=1
done
if [[ -x "$BUILD/emu_cuda_mpi_tests" ]]; then
  echo "== emulated GPU tests under mpiexec, 2 ranks"
  mpiexec -n 2 --allow-run-as-root --oversubscribe "$BUILD/emu_cuda_mpi_tests" || status=1
fi
echo "== tests/cli with --backend cuda"
"$BUILD/emu_cli_tests" || status=1
exit $status
