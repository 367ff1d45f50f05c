#!/usr/bin/env bash
# Installs the Debian packages the lab in a box and the tests need, and
# builds the boot artifacts from Debian packages. Sourced by test.sh and
# demo.sh; safe to run repeatedly.
#
# Real peers and parts: busybox udhcpc and iproute2 (DHCP in network
# namespaces), curl and atftp (TFTP and HTTP clients), QEMU with its iPXE
# ROMs (x86 hosts that PXE-boot Xen through the agent), qemu-system-arm and
# AAVMF (aarch64 hosts), OpenIPMI's ipmi_sim and ipmitool (a BMC per host
# and the reference client), python3 (the serial relay between a VM and its
# BMC, the grpcio client test), dnsmasq-base (only the binary: the boot
# benchmark's hand-tuned peer; it never runs outside a test namespace),
# openssh-client and openssh-server (`lab ssh`, and the real sshd that the
# forward test starts on 127.0.0.2 with its own config; the package's own
# sshd service is never started, see below),
# qemu-img (qemu-utils: the lab-in-a-box hosts' disks), and what builds the
# install-to-disk image: mmdebstrap, zstd, fdisk (sfdisk), e2fsprogs.
# prometheus (it ships promtool): tests/tests/metrics.rs scrapes lab-server
# and an agent with it on loopback; its own service is never started (the
# policy-rc.d below). chromium, chromium-driver and python3-selenium:
# tests/tests/dashboard.rs drives the dashboard in headless Chromium (Debian's
# /usr/bin/python3, where python3-selenium lives).
#
# Packaging (tests/tests/packaging.rs, agent_caps.rs, docs/deploy.md):
# mmdebstrap (a fresh bookworm root to install the .debs into), systemd
# (systemd-analyze verify, security, syscall-filter; nothing is started
# on this machine), systemd-container (systemd-nspawn boots the installed
# root to run the units for real),
# man-db and groff-base (man -l), strace (the agent's and the server's
# system calls against the units' filters), openssl (the private CA of
# docs/deploy.md); cargo-deb, pinned, built once with cargo install.
#
# Fuzzing (fuzz/, docs/testing.md): g++ builds libFuzzer (libfuzzer-sys).
#
# etcd-server (3.4): the etcd store's tests (tests/src/etcd.rs starts
# throwaway members on loopback; the package's own service is never
# started, the policy-rc.d below).
#
# tmux: a real terminal for `lab grab`'s keep-or-release question
# (tests/tests/grab.rs).
set -euo pipefail
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
DEBS="iproute2 busybox-static curl atftp qemu-system-x86 ipxe-qemu qemu-system-arm qemu-efi-aarch64 openipmi ipmitool python3 dnsmasq-base openssh-client openssh-server mmdebstrap systemd systemd-container man-db groff-base strace openssl zstd fdisk e2fsprogs prometheus chromium chromium-driver python3-selenium g++ etcd-server tmux"
# One line, space-separated (the pattern below matches " name ").
missing=$(for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"; done)
# bookworm's qemu-system-x86 needs bookworm's qemu-utils, older than the
# image's backport: allow that downgrade explicitly. qemu-img itself (the
# box's disks): any qemu-utils will do, else bookworm's.
extra=
case " $missing " in *" qemu-system-x86 "*|*" qemu-system-arm "*) extra="qemu-utils/bookworm";; esac
command -v qemu-img >/dev/null || extra="qemu-utils/bookworm"
if [ -n "$missing$extra" ] || ! ls /var/lib/apt/lists/*Packages* >/dev/null 2>&1; then
  printf '\n==> %s\n' "apt-get update"
  $SUDO apt-get update -qq
fi
if [ -n "$missing$extra" ]; then
  printf '\n==> %s\n' "Debian packages: $missing $extra"
  # No package may start its service here (openssh-server's sshd on port
  # 22 of every address): a policy-rc.d that says no, for the install only,
  # unless one is there already.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  # shellcheck disable=SC2086  # word lists
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    --allow-downgrades $missing $extra
  [ -z "$own_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi
# Installing bookworm's QEMU can remove a newer qemu-utils without putting
# one back (seen on a fresh machine: qemu-img gone, the disk tests failed).
if ! command -v qemu-img >/dev/null; then
  printf '\n==> %s\n' "qemu-utils/bookworm (qemu-img)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    --allow-downgrades qemu-utils/bookworm
fi

CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
  printf '\n==> %s\n' "cargo install cargo-deb $CARGO_DEB_VERSION (packaging/build-debs.sh)"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

printf '\n==> %s\n' "Boot artifacts from Debian packages (Xen, dom0 kernels, iPXE, GRUB, test initramfs)"
./pxe-assets/fetch-artifacts.sh

# The install-to-disk image (Debian 12 + Xen 4.17, mmdebstrap as root):
# ~2-4 min and ~110 MB of .debs cold; skipped in ~1 s while its cache key
# (script, pxe-assets/image/, package candidates) is unchanged. The same
# cache directory as fetch-artifacts.sh, passed explicitly (sudo drops
# XDG_CACHE_HOME).
printf '\n==> %s\n' "Disk image for install-to-disk (Debian 12 + Xen 4.17)"
cache=(); [ -z "${XDG_CACHE_HOME:-}" ] || cache=("$XDG_CACHE_HOME/lab/artifacts")
$SUDO ./pxe-assets/build-image.sh "${cache[@]}"
