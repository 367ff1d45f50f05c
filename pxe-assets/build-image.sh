#!/bin/bash
# Build the lab's bootable x86_64 disk image: Debian bookworm with Xen 4.17
# as the default GRUB entry (BIOS), dom0 on the serial console, root SSH by
# the lease holder's key, and first-boot units that apply the lease's
# metadata and print the ready line. The installer initramfs
# (fetch-artifacts.sh, pxe-assets/installer/init) writes it to a host's disk.
# Adapted from the checked recipe /work/shared/lab-in-a-box/disk-image/.
#
# Usage: sudo pxe-assets/build-image.sh [CACHE_DIR]
#   CACHE_DIR as fetch-artifacts.sh: $XDG_CACHE_HOME/lab/artifacts, else
#   <repo>/.cache/artifacts.
#
# Output (in CACHE_DIR):
#   xenlab-amd64.img.zst          the raw disk image, zstd (one frame that
#                                 records the image size; sparse input read fast)
#   xenlab-amd64.img.zst.sha256   sha256sum line of the COMPRESSED file: the
#                                 exact bytes served over HTTP, which the
#                                 installer hashes as it streams them
#   xenlab-amd64.img.info         KEY=VALUE: sha256, sizes (compressed,
#                                 image, allocated), kernel, Xen, build time
#   xenlab-amd64.img.packages     the image's packages and versions
#   xenlab-amd64.img.inputs       the cache key (below)
#
# Cached: the image is rebuilt only when the cache key changes: the sha256
# of this script and of every file under pxe-assets/image/, the knobs below,
# and the candidate version (host apt) of every package in the last image.
# FORCE=1 rebuilds anyway. .debs are kept in CACHE_DIR/debs/image.
#
# Needs: root (mmdebstrap --mode=root, loop devices, mount), Debian 12 with
# access to a Debian mirror through the host's apt sources (mmdebstrap runs
# apt-get update on every build), and
#   apt-get install -y --no-install-recommends mmdebstrap zstd fdisk e2fsprogs
# Works without loop partition nodes (containers): the file system is
# reached through a loop device with an offset, and GRUB's boot code is
# written with dd instead of grub-install (recipe README, gotchas 1 and 2).
#
# Knobs (environment): MIRROR (default: the host's apt sources),
# ZSTD_LEVEL (default 10), IMG_SLACK_MB (free space in the image's file
# system before the first boot grows it to the disk; default 128).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
if [ -n "${1:-}" ]; then
  out=$1
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
  out=$XDG_CACHE_HOME/lab/artifacts
else
  out=$repo/.cache/artifacts
fi
[ "$(id -u)" = 0 ] || { echo "build-image.sh: run as root (mmdebstrap --mode=root, losetup, mount)" >&2; exit 1; }
mkdir -p "$out/debs/image"
out=$(cd "$out" && pwd)
[ -e "$out/.gitignore" ] || echo '*' > "$out/.gitignore"

NAME=xenlab-amd64.img
SUITE=bookworm
MIRROR=${MIRROR:-}
ZSTD_LEVEL=${ZSTD_LEVEL:-10}
IMG_SLACK_MB=${IMG_SLACK_MB:-128}
PART_START_SECTOR=2048        # partition 1 at 1 MiB; sectors 1..2047 hold GRUB's core.img
PKGS=systemd-sysv,udev,kmod,initramfs-tools,zstd,linux-image-amd64,xen-system-amd64,openssh-server,grub-pc,iproute2,procps,fdisk,e2fsprogs

# One build at a time per cache directory.
exec 9> "$out/.build-image.lock"
flock 9

# ------------------------------------------------------------- cache key
# inputs_for PACKAGES...: the cache key for an image made of PACKAGES.
inputs_for() {
  (cd "$here" && sha256sum build-image.sh && find image -type f | LC_ALL=C sort | xargs sha256sum)
  echo "knobs suite=$SUITE mirror=$MIRROR zstd=$ZSTD_LEVEL slack=$IMG_SLACK_MB pkgs=$PKGS"
  apt-cache policy "$@" 2>/dev/null | awk '
    /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
    /^  Candidate:/ { print "pkg", pkg, $2 }' | LC_ALL=C sort
}
if [ -s "$out/$NAME.packages" ]; then
  # shellcheck disable=SC2046  # one package name per word
  inputs_for $(awk '{print $1}' "$out/$NAME.packages") > "$out/.$NAME.inputs.new"
else
  : > "$out/.$NAME.inputs.new"
fi
if [ "${FORCE:-0}" != 1 ] && [ -s "$out/$NAME.zst" ] && [ -s "$out/$NAME.zst.sha256" ] &&
   [ -s "$out/.$NAME.inputs.new" ] && cmp -s "$out/.$NAME.inputs.new" "$out/$NAME.inputs"; then
  rm -f "$out/.$NAME.inputs.new"
  echo "disk image up to date ($out/$NAME.zst; FORCE=1 rebuilds)"
  exit 0
fi
rm -f "$out/.$NAME.inputs.new"

work=$(mktemp -d "$out/.image-work.XXXXXX")
ROOT=$work/rootfs
MNT=$work/mnt
IMG=$work/$NAME
LOOP= LOOP2=
cleanup() {
  set +e
  for m in "$MNT/dev/pts" "$MNT/dev" "$MNT/proc" "$MNT/sys" "$MNT"; do
    mountpoint -q "$m" && umount "$m"
  done
  [ -n "$LOOP2" ] && losetup -d "$LOOP2"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  rm -rf "$work"
}
trap cleanup EXIT
T0=$(date +%s)
step() { echo "=== $1 (+$(( $(date +%s) - T0 ))s)"; }

# ---------------------------------------------------------------- rootfs
step rootfs
# Drop docs, man pages, locales and kernel modules a Xen lab host does not
# use (patterns quoted: they are for dpkg, not for the shell; gotcha 3).
DPKG_OPTS=()
for p in '/usr/share/man/*' '/usr/share/doc/*' '/usr/share/info/*' '/usr/share/locale/*' \
         '/usr/share/lintian/*' \
         '/lib/modules/*/kernel/sound/*' '/lib/modules/*/kernel/drivers/gpu/*' \
         '/lib/modules/*/kernel/drivers/media/*' '/lib/modules/*/kernel/drivers/net/wireless/*' \
         '/lib/modules/*/kernel/drivers/infiniband/*' '/lib/modules/*/kernel/drivers/staging/*' \
         '/lib/modules/*/kernel/drivers/bluetooth/*' '/lib/modules/*/kernel/net/bluetooth/*' \
         '/lib/modules/*/kernel/net/wireless/*' '/lib/modules/*/kernel/net/mac80211/*' \
         '/lib/modules/*/kernel/drivers/iio/*' '/lib/modules/*/kernel/drivers/isdn/*'; do
  DPKG_OPTS+=(--dpkgopt="path-exclude=$p")
done
DPKG_OPTS+=(--dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-include=/usr/share/locale/locale.alias')

# The overlay goes in before the kernel and openssh are installed: the
# initramfs is built with its configuration (MODULES=list, the fw_cfg
# blacklist) and sshd's first configuration already has it.
# shellcheck disable=SC2016  # $1 is mmdebstrap's, expanded by its hook shell
mmdebstrap --mode=root --variant=minbase --include="$PKGS" \
  --aptopt='APT::Install-Recommends "false"' \
  "${DPKG_OPTS[@]}" \
  --skip=download/empty \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in $out/debs/image /var/cache/apt/archives/" \
  --essential-hook="sync-in $here/image/rootfs /" \
  --customize-hook="sync-out /var/cache/apt/archives $out/debs/image" \
  --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages* "$1"/var/lib/apt/lists/*_Release* "$1"/var/lib/apt/lists/*_InRelease' \
  $SUITE "$ROOT" $MIRROR
# Keep only the .debs of this build.
(cd "$out/debs/image" && for d in *.deb; do
   [ -e "$d" ] || continue
   p=${d%%_*}; v=$(chroot "$ROOT" dpkg-query -W -f '${Version}' "$p" 2>/dev/null | sed 's/:/%3a/') || v=
   case "$d" in "${p}_${v}_"*) ;; *) rm -f "$d" ;; esac
 done)

# ------------------------------------------------------------- configure
step configure
chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}\n' | LC_ALL=C sort > "$work/packages"
kver=$(cd "$ROOT/lib/modules" && ls | sort -V | tail -n1)
xver=$(awk '$1 ~ /^xen-hypervisor-4\.17/ {print $2; exit}' "$work/packages")
echo xenlab > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\txenlab\n' > "$ROOT/etc/hosts"

# ssh.service without "After=network.target" (sshd listens on the wildcard
# address; waiting for systemd-networkd cost 5–18 s under TCG), making its
# host keys first (the image ships none: every install gets its own).
sed -e '/^After=/s/ *network\.target//' -e '/^After=$/d' \
    -e 's|^ExecStartPre=/usr/sbin/sshd -t$|ExecStartPre=/usr/local/sbin/lab-ssh-hostkeys\n&|' \
    "$ROOT/lib/systemd/system/ssh.service" > "$ROOT/etc/systemd/system/ssh.service"
grep -q '^ExecStartPre=/usr/local/sbin/lab-ssh-hostkeys$' "$ROOT/etc/systemd/system/ssh.service"
if grep -q '^After=.*network' "$ROOT/etc/systemd/system/ssh.service"; then
  echo "ssh.service still waits for the network" >&2; exit 1
fi
rm -f "$ROOT"/etc/ssh/ssh_host_*

chroot "$ROOT" systemctl enable systemd-networkd.service lab-firstboot.service lab-growroot.service lab-ready.service
# Units that only cost boot time on a lab host.
for u in systemd-networkd-wait-online.service getty-static.service \
         apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
         fstrim.timer man-db.timer systemd-tmpfiles-clean.timer dpkg-db-backup.timer; do
  chroot "$ROOT" systemctl mask "$u" >/dev/null 2>&1 || true
done
# No password login anywhere (root logs in over SSH with the holder's key).
chroot "$ROOT" passwd -l root >/dev/null
install -d -m 700 "$ROOT/root/.ssh" "$ROOT/etc/lab"
# The xen toolstack unit the ready line waits for must exist.
[ -e "$ROOT/lib/systemd/system/xen.service" ] || [ -e "$ROOT/etc/init.d/xen" ]
# The fw_cfg blacklist is in place and the module is not in the initramfs.
[ -s "$ROOT/etc/modprobe.d/lab-no-fw-cfg.conf" ]
chroot "$ROOT" lsinitramfs "/boot/initrd.img-$kver" > "$work/initrd.list"
if grep -q 'qemu_fw_cfg' "$work/initrd.list"; then echo "qemu_fw_cfg is in the initramfs" >&2; exit 1; fi
grep -q '/virtio_blk.ko' "$work/initrd.list"
grep -q '/ext4.ko' "$work/initrd.list"

# ------------------------------------------------------------- disk image
step disk
# As small as the root fs allows (the installer writes every byte of it);
# the first boot grows partition and file system to the disk.
root_mb=$(du -sm "$ROOT" | cut -f1)
img_mb=$(( (root_mb * 110 / 100 + IMG_SLACK_MB + 63) / 64 * 64 ))
truncate -s "${img_mb}M" "$IMG"
printf 'label: dos\nstart=%s, type=83, bootable\n' $PART_START_SECTOR | sfdisk -q "$IMG"
# No boot-time fsck (pass 0): ext4's journal covers unclean power-offs, and
# systemd-fsck-root was 5 s of the path to sshd under TCG. A lab host's
# disk is reinstalled, not repaired.
UUID=$(cat /proc/sys/kernel/random/uuid)
echo "UUID=$UUID / ext4 errors=remount-ro,noatime 0 0" > "$ROOT/etc/fstab"
# mke2fs fills the file system from the rootfs itself (-d: owners, modes,
# xattrs, hard links), straight into the image file at the partition's
# offset: no copy through loop devices (that took 7-105 s here).
mkfs.ext4 -q -L xenroot -m 1 -U "$UUID" -E offset=$(( PART_START_SECTOR * 512 )) -d "$ROOT" \
  "$IMG" "$(( img_mb * 1024 - PART_START_SECTOR / 2 ))k"
rm -rf "$ROOT"
LOOP=$(losetup -f --show -o $(( PART_START_SECTOR * 512 )) "$IMG")
# Debian's 10_linux/20_linux_xen emit nothing for a root on a loop device
# backed by a file; a second loop device stacked on the first hides that
# (gotcha 1). Its leftovers are rewritten below.
LOOP2=$(losetup -f --show "$LOOP")
[ "$(blkid -s UUID -o value "$LOOP2")" = "$UUID" ]
mkdir -p "$MNT"
mount "$LOOP2" "$MNT"

step grub
mount --bind /dev "$MNT/dev"; mount --bind /dev/pts "$MNT/dev/pts"
mount -t proc proc "$MNT/proc"; mount -t sysfs sys "$MNT/sys"
chroot "$MNT" update-grub 2>&1 | grep -v '^Warning: os-prober' || true
sed -i -E -e '/^\s*loopback loop[0-9]+ /d' -e '/^\s*set root=\(loop[0-9]+\)/d' \
  -e "s#root=/dev/loop[0-9]+#root=UUID=$UUID#g" "$MNT/boot/grub/grub.cfg"
if grep -n "loop[0-9]" "$MNT/boot/grub/grub.cfg"; then echo "loop device left in grub.cfg" >&2; exit 1; fi
grep -qE "^menuentry 'Debian GNU/Linux, with Xen hypervisor'" "$MNT/boot/grub/grub.cfg"
grep -q 'set default="Debian GNU/Linux, with Xen hypervisor"' "$MNT/boot/grub/grub.cfg"
grep -q 'dom0_mem=512M,max:512M' "$MNT/boot/grub/grub.cfg"
# grub-install --target=i386-pc without probing a partitioned device (gotcha 2).
chroot "$MNT" sh -c 'rm -rf /boot/grub/i386-pc && cp -r /usr/lib/grub/i386-pc /boot/grub/ &&
  grub-mkimage -O i386-pc -o /boot/grub/i386-pc/core.img -p "(hd0,msdos1)/boot/grub" \
    biosdisk part_msdos ext2'
cp "$MNT/boot/grub/i386-pc/core.img" "$work/core.img"
cp "$MNT/usr/lib/grub/i386-pc/boot.img" "$work/boot.img"
for m in "$MNT/dev/pts" "$MNT/dev" "$MNT/proc" "$MNT/sys" "$MNT"; do umount "$m"; done
# Everything must be in the image file before it is read: flush each loop
# device, and wait until the kernel has really let go of them (a detach is
# deferred while a device is open). Without this, an image once came out
# with the last files written (/boot/grub/i386-pc) empty or unreadable.
sync
blockdev --flushbufs "$LOOP2"
losetup -d "$LOOP2"
blockdev --flushbufs "$LOOP"
losetup -d "$LOOP"
for _ in $(seq 100); do
  [ -z "$(losetup -j "$LOOP")" ] && [ -z "$(losetup -j "$IMG")" ] && break
  sleep 0.1
done
LOOP= LOOP2=
sync
# Check the image file itself, through a fresh read-only loop device: a
# clean file system, and GRUB's modules as the package ships them.
LOOP=$(losetup -f --show -r -o $(( PART_START_SECTOR * 512 )) "$IMG")
e2fsck -fn "$LOOP" >/dev/null 2>&1 || { e2fsck -fn "$LOOP" >&2; echo "the image's file system is not clean" >&2; exit 1; }
mount -o ro "$LOOP" "$MNT"
for f in "$MNT"/usr/lib/grub/i386-pc/*; do
  cmp -s "$f" "$MNT/boot/grub/i386-pc/${f##*/}" || { echo "/boot/grub/i386-pc/${f##*/} differs from GRUB's" >&2; exit 1; }
done
cmp -s "$MNT/boot/grub/i386-pc/core.img" "$work/core.img"
grep -q "^menuentry 'Debian GNU/Linux, with Xen hypervisor'" "$MNT/boot/grub/grub.cfg"
umount "$MNT"
losetup -d "$LOOP"; LOOP=
dd if="$work/boot.img" of="$IMG" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$IMG" bs=512 seek=1 conv=notrunc status=none
[ $(( $(stat -c %s "$work/core.img") / 512 + 1 )) -lt $PART_START_SECTOR ]

# ---------------------------------------------------------------- output
step zstd
# One frame with the content size in its header (the installer's progress
# total); --sparse is about writing, the input's holes are just zeros here.
zstd -q -T0 -"$ZSTD_LEVEL" -f "$IMG" -o "$work/$NAME.zst"
img_bytes=$(stat -c %s "$IMG")
zstd -lv "$work/$NAME.zst" 2>/dev/null | grep -q "Decompressed Size:.*($img_bytes B)"
alloc_bytes=$(( $(stat -c %b "$IMG") * $(stat -c %B "$IMG") ))
zst_bytes=$(stat -c %s "$work/$NAME.zst")
sha=$(sha256sum "$work/$NAME.zst" | cut -d' ' -f1)
echo "$sha  $NAME.zst" > "$work/$NAME.zst.sha256"
secs=$(( $(date +%s) - T0 ))
cat > "$work/$NAME.info" <<EOF
# pxe-assets/build-image.sh; sha256 is of $NAME.zst (the compressed bytes served)
image=$NAME.zst
sha256=$sha
compressed_bytes=$zst_bytes
image_bytes=$img_bytes
allocated_bytes=$alloc_bytes
rootfs_mb=$root_mb
kernel=$kver
xen=$xver
build_seconds=$secs
EOF
mv -f "$work/packages" "$work/$NAME.packages"
# shellcheck disable=SC2046  # one package name per word
inputs_for $(awk '{print $1}' "$work/$NAME.packages") > "$work/$NAME.inputs"
# The image and its checksum change together: the .sha256 last.
for f in "$NAME.zst" "$NAME.info" "$NAME.packages" "$NAME.zst.sha256" "$NAME.inputs"; do
  mv -f "$work/$f" "$out/$f"
done
step done
sed -n '2,$p' "$out/$NAME.info"
