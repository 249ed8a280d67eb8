#!/usr/bin/env bash
# README's "### From the .deb to the first sensor", run as written: the fenced
# ```sh block(s) under that heading are extracted from README.md itself and run
# in a throw-away Debian bookworm guest (systemd 252, as on Raspberry Pi OS) by
# an ordinary user with sudo, the way a new user would type them. Then every
# step's outcome is checked from outside the walkthrough. A README edit that
# breaks the path fails this test.
#
# Usage (root; needs debootstrap and systemd-container, see scripts/install-deps.sh):
#   tests/systemd/readme-test.sh --deb onboardd_*.deb [--readme FILE] [FAKE_QUBITRO_BIN]
#   tests/systemd/readme-test.sh --extract [--readme FILE]
#       prints the walkthrough script the guest would run, and exits
#
# What is substituted, and nothing else: the README's placeholders for what only
# a Qubitro account gives, pointed at the fake Qubitro running in the guest:
#   your-project-id          -> the fake's project id
#   https://api.qubitro.com  -> http://127.0.0.1:8080 (the fake)
# Each must occur in the block: a README edit that dropped one would otherwise
# silently run the walkthrough against something else. The API key is typed at
# the walkthrough's prompt (no secret on a command line): the walkthrough's
# standard input is the fake's API key, one line, as a user would type it.
#
# The user is "pi", as on Raspberry Pi OS: groups sudo and adm (the journal),
# passwordless sudo. The .deb is put in its home directory ("copy it to the Pi").
#
# How the walkthrough runs: one bash script, run as pi from its home, in which
# every command of the block sits on its own README line number (the gaps are
# blank lines), with `set -e -o pipefail`, xtrace (`+ README.md:LINE: command`)
# and an ERR trap: the first failing command stops it, and the trap names its
# README line. Shell variables carry from one command to the next, as in the
# terminal of a user who types them in order.
#
# Output: `PASS name` / `FAIL name: why` lines, then `N passed, M failed`; the
# walkthrough's own output is printed when a check fails. ONBOARDD_TEST_KEEP=1
# keeps the guest running and the walkthrough's output file, for a look around.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=tests/systemd/guest.sh
. "$here/guest.sh"

HEADING='### From the .deb to the first sensor'
API_KEY="QB_fake_$RANDOM$RANDOM"
PROJECT_ID="fake-project-$RANDOM"
FAKE_URL="http://127.0.0.1:8080"
# placeholder -> value, in this order (the URL before anything else that could
# contain it; neither overlaps the other).
PLACEHOLDERS=("your-project-id" "https://api.qubitro.com")
VALUES=("$PROJECT_ID" "$FAKE_URL")

readme="$repo/README.md"
deb=""
extract_only=0
fake_bin=""
while (($#)); do
    case "$1" in
    --deb) deb="${2:?--deb needs the .deb path}"; shift 2 ;;
    --readme) readme="${2:?--readme needs a file}"; shift 2 ;;
    --extract) extract_only=1; shift ;;
    -*) echo "readme-test: unknown option $1" >&2; exit 2 ;;
    *) fake_bin="$1"; shift ;;
    esac
done

# extract_block README: "LINE<TAB>text" for every line inside the ```sh (or
# ```bash) fences between HEADING and the next heading of any level. Lines that
# start with # inside a fence are shell comments, not headings.
extract_block() {
    awk -v heading="$HEADING" '
        !in_section { if ($0 == heading) in_section = 1; next }
        /^```/ {
            if (!in_fence) { in_fence = 1; is_sh = ($0 ~ /^```(sh|bash)[[:space:]]*$/) }
            else { in_fence = 0 }
            next
        }
        !in_fence && /^#+ / { exit }
        in_fence && is_sh { printf "%d\t%s\n", NR, $0 }
    ' "$1"
}

# walkthrough_script README: the script the user runs (see the header).
walkthrough_script() {
    local block lineno text i line=1
    block="$(extract_block "$1")"
    if [[ -z "$block" ]]; then
        echo "readme-test: no \`\`\`sh block under '$HEADING' in $1" >&2
        return 1
    fi
    for i in "${!PLACEHOLDERS[@]}"; do
        if [[ "$block" != *"${PLACEHOLDERS[$i]}"* ]]; then
            echo "readme-test: placeholder '${PLACEHOLDERS[$i]}' is missing from the block under '$HEADING' in $1 (the test substitutes exactly it; update tests/systemd/readme-test.sh with the README)" >&2
            return 1
        fi
    done
    # Line 1: the harness. Everything else sits on its README line.
    printf '%s\n' "set -e -o pipefail; trap '{ rc=\$?; set +x; } 2>/dev/null; echo \"readme-test: README.md line \$LINENO failed (exit \$rc): \$BASH_COMMAND\" >&2' ERR; PS4='+ README.md:\$LINENO: '; set -x"
    while IFS=$'\t' read -r lineno text; do
        while ((++line < lineno)); do echo; done
        for i in "${!PLACEHOLDERS[@]}"; do
            text="${text//"${PLACEHOLDERS[$i]}"/"${VALUES[$i]}"}"
        done
        printf '%s\n' "$text"
    done <<<"$block"
    # The harness's last line: what the sensor's firmware would hold, for the
    # checks made from outside (the ACL as the sensor sees it, its proof).
    printf '%s\n' "set +x; echo 'readme-test: walkthrough done'; declare -p SENSOR_PASSWORD SENSOR_KEY PROOF NONCE BODY >\"\$HOME/walkthrough.vars\" 2>/dev/null || true"
}

if ((extract_only)); then
    walkthrough_script "$readme"
    exit
fi

target="${CARGO_TARGET_DIR:-$repo/target}"
fake_bin="${fake_bin:-$target/debug/fake-qubitro}"
[[ -n "$deb" && -f "$deb" ]] || { echo "readme-test: --deb FILE is required (scripts/build-deb.sh host)" >&2; exit 2; }
[[ -x "$fake_bin" ]] || { echo "readme-test: $fake_bin not found (cargo build -p fake-qubitro)" >&2; exit 2; }
[[ $EUID -eq 0 ]] || { echo "readme-test: must run as root (systemd-nspawn)" >&2; exit 2; }
script="$(walkthrough_script "$readme")" || exit 1
# The sensor of the walkthrough: the last level of the topic it announces on.
sensor="$(extract_block "$readme" | grep -o 'onboard/announce/[A-Za-z0-9._:-]*' | head -n 1 | cut -d/ -f3)"
[[ -n "$sensor" ]] || { echo "readme-test: no onboard/announce/SENSOR_ID topic in the block" >&2; exit 1; }

passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
check() { # check NAME COMMAND...: PASS if it succeeds, else FAIL with its output
    local name=$1 out
    shift
    if out="$("$@" 2>&1)"; then pass "$name"; else fail "$name" "$(echo "$out" | tail -n 5 | tr '\n' ' ')"; fi
}
ms_now() { echo $(($(date +%s%N) / 1000000)); }
as_pi() { guest_exec "cd /home/pi && runuser -u pi -- env HOME=/home/pi USER=pi LOGNAME=pi $1"; }

log="$(mktemp -t readme-test.XXXXXX.log)"
cleanup() {
    if [[ "${ONBOARDD_TEST_KEEP:-0}" == 1 && -n "$GUEST_PID" ]]; then
        echo "guest kept: nsenter --target $GUEST_LEADER --all /bin/bash   (stop: kill $GUEST_PID)" >&2
        echo "walkthrough output kept: $log" >&2
    else
        guest_stop
        rm -f "$log"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(ms_now)
rootfs="$("$here/rootfs.sh")" || { echo "readme-test: could not build the root fs" >&2; exit 2; }
guest_boot "$rootfs" || exit 2
guest_wait_booted 60 || exit 2

# ------------------------------------------------------------------ setup ---
# The gateway as a new user has it: an ordinary user with sudo (Raspberry Pi
# OS's first user, with its groups sudo and adm), the .deb copied into its home,
# Debian's mosquitto running as installed, and "Qubitro" (the fake) reachable.
guest_exec 'useradd --create-home --shell /bin/bash --groups sudo,adm pi &&
    echo "pi ALL=(ALL) NOPASSWD: ALL" >/etc/sudoers.d/010_pi-nopasswd && chmod 0440 /etc/sudoers.d/010_pi-nopasswd'
deb_name="$(basename "$deb")"
guest_copy "$deb" "/home/pi/$deb_name" 0644
guest_exec "chown pi:pi '/home/pi/$deb_name'"
guest_copy "$fake_bin" /usr/local/bin/fake-qubitro 0755
guest_exec "systemd-run --quiet --unit=fake-qubitro --property=Type=exec \
    /usr/local/bin/fake-qubitro --listen 127.0.0.1:8080 --api-key '$API_KEY' --project-id '$PROJECT_ID'"
for _ in $(seq 50); do
    guest_exec 'journalctl -u fake-qubitro -o cat --no-pager | grep -q "fake-qubitro listening on"' && break
    sleep 0.2
done
printf '%s\n' "$script" | guest_write /home/pi/readme-walkthrough.sh 0644

# ------------------------------------------------------------ walkthrough ---
t_run=$(ms_now)
if as_pi 'bash readme-walkthrough.sh' <<<"$API_KEY" >"$log" 2>&1; then
    pass "walkthrough-runs-to-the-end ($(($(ms_now) - t_run)) ms, as user pi)"
else
    fail walkthrough-runs-to-the-end "$(grep '^readme-test: README.md line' "$log" | tail -n 1)"
fi

# ----------------------------------------------------- each step's outcome ---
check deb-installed guest_exec '[ "$(dpkg-query -W -f="\${Status}" onboardd)" = "install ok installed" ] && [ -x /usr/bin/onboardd ]'

# The broker: Debian's anonymous listener is gone, the logins and the ACL work.
check broker-active guest_exec 'systemctl is-active --quiet mosquitto'
anon_out="$(guest_exec 'mosquitto_pub -h 127.0.0.1 -t onboard/announce/anonymous -m "{}" 2>&1; echo "exit=$?"')"
if [[ "$anon_out" != *"exit=0"* && "$anon_out" == *"ot authori"* ]]; then
    pass broker-refuses-anonymous
else
    fail broker-refuses-anonymous "anonymous publish: $(echo "$anon_out" | tr '\n' ' ')"
fi
check broker-logins guest_exec "grep -q '^onboardd:' /etc/mosquitto/onboardd.passwd && grep -q '^$sensor:' /etc/mosquitto/onboardd.passwd"
# What the walkthrough left its sensor with (declared by its last line).
walkthrough_var() {
    guest_exec 'cat /home/pi/walkthrough.vars 2>/dev/null' | sed -n "s/^declare -- $1=\"\([0-9a-zA-Z]*\)\"\$/\1/p"
}
sensor_password="$(walkthrough_var SENSOR_PASSWORD)"
sensor_key="$(walkthrough_var SENSOR_KEY)"
proof="$(walkthrough_var PROOF)"
# The ACL, as the sensor meets it: it may not announce as another sensor
# (MQTT 5 PUBACK "Not authorized"; its own login is accepted).
acl_out="$(guest_exec "mosquitto_pub -V 5 -h 127.0.0.1 -u '$sensor' -P '$sensor_password' -q 1 \
    -t 'onboard/announce/not-$sensor' -m '{}' 2>&1; echo \"exit=\$?\"")"
if [[ -z "$sensor_password" ]]; then
    fail broker-acl-enforced "the walkthrough left no SENSOR_PASSWORD (tests/systemd/readme-test.sh reads it to log in as the sensor)"
elif [[ "$acl_out" == *"ot authorized"* && "$acl_out" != *"Connection"* ]]; then
    pass broker-acl-enforced
else
    fail broker-acl-enforced "publish as $sensor on onboard/announce/not-$sensor: $(echo "$acl_out" | tr '\n' ' ')"
fi
# onboardd logged in with its own login (the drop-in and the password file).
if guest_exec "journalctl -u mosquitto -o cat --no-pager | grep -q \"as onboardd (.*u'onboardd')\""; then
    pass broker-onboardd-login
else
    fail broker-onboardd-login "mosquitto logged no connection with username onboardd"
fi

check check-config-exit-0 as_pi 'onboardd check-config --config /etc/onboardd/onboardd.toml'

show() { guest_exec "systemctl show -p $1 --value onboardd.service"; }
state="$(show ActiveState)/$(show SubState)"
# Type=notify: active/running only after READY=1.
if [[ "$state" == active/running && "$(show Type)" == notify ]]; then
    pass "unit-active-after-ready (status: $(show StatusText))"
else
    fail unit-active-after-ready "state $state: $(guest_exec 'journalctl -u onboardd -n 10 -o cat --no-pager' | tr '\n' ' ')"
fi
# STATUS= follows the broker session; allow it a moment after a (re)connect.
for _ in $(seq 25); do
    status_text="$(show StatusText)"
    [[ "$status_text" == *"broker connected"* ]] && break
    sleep 0.2
done
if [[ "$status_text" == *"broker connected"* ]]; then
    pass "unit-broker-connected-with-its-login"
else
    fail unit-broker-connected-with-its-login "StatusText: $status_text"
fi

# The proof the walkthrough sent is protocol v2's, computed here independently:
# hex(HMAC-SHA256(key = the sensor key's bytes, msg = "onboardd-announce-v2\n" + BODY)),
# BODY the announce's exact text (read back whole: it holds quotes and spaces).
nonce="$(walkthrough_var NONCE)"
body="$(guest_exec "bash -c 'source /home/pi/walkthrough.vars 2>/dev/null; printf %s \"\$BODY\"'")"
want_proof="$(python3 -c 'import hmac, hashlib, sys; print(hmac.new(bytes.fromhex(sys.argv[1]), b"onboardd-announce-v2\n" + sys.argv[2].encode(), hashlib.sha256).hexdigest())' "$sensor_key" "$body" 2>&1)"
if [[ ${#sensor_key} == 64 && ${#nonce} == 32 && "$body" == *"\"nonce\":\"$nonce\""* && -n "$proof" && "$proof" == "$want_proof" ]]; then
    pass sensor-proof-as-the-protocol-says
else
    fail sensor-proof-as-the-protocol-says "SENSOR_KEY '$sensor_key', NONCE '$nonce', BODY '$body', PROOF '$proof', expected '$want_proof'"
fi
# The sensor's answer, as the walkthrough's sensor printed it, read as firmware reads
# it (tests/systemd/protocol.py: its mac verifies for this announce's nonce, and its
# sealed token opens with the sensor key).
reply="$(grep -m 1 '^{"body"' "$log")"
opened="$([[ -n "$reply" ]] && "$here/protocol.py" read "$sensor_key" "$sensor" "$nonce" "$reply" 2>&1)"
if [[ "$opened" == *'"status":"ok"'* && "$opened" == *'"device_id"'* && "$opened" == *'"opened_token"'* && "$opened" != *'"device_token":'* ]]; then
    pass "sensor-announce-with-proof-ok (mac verified, token sealed)"
else
    fail sensor-announce-with-proof-ok "reply: ${reply:-none in the walkthrough output}; as the sensor reads it: $opened"
fi

# As pi (group adm, as on Raspberry Pi OS); journald writes asynchronously.
for _ in $(seq 25); do
    journal_out="$(as_pi "journalctl -u onboardd SENSOR_ID=$sensor -o json --no-pager" 2>&1)"
    [[ "$journal_out" == *'"OUTCOME":"created"'* ]] && break
    sleep 0.2
done
if [[ "$journal_out" == *'"OUTCOME":"created"'* ]]; then
    pass "journal-finds-the-sensor (as pi)"
else
    fail journal-finds-the-sensor "journalctl -u onboardd SENSOR_ID=$sensor: $(echo "$journal_out" | tail -n 3 | cut -c1-300 | tr '\n' ' ')"
fi

devices_out="$(as_pi 'sudo onboardd devices list' 2>&1)"
if [[ "$devices_out" == *"$sensor"* ]]; then
    pass "devices-list-shows-the-sensor (sudo, as pi)"
else
    fail devices-list-shows-the-sensor "$(echo "$devices_out" | tail -n 3 | tr '\n' ' ')"
fi

# The fake's own view, through its control endpoint (the host's python3 in the
# guest's network namespace): exactly one device, and it is this sensor's.
fake_devices="$(nsenter --target "$GUEST_LEADER" --net python3 -c '
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1] + "/_fake/devices", timeout=10).read().decode())
' "$FAKE_URL" 2>&1)"
count="$(python3 -c '
import json, sys
devices = json.loads(sys.argv[1])
mine = [d for d in devices if (d.get("metadata") or {}).get("sensor_id") == sys.argv[2]]
print(f"{len(mine)} {len(devices)}")
' "$fake_devices" "$sensor" 2>&1)"
reply_device="$(sed -n 's/.*"device_id":"\([^"]*\)".*/\1/p' <<<"$opened")"
if [[ "$count" == "1 1" && -n "$reply_device" && "$fake_devices" == *"\"$reply_device\""* ]]; then
    pass "fake-holds-one-device-for-the-sensor ($reply_device)"
else
    fail fake-holds-one-device-for-the-sensor "mine/all: $count, reply device '${reply_device}': $(echo "$fake_devices" | cut -c1-300)"
fi

if ((failed)); then
    echo "# the walkthrough's output (as pi):" >&2
    tail -n 60 "$log" >&2
    echo "# last journal lines of onboardd.service:" >&2
    guest_exec 'journalctl -u onboardd.service -u mosquitto.service -n 30 -o short-monotonic --no-pager' >&2 || true
fi
echo "# total $(($(ms_now) - t0)) ms" >&2
echo "$passed passed, $failed failed"
((failed == 0))
