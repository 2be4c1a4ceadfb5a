#!/usr/bin/env bash
# Installs what distgn needs on Debian (bookworm or newer), then nothing else.
# Safe to run again: only missing packages are installed.
#   scripts/setup.sh           build, test and run (scripts/build.sh calls it)
#   scripts/setup.sh --bench   also what the benchmark scripts use: torch for
#                              scripts/compare_torch.py, matplotlib for plots
#   scripts/setup.sh --fuzz    also clang++ with libFuzzer and the sanitizer
#                              runtimes, and clang's OpenMP, for scripts/fuzz.sh
#                              (the CTest fuzz tests; .ci/run passes it)
set -euo pipefail

packages=(cmake g++ make catch2 libopenmpi-dev openmpi-bin libcli11-dev nlohmann-json3-dev zlib1g-dev
          python3-sklearn)
case "${1:-}" in
  --bench) packages+=(python3-torch python3-matplotlib python3-numpy) ;;
  # The unversioned names follow Debian's default clang (14 on bookworm);
  # libclang-rt-dev holds libFuzzer, which the clang package does not.
  --fuzz) packages+=(clang libclang-rt-dev libomp-dev) ;;
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
