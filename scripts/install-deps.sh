#!/usr/bin/env bash
# Debian packages onboardd's tests and tooling need. Idempotent: installs only
# what is missing and runs `apt-get update` only when something is. Needs root
# (or sudo). Works the same on Debian 12 and Raspberry Pi OS (bookworm).
#
#   scripts/install-deps.sh test       # what `cargo test --workspace --features failpoints`
#                                      # and scripts/demo.sh need:
#                                      # mosquitto (+ clients), openssl (test
#                                      # certificates), a C compiler (ring),
#                                      # Python's cryptography (v2 vectors),
#                                      # chromium + its driver (the gateway page)
#   scripts/install-deps.sh            # everything CI runs (test + the rest below)
#   scripts/install-deps.sh systemd    # only the systemd guest test's needs
#   scripts/install-deps.sh cross      # only the cross build + qemu smoke test
#   scripts/install-deps.sh demo       # the same as test
#   scripts/install-deps.sh compose    # only docker-compose, to validate docker-compose.yml
set -euo pipefail

systemd_pkgs=(debootstrap systemd-container python3-cryptography)
cross_pkgs=(qemu-user gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross)
# python3-cryptography: tests/protocol_v2_vectors.rs checks the v2 vectors with it too.
# chromium + chromium-driver: tests/gateway_page.rs drives the gateway page in a real
# headless browser over WebDriver.
test_pkgs=(mosquitto mosquitto-clients openssl gcc libc6-dev python3-cryptography chromium chromium-driver)
# Only to validate docker-compose.yml (no engine is needed for `config`).
compose_pkgs=(docker-compose)

case "${1:-all}" in
systemd) wanted=("${systemd_pkgs[@]}") ;;
cross) wanted=("${cross_pkgs[@]}") ;;
test | demo) wanted=("${test_pkgs[@]}") ;;
compose) wanted=("${compose_pkgs[@]}") ;;
all) wanted=("${test_pkgs[@]}" "${systemd_pkgs[@]}" "${cross_pkgs[@]}" "${compose_pkgs[@]}") ;;
*) echo "usage: $0 [all|test|systemd|cross|compose]" >&2; exit 2 ;;
esac

missing=()
for p in "${wanted[@]}"; do
    # "install ok installed" only: a removed-but-configured package does not count.
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
if ((${#missing[@]} == 0)); then
    echo "install-deps: all present (${wanted[*]})"
    exit 0
fi

sudo=()
[[ $EUID -eq 0 ]] || sudo=(sudo)
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
# mosquitto's package starts a broker on localhost:1883 where systemd runs; the
# demo and the tests use their own brokers on other ports, so that is harmless.
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
