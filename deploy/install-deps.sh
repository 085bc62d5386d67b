#!/usr/bin/env bash
# Installs the system packages Meridian builds against (Debian/Ubuntu, as root or with sudo):
# librocksdb-dev (RocksDB 7.8 linked by the `rocksdb` crate, docs/adr/002), libclang-dev (bindgen).
# Idempotent and quiet when everything is present.
set -euo pipefail
need=()
for pkg in librocksdb-dev libclang-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    echo "[deps] installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
