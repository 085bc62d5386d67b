#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy (-D warnings), unit tests, integration tests that
# start real nodes (single node and 3-node clusters on loopback) and the official Azure SDK tests.
# Installs what it needs first (system packages, the pinned Azure SDKs in ~/.cache/meridian-sdk).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meridian-target}"
bash node/tests/sdk/setup.sh >/dev/null
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build"
cargo build --workspace --all-targets
echo "== cargo test"
# Integration tests start whole clusters; one test binary at a time keeps 2-core machines honest.
log="$(mktemp)"
status=0
cargo test --workspace --no-fail-fast -- --test-threads=1 2>&1 | tee "$log" || status=$?
# One closing line for every test binary together (cargo prints one per binary, the last of which
# is often a doc-test run with nothing in it).
summary=$(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { printf "%d passed, %d failed", p, f }' "$log")
rm -f "$log"
echo "tests: $summary"
exit "$status"
