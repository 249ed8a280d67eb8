#!/usr/bin/env bash
# Builds the onboardd .deb with cargo-deb (config in Cargo.toml's
# [package.metadata.deb]): /usr/bin/onboardd without the fake cloud, the systemd
# unit, /etc/onboardd/onboardd.toml as a conffile.
#
#   scripts/build-deb.sh             # for this machine's architecture
#   scripts/build-deb.sh aarch64     # 64-bit Raspberry Pi OS (arm64)
#   scripts/build-deb.sh armv7       # 32-bit Raspberry Pi OS (armhf)
#
# Uses the cross-build target dir (CROSS_TARGET_DIR, default target-cross/ inside the checkout)
# so it does not churn the shared host target dir. Prints the .deb path.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$repo/target-cross}"

if ! command -v cargo-deb >/dev/null; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked
fi

target_args=()
case "${1:-host}" in
host) ;;
aarch64) target_args=(--target aarch64-unknown-linux-gnu) ;;
armv7) target_args=(--target armv7-unknown-linux-gnueabihf) ;;
*) echo "usage: $0 [host|aarch64|armv7]" >&2; exit 2 ;;
esac
if ((${#target_args[@]})); then
    triple=${target_args[1]}
    rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
fi

start=$(date +%s)
# --locked: the package is built from exactly the committed Cargo.lock.
deb="$(cargo deb --locked "${target_args[@]}" | tail -n 1)"
echo "build-deb: $deb ($(stat -c %s "$deb") bytes) in $(($(date +%s) - start)) s" >&2
echo "$deb"
