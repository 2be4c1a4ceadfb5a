#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every CTest test
# (unit tests, golden tests, command-line tests and the mpirun tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
cd build
ctest --output-on-failure --timeout 600 "$@"
