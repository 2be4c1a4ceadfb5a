#!/usr/bin/env bash
# Installs what distgn needs to build and test on Debian (bookworm or newer),
# then nothing else. Safe to run again: only missing packages are installed.
set -euo pipefail

packages=(cmake g++ make catch2 libopenmpi-dev openmpi-bin libcli11-dev nlohmann-json3-dev zlib1g-dev
          python3-sklearn)
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
