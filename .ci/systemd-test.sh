#!/usr/bin/env bash
# CI step (run after `cargo nextest`): the shipped systemd unit, run for real in
# a Debian bookworm guest under systemd-nspawn (tests/systemd/service-test.sh).
# It is a separate step, not a cargo test, because it needs root, debootstrap
# and systemd-nspawn, which a developer's `cargo test` must not depend on.
#
# Installs what is missing, builds the .deb (scripts/build-deb.sh) and the fake
# cloud (debug, sharing CI's cargo cache with the test step), and exits non-zero
# if any check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh systemd

cargo build --locked --workspace --bins
target="${CARGO_TARGET_DIR:-target}"
# The .deb as a Pi user installs it (release build, no fake cloud): the guest
# installs it with dpkg, so the package's files, unit and conffile are tested too.
deb="$(bash scripts/build-deb.sh host | tail -n 1)"
start=$(date +%s)
tests/systemd/service-test.sh --deb "$deb" "$target/debug/fake-qubitro"
echo "systemd-test: $(($(date +%s) - start)) s" >&2
