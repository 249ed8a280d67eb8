#!/usr/bin/env bash
# CI step (run after `cargo nextest`): the shipped systemd unit, run for real in
# a Debian bookworm guest under systemd-nspawn (tests/systemd/service-test.sh),
# and README's Raspberry Pi walkthrough run as written in such a guest
# (tests/systemd/readme-test.sh).
# It is a separate step, not a cargo test, because it needs root, debootstrap
# and systemd-nspawn, which a developer's `cargo test` must not depend on.
#
# Installs what is missing, builds the .deb (scripts/build-deb.sh) and the fake
# cloud (release, the same `cargo build` as .ci/run's release step, so in CI nothing
# is built twice: a different set of targets unifies features differently and
# compiles half the dependencies again), and exits non-zero if any check fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh systemd

cargo build --release --locked --workspace --bins --examples
target="${CARGO_TARGET_DIR:-target}"
# The .deb as a Pi user installs it (release build, no fake cloud): the guest
# installs it with dpkg, so the package's files, unit and conffile are tested too.
deb="$(bash scripts/build-deb.sh host | tail -n 1)"
# Both run, whatever the first one says; the step fails if either failed.
rc=0
start=$(date +%s)
tests/systemd/service-test.sh --deb "$deb" "$target/release/fake-qubitro" || rc=1
echo "systemd-test: service test $(($(date +%s) - start)) s" >&2
# README's "From the .deb to the first sensor", extracted from README.md and run
# as written by an ordinary user with sudo, in the same kind of guest.
start=$(date +%s)
tests/systemd/readme-test.sh --deb "$deb" "$target/release/fake-qubitro" || rc=1
echo "systemd-test: README walkthrough $(($(date +%s) - start)) s" >&2
exit "$rc"
