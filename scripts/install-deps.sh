#!/usr/bin/env bash
# Debian packages the service tooling needs (systemd guest tests, cross builds,
# qemu smoke test, demo). Idempotent: installs only what is missing and runs
# `apt-get update` only when something is. Needs root (or sudo).
#
#   scripts/install-deps.sh            # everything
#   scripts/install-deps.sh systemd    # only the systemd guest test's needs
#   scripts/install-deps.sh cross      # only the cross build + qemu smoke test
#   scripts/install-deps.sh demo       # only mosquitto for scripts/demo.sh
#   scripts/install-deps.sh compose    # only docker-compose, to validate docker-compose.yml
set -euo pipefail

systemd_pkgs=(debootstrap systemd-container)
cross_pkgs=(qemu-user gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross)
demo_pkgs=(mosquitto mosquitto-clients)
# Only to validate docker-compose.yml (no engine is needed for `config`).
compose_pkgs=(docker-compose)

case "${1:-all}" in
systemd) wanted=("${systemd_pkgs[@]}") ;;
cross) wanted=("${cross_pkgs[@]}") ;;
demo) wanted=("${demo_pkgs[@]}") ;;
compose) wanted=("${compose_pkgs[@]}") ;;
all) wanted=("${demo_pkgs[@]}" "${systemd_pkgs[@]}" "${cross_pkgs[@]}" "${compose_pkgs[@]}") ;;
*) echo "usage: $0 [all|systemd|cross|demo|compose]" >&2; exit 2 ;;
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
