#!/usr/bin/env bash
# Installs the official Azure IoT SDKs used by the black-box tests in node/tests/sdk/.
#
#   Python venv : ${MERIDIAN_SDK_CACHE:-$HOME/.cache/meridian-sdk}/venv
#                 azure-iot-hub==2.7.0 azure-iot-device==2.14.0 azure-eventhub==5.15.1 six
#                 (six is an undeclared dependency of azure-iot-hub 2.7.0)
#   Node        : ${MERIDIAN_SDK_CACHE:-$HOME/.cache/meridian-sdk}/node/node_modules
#                 azure-iothub@1.16.6 azure-iot-device@1.18.4 azure-iot-device-mqtt@1.16.4
#                 azure-iot-device-amqp@1.14.4 @azure/event-hubs@6.0.4
#
# Idempotent: each part is skipped when the pinned versions are already installed.
# Output: the last two lines are
#   python=<venv python path>
#   node_modules=<node_modules path>
set -euo pipefail

CACHE="${MERIDIAN_SDK_CACHE:-$HOME/.cache/meridian-sdk}"
VENV="$CACHE/venv"
NODE_DIR="$CACHE/node"
PY="$VENV/bin/python"

PY_PINS=(azure-iot-hub==2.7.0 azure-iot-device==2.14.0 azure-eventhub==5.15.1 six)
NODE_PINS=(azure-iothub@1.16.6 azure-iot-device@1.18.4 azure-iot-device-mqtt@1.16.4 azure-iot-device-amqp@1.14.4 @azure/event-hubs@6.0.4)

log() { echo "[sdk-setup] $*" >&2; }

mkdir -p "$CACHE"

# ---------------------------------------------------------------- Python
if [[ ! -x "$PY" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi

python_ok() {
    "$PY" - <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version, PackageNotFoundError
want = {"azure-iot-hub": "2.7.0", "azure-iot-device": "2.14.0", "azure-eventhub": "5.15.1", "six": None}
try:
    for name, ver in want.items():
        got = version(name)
        if ver is not None and got != ver:
            sys.exit(1)
    import azure.iot.hub, azure.iot.device, azure.eventhub  # noqa: F401  (import must work, needs six)
except (PackageNotFoundError, ImportError):
    sys.exit(1)
PYEOF
}

if python_ok; then
    log "python SDKs already installed"
else
    log "pip installing ${PY_PINS[*]}"
    "$PY" -m pip install --quiet "${PY_PINS[@]}"
    python_ok || { log "python SDK import check failed after install"; exit 1; }
fi

# ---------------------------------------------------------------- Node
node_ok() {
    local spec name ver got
    for spec in "${NODE_PINS[@]}"; do
        name="${spec%@*}"
        ver="${spec##*@}"
        [[ -f "$NODE_DIR/node_modules/$name/package.json" ]] || return 1
        got="$(node -p "require(process.argv[1]).version" "$NODE_DIR/node_modules/$name/package.json" 2>/dev/null || true)"
        [[ "$got" == "$ver" ]] || return 1
    done
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node/npm not found; skipping Node SDKs"
    echo "python=$PY"
    echo "node_modules="
    exit 0
fi

mkdir -p "$NODE_DIR"
if [[ ! -f "$NODE_DIR/package.json" ]]; then
    cat > "$NODE_DIR/package.json" <<'JSONEOF'
{
  "name": "meridian-sdk-tests",
  "version": "0.0.0",
  "private": true,
  "description": "Official Azure IoT Node SDKs for Meridian black-box tests"
}
JSONEOF
fi

if node_ok; then
    log "node SDKs already installed"
else
    log "npm installing ${NODE_PINS[*]}"
    (cd "$NODE_DIR" && npm install --no-audit --no-fund --loglevel=error "${NODE_PINS[@]}")
    node_ok || { log "node SDK version check failed after install"; exit 1; }
fi

echo "python=$PY"
echo "node_modules=$NODE_DIR/node_modules"
