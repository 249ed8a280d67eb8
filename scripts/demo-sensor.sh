#!/bin/sh
# A simulated sensor: the reference sensor (examples/sensor.rs) with the demo's
# announce fields. It subscribes to its reply topic and announces itself with
# protocol v2 (a proof over each announce, a new nonce each time, backing off)
# until an ok arrives whose mac verifies for its latest announce (the gateway may
# not be up yet; anything else on the reply topic is logged and ignored), unseals
# the token and prints the device id, the token and the broker.
#
# Env: BROKER_HOST (localhost), BROKER_PORT (1883), SENSOR_ID (demo-sensor-1),
#      SENSOR_KEY (64 hex, from `onboardd claim SENSOR_ID`) or, for demos only,
#      CLAIM_KEY; REPLY_TIMEOUT (60 s); ANNOUNCE_INTERVAL (5 s, doubling up to
#      ANNOUNCE_MAX_INTERVAL, 60 s); SENSOR_BIN (target/debug/examples/sensor).
set -eu
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin=${SENSOR_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/examples/sensor}
[ -x "$bin" ] || { echo "demo-sensor: $bin missing (cargo build --example sensor)" >&2; exit 1; }
id=${SENSOR_ID:-demo-sensor-1}
export BROKER_HOST="${BROKER_HOST:-localhost}" BROKER_PORT="${BROKER_PORT:-1883}" \
    SENSOR_ID="$id" REPLY_TIMEOUT="${REPLY_TIMEOUT:-60}"
exec "$bin" --fields "{\"name\":\"Demo sensor $id\",\"brand\":\"acme\",\"model\":\"th-1\",\"tags\":[\"demo\"],\"metadata\":{\"fw\":\"1.0.0\"},\"request_id\":\"$id-$$\"}"
