#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every gate and
# every test tier that exists. Safe to run repeatedly on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages (QEMU, ipmi_sim, ipmitool, busybox, ...) and the boot
# artifacts built from Debian packages.
./scripts/deps.sh

log "Python packages for the grpcio reflection client test"
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

log "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

log "cargo build --workspace (the process tests run the real binaries)"
cargo build --workspace --locked

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

log "cargo test --workspace"
cargo test --workspace --locked

# Every fuzz target for a few seconds from its seeds (docs/testing.md,
# "Fuzzing"); the long runs are done by hand with fuzz/campaign.sh.
log "fuzz smoke (fuzz/smoke.sh)"
./fuzz/smoke.sh
