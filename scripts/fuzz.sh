#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang++ with ASan+UBSan) into
# build-fuzz/ and runs them from their seed corpora (tests/fuzz/corpus/<target>).
#   scripts/fuzz.sh [--seconds N] [target...]   fuzz each target N seconds (default 60)
#   scripts/fuzz.sh --runs N [target...]        N inputs each, seed 1: reproducible (CTest, label fuzz)
# Targets: npy, cli_parse (default both). New inputs go to build-fuzz/corpus/<target>,
# never into the committed seeds; a crash is saved as build-fuzz/crash-<target>-*
# and makes the script fail.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=(-max_total_time=60)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) limit=(-max_total_time="$2"); shift 2 ;;
    --runs) limit=(-runs="$2" -seed=1); shift 2 ;;
    npy|cli_parse) targets+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument '$1' (targets: npy cli_parse)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(npy cli_parse)

scripts/setup.sh --fuzz
# One build at a time: CTest may start both fuzz tests at once.
mkdir -p build-fuzz
(
  flock 9
  if [ ! -f build-fuzz/CMakeCache.txt ]; then
    cmake -S tests/fuzz -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=None >/dev/null
  fi
  cmake --build build-fuzz -j 2 --target $(printf 'fuzz_%s ' "${targets[@]}") >/dev/null
) 9>build-fuzz/.lock

for t in "${targets[@]}"; do
  # libFuzzer writes new inputs into the first corpus directory, so the seeds
  # come second and are only read. A --runs check starts from the seeds alone
  # each time (an emptied directory), so the same inputs are tried every run.
  out="build-fuzz/corpus/$t"
  [ "${limit[0]#-runs=}" = "${limit[0]}" ] || { out="build-fuzz/runs-corpus/$t"; rm -rf "$out"; }
  mkdir -p "$out"
  echo "== fuzz_$t ${limit[*]}"
  # -max_len: .npy headers and option texts are small; larger adds nothing.
  build-fuzz/fuzz_$t "${limit[@]}" -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/crash-$t-" "$out" "tests/fuzz/corpus/$t"
done
