#!/usr/bin/env bash
# Functions to run a throw-away systemd guest with systemd-nspawn. Source it:
#
#   . tests/systemd/guest.sh
#   guest_boot "$(tests/systemd/rootfs.sh)"   # sets GUEST_NAME, GUEST_PID, GUEST_LEADER
#   guest_wait_booted 30
#   guest_exec 'systemctl is-active mosquitto'
#   guest_copy target/debug/onboardd /usr/bin/onboardd 0755
#   guest_stop
#
# Why these choices (see docs/testing-systemd.md):
# - --volatile=overlay: the cached root fs is the lower layer, every write goes
#   to a tmpfs, so each run starts clean and the cache is never modified.
# - --private-network: everything (mosquitto, fake cloud, onboardd) runs inside
#   the guest on 127.0.0.1, and the host's ports are never touched.
# - SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 + --system-call-filter=bpf: on these hosts
#   (hybrid cgroup v1/v2) this gives the guest a working cgroup v2 tree, which
#   Type=notify, WatchdogSec= and per-unit sandboxing need.
# - --register=no --keep-unit: the host's PID 1 is not systemd, there is no
#   machined to register with; commands reach the guest with nsenter instead of
#   machinectl.
# Only the processes started here are ever signalled (by PID).

GUEST_NAME=""
GUEST_PID=""
GUEST_LEADER=""
GUEST_LOG=""

# guest_boot ROOTFS [extra systemd-nspawn args...]
guest_boot() {
    local rootfs=$1
    shift
    GUEST_NAME="onboardd-test-$$-$RANDOM"
    GUEST_LOG="$(mktemp -t "$GUEST_NAME.XXXXXX.log")"
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 setsid systemd-nspawn \
        --quiet --boot \
        --directory="$rootfs" \
        --machine="$GUEST_NAME" \
        --register=no --keep-unit \
        --private-network \
        --volatile=overlay \
        --system-call-filter=bpf \
        --console=read-only \
        "$@" </dev/null >"$GUEST_LOG" 2>&1 &
    # Non-interactive bash puts background jobs in its own process group, so
    # setsid does not fork again and $! is systemd-nspawn itself.
    GUEST_PID=$!
    local i child
    for ((i = 0; i < 100; i++)); do
        # systemd-nspawn forks an intermediate child first (it sets up the
        # mounts, then forks the container's init and exits): only a child that
        # is PID 1 in its own PID namespace is the leader.
        for child in $(cat "/proc/$GUEST_PID/task/$GUEST_PID/children" 2>/dev/null); do
            if awk '/^NSpid:/ { exit !($NF == 1 && NF > 2) }' "/proc/$child/status" 2>/dev/null; then
                GUEST_LEADER=$child
                return 0
            fi
        done
        if ! kill -0 "$GUEST_PID" 2>/dev/null; then
            echo "guest_boot: systemd-nspawn exited early:" >&2
            cat "$GUEST_LOG" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "guest_boot: no container leader after 10 s" >&2
    return 1
}

# guest_exec 'shell command'   - runs /bin/sh -c in the guest, with a clean
# environment (the host's variables would otherwise leak into systemctl & co).
guest_exec() {
    nsenter --target "$GUEST_LEADER" --all \
        /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 \
        /bin/sh -c "$*"
}

# guest_wait_booted [TIMEOUT_SECONDS]   - until systemd says running/degraded.
guest_wait_booted() {
    local timeout=${1:-30} state="" deadline
    deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$GUEST_PID" 2>/dev/null; then
            echo "guest_wait_booted: guest exited; console:" >&2
            cat "$GUEST_LOG" >&2
            return 1
        fi
        state="$(guest_exec 'systemctl is-system-running' 2>/dev/null || true)"
        case "$state" in
        running | degraded) return 0 ;;
        esac
        sleep 0.2
    done
    echo "guest_wait_booted: still '$state' after ${timeout}s" >&2
    guest_exec 'systemctl --failed --no-legend' >&2 || true
    return 1
}

# guest_copy HOST_FILE GUEST_PATH [MODE]   - copies through a pipe, so it works
# after boot and needs no bind mount (the guest root is an overlay on tmpfs).
guest_copy() {
    local src=$1 dst=$2 mode=${3:-0644}
    guest_exec "mkdir -p \"\$(dirname '$dst')\" && cat > '$dst' && chmod $mode '$dst'" <"$src"
}

# guest_write GUEST_PATH [MODE] <<< content
guest_write() {
    local dst=$1 mode=${2:-0644}
    guest_exec "mkdir -p \"\$(dirname '$dst')\" && cat > '$dst' && chmod $mode '$dst'"
}

# guest_stop   - SIGTERM to systemd-nspawn (the guest halts cleanly in ~2 s),
# SIGKILL to the same PID only if it is still there after 20 s.
guest_stop() {
    [[ -n "$GUEST_PID" ]] || return 0
    if kill -0 "$GUEST_PID" 2>/dev/null; then
        kill -TERM "$GUEST_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 200; i++)); do
            kill -0 "$GUEST_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$GUEST_PID" 2>/dev/null; then
            echo "guest_stop: nspawn $GUEST_PID did not stop in 20 s, killing it" >&2
            kill -KILL "$GUEST_PID" 2>/dev/null || true
        fi
    fi
    wait "$GUEST_PID" 2>/dev/null || true
    if [[ -n "$GUEST_LOG" ]]; then rm -f "$GUEST_LOG"; fi
    GUEST_PID=""
    GUEST_LEADER=""
}
