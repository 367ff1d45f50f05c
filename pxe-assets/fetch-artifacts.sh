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
#   initrd-install-amd64.gz the disk installer (installer/init: streams the
#                          disk image of build-image.sh to the host's disk);
#                          busybox, Debian's zstd + libraries, NIC/disk/ext4
#                          modules of the same kernel; VERSIONS-install is its
#                          cache key (rebuilt only when it changes)
#   undionly.kpxe          iPXE for BIOS PXE ROMs (chainloaded)
#   ipxe.efi snponly.efi   iPXE for x86 UEFI (all drivers / firmware's network stack)
#   VERSIONS               the package versions used
# and for aarch64 hosts (UEFI PXE -> GRUB -> Xen on ARM), from :arm64 packages
# fetched through a private APT configuration (CACHE_DIR/apt-arm64; the
# machine's dpkg architectures are not changed):
#   grubnetaa64-lab.efi    GRUB netboot image built with grub-mkimage (from
#                          grub-common, unpacked, not installed) with efinet,
#                          tftp, http, xen_boot, gzio, ... built in; prefix
#                          (tftp)/grub (the per-host configs load Xen, the
#                          kernel and the initrd over http)
#   xen-4.17-arm64         Xen hypervisor for arm64
#   vmlinuz-arm64.gz       Debian arm64 kernel (an Image), gzipped; loaded with
#                          --nounzip, Xen unpacks it
#   initrd-labbox-arm64.gz the same initramfs as x86, arm64 busybox and modules
#   VERSIONS-arm64         their package versions and input hashes (the arm64
#                          outputs are rebuilt only when this changes)
# LAB_NO_ARM64=1 skips the arm64 part.
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

# arm64 packages: a private APT state (lists and cache under CACHE_DIR) whose
# only architecture is arm64, over the machine's sources. Nothing is
# installed and dpkg's architectures stay as they are.
armapt=$out/apt-arm64
apt_arm() { APT_CONFIG=$armapt/apt.conf "$@"; }
arm_update() {
  mkdir -p "$armapt/lists/partial" "$armapt/cache/archives/partial"
  printf '%s\n' \
    "Dir::State::Lists \"$armapt/lists\";" \
    "Dir::Cache \"$armapt/cache\";" \
    'APT::Architecture "arm64";' \
    'APT::Architectures { "arm64"; };' \
    'Acquire::Languages "none";' \
    'Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";' \
    'Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";' \
    'Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";' \
    > "$armapt/apt.conf"
  apt_arm apt-get update -q ${sandbox:+-o APT::Sandbox::User=root} >/dev/null
}
# arm_deb_for PKG: like deb_for, for PKG:arm64 (cached in debs/arm64). If it
# cannot be resolved or downloaded (private lists older than the mirror),
# the lists are refreshed once and the lookup repeated.
arm_deb_for() {
  local pkg=$1 ver file try
  for try in 1 2; do
    ver=$(apt_arm apt-cache policy "$pkg" | awk '/Candidate:/{print $2; exit}')
    if [ -n "$ver" ] && [ "$ver" != "(none)" ]; then
      file=$(ls "$out/debs/arm64/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
      if [ -z "$file" ] && (cd "$out/debs/arm64" &&
          apt_arm apt-get download -q ${sandbox:+-o APT::Sandbox::User=root} "$pkg=$ver" >/dev/null); then
        file=$(ls "$out/debs/arm64/${pkg}_${ver//:/%3a}_"*.deb | head -n1)
      fi
      if [ -n "$file" ]; then
        echo "$pkg:arm64 $ver" >> "$work/VERSIONS-arm64"
        echo "$file"
        return 0
      fi
    fi
    [ "$try" = 1 ] && arm_update
  done
  echo "no arm64 candidate for $pkg (APT state in $armapt)" >&2
  return 1
}

sandbox=; [ "$(id -u)" = 0 ] && sandbox=1
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
: > "$work/VERSIONS"

kdeb=$(deb_for "$kpkg")
xdeb=$(deb_for xen-hypervisor-4.17-amd64)
bdeb=$(deb_for busybox-static)
ideb=$(deb_for ipxe)

# add_modules KROOT DEST KVER WHAT MODS...: the modules MODS of the kernel
# tree KROOT (a lib/modules/KVER) and, transitively, their "depends=" (from
# the .modinfo strings; every dependency is a module, never built in) copied
# into DEST/lib/modules/KVER, with its modules.dep (busybox depmod). WHAT
# names the initramfs in errors.
add_modules() {
  local kroot=$1 dest=$2 kver=$3 what=$4 m f index queue have
  shift 4
  local wanted="$*"
  index=$(mktemp "$work/ko.index.XXXXXX")
  (cd "$kroot" && find kernel -name '*.ko' | awk '{ n = $0; sub(/.*\//, "", n); sub(/\.ko$/, "", n); gsub(/-/, "_", n); print n, $0 }') > "$index"
  queue=$wanted have=" "
  while [ -n "$(echo $queue)" ]; do
    # shellcheck disable=SC2086  # a word list
    set -- $queue; m=$(echo "$1" | tr - _); shift; queue="$*"
    case "$have" in *" $m "*) continue ;; esac
    f=$(awk -v m="$m" '$1 == m { print $2; exit }' "$index")
    [ -n "$f" ] || { echo "$what: module $m not in $kroot" >&2; exit 1; }
    have="$have$m "
    mkdir -p "$dest/lib/modules/$kver/$(dirname "$f")"
    cp "$kroot/$f" "$dest/lib/modules/$kver/$f"
    queue="$queue $(tr '\0' '\n' < "$kroot/$f" | sed -n 's/^depends=//p' | head -n1 | tr , ' ')"
  done
  "$work/bin/busybox" depmod -b "$dest" "$kver"
  for m in $wanted; do grep -q "/$m.ko:" "$dest/lib/modules/$kver/modules.dep" ||
    grep -q "/${m//_/-}.ko:" "$dest/lib/modules/$kver/modules.dep" ||
    { echo "$what: $m missing from modules.dep" >&2; exit 1; }; done
  rm -f "$index"
}

# From the ~70 MB kernel .deb, in one pass: vmlinuz and the modules (the
# xenfs ones, the test initramfs' NIC and disk drivers, the installer's).
M=./lib/modules/$kver/kernel/drivers
(cd "$work" && dpkg-deb --fsys-tarfile "$kdeb" | tar -x --wildcards "./boot/vmlinuz-$kver" \
  "./lib/modules/$kver/kernel/*")
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
# NIC and disk drivers: init loads them (without Xen) before the facts line.
labbox_mods="virtio_pci virtio_net virtio_blk virtio_scsi e1000 e1000e igb ahci ata_piix sd_mod nvme"
add_modules "$work/lib/modules/$kver" "$root" "$kver" "test initramfs" $labbox_mods
install -m 0755 "$here/initramfs/init" "$root/init"
# /dev/console: the kernel's built-in initramfs already has it and init mounts
# devtmpfs; the node is added too when we can (root), as the shared recipe does.
if [ "$(id -u)" = 0 ]; then mknod -m 600 "$root/dev/console" c 5 1; mknod -m 666 "$root/dev/null" c 1 3; fi
(cd "$root" && find . | LC_ALL=C sort | "$work/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -n -6 > "$work/initrd-labbox-amd64.gz"

# Inputs besides the packages (what tests/labbox's ensure_artifacts checks).
(cd "$here" && sha256sum fetch-artifacts.sh initramfs/init) >> "$work/VERSIONS"
for f in xen-4.17-amd64 vmlinuz-amd64 initrd-labbox-amd64.gz undionly.kpxe ipxe.efi snponly.efi VERSIONS; do
  mv -f "$work/$f" "$out/$f"
done

# ------------------------------------------------------------- installer
# The disk installer's initramfs (profile xen-install, installer/init):
# busybox, Debian's zstd with the libraries it links (busybox has no zstd),
# GNU tee and sha256sum (busybox's tee copies 1 KiB at a time: the install
# pipeline ran 2.5x slower with it under TCG), and the NIC, disk and ext4 modules of the same kernel as vmlinuz-amd64
# with everything they depend on (modules.dep made by busybox depmod).
# Rebuilt only when VERSIONS-install (package versions, input hashes) changes.
inst_mods="virtio_pci virtio_net virtio_blk virtio_scsi e1000 e1000e igb ixgbe tg3
  ahci ata_piix sd_mod nvme ext4 crc32c_generic"
zdeb=$(deb_for zstd)
zlibdebs="$(deb_for zlib1g) $(deb_for liblzma5) $(deb_for liblz4-1) $(deb_for libc6)"
cudeb=$(deb_for coreutils)
keep_inst="$zdeb $zlibdebs $cudeb"
{
  echo "kernel $kpkg ${kdeb##*/}"
  echo "busybox ${bdeb##*/}"
  for d in $keep_inst; do echo "lib ${d##*/}"; done
  echo "modules $inst_mods"
  (cd "$here" && sha256sum fetch-artifacts.sh installer/init)
} > "$work/VERSIONS-install"
if [ -s "$out/initrd-install-amd64.gz" ] && cmp -s "$work/VERSIONS-install" "$out/VERSIONS-install"; then
  echo "installer initramfs up to date (VERSIONS-install)"
else
  i=$work/install
  iroot=$i/rootfs
  mkdir -p "$i" "$iroot"/{bin,usr/bin,dev,proc,sys,tmp,mnt,run,etc,lib/x86_64-linux-gnu,lib64}
  cp "$work/bin/busybox" "$iroot/bin/busybox"
  # zstd, tee, sha256sum and their libraries (cp -L: the .debs ship
  # symlinks to versioned files)
  for d in $keep_inst; do dpkg-deb -x "$d" "$i/debs"; done
  cp "$i/debs/usr/bin/zstd" "$iroot/bin/zstd"
  cp "$i/debs/usr/bin/tee" "$i/debs/usr/bin/sha256sum" "$iroot/usr/bin/"
  for l in libc.so.6 libz.so.1 liblzma.so.5 liblz4.so.1; do
    f=$(find "$i/debs" -name "$l" | head -n1)
    [ -n "$f" ] || { echo "installer: $l not in the .debs" >&2; exit 1; }
    cp -L "$f" "$iroot/lib/x86_64-linux-gnu/$l"
  done
  cp -L "$i/debs/lib64/ld-linux-x86-64.so.2" "$iroot/lib64/ld-linux-x86-64.so.2"
  # Modules: the wanted ones and, transitively, their dependencies.
  add_modules "$work/lib/modules/$kver" "$iroot" "$kver" installer $inst_mods
  install -m 0755 "$here/installer/init" "$iroot/init"
  if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$iroot/dev/console" c 5 1; mknod -m 666 "$iroot/dev/null" c 1 3
    # The copied binaries run with only what the initramfs has.
    for b in /bin/zstd /usr/bin/tee /usr/bin/sha256sum; do
      chroot "$iroot" "$b" --version >/dev/null || { echo "installer: $b does not run in the initramfs" >&2; exit 1; }
    done
  fi
  (cd "$iroot" && find . | LC_ALL=C sort | "$work/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -n -6 > "$work/initrd-install-amd64.gz"
  mv -f "$work/initrd-install-amd64.gz" "$out/initrd-install-amd64.gz"
  mv -f "$work/VERSIONS-install" "$out/VERSIONS-install"
  rm -rf "$i"
fi

# ------------------------------------------------------------------ arm64
# UEFI PXE -> GRUB -> Xen on ARM -> dom0 (lab-in-a-box aarch64/). The x86
# outputs above are in place even if something here fails.
arm_files=(grubnetaa64-lab.efi xen-4.17-arm64 vmlinuz-arm64.gz initrd-labbox-arm64.gz)
keep_arm=
if [ "${LAB_NO_ARM64:-0}" != 1 ]; then
  mkdir -p "$out/debs/arm64"
  if [ ! -s "$armapt/apt.conf" ] || ! ls "$armapt"/lists/*_Packages* >/dev/null 2>&1; then
    arm_update
  fi
  akpkg=${KPKG_ARM64:-$(apt_arm apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')}
  [ -n "$akpkg" ] || { echo "cannot resolve linux-image-arm64 (APT state in $armapt)" >&2; exit 1; }
  akver=${akpkg#linux-image-}
  : > "$work/VERSIONS-arm64"
  akdeb=$(arm_deb_for "$akpkg")
  axdeb=$(arm_deb_for xen-hypervisor-4.17-arm64)
  agdeb=$(arm_deb_for grub-efi-arm64-bin)
  abdeb=$(arm_deb_for busybox-static)
  # grub-mkimage is an amd64 host tool (grub-common): unpacked, not installed.
  gcdeb=$(deb_for grub-common)
  echo "grub-common ${gcdeb##*/}" >> "$work/VERSIONS-arm64"
  keep_arm="$akdeb $axdeb $agdeb $abdeb $gcdeb"
  # Inputs besides the packages: this script (GRUB modules, compression)
  # and the init.
  (cd "$here" && sha256sum fetch-artifacts.sh initramfs/init) >> "$work/VERSIONS-arm64"
  have_all=1
  for f in "${arm_files[@]}"; do [ -s "$out/$f" ] || have_all=; done
  if [ -n "$have_all" ] && cmp -s "$work/VERSIONS-arm64" "$out/VERSIONS-arm64"; then
    echo "arm64 artifacts up to date (VERSIONS-arm64)"
  else
    a=$work/arm64
    mkdir -p "$a"
    AM=./lib/modules/$akver/kernel/drivers
    (cd "$a" && dpkg-deb --fsys-tarfile "$akdeb" | tar -x --wildcards "./boot/vmlinuz-$akver" \
      "./lib/modules/$akver/kernel/*")
    # The arm64 vmlinuz is an uncompressed Image (~33 MB): gzipped for GRUB's
    # slow TFTP; the xen profile loads it with --nounzip and Xen unpacks it.
    gzip -n -6 < "$a/boot/vmlinuz-$akver" > "$work/vmlinuz-arm64.gz"
    (cd "$a" && dpkg-deb --fsys-tarfile "$axdeb" | tar -x ./boot/xen-4.17-arm64)
    cp "$a/boot/xen-4.17-arm64" "$work/xen-4.17-arm64"

    # GRUB: Debian's grubnetaa64.efi lacks xen_boot, so build an image with
    # every module the lab's GRUB configs use built in (no .mod files over
    # TFTP). Prefix /grub: GRUB turns it into (tftp,<next-server>)/grub, and
    # its normal mode reads grub/grub.cfg (pxe-assets/grub/grub.cfg). http:
    # the per-host configs load Xen, the kernel and the initrd from the
    # agent's HTTP server, (http,ADDR:PORT)/artifacts/...; GRUB's TFTP
    # (1024-byte blocks in lockstep) took ~3 s for the kernel alone.
    (cd "$a" && dpkg-deb -x "$agdeb" grub && dpkg-deb -x "$gcdeb" grub-common)
    "$a/grub-common/usr/bin/grub-mkimage" -O arm64-efi -d "$a/grub/usr/lib/grub/arm64-efi" \
      -p /grub -o "$work/grubnetaa64-lab.efi" \
      normal configfile echo test sleep minicmd halt reboot \
      net efinet tftp http gzio xen_boot linux

    # The initramfs: as x86's, with the arm64 busybox and modules (cpio is
    # run by the amd64 busybox unpacked above).
    (cd "$a" && dpkg-deb --fsys-tarfile "$abdeb" | tar -x ./bin/busybox)
    aroot=$a/rootfs
    mkdir -p "$aroot"/{bin,dev,proc,sys,tmp,etc,lib/modules}
    cp "$a/bin/busybox" "$aroot/bin/busybox"
    cp "$a/$AM/xen/xen-privcmd.ko" "$a/$AM/xen/xenfs/xenfs.ko" "$aroot/lib/modules/"
    add_modules "$a/lib/modules/$akver" "$aroot" "$akver" "arm64 test initramfs" \
      virtio_pci virtio_mmio virtio_net virtio_blk virtio_scsi e1000e igb ahci sd_mod nvme
    install -m 0755 "$here/initramfs/init" "$aroot/init"
    if [ "$(id -u)" = 0 ]; then mknod -m 600 "$aroot/dev/console" c 5 1; mknod -m 666 "$aroot/dev/null" c 1 3; fi
    (cd "$aroot" && find . | LC_ALL=C sort | "$work/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -n -6 > "$work/initrd-labbox-arm64.gz"
    for f in "${arm_files[@]}" VERSIONS-arm64; do
      mv -f "$work/$f" "$out/$f"
    done
  fi
fi

# drop .debs of versions no longer current
for d in "$out"/debs/*.deb "$out"/debs/arm64/*.deb; do
  [ -e "$d" ] || continue
  case " $kdeb $xdeb $bdeb $ideb $keep_inst $keep_arm " in *" $d "*) ;; *) rm -f "$d" ;; esac
done
cd "$out" && ls -l xen-4.17-amd64 vmlinuz-amd64 initrd-labbox-amd64.gz initrd-install-amd64.gz undionly.kpxe ipxe.efi snponly.efi
if [ -n "$keep_arm" ]; then ls -l "${arm_files[@]}"; fi
