#!/bin/sh
# A simulated sensor: subscribes to its reply topic, announces itself until it
# gets an answer (like firmware would: the gateway may not be up yet, and an
# announce is not retained), then prints the reply. POSIX sh, so it runs in the
# eclipse-mosquitto (busybox) image as well as on a Debian host.
#
# Env: BROKER_HOST (localhost), BROKER_PORT (1883), SENSOR_ID (demo-sensor-1),
#      REPLY_TIMEOUT (60 s)
set -u
host=${BROKER_HOST:-localhost}
port=${BROKER_PORT:-1883}
id=${SENSOR_ID:-demo-sensor-1}
timeout=${REPLY_TIMEOUT:-60}
reply=$(mktemp)
trap 'rm -f "$reply"' EXIT

mosquitto_sub -h "$host" -p "$port" -q 1 -t "onboard/reply/$id" -C 1 -W "$timeout" >"$reply" &
sub=$!
sleep 0.5 # let the subscription reach the broker before the first announce

payload="{\"name\":\"Demo sensor $id\",\"brand\":\"acme\",\"model\":\"th-1\",\"tags\":[\"demo\"],\"metadata\":{\"fw\":\"1.0.0\"},\"request_id\":\"$id-$$\"}"
attempt=0
while kill -0 "$sub" 2>/dev/null; do
    attempt=$((attempt + 1))
    echo "sensor $id: announce #$attempt on onboard/announce/$id" >&2
    mosquitto_pub -h "$host" -p "$port" -q 1 -t "onboard/announce/$id" -m "$payload" ||
        echo "sensor $id: broker not reachable yet" >&2
    # Wait up to 5 s for the reply before announcing again.
    i=0
    while [ $i -lt 50 ] && kill -0 "$sub" 2>/dev/null; do
        sleep 0.1
        i=$((i + 1))
    done
done
wait "$sub"
status=$?
if [ $status -ne 0 ] || [ ! -s "$reply" ]; then
    echo "sensor $id: no reply within ${timeout}s" >&2
    exit 1
fi
echo "sensor $id: reply on onboard/reply/$id:"
cat "$reply"
