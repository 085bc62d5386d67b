#!/usr/bin/env bash
# Runs a single-node Meridian hub with embedded defaults: generated test CA and server certificate,
# data in ./meridian-data, connection string printed and saved to ./meridian-data/dev-credentials.json.
# Extra arguments go to `meridian dev` (see `meridian dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/meridian-target}"
exec cargo run --quiet -p meridian --bin meridian -- dev "$@"
