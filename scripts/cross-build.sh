#!/usr/bin/env bash
# Release builds of onboardd for Raspberry Pi.
#
#   scripts/cross-build.sh [aarch64|armv7|all]     (default: all)
#
# Builds only the onboardd package: the fake Qubitro HTTP server is a separate
# workspace crate and never ships to gateways. Uses its own target dir
# (CROSS_TARGET_DIR, default target-cross/ inside the checkout) so a cross
# build never invalidates the host build's cache. Prints each stripped
# binary's size and the build time.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CROSS_TARGET_DIR:-$repo/target-cross}"

which="${1:-all}"
case "$which" in
aarch64) triples=(aarch64-unknown-linux-gnu) ;;
armv7) triples=(armv7-unknown-linux-gnueabihf) ;;
all) triples=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf) ;;
*) echo "usage: $0 [aarch64|armv7|all]" >&2; exit 2 ;;
esac

linker_for() {
    case "$1" in
    aarch64-*) echo aarch64-linux-gnu-gcc ;;
    armv7-*) echo arm-linux-gnueabihf-gcc ;;
    esac
}
strip_for() {
    case "$1" in
    aarch64-*) echo aarch64-linux-gnu-strip ;;
    armv7-*) echo arm-linux-gnueabihf-strip ;;
    esac
}

for triple in "${triples[@]}"; do
    if ! rustup target list --installed | grep -qx "$triple"; then
        echo "cross-build: adding rustup target $triple" >&2
        rustup target add "$triple"
    fi
    linker="$(linker_for "$triple")"
    command -v "$linker" >/dev/null || {
        echo "cross-build: $linker missing (scripts/install-deps.sh)" >&2
        exit 1
    }
    start=$(date +%s)
    cargo build --release --locked -p onboardd --target "$triple" --bin onboardd
    secs=$(($(date +%s) - start))
    bin="$CARGO_TARGET_DIR/$triple/release/onboardd"
    # The release profile already strips (strip = true); strip again with the
    # target's binutils only to make the printed size independent of that.
    stripped="$bin.stripped"
    "$(strip_for "$triple")" -o "$stripped" "$bin" 2>/dev/null || cp "$bin" "$stripped"
    size=$(stat -c %s "$stripped")
    printf '%s: %s  %d bytes (%.2f MiB stripped), built in %d s\n' \
        "$triple" "$bin" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$secs"
done
