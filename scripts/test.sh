#!/usr/bin/env bash
# The project's one test command:
#   deps (NATS, Redis, SecantusDB) -> fmt -> clippy -> metrics check -> k8s check -> build ->
#   cargo test -> e2e -> faults -> fuzz
# Usage: scripts/test.sh [--no-lint] [--no-e2e] [--no-fuzz]   (skips are for local iteration only)
# The fuzz step runs every target 20 s (scripts/fuzz.sh; longer: scripts/fuzz.sh 600).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
lint=1 e2e=1 fuzz=1
for arg in "$@"; do
  case $arg in
    --no-lint) lint=0 ;;
    --no-e2e) e2e=0 ;;
    --no-fuzz) fuzz=0 ;;
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "test.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

start=$SECONDS
step() { printf '\n=== [%s +%ds] %s\n' "$(date +%T)" "$((SECONDS - start))" "$*"; }
finish() {
  local rc=$?
  printf '\n=== test.sh %s (exit %d) in %dm%02ds\n' "$([[ $rc == 0 ]] && echo PASSED || echo FAILED)" \
    "$rc" "$(((SECONDS - start) / 60))" "$(((SECONDS - start) % 60))"
}
trap finish EXIT

step "dependencies (scripts/deps.sh)"
scripts/deps.sh
# Exports NATS_URL, REDIS_URL, TEST_MONGODB_URL for the Rust tests and e2e servers.
# shellcheck source=/dev/null
source "${QC_TEST_STATE_DIR:-/tmp/quckchat-test}/env"

if ((lint)); then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy"
  cargo clippy --workspace --all-targets -- -D warnings
  step "metrics: README table, dashboard and alert queries (scripts/check-metrics.py)"
  python3 scripts/check-metrics.py
fi

step "k8s manifests and Dockerfile (scripts/check-k8s.sh)"
scripts/check-k8s.sh

# Debug build on purpose: cargo test and the e2e suite reuse these artifacts. --workspace --bins
# builds every binary the e2e harness starts: quckchat, gateway, chat-svc, presence-svc, signaling-svc,
# huddle-svc, push-svc.
step "cargo build --workspace --bins"
cargo build --workspace --bins

step "cargo test --workspace"
cargo test --workspace

if ((e2e)); then
  step "e2e (npm ci && npm test)"
  cd "$ROOT/e2e"
  npm ci --no-audit --no-fund
  QUCKCHAT_BIN_DIR="$ROOT/target/debug" npm test
  # Each fault once under load (~1-2 min): chat-svc/presence-svc SIGKILL, gateway SIGTERM,
  # NATS and Redis killed and restarted, on the suite's own nats-server and redis-server.
  # The 30-minute soak is its own command: `cd e2e && E2E_SOAK_MINUTES=30 npm run soak`.
  step "e2e fault suite (npm run test:faults)"
  QUCKCHAT_BIN_DIR="$ROOT/target/debug" npm run test:faults
fi

if ((fuzz)); then
  step "fuzz (scripts/fuzz.sh 20: every target 20 s)"
  cd "$ROOT"
  scripts/fuzz.sh 20
fi
