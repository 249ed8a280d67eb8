#!/usr/bin/env bash
# Build (once) the Debian bookworm root file system that the systemd service
# tests boot with systemd-nspawn.
#
# Why a cached debootstrap: it takes ~70 s and ~250 MB; the guest is booted with
# --volatile=overlay so the cached tree is never modified and can be reused by
# every run. It is rebuilt only when missing or when the package list / recipe
# below changes (the stamp holds a hash of them).
#
# Usage: tests/systemd/rootfs.sh            # prints the root fs path on stdout
#                                           # (/var/cache/onboardd-test/rootfs-bookworm-vN)
#        ONBOARDD_TEST_ROOTFS=DIR rootfs.sh # build/use another directory
set -euo pipefail

SUITE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# systemd 252 = Debian 12 = Raspberry Pi OS bookworm: the init we ship against.
# ca-certificates: on every Raspberry Pi OS image, and onboardd's HTTPS client
# loads the system roots at start. sudo and openssl: also on every Raspberry Pi
# OS image; the README walkthrough (tests/systemd/readme-test.sh) runs as an
# ordinary user with sudo, and computes a sensor's proof with `openssl dgst`.
PACKAGES="systemd,systemd-sysv,dbus,libnss-systemd,ca-certificates,mosquitto,mosquitto-clients,sudo,openssl"
RECIPE_VERSION=3 # bump when the post-install tweaks below change
# One directory per recipe version: checkouts of different versions (branches,
# CI next to a developer) each keep their own tree instead of rebuilding the
# other's, and a tree is never replaced under a guest that is booted from it.
ROOTFS="${ONBOARDD_TEST_ROOTFS:-/var/cache/onboardd-test/rootfs-$SUITE-v$RECIPE_VERSION}"

stamp_wanted="$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" "$RECIPE_VERSION" | sha256sum | cut -d' ' -f1)"
stamp_file="$ROOTFS/.onboardd-test-stamp"

if [[ -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_wanted" ]]; then
    echo "$ROOTFS"
    exit 0
fi

if [[ $EUID -ne 0 ]]; then
    echo "rootfs.sh: must run as root (debootstrap)" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "rootfs.sh: debootstrap missing (scripts/install-deps.sh)" >&2; exit 1; }

# Build next to the final place and rename, so an interrupted build never
# leaves a half tree that a later run would take for a good one.
parent="$(dirname "$ROOTFS")"
mkdir -p "$parent"
tmp="$(mktemp -d "$parent/.rootfs-build.XXXXXX")"
cleanup() {
    if [[ -n "${tmp:-}" && -d "$tmp" ]]; then rm -rf --one-file-system "$tmp"; fi
}
trap cleanup EXIT

echo "rootfs.sh: debootstrap $SUITE into $tmp (about a minute)" >&2
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp" "$MIRROR" >"$tmp.log" 2>&1 || {
    echo "rootfs.sh: debootstrap failed; last lines of $tmp.log:" >&2
    tail -n 30 "$tmp.log" >&2
    exit 1
}
rm -f "$tmp.log"

# Guest tweaks. Each one removes a source of slowness or flakiness at boot:
# - empty machine-id: systemd generates one per boot (volatile overlay anyway);
# - no getty on the console: nspawn is started detached and nobody logs in;
# - a hostname so journal records are recognisable;
# - /etc/hosts as a Debian or Raspberry Pi OS install has it (minbase has none,
#   and `localhost` must resolve like on a real gateway).
: >"$tmp/etc/machine-id"
echo onboardd-test >"$tmp/etc/hostname"
cat >"$tmp/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	onboardd-test
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS
ln -sf /dev/null "$tmp/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$tmp/etc/systemd/system/getty@.service"
# apt's daily timers would only compete for the 2 cores during a test.
ln -sf /dev/null "$tmp/etc/systemd/system/apt-daily.timer"
ln -sf /dev/null "$tmp/etc/systemd/system/apt-daily-upgrade.timer"
apt_clean_dir="$tmp/var/cache/apt/archives"
find "$apt_clean_dir" -name '*.deb' -delete 2>/dev/null || true

echo "$stamp_wanted" >"$tmp/.onboardd-test-stamp"
if [[ -e "$ROOTFS" ]]; then
    rm -rf --one-file-system "$ROOTFS"
fi
mv "$tmp" "$ROOTFS"
tmp=""
echo "rootfs.sh: built $ROOTFS in $(( $(date +%s) - start )) s ($(du -sh "$ROOTFS" | cut -f1))" >&2
echo "$ROOTFS"
