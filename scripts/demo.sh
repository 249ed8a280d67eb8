#!/usr/bin/env bash
# The whole onboarding scenario on this machine, without Docker, in one command:
# a local mosquitto on a free port, the fake Qubitro API, onboardd with a
# temporary config and state dir (proofs required, as shipped: onboardd generates
# its claim key on first start), and the reference sensor (examples/sensor.rs):
# `onboardd claim` gives it its sensor key, it announces with protocol v2 (a proof
# over each announce, a new nonce each time), trusts only the reply whose mac
# verifies for its latest announce, and prints the device id, the token it
# unsealed from that reply and the broker the reply names.
# Everything started here is stopped (by PID) on exit.
#
#   scripts/demo.sh                # builds the debug binaries if needed
#   ONBOARDD_BIN=... FAKE_QUBITRO_BIN=... scripts/demo.sh
#   KEEP_LOGS=1 scripts/demo.sh    # keep the temp dir with all logs
#
# Needs: mosquitto, mosquitto_pub, mosquitto_sub (scripts/install-deps.sh demo).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# Debian puts the broker in /usr/sbin, which a normal user's PATH lacks.
export PATH="$PATH:/usr/sbin:/usr/local/sbin"
for tool in mosquitto mosquitto_pub mosquitto_sub; do
    command -v "$tool" >/dev/null || { echo "demo: $tool missing (scripts/install-deps.sh demo)" >&2; exit 1; }
done

target="${CARGO_TARGET_DIR:-$repo/target}"
onboardd="${ONBOARDD_BIN:-$target/debug/onboardd}"
fake="${FAKE_QUBITRO_BIN:-$target/debug/fake-qubitro}"
sensor_bin="${SENSOR_BIN:-$target/debug/examples/sensor}"
if [[ -z "${ONBOARDD_BIN:-}${FAKE_QUBITRO_BIN:-}${SENSOR_BIN:-}" ]]; then
    echo "demo: cargo build --workspace --bins --example sensor" >&2
    cargo build --quiet --workspace --bins --example sensor
fi

tmp="$(mktemp -d -t onboardd-demo.XXXXXX)"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP_LOGS:-0}" == 1 ]]; then
        echo "demo: logs kept in $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_is_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((20000 + RANDOM % 40000))
        port_is_open "$p" || { echo "$p"; return; }
    done
    echo "demo: no free port found" >&2
    return 1
}
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || { echo "demo: timed out waiting for $what" >&2; return 1; }
        sleep 0.1
    done
}

# 1. The broker.
mqtt_port="$(free_port)"
sed "s/^listener .*/listener $mqtt_port 127.0.0.1/" config/mosquitto/demo.conf >"$tmp/mosquitto.conf"
mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
wait_for 10 "mosquitto on port $mqtt_port" port_is_open "$mqtt_port"
echo "demo: mosquitto on 127.0.0.1:$mqtt_port" >&2

# 2. The fake cloud, on a port the kernel picks; it prints the address it bound.
api_key="demo-key-$RANDOM$RANDOM"
"$fake" --listen 127.0.0.1:0 --api-key "$api_key" --project-id demo-project >"$tmp/fake-qubitro.log" 2>&1 &
pids+=($!)
wait_for 10 "fake-qubitro" grep -q 'fake-qubitro listening on http://' "$tmp/fake-qubitro.log"
cloud_url="$(grep -o 'http://[0-9.:]*' "$tmp/fake-qubitro.log" | head -n 1)"
echo "demo: fake Qubitro on $cloud_url" >&2

# 3. onboardd, with its secret in a file like under systemd.
printf '%s' "$api_key" >"$tmp/qubitro-api-key"
chmod 600 "$tmp/qubitro-api-key"
cat >"$tmp/onboardd.toml" <<CONF
gateway_id = "demo-gateway"

[log]
level = "info"

[mqtt]
host = "127.0.0.1"
port = $mqtt_port

[qubitro]
base_url = "$cloud_url"
project_id = "demo-project"
api_key_file = "$tmp/qubitro-api-key"

[store]
path = "$tmp/state"

[control]
socket = "$tmp/onboardd.sock"
CONF
"$onboardd" run --config "$tmp/onboardd.toml" >"$tmp/onboardd.log" 2>&1 &
onboardd_pid=$!
pids+=("$onboardd_pid")
echo "demo: onboardd started (pid $onboardd_pid, log $tmp/onboardd.log)" >&2

# 4. The sensor's key, as a factory station would flash it: derived from the
#    claim key onboardd generated in its store on first start.
wait_for 10 "onboardd's claim key" test -s "$tmp/state/claim-key"
sensor_id="demo-sensor-$RANDOM"
sensor_key="$("$onboardd" claim --config "$tmp/onboardd.toml" "$sensor_id")"
echo "demo: sensor key of $sensor_id from \`onboardd claim\` (flashed into the sensor, never sent)" >&2

# 5. The sensor: it announces (v2) until an authenticated ok comes, and unseals its token.
if BROKER_HOST=127.0.0.1 BROKER_PORT="$mqtt_port" SENSOR_ID="$sensor_id" SENSOR_KEY="$sensor_key" \
    REPLY_TIMEOUT=30 SENSOR_BIN="$sensor_bin" "$repo/scripts/demo-sensor.sh"; then
    echo
    echo "demo: done; onboardd log:" >&2
    sed 's/^/  | /' "$tmp/onboardd.log" >&2
else
    echo "demo: the sensor got no authenticated ok; logs:" >&2
    for f in onboardd fake-qubitro mosquitto; do
        echo "--- $f" >&2
        tail -n 30 "$tmp/$f.log" >&2
    done
    kill -0 "$onboardd_pid" 2>/dev/null || echo "demo: onboardd exited" >&2
    exit 1
fi
