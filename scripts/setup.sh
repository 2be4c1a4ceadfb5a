#!/usr/bin/env bash
# Installs what distgn needs on Debian (bookworm or newer), then nothing else.
# Safe to run again: only missing packages are installed.
#   scripts/setup.sh           build, test and run (scripts/build.sh calls it)
#   scripts/setup.sh --bench   also what the benchmark scripts use: torch for
#                              scripts/compare_torch.py, matplotlib for plots
#   scripts/setup.sh --fuzz    also clang++ with libFuzzer and the sanitizer
#                              runtimes, and clang's OpenMP, for scripts/fuzz.sh
#                              (the CTest fuzz tests; .ci/run passes it)
#   scripts/setup.sh --python  also Debian's torch, pytest and mpi4py, and the venv
#                              .venv-python (system site packages, so it sees
#                              that torch) with the pinned build tools of
#                              pyproject.toml; scripts/test.sh installs distgn
#                              into it and runs tests/python
set -euo pipefail

packages=(cmake g++ make catch2 libopenmpi-dev openmpi-bin libcli11-dev nlohmann-json3-dev zlib1g-dev
          python3-sklearn)
case "${1:-}" in
  --bench) packages+=(python3-torch python3-matplotlib python3-numpy) ;;
  # The unversioned names follow Debian's default clang (14 on bookworm);
  # libclang-rt-dev holds libFuzzer, which the clang package does not.
  --fuzz) packages+=(clang libclang-rt-dev libomp-dev) ;;
  --python) packages+=(python3-torch python3-pytest python3-numpy python3-venv python3-dev python3-pip python3-mpi4py) ;;
esac
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "${1:-}" = "--python" ]; then
  # Debian's python3 (the one python3-torch is for), whatever python3 is on PATH.
  cd "$(dirname "$0")/.."
  [ -x .venv-python/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv-python
  # The build tools at the versions pyproject.toml's [build-system] pins.
  mapfile -t requires < <(.venv-python/bin/python -c \
    'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
  .venv-python/bin/pip install -q "${requires[@]}"
fi
