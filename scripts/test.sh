#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every gate and
# every test tier that exists. Safe to run repeatedly on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Real peers the tests talk to: busybox udhcpc and iproute2 (DHCP in network
# namespaces), curl and atftp (TFTP and HTTP clients), QEMU with its iPXE
# ROMs (a VM that PXE-boots Xen through the agent), OpenIPMI's ipmi_sim and
# ipmitool (a real BMC peer and the reference client).
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
DEBS="iproute2 busybox-static curl atftp qemu-system-x86 ipxe-qemu qemu-system-arm qemu-efi-aarch64 openipmi ipmitool"
missing=$(for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ] || ! ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1; then
  log "apt-get update"
  $SUDO apt-get update -qq
fi
if [ -n "$missing" ]; then
  log "Debian packages: $missing"
  # bookworm's qemu-system-x86 needs bookworm's qemu-utils, older than the
  # image's backport: allow that downgrade explicitly.
  extra=; case " $missing " in *" qemu-system-x86 "*) extra="qemu-utils/bookworm";; esac
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    --allow-downgrades $missing $extra
fi

log "Boot artifacts from Debian packages (Xen, dom0 kernel, iPXE, test initramfs)"
./pxe-assets/fetch-artifacts.sh

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
