#!/usr/bin/env bash
# Runs onboardd as the shipped systemd unit in a throw-away Debian bookworm guest
# (systemd 252, the init of Raspberry Pi OS bookworm) and checks what the unit
# promises: Type=notify readiness, status text, an onboarding through the unit,
# structured journal records, secrets through LoadCredential=, recovery from a
# corrupt database (moved aside inside the state directory, the sensor adopted
# again with its sealed token readable), `devices list` with the service stopped,
# no restart on a config error (exit 78), a missing API key named by
# `systemctl status`, and the watchdog killing and restarting a hung daemon.
# Needs python3-cryptography on the host (tests/systemd/protocol.py, the sensor's side of
# protocol v2).
#
# Usage (root; needs debootstrap and systemd-container, see scripts/install-deps.sh):
#   tests/systemd/service-test.sh [ONBOARDD_BIN [FAKE_QUBITRO_BIN]]
#       defaults: target/release/... if built, else target/debug/...
#   tests/systemd/service-test.sh --deb onboardd_*_amd64.deb [FAKE_QUBITRO_BIN]
#       installs onboardd with dpkg from the package (scripts/build-deb.sh)
#       instead of copying the binary and unit, then runs the same checks
#   tests/systemd/service-test.sh --self-test
#       the same checks against tests/systemd/fake-onboardd.sh, to prove the
#       harness itself (needs no Rust build).
#
# Output: one `PASS name` or `FAIL name: why` line per check, then
# `N passed, M failed`; the exit status is non-zero if anything failed.
# ONBOARDD_TEST_KEEP=1 keeps the guest running at the end for a look around
# (it prints the nsenter command).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=tests/systemd/guest.sh
. "$here/guest.sh"

pick() { # first existing of the given paths
    local p
    for p in "$@"; do [[ -x "$p" ]] && { echo "$p"; return; }; done
    echo "$1"
}
target="${CARGO_TARGET_DIR:-$repo/target}"
self_test=0
deb=""
if [[ "${1:-}" == "--self-test" ]]; then
    self_test=1
    onboardd_bin="$here/fake-onboardd.sh"
    fake_bin="$here/fake-qubitro.sh"
elif [[ "${1:-}" == "--deb" ]]; then
    deb="${2:?--deb needs the .deb path}"
    [[ -f "$deb" ]] || { echo "service-test: $deb not found (scripts/build-deb.sh)" >&2; exit 2; }
    onboardd_bin="" # comes from the package
    fake_bin="${3:-$(pick "$target/release/fake-qubitro" "$target/debug/fake-qubitro")}"
else
    onboardd_bin="${1:-$(pick "$target/release/onboardd" "$target/debug/onboardd")}"
    fake_bin="${2:-$(pick "$target/release/fake-qubitro" "$target/debug/fake-qubitro")}"
fi
for f in $onboardd_bin "$fake_bin"; do
    [[ -x "$f" ]] || { echo "service-test: $f not found or not executable (cargo build --workspace --bins)" >&2; exit 2; }
done
[[ $EUID -eq 0 ]] || { echo "service-test: must run as root (systemd-nspawn)" >&2; exit 2; }

passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
# check NAME COMMAND...: PASS if the command succeeds, else FAIL with its output.
check() {
    local name=$1 out
    shift
    if out="$("$@" 2>&1)"; then pass "$name"; else fail "$name" "$(echo "$out" | tail -n 5 | tr '\n' ' ')"; fi
}
# poll TIMEOUT_S COMMAND...: retry until it succeeds (journal writes, restarts
# are asynchronous); bounded so a broken daemon cannot hang the test.
poll() {
    local timeout=$1 deadline
    shift
    deadline=$(($(date +%s%N) / 1000000 + timeout * 1000))
    while ! "$@" >/dev/null 2>&1; do
        (($(date +%s%N) / 1000000 < deadline)) || return 1
        sleep 0.2
    done
}
ms_now() { echo $(($(date +%s%N) / 1000000)); }
show() { guest_exec "systemctl show -p $1 --value onboardd.service"; }
# A real process id: never 0 or 1 (`kill -STOP 0` would stop this very script,
# which shares the nsenter'ed shell's process group).
is_pid() { [[ "$1" =~ ^[0-9]+$ ]] && (($1 > 1)); }

API_KEY="test-api-key-$RANDOM$RANDOM"
PROJECT_ID="test-project"

cleanup() {
    if [[ "${ONBOARDD_TEST_KEEP:-0}" == 1 && -n "$GUEST_PID" ]]; then
        echo "guest kept: nsenter --target $GUEST_LEADER --all /bin/bash   (stop: kill $GUEST_PID)" >&2
        return
    fi
    guest_stop
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(ms_now)
rootfs="$("$here/rootfs.sh")" || { echo "service-test: could not build the root fs" >&2; exit 2; }
t_rootfs=$(ms_now)
guest_boot "$rootfs" || exit 2
guest_wait_booted 60 || exit 2
t_boot=$(ms_now)
echo "# guest booted in $((t_boot - t_rootfs)) ms (root fs ready in $((t_rootfs - t0)) ms)" >&2

# ---------------------------------------------------------------- install ---
if [[ -n "$deb" ]]; then
    guest_copy "$deb" /tmp/onboardd.deb 0644
    if out="$(guest_exec 'dpkg -i /tmp/onboardd.deb' 2>&1)"; then
        pass "deb-installs ($(basename "$deb"))"
    else
        fail deb-installs "$(echo "$out" | tail -n 5 | tr '\n' ' ')"
    fi
    # Installed, but neither enabled nor started: it has no API key yet.
    check deb-unit-installed-not-enabled guest_exec '
        [ -x /usr/bin/onboardd ] && [ -f /lib/systemd/system/onboardd.service ] &&
        [ "$(systemctl is-enabled onboardd.service)" = disabled ] &&
        ! systemctl is-active --quiet onboardd.service &&
        grep -qx /etc/onboardd/onboardd.toml /var/lib/dpkg/info/onboardd.conffiles'
else
    guest_copy "$onboardd_bin" /usr/bin/onboardd 0755
    guest_copy "$repo/systemd/onboardd.service" /etc/systemd/system/onboardd.service 0644
fi
guest_copy "$fake_bin" /usr/local/bin/fake-qubitro 0755
# The config holds no secret: the API key comes only through LoadCredential=.
# Debian's mosquitto listens on localhost:1883 for anonymous local clients.
guest_write /etc/onboardd/onboardd.toml 0644 <<EOF
gateway_id = "gw-test"

[log]
level = "info"

[mqtt]
host = "localhost"
port = 1883

[qubitro]
base_url = "http://127.0.0.1:8080"
project_id = "$PROJECT_ID"
EOF
printf '%s' "$API_KEY" | guest_write /etc/onboardd/qubitro-api-key 0600
if ((self_test)); then
    guest_write /etc/systemd/system/onboardd.service.d/self-test.conf <<'EOF'
[Service]
# fake-onboardd.sh notifies through systemd-notify, a child process.
NotifyAccess=all
EOF
fi
guest_exec 'systemctl daemon-reload'

unit_path=/etc/systemd/system/onboardd.service
[[ -n "$deb" ]] && unit_path=/lib/systemd/system/onboardd.service
check unit-verifies guest_exec "out=\$(systemd-analyze verify $unit_path 2>&1); echo \"\$out\"; [ -z \"\$out\" ]"
exposure="$(guest_exec 'systemd-analyze security onboardd.service --no-pager 2>/dev/null | sed -n "s/.*Overall exposure level for onboardd.service: \([0-9.]*\).*/\1/p"')"
if [[ -n "$exposure" ]] && awk -v e="$exposure" 'BEGIN { exit !(e + 0 <= 2.0) }'; then
    pass "security-exposure-$exposure"
else
    fail security-exposure "level '${exposure:-?}' (want <= 2.0; systemd-analyze security onboardd)"
fi

# fake Qubitro, bound to the guest's 127.0.0.1, as a transient unit so its log
# is in the journal next to onboardd's.
guest_exec "systemd-run --quiet --unit=fake-qubitro --property=Type=exec \
    /usr/local/bin/fake-qubitro --listen 127.0.0.1:8080 --api-key '$API_KEY' --project-id '$PROJECT_ID'"
if poll 15 guest_exec 'journalctl -u fake-qubitro -o cat --no-pager | grep -q "fake-qubitro listening on"'; then
    pass fake-qubitro-listening
else
    fail fake-qubitro-listening "$(guest_exec 'systemctl status fake-qubitro --no-pager -n 5' 2>&1 | tr '\n' ' ')"
fi

# ------------------------------------------------------------- readiness ---
# With Type=notify, `systemctl start` blocks until READY=1: right after it
# returns the unit must already be active (it would be "activating" otherwise).
t_start=$(ms_now)
if guest_exec 'systemctl start onboardd.service'; then
    t_ready=$(ms_now)
    state="$(show ActiveState)/$(show SubState)"
    if [[ "$state" == active/running ]]; then
        pass "start-returns-after-ready ($((t_ready - t_start)) ms)"
    else
        fail start-returns-after-ready "state right after start: $state"
    fi
else
    fail start-returns-after-ready "systemctl start failed: $(guest_exec 'journalctl -u onboardd -n 15 -o cat --no-pager' | tr '\n' ' ')"
fi
status_text="$(show StatusText)"
if [[ -n "$status_text" ]]; then pass "status-text ($status_text)"; else fail status-text "StatusText is empty"; fi

# ------------------------------------------------------------ onboarding ---
# sensor_key_of SENSOR_ID [KEY_FILE]: the sensor's key as an operator gets it, from
# the key onboardd generated in its state directory, or from KEY_FILE.
sensor_key_of() {
    if [[ -n "${2:-}" ]]; then
        guest_exec "onboardd claim --key-file '$2' '$1'" 2>&1 | tail -n 1
    else
        guest_exec "onboardd claim --config /etc/onboardd/onboardd.toml '$1'" 2>&1 | tail -n 1
    fi
}
# json_field JSON NAME: a top-level field of a JSON object, or nothing.
json_field() { /usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ""))' "$1" "$2" 2>/dev/null; }
# onboard SENSOR_ID [SENSOR_KEY_HEX] -> prints the reply as the sensor reads it.
# With a key, the announce is protocol v2's, built as firmware builds it
# (tests/systemd/protocol.py, from README's spec), and the reply is printed only
# when it is authenticated for that announce (its body, with "opened_token" when its
# sealed token opens); without a key, a bare announce and the reply as it came.
onboard() {
    local fields="{\"name\":\"service test $1\",\"brand\":\"acme\",\"model\":\"t1\",\"request_id\":\"r-$1\"}"
    local nonce="" payload="$fields" raw
    if [[ -n "${2:-}" ]]; then
        read -r nonce payload < <("$here/protocol.py" announce "$2" "$fields")
    fi
    # Built here and passed in single quotes: it holds no single quote.
    raw="$(guest_exec "
        out=\$(mktemp)
        # Line-buffered, or the SUBACK line sits in stdio's buffer until exit.
        stdbuf -oL mosquitto_sub -h localhost -d -q 1 -t 'onboard/reply/$1' -C 1 -W 10 >\"\$out\" 2>&1 &
        sub=\$!
        # Publish only once the reply subscription is in place.
        i=0; until grep -q SUBACK \"\$out\" || [ \$i -ge 50 ]; do sleep 0.1; i=\$((i+1)); done
        mosquitto_pub -h localhost -q 1 -t 'onboard/announce/$1' -m '$payload'
        wait \$sub
        grep '^{' \"\$out\"")"
    if [[ -z "$nonce" || -z "$raw" ]]; then
        printf '%s\n' "$raw"
    else
        "$here/protocol.py" read "$2" "$1" "$nonce" "$raw" 2>&1
    fi
}
sensor="svc-$RANDOM$RANDOM"
# Proofs are required by default, with the key onboardd generated on first start.
unproven="$(onboard "$sensor" 2>&1)"
if [[ "$unproven" == *unauthorized* && "$unproven" != *'"status":"ok"'* ]]; then
    pass announce-without-proof-refused-by-default
else
    fail announce-without-proof-refused-by-default "reply: ${unproven:-none within 10 s}"
fi
sensor_key="$(sensor_key_of "$sensor")"
t_announce=$(ms_now)
reply="$(onboard "$sensor" "$sensor_key" 2>&1)"
t_reply=$(ms_now)
if [[ "$reply" == *'"status":"ok"'* && "$reply" == *'"device_id"'* && -n "$(json_field "$reply" opened_token)" && "$reply" != *'"device_token":'* ]]; then
    pass "onboarding-through-unit ($((t_reply - t_announce)) ms)"
else
    fail onboarding-through-unit "reply: ${reply:-none within 10 s}"
fi

# ------------------------------------------------------------- journal ---
# Native journal records: the event field sensor_id is the journal field
# SENSOR_ID, and an info event has PRIORITY 6.
journal_match="_SYSTEMD_UNIT=onboardd.service"
# The stand-in logs through short-lived `logger` processes, which journald cannot
# always attribute to the unit (the sender is gone when it looks up its cgroup).
((self_test)) && journal_match="SYSLOG_IDENTIFIER=onboardd"
journal_has_sensor() {
    guest_exec "journalctl $journal_match SENSOR_ID='$sensor' -o json --no-pager" | grep -q '"PRIORITY":"6"'
}
if poll 5 journal_has_sensor; then
    pass journal-sensor-id-field
else
    fail journal-sensor-id-field "no PRIORITY=6 record with SENSOR_ID=$sensor: $(guest_exec "journalctl _SYSTEMD_UNIT=onboardd.service -o json --no-pager -n 3" | cut -c1-300 | tr '\n' ' ')"
fi

# ----------------------------------------------------------- credentials ---
main_pid="$(show MainPID)"
cred_check() {
    is_pid "$main_pid" || { echo "onboardd is not running (MainPID=$main_pid)"; return 1; }
    guest_exec "
        set -e
        ! grep -q '$API_KEY' /etc/onboardd/onboardd.toml
        dir=\$(tr '\0' '\n' </proc/$main_pid/environ | sed -n 's/^CREDENTIALS_DIRECTORY=//p')
        [ -n \"\$dir\" ] || { echo 'no CREDENTIALS_DIRECTORY in the daemon environment'; exit 1; }
        [ \"\$(cat \"\$dir/qubitro-api-key\")\" = '$API_KEY' ] || { echo 'credential content differs'; exit 1; }
        mode=\$(stat -c %a \"\$dir/qubitro-api-key\")
        [ \"\$mode\" = 400 ] || [ \"\$mode\" = 440 ] || { echo \"credential mode \$mode\"; exit 1; }
        owner=\$(stat -c %U \"\$dir/qubitro-api-key\")
        [ \"\$owner\" != root ] || { echo 'credential owned by root, not the dynamic user'; exit 1; }"
}
check api-key-via-load-credential cred_check
# The onboarding above succeeded against a fake cloud that requires this key,
# so the daemon did read it from $CREDENTIALS_DIRECTORY.
dynamic_uid() { # DynamicUser= allocates from 61184-65519
    is_pid "$main_pid" && guest_exec "uid=\$(stat -c %u /proc/$main_pid); echo uid=\$uid; [ \$uid -ge 61184 ] && [ \$uid -le 65519 ]"
}
check runs-as-dynamic-user dynamic_uid
check state-dir-private guest_exec '[ "$(stat -c %a /var/lib/private/onboardd)" = 700 ] && [ -L /var/lib/onboardd ]'

# ------------------------------------------------------------ clean stop ---
if guest_exec 'systemctl stop onboardd.service' && [[ "$(show Result)" == success ]] && [[ "$(show ExecMainStatus)" == 0 ]]; then
    pass clean-stop-exit-0
else
    fail clean-stop-exit-0 "Result=$(show Result) ExecMainStatus=$(show ExecMainStatus)"
fi

# ------------------------------------------------------ corrupt database ---
# What a power cut on a worn SD card leaves: sled's files overwritten with noise
# while the service is stopped. The database must be moved aside inside the state
# directory (/var/lib/onboardd itself cannot be renamed under ProtectSystem=strict),
# the service must come up, and the sensor must be adopted again: the same device,
# its token sealed with the key the sensor was flashed with (the claim key beside
# the database is untouched), and no second device at Qubitro.
state_dir=/var/lib/private/onboardd
first_device="$(json_field "$reply" device_id)"
first_token="$(json_field "$reply" opened_token)"
# fake_devices: the number of devices the fake Qubitro holds (its list endpoint,
# over the guest's own loopback: the guest has no curl, and bash's /dev/tcp does).
guest_write /usr/local/bin/fake-qubitro-devices 0755 <<EOF
#!/bin/bash
exec 3<>/dev/tcp/127.0.0.1/8080
printf 'GET /v2/projects/$PROJECT_ID/devices HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n' '$API_KEY' >&3
cat <&3
EOF
fake_devices() {
    guest_exec /usr/local/bin/fake-qubitro-devices | sed '1,/^\r$/d' | /usr/bin/python3 -c '
import json, sys
v = json.load(sys.stdin)
while isinstance(v, dict):
    v = next(x for x in v.values() if isinstance(x, (list, dict)))
print(len(v))'
}
# sled's files: in db/, or (a version before db/) directly in the state directory.
noise_out="$(guest_exec "set -e
    cd $state_dir/db 2>/dev/null || cd $state_dir
    n=0
    for f in conf db snap.*; do
        [ -f \"\$f\" ] || continue
        head -c 4096 /dev/urandom >\"\$f\"; n=\$((n+1))
    done
    echo \"overwrote \$n files\"; [ \$n -ge 2 ]" 2>&1)" || fail corrupt-db-noise-written "$noise_out"
restarts_before="$(show NRestarts)"
t_corrupt=$(ms_now)
guest_exec 'systemctl start onboardd.service' >/dev/null 2>&1
up_with_broker() { [[ "$(show ActiveState)" == active && "$(show StatusText)" == *"broker connected"* ]]; }
if poll 10 up_with_broker; then
    t_up=$(ms_now)
    restarts=$(($(show NRestarts) - restarts_before))
    if ((restarts <= 1)); then
        pass "corrupt-db-service-up-with-broker ($((t_up - t_corrupt)) ms, $restarts restarts)"
    else
        fail corrupt-db-service-up-with-broker "NRestarts went from $restarts_before to $(show NRestarts)"
    fi
else
    fail corrupt-db-service-up-with-broker "state=$(show ActiveState)/$(show SubState) NRestarts=$(show NRestarts) status='$(show StatusText)': $(guest_exec 'journalctl -u onboardd -n 8 -o cat --no-pager' | tr '\n' ' ')"
fi
check corrupt-db-moved-aside-inside-state-dir guest_exec "ls -d $state_dir/db.corrupt-* && [ -f $state_dir/claim-key ] && [ -d $state_dir/db ]"
reply5="$(onboard "$sensor" "$sensor_key" 2>&1)"
token5="$(json_field "$reply5" opened_token)"
if [[ "$reply5" == *'"status":"ok"'* && -n "$first_device" && "$(json_field "$reply5" device_id)" == "$first_device" ]] &&
    [[ -n "$first_token" && "$token5" == "$first_token" ]]; then
    pass corrupt-db-same-device-token-opens-with-flashed-key
else
    fail corrupt-db-same-device-token-opens-with-flashed-key "first device '$first_device' token '${first_token:0:60}'; now reply: ${reply5:-none within 10 s}; unsealed: ${token5:0:80}"
fi
devices_now="$(fake_devices 2>&1)"
if [[ "$devices_now" == 1 ]]; then pass corrupt-db-fake-holds-one-device; else fail corrupt-db-fake-holds-one-device "devices: $devices_now"; fi

# The operator's look at the store while the service is stopped: run as root
# (sudo), the CLI becomes the store's dynamic owner and leaves no root-owned file.
guest_exec 'systemctl stop onboardd.service'
list_out="$(guest_exec 'sudo onboardd devices list --config /etc/onboardd/onboardd.toml 2>&1; echo "exit=$?"')"
root_owned="$(guest_exec "find $state_dir -user root" 2>&1)"
if [[ "$list_out" == *"exit=0"* && "$list_out" == *"$sensor"* && -z "$root_owned" ]]; then
    pass devices-list-with-service-stopped
else
    fail devices-list-with-service-stopped "$(echo "$list_out" | tail -n 3 | tr '\n' ' ') root-owned: $(echo "$root_owned" | tr '\n' ' ')"
fi
guest_exec 'systemctl reset-failed onboardd.service' >/dev/null 2>&1

# ---------------------------------------------------------- config error ---
# Exit 78 must leave the unit failed, not restarting: a config error cannot be
# fixed by a restart, and a restart loop would only fill the journal.
guest_exec 'cp /etc/onboardd/onboardd.toml /etc/onboardd/onboardd.toml.good'
guest_write /etc/onboardd/onboardd.toml <<'EOF'
[mqtt]
port = "INVALID"
EOF
guest_exec 'systemctl start onboardd.service' >/dev/null 2>&1
# Wait for the start job to settle (failed, or auto-restart if 78 were ignored).
poll 10 guest_exec '[ "$(systemctl show -p ActiveState --value onboardd)" != activating ] || [ "$(systemctl show -p SubState --value onboardd)" = auto-restart ]'
sleep 1 # a restart, if one were coming, would be scheduled by now
state="$(show ActiveState)/$(show SubState)"
status="$(show ExecMainStatus)"
restarts="$(show NRestarts)"
if [[ "$status" == 78 && "$state" == failed/failed && "$restarts" == 0 ]]; then
    pass config-error-exit-78-no-restart
else
    fail config-error-exit-78-no-restart "ExecMainStatus=$status state=$state NRestarts=$restarts"
fi
guest_exec 'mv /etc/onboardd/onboardd.toml.good /etc/onboardd/onboardd.toml; systemctl reset-failed onboardd.service'

# A missing API key file: the unit's AssertPathExists= stops the start before
# systemd tries LoadCredential= (which would fail as the cryptic
# "243/CREDENTIALS ... Protocol error"). `systemctl start` fails and says
# "Assertion failed"; `systemctl status` names the file. The unit is enabled
# first, as README's `enable --now` leaves it: systemd 252 unloads an inactive
# unit nothing refers to, and with it the result of its assertions, so the
# status of a disabled unit would no longer show the file. Nothing is restarted.
guest_exec 'mv /etc/onboardd/qubitro-api-key /etc/onboardd/qubitro-api-key.away; systemctl enable --quiet onboardd.service'
start_out="$(guest_exec 'systemctl start onboardd.service 2>&1; echo "exit=$?"')"
status_out="$(guest_exec 'systemctl status onboardd.service --no-pager 2>&1')"
sleep 1 # a restart, if one were coming, would be scheduled by now
state="$(show ActiveState)/$(show SubState)"
restarts="$(show NRestarts)"
if [[ "$start_out" != *"exit=0"* && "$start_out" == *"Assertion failed"* &&
    "$status_out" == *"AssertPathExists=/etc/onboardd/qubitro-api-key was not met"* &&
    "$state" == inactive/dead && "$restarts" == 0 ]]; then
    pass missing-api-key-named-without-restart
else
    fail missing-api-key-named-without-restart "start: $(echo "$start_out" | tr '\n' ' ') state=$state NRestarts=$restarts status: $(echo "$status_out" | head -n 6 | tr '\n' ' ')"
fi
guest_exec 'mv /etc/onboardd/qubitro-api-key.away /etc/onboardd/qubitro-api-key; systemctl disable --quiet onboardd.service; systemctl reset-failed onboardd.service'

# -------------------------------------------------------------- watchdog ---
# kill -STOP stands for a hang: the process stops pinging. (SIGABRT, the
# watchdog's signal, kills even a stopped process, so no abort timeout is
# involved.) The shipped RestartSec=5s is kept.
guest_write /etc/systemd/system/onboardd.service.d/watchdog-test.conf <<'EOF'
[Service]
WatchdogSec=3
EOF
guest_exec 'systemctl daemon-reload && systemctl start onboardd.service'
old_pid="$(show MainPID)"
wd_env="$(guest_exec "tr '\0' '\n' </proc/$old_pid/environ | sed -n 's/^WATCHDOG_USEC=//p'")"
# Alive past two watchdog periods while it pings (the daemon pings every 1.5 s).
sleep 7
if [[ "$(show MainPID)" == "$old_pid" && "$(show NRestarts)" == 0 ]]; then
    pass "watchdog-pinged-while-healthy (WATCHDOG_USEC=$wd_env)"
else
    fail watchdog-pinged-while-healthy "MainPID $old_pid -> $(show MainPID), NRestarts=$(show NRestarts): $(guest_exec 'journalctl -u onboardd -n 5 -o cat --no-pager' | tr '\n' ' ')"
fi
t_hang=$(ms_now)
if is_pid "$old_pid"; then
    guest_exec "kill -STOP $old_pid"
fi
restarted() {
    local pid
    pid="$(show MainPID)"
    [[ "$(show NRestarts)" -ge 1 && "$pid" != 0 && "$pid" != "$old_pid" && "$(show ActiveState)" == active ]]
}
# 3 s watchdog + 5 s RestartSec + start: ~9 s.
if ! is_pid "$old_pid"; then
    fail watchdog-kills-and-restarts-hung-daemon "onboardd was not running (MainPID=$old_pid)"
elif poll 30 restarted; then
    t_back=$(ms_now)
    if guest_exec 'journalctl -u onboardd.service -o cat --no-pager | grep -q "Watchdog timeout"'; then
        pass "watchdog-kills-and-restarts-hung-daemon ($((t_back - t_hang)) ms, NRestarts=$(show NRestarts))"
    else
        fail watchdog-kills-and-restarts-hung-daemon "restarted, but systemd logged no watchdog timeout"
    fi
else
    fail watchdog-kills-and-restarts-hung-daemon "MainPID=$(show MainPID) NRestarts=$(show NRestarts) state=$(show ActiveState)/$(show SubState)"
fi
# Service still works after the restart (state reloaded from the store).
reply2="$(onboard "$sensor" "$sensor_key" 2>&1)"
if [[ "$reply2" == *'"status":"ok"'* ]]; then pass onboarding-after-restart; else fail onboarding-after-restart "reply: ${reply2:-none within 10 s}"; fi

# ------------------------------------------------------------- claim key ---
# A claim key of the operator's own comes through the shipped drop-in (systemd 252
# fails a unit whose LoadCredential= file is missing, so it is not in the main unit).
# 64 hex characters, as the refusal of a weak key advises (`openssl rand -hex 32`; under 32
# characters is refused at start).
openssl rand -hex 32 | tr -d '\n' | guest_write /etc/onboardd/claim-key 0600
guest_copy "$repo/systemd/claim-key.conf" /etc/systemd/system/onboardd.service.d/claim-key.conf 0644
if guest_exec 'systemctl daemon-reload && systemctl restart onboardd.service' && [[ "$(show ActiveState)" == active ]]; then
    pass claim-key-drop-in-starts
else
    fail claim-key-drop-in-starts "state=$(show ActiveState)/$(show SubState): $(guest_exec 'journalctl -u onboardd -n 5 -o cat --no-pager' | tr '\n' ' ')"
fi
claimed="claim-$RANDOM$RANDOM"
# A proof made with the generated key no longer proves anything.
reply3="$(onboard "$claimed" "$(sensor_key_of "$claimed")" 2>&1)"
if [[ "$reply3" == *unauthorized* && "$reply3" != *'"status":"ok"'* ]]; then
    pass announce-with-another-keys-proof-refused
else
    fail announce-with-another-keys-proof-refused "reply: ${reply3:-none within 10 s}"
fi
# Derive the sensor key as the operator would (outside the unit, the key files are
# given by absolute path: there is no $CREDENTIALS_DIRECTORY).
claimed_key="$(sensor_key_of "$claimed" /etc/onboardd/claim-key)"
reply4="$(onboard "$claimed" "$claimed_key" 2>&1)"
if [[ "$reply4" == *'"status":"ok"'* && -n "$(json_field "$reply4" opened_token)" ]]; then
    pass announce-with-proof-onboarded
else
    fail announce-with-proof-onboarded "sensor key '$claimed_key', reply: ${reply4:-none within 10 s}"
fi

if ((failed)); then
    echo "# last journal lines of onboardd.service:" >&2
    guest_exec 'journalctl -u onboardd.service -n 40 -o short-monotonic --no-pager' >&2 || true
fi
echo "# total $(($(ms_now) - t0)) ms" >&2
echo "$passed passed, $failed failed"
((failed == 0))
