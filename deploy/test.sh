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
cargo test --workspace --no-fail-fast -- --test-threads=1
