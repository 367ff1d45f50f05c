#!/bin/bash
# Fetch the large boot artifacts that are not committed (Xen, the dom0 kernel,
# iPXE binaries) from Debian's packages into a cache directory, and build the
# small test initramfs whose init proves it runs as Xen dom0.
#
# Usage: pxe-assets/fetch-artifacts.sh [CACHE_DIR]
#   CACHE_DIR defaults to $XDG_CACHE_HOME/lab/artifacts if XDG_CACHE_HOME is
#   set, else <repo>/.cache/artifacts.
#
# Needs only apt (apt-get download: nothing is installed on this machine, and
# no network beyond the configured Debian repositories), dpkg-deb, tar, gzip;
# cpio comes from the busybox-static .deb itself. Idempotent: .debs already in the cache are
# reused, outputs are rebuilt into temporaries and renamed into place.
#
# Output (in CACHE_DIR):
#   xen-4.17-amd64         Xen hypervisor, gunzipped (iPXE's multiboot loader needs it so)
#   vmlinuz-amd64          Debian dom0 kernel (current linux-image-amd64)
#   initrd-labbox-amd64.gz busybox initramfs; init prints LAB-DOM0-OK and powers off
#   undionly.kpxe          iPXE for BIOS PXE ROMs (chainloaded)
#   ipxe.efi snponly.efi   iPXE for x86 UEFI (all drivers / firmware's network stack)
#   VERSIONS               the package versions used
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
if [ $# -ge 1 ]; then
  out=$1
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
  out=$XDG_CACHE_HOME/lab/artifacts
else
  out=$repo/.cache/artifacts
fi
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
# never let the cache be committed by accident
[ -e "$out/.gitignore" ] || echo '*' > "$out/.gitignore"

# The kernel package name changes with every point release: resolve it
# through the metapackage, never pin linux-image-6.1.0-NN.
kpkg=${KPKG:-$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')}
[ -n "$kpkg" ] || { echo "cannot resolve linux-image-amd64 (run apt-get update?)" >&2; exit 1; }
kver=${kpkg#linux-image-}
pkgs=("$kpkg" xen-hypervisor-4.17-amd64 busybox-static ipxe)

# deb_for PKG: the cached .deb of PKG's candidate version, downloading it if missing
deb_for() {
  local pkg=$1 ver file
  ver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2; exit}')
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "no candidate for $pkg" >&2; return 1; }
  # apt-get download names files PKG_VERSION_ARCH.deb with ':' escaped as %3a
  file=$(ls "$out/debs/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$file" ]; then
    # as root, apt would warn that its _apt sandbox user cannot write here
    (cd "$out/debs" && apt-get download -q ${sandbox:+-o APT::Sandbox::User=root} "$pkg=$ver" >/dev/null)
    file=$(ls "$out/debs/${pkg}_${ver//:/%3a}_"*.deb | head -n1)
  fi
  echo "$pkg $ver" >> "$work/VERSIONS"
  echo "$file"
}

sandbox=; [ "$(id -u)" = 0 ] && sandbox=1
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
: > "$work/VERSIONS"

kdeb=$(deb_for "$kpkg")
xdeb=$(deb_for xen-hypervisor-4.17-amd64)
bdeb=$(deb_for busybox-static)
ideb=$(deb_for ipxe)

# Only what we need from the ~70 MB kernel .deb: vmlinuz and the xenfs modules.
M=./lib/modules/$kver/kernel/drivers
(cd "$work" && dpkg-deb --fsys-tarfile "$kdeb" | tar -x "./boot/vmlinuz-$kver" \
  "$M/xen/xen-privcmd.ko" "$M/xen/xenfs/xenfs.ko")
cp "$work/boot/vmlinuz-$kver" "$work/vmlinuz-amd64"

dpkg-deb --fsys-tarfile "$xdeb" | tar -xO ./boot/xen-4.17-amd64.gz | gunzip > "$work/xen-4.17-amd64"

# (in the .deb, /usr/lib/ipxe/ipxe.efi is a symlink to /boot/ipxe.efi)
(cd "$work" && dpkg-deb --fsys-tarfile "$ideb" | tar -x ./usr/lib/ipxe/undionly.kpxe ./usr/lib/ipxe/snponly.efi ./boot/ipxe.efi)
cp "$work/usr/lib/ipxe/undionly.kpxe" "$work/usr/lib/ipxe/snponly.efi" "$work/boot/ipxe.efi" "$work/"

# The initramfs: busybox from the .deb (not the host's), the two modules, init.
(cd "$work" && dpkg-deb --fsys-tarfile "$bdeb" | tar -x ./bin/busybox)
root=$work/rootfs
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$work/bin/busybox" "$root/bin/busybox"
cp "$work/$M/xen/xen-privcmd.ko" "$work/$M/xen/xenfs/xenfs.ko" "$root/lib/modules/"
install -m 0755 "$here/initramfs/init" "$root/init"
# /dev/console: the kernel's built-in initramfs already has it and init mounts
# devtmpfs; the node is added too when we can (root), as the shared recipe does.
if [ "$(id -u)" = 0 ]; then mknod -m 600 "$root/dev/console" c 5 1; mknod -m 666 "$root/dev/null" c 1 3; fi
(cd "$root" && find . | LC_ALL=C sort | "$work/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -n -6 > "$work/initrd-labbox-amd64.gz"

for f in xen-4.17-amd64 vmlinuz-amd64 initrd-labbox-amd64.gz undionly.kpxe ipxe.efi snponly.efi VERSIONS; do
  mv -f "$work/$f" "$out/$f"
done
# drop .debs of versions no longer current
for d in "$out"/debs/*.deb; do
  case " $kdeb $xdeb $bdeb $ideb " in *" $d "*) ;; *) rm -f "$d" ;; esac
done
cd "$out" && ls -l xen-4.17-amd64 vmlinuz-amd64 initrd-labbox-amd64.gz undionly.kpxe ipxe.efi snponly.efi
