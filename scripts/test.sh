#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every CTest test
# (unit tests, golden tests, command-line tests and the mpirun tests), then
# the Python tests (tests/python, pytest: distgn.torch against torch, and over
# gloo), after scripts/setup.sh --python and pip install . into .venv-python.
#   scripts/test.sh [ctest args]              Release build in build/ (with
#                                             ctest args, the Python tests only
#                                             if DISTGN_PYTHON_TESTS=1)
#   scripts/test.sh --sanitize [ctest args]   ASan+UBSan build in build-sanitize/
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--sanitize" ]; then
  scripts/build.sh
  cd build
  ctest --output-on-failure --timeout 600 "$@"
  cd ..
  if [ $# -gt 0 ] && [ "${DISTGN_PYTHON_TESTS:-0}" != 1 ]; then exit 0; fi
  if ! scripts/setup.sh --python; then
    echo "test.sh: Python tests SKIPPED: torch could not be installed (scripts/setup.sh --python failed)"
    exit 0
  fi
  echo "test.sh: building the Python package (pip install . into .venv-python)"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc 2>/dev/null || echo 2) \
    .venv-python/bin/pip install -q --no-build-isolation --force-reinstall --no-deps .
  .venv-python/bin/python -m pytest -q -p no:cacheprovider -rs tests/python
  exit 0
fi
shift
scripts/setup.sh
jobs=$(nproc 2>/dev/null || echo 2)
# CPU only: nvcc-compiled code is not instrumented. -O1 -g keeps stacks readable
# and the suite fast enough.
cmake -S . -B build-sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DDISTGN_SANITIZE=ON -DDISTGN_CUDA=OFF >/dev/null
cmake --build build-sanitize -j "$jobs"
# halt_on_error: the first report fails the test; the suppressions cover only
# the MPI stack's process-lifetime allocations (tests/sanitize/lsan.supp).
# Those need whole stacks: fast_unwind_on_malloc=0, since Open MPI is built
# without frame pointers, and its and PMIx's components kept loaded at exit
# (disable_dlclose), or their frames have no library name to match.
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:print_stacktrace=1:strict_string_checks=1:detect_stack_use_after_return=1:fast_unwind_on_malloc=0"
export OMPI_MCA_mca_base_component_disable_dlclose=1 PMIX_MCA_mca_base_component_disable_dlclose=1
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export LSAN_OPTIONS="suppressions=$PWD/tests/sanitize/lsan.supp:print_suppressions=0"
cd build-sanitize
# Left out: the fuzz tests (label fuzz), which build with ASan+UBSan anyway
# and ran in the normal suite; cuda_emulated (label emu), which
# tests/cuda/emulator builds with its own Makefile, without these flags, so it
# would check nothing here, and whose threads are fibers switching stacks,
# which ASan cannot follow unannotated.
ctest --output-on-failure --timeout 900 -LE "emu|fuzz" "$@"
