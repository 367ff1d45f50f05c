#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every gate and
# every test tier that exists. Safe to run repeatedly on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Real peers the tests talk to: busybox udhcpc and iproute2 (DHCP in network
# namespaces), curl and atftp (TFTP and HTTP clients).
DEBS="iproute2 busybox-static curl atftp"
missing=$(for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  log "Debian packages: $missing"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

log "Python packages for the grpcio reflection client test"
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo build --workspace (the process tests run the real binaries)"
cargo build --workspace --locked

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

log "cargo test --workspace"
cargo test --workspace --locked
