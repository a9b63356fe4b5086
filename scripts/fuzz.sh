#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ and runs each for SECONDS (default 20),
# starting from the seed corpus in fuzz/corpus/<target>/. Exits non-zero if
# any target crashes, panics, runs out of memory or takes over 10 s on one
# input; the input is kept in fuzz/artifacts/<target>/ (replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a <target> <file>`).
#   scripts/fuzz.sh            # the CI step: 20 s per target
#   scripts/fuzz.sh 600        # a longer run
#   scripts/fuzz.sh 60 jwt     # some targets only
# Needs cargo-fuzz (installed from crates.io if missing) and a C++ compiler.
# Builds into QC_FUZZ_TARGET_DIR (default ~/.cache/quckchat/fuzz-target).
# The toolchain is stable: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z
# flags (sanitizer, coverage instrumentation). See docs/security.md#fuzzing.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

case ${1:-} in
  -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
esac
secs=${1:-20}
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: SECONDS must be a positive integer: $secs" >&2; exit 2; }
shift || true

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
# Outside the clone, so CI's fresh clones reuse the instrumented build of
# the same machine (a cold build takes many minutes; a warm one seconds).
export CARGO_TARGET_DIR=${QC_FUZZ_TARGET_DIR:-$HOME/.cache/quckchat/fuzz-target}

if (($# > 0)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

# -O -a: optimized, with debug assertions and overflow checks on.
if (($# > 0)); then
  for t in "${targets[@]}"; do cargo fuzz build --fuzz-dir fuzz -O -a "$t"; done
else
  cargo fuzz build --fuzz-dir fuzz -O -a
fi

# New inputs go to a scratch corpus; the seeds in fuzz/corpus stay as committed.
work=$(mktemp -d "${TMPDIR:-/tmp}/quckchat-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

failed=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "fuzz/artifacts/$t"
  printf '\n=== fuzz %s for %ss\n' "$t" "$secs"
  if cargo fuzz run --fuzz-dir fuzz -O -a "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$ROOT/fuzz/artifacts/$t/" \
    >"$work/$t.log" 2>&1; then
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^#[0-9]+.*DONE' "$work/$t.log" || true
  else
    failed+=("$t")
    tail -n 60 "$work/$t.log"
  fi
done

if ((${#failed[@]})); then
  printf '\nfuzz.sh: FAILED: %s (inputs in fuzz/artifacts/<target>/)\n' "${failed[*]}" >&2
  exit 1
fi
printf '\nfuzz.sh: %d targets, %ss each, no crash\n' "${#targets[@]}" "$secs"
