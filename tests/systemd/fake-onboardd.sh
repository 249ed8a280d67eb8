#!/bin/sh
# A stand-in for onboardd, in sh, used only to prove the checks of
# service-test.sh before the real daemon works (or when changing the harness):
#   tests/systemd/service-test.sh --self-test
# It plays the same contract with tools the guest already has: exit 78 on a bad
# config, READY/STATUS/WATCHDOG through systemd-notify (hence the self-test's
# NotifyAccess=all drop-in: systemd-notify is a child process, not the main PID),
# a reply to each announce, and a native journal record with SENSOR_ID.
set -u
# The stand-in's sensor key is the hex of "fake-KEY-ID" (no HMAC), KEY naming the
# claim key: "generated", or "given" for a --key-file / the claim-key credential.
# The proof is computed from it as the protocol says.
fake_key() { printf 'fake-%s-%s' "$1" "$2" | od -An -tx1 | tr -d ' \n'; }
# `claim [--config F | --key-file F] ID`: the sensor key.
if [ "${1:-}" = claim ]; then
    which=generated
    [ "${2:-}" = --key-file ] && which=given
    for id; do :; done
    fake_key "$which" "$id"
    echo
    exit 0
fi
config=""
while [ $# -gt 0 ]; do
    case "$1" in
    --config) config=$2; shift ;;
    esac
    shift
done
if ! grep -q '^\[qubitro\]' "$config" 2>/dev/null || grep -q 'INVALID' "$config"; then
    echo "fake-onboardd: invalid config $config" >&2
    exit 78
fi
key_file="${CREDENTIALS_DIRECTORY:-/nonexistent}/${ONBOARDD__QUBITRO__API_KEY_FILE:-}"
[ -r "$key_file" ] || { echo "fake-onboardd: no API key at $key_file" >&2; exit 1; }

systemd-notify --ready --status="fake-onboardd: serving"
n=0
while :; do
    # The loop pings only when it runs: kill -STOP on this shell stops pinging.
    systemd-notify WATCHDOG=1
    msg=$(mosquitto_sub -h localhost -c -i fake-onboardd -q 1 -v -t 'onboard/announce/+' -C 1 -W 1 2>/dev/null) || continue
    [ -n "$msg" ] || continue
    topic=${msg%% *}
    sensor=${topic##*/}
    # Proofs are required, as by default, under the credential's key when loaded.
    which=generated
    [ -r "${CREDENTIALS_DIRECTORY:-/nonexistent}/claim-key" ] && which=given
    key=$(fake_key "$which" "$sensor")
    # Protocol v2: the proof covers the body's exact text, unescaped from the outer
    # JSON (the stand-in's bodies hold no escapes but quotes).
    body=$(printf '%s' "${msg#* }" | sed -n 's/^{"body":"\(.*\)","proof":"[0-9a-f]*"}$/\1/p' | sed 's/\\"/"/g')
    nonce=$(printf '%s' "$body" | sed -n 's/.*"nonce":"\([0-9a-f]*\)".*/\1/p')
    proof=$(printf 'onboardd-announce-v2\n%s' "$body" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$key" | awk '{print $NF}')
    if [ -z "$body" ] || ! printf '%s' "$msg" | grep -q "\"proof\":\"$proof\""; then
        mosquitto_pub -h localhost -q 1 -t "onboard/reply/$sensor" \
            -m '{"status":"error","code":"unauthorized","message":"announce carries no protocol v2 proof"}'
        continue
    fi
    n=$((n + 1))
    mac_key=$(printf %s onboardd-mac-v2 | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$key" | awk '{print $NF}')
    # The stand-in's seal is not AES-GCM: the service test's check that it opens fails
    # against the stand-in, as it should.
    reply="{\"status\":\"ok\",\"device_id\":\"fake-$n\",\"device_token_sealed\":\"00$n\",\"nonce\":\"$nonce\"}"
    mac=$(printf 'onboardd-reply-v2\n%s' "$reply" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$mac_key" | awk '{print $NF}')
    mosquitto_pub -h localhost -q 1 -t "onboard/reply/$sensor" \
        -m "{\"body\":\"$(printf '%s' "$reply" | sed 's/"/\\"/g')\",\"mac\":\"$mac\"}"
    printf 'MESSAGE=sensor onboarded\nPRIORITY=6\nSYSLOG_IDENTIFIER=onboardd\nSENSOR_ID=%s\n' "$sensor" | logger --journald
    systemd-notify --status="fake-onboardd: $n onboarded"
done
