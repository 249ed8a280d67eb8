#!/usr/bin/env bash
# Smoke test of the aarch64 (and, if built, armv7) release binary under qemu-user:
# `--version` and `check-config` on the shipped config must work on the target
# architecture. Run scripts/cross-build.sh first.
#
#   scripts/qemu-smoke.sh [aarch64|armv7|all]      (default: aarch64)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CROSS_TARGET_DIR:-$repo/target-cross}"

which="${1:-aarch64}"
case "$which" in
aarch64) arches=(aarch64) ;;
armv7) arches=(armv7) ;;
all) arches=(aarch64 armv7) ;;
*) echo "usage: $0 [aarch64|armv7|all]" >&2; exit 2 ;;
esac

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The shipped config needs a project id and an API key to be valid: supply
# them the way a gateway does (environment / key file), not by editing it.
config="$repo/config/onboardd.toml"
if [[ ! -f "$config" ]]; then
    config="$tmp/onboardd.toml"
    printf '[qubitro]\nproject_id = "p"\n' >"$config"
fi
printf 'smoke-test-key' >"$tmp/api-key"

failed=0
for arch in "${arches[@]}"; do
    case "$arch" in
    aarch64) triple=aarch64-unknown-linux-gnu qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu ;;
    armv7) triple=armv7-unknown-linux-gnueabihf qemu=qemu-arm sysroot=/usr/arm-linux-gnueabihf ;;
    esac
    bin="$target_dir/$triple/release/onboardd"
    [[ -x "$bin" ]] || { echo "qemu-smoke: $bin missing; run scripts/cross-build.sh $arch" >&2; exit 2; }
    file "$bin" 2>/dev/null | sed 's/^/# /' || true
    run() {
        env ONBOARDD__QUBITRO__PROJECT_ID=smoke-project \
            ONBOARDD__QUBITRO__API_KEY_FILE="$tmp/api-key" \
            ONBOARDD__STORE__PATH="$tmp/store" \
            "$qemu" -L "$sysroot" "$bin" "$@"
    }
    if out="$(run --version 2>&1)"; then
        echo "PASS $arch --version: $out"
    else
        echo "FAIL $arch --version: $out"
        failed=1
    fi
    if out="$(run check-config --config "$config" 2>&1)"; then
        echo "PASS $arch check-config ($(echo "$out" | wc -l) lines of effective config)"
        # The effective config is printed redacted: the key must not appear.
        if grep -q smoke-test-key <<<"$out"; then
            echo "FAIL $arch check-config printed the API key"
            failed=1
        fi
    else
        echo "FAIL $arch check-config: $(echo "$out" | tail -n 5)"
        failed=1
    fi
done
exit $failed
