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
# qemu-img (qemu-utils: the lab-in-a-box hosts' disks), and what builds the
# install-to-disk image: mmdebstrap, zstd, fdisk (sfdisk), e2fsprogs.
set -euo pipefail
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
DEBS="iproute2 busybox-static curl atftp qemu-system-x86 ipxe-qemu qemu-system-arm qemu-efi-aarch64 openipmi ipmitool python3 dnsmasq-base mmdebstrap zstd fdisk e2fsprogs"
missing=$(for p in $DEBS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
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
  # shellcheck disable=SC2086  # word lists
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    --allow-downgrades $missing $extra
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
