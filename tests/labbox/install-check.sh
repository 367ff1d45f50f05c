#!/bin/bash
# Install-to-disk check, by hand (not a CI test): in a fresh network
# namespace, serve the disk image, its sha256 and a lease's metadata over
# HTTP, boot a QEMU VM with the installer (kernel + initrd-install-amd64.gz)
# and an empty qcow2 disk, follow the install on the serial console, then
# boot the same disk, wait for the ready line and SSH into dom0 with the key
# named in the metadata, and check `xl info` (Xen 4.17). Prints the figures.
#
# Usage: tests/labbox/install-check.sh [--failures] [--keep]
#   --failures  also check that the installer fails loudly and powers off:
#               wrong sha256, HTTP 404, metadata of another host, no disk,
#               a server that stalls
#   --keep      keep the work directory (logs, disk) under /tmp
#   LAB_ARTIFACTS  the artifacts cache (default as fetch-artifacts.sh); it
#               needs vmlinuz-amd64, initrd-install-amd64.gz (fetch-artifacts.sh)
#               and xenlab-amd64.img.zst(.sha256) (build-image.sh)
#   LAB_DISK_SIZE  the virtual disk (default 4G)
#
# Runs as root (namespace, tap). Takes the machine's VM lock
# (flock /tmp/lab-vm.lock): one VM at a time. Nothing leaves the namespace:
# DHCP (busybox udhcpd) and HTTP (python3 http.server) run inside it.
set -euo pipefail
if [ -z "${LAB_VM_LOCKED:-}" ]; then
  exec env LAB_VM_LOCKED=1 flock /tmp/lab-vm.lock "$0" "$@"
fi

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [ -n "${LAB_ARTIFACTS:-}" ]; then art=$LAB_ARTIFACTS
elif [ -n "${XDG_CACHE_HOME:-}" ]; then art=$XDG_CACHE_HOME/lab/artifacts
else art=$repo/.cache/artifacts; fi
failures= keep=
for a in "$@"; do
  case "$a" in --failures) failures=1 ;; --keep) keep=1 ;; *) echo "unknown option $a" >&2; exit 2 ;; esac
done
for f in vmlinuz-amd64 initrd-install-amd64.gz xenlab-amd64.img.zst xenlab-amd64.img.zst.sha256; do
  [ -s "$art/$f" ] || { echo "missing $art/$f (pxe-assets/fetch-artifacts.sh, pxe-assets/build-image.sh)" >&2; exit 1; }
done
for t in qemu-system-x86_64 qemu-img busybox python3 ssh ssh-keygen ip; do
  command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done

ns=labinst-$$
work=$(mktemp -d /tmp/install-check.XXXXXX)
srv=$work/srv
mkdir -p "$srv"
MAC=52:54:00:00:01:01
IP=198.18.0.11
SRV_IP=198.18.0.1
URL=http://$SRV_IP:8080
pids=()
qemu_pid=
cleanup() {
  set +e
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  # What runs in the namespace is ours (udhcpd, the HTTP server, QEMU).
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  ip netns del "$ns" 2>/dev/null
  if [ -n "$keep" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
# (background processes are started with "ip netns exec" itself, which execs: $! is theirs)
in_ns() { ip netns exec "$ns" "$@"; }

ip netns add "$ns"
in_ns ip link set lo up
in_ns ip link add br0 type bridge
in_ns ip addr add $SRV_IP/24 dev br0
in_ns ip link set br0 up
in_ns ip tuntap add tap0 mode tap
in_ns ip link set tap0 master br0
in_ns ip link set tap0 up

# DHCP for the VM's MAC only, inside the namespace.
cat > "$work/udhcpd.conf" <<EOF
start $IP
end $IP
interface br0
max_leases 1
lease_file $work/udhcpd.leases
static_lease $MAC $IP
option subnet 255.255.255.0
option lease 600
EOF
touch "$work/udhcpd.leases"
ip netns exec "$ns" busybox udhcpd -f "$work/udhcpd.conf" > "$work/udhcpd.log" 2>&1 &
pids+=($!)

# What the agent will serve: the image, its sha256, the lease's metadata.
ssh-keygen -q -t ed25519 -N '' -C install-check -f "$work/id_ed25519"
ln -s "$art/xenlab-amd64.img.zst" "$art/xenlab-amd64.img.zst.sha256" "$srv/"
cat > "$srv/lease.env" <<EOF
# lease metadata as the agent serves it (docs/netboot.md)
LAB_HOST=h1
LAB_LEASE=L-check
LAB_HOLDER=install-check
LAB_SSH_KEY=$(cat "$work/id_ed25519.pub")
EOF
# Serves the files; any path under /stall/ sends the first 1 MiB of the
# image and then nothing (the installer's stall timeout).
cat > "$work/httpd.py" <<'EOF'
import functools, http.server, os, sys, time
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/stall/"):
            path = os.path.join(self.directory, "xenlab-amd64.img.zst")
            self.send_response(200)
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.end_headers()
            with open(path, "rb") as f:
                self.wfile.write(f.read(1 << 20))
            self.wfile.flush()
            time.sleep(600)
            return
        return super().do_GET()
http.server.ThreadingHTTPServer((sys.argv[1], 8080), functools.partial(H, directory=sys.argv[2])).serve_forever()
EOF
ip netns exec "$ns" python3 "$work/httpd.py" $SRV_IP "$srv" > "$work/httpd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do in_ns busybox wget -q -O /dev/null "$URL/lease.env" 2>/dev/null && break; sleep 0.1; done

SHA=$(cut -d' ' -f1 "$art/xenlab-amd64.img.zst.sha256")
# Console lines get the seconds since the VM's start in front: "[   12.34] …".
cat > "$work/stamp.py" <<'EOF'
import sys, time
t0, out, buf = float(sys.argv[1]), open(sys.argv[2], "ab", buffering=0), b""
stamp = lambda line: out.write(b"[%8.2f] " % (time.time() - t0) + line.replace(b"\r", b"") + b"\n")
for chunk in iter(lambda: sys.stdin.buffer.read1(65536), b""):
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        stamp(line)
if buf:
    stamp(buf)
EOF

# vm NAME QEMU_ARGS... : start a VM (1 vCPU, 1 GiB, TCG, as the lab box's)
# in the namespace, its serial console time-stamped into $work/NAME.log.
vm() {
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  : > "$work/$name.log"
  rm -f "$work/$name.fifo"; mkfifo "$work/$name.fifo"
  python3 "$work/stamp.py" "$t0" "$work/$name.log" < "$work/$name.fifo" &
  pids+=($!)
  ip netns exec "$ns" qemu-system-x86_64 -accel tcg -cpu qemu64 -m 1G -smp 1 -nodefaults -display none \
    -monitor none -serial stdio -no-reboot \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device "virtio-net-pci,disable-legacy=on,netdev=n0,mac=$MAC,romfile=" \
    "$@" < /dev/null > "$work/$name.fifo" 2> "$work/$name.qemu.log" &
  qemu_pid=$!
  echo "$t0" > "$work/$name.t0"
}
# wait_line NAME PATTERN TIMEOUT: the seconds after the VM's start of the
# first console line matching PATTERN (ERE); fails on timeout or when the VM
# ends first.
wait_line() {
  local name=$1 pat=$2 deadline=$(( $(date +%s) + $3 )) hit
  while :; do
    hit=$(grep -a -m1 -E "$pat" "$work/$name.log" || true)
    if [ -n "$hit" ]; then echo "$hit" | sed -E 's/^\[ *([0-9.]+)\].*/\1/'; return 0; fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      sleep 0.5  # the stamper's last lines
      hit=$(grep -a -m1 -E "$pat" "$work/$name.log" || true)
      if [ -n "$hit" ]; then echo "$hit" | sed -E 's/^\[ *([0-9.]+)\].*/\1/'; return 0; fi
      echo "VM $name ended without /$pat/; console tail:" >&2; tail -n 30 "$work/$name.log" >&2; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "no /$pat/ on $name's console within $3 s; console tail:" >&2; tail -n 30 "$work/$name.log" >&2; return 1
    fi
    sleep 0.2
  done
}
elapsed() { awk -v a="$(date +%s.%N)" -v b="$(cat "$work/$1.t0")" 'BEGIN { printf "%.1f", a - b }'; }
# wait_exit TIMEOUT: the VM powers itself off
wait_exit() {
  local deadline=$(( $(date +%s) + $1 ))
  while kill -0 "$qemu_pid" 2>/dev/null; do
    [ "$(date +%s)" -ge "$deadline" ] && { echo "the VM did not power off within $1 s" >&2; return 1; }
    sleep 0.2
  done
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=
}
KERNEL=(-kernel "$art/vmlinuz-amd64" -initrd "$art/initrd-install-amd64.gz")
BASE="console=ttyS0,115200 quiet panic=10 lab.mac=$MAC lab.host=h1 lab.lease=L-check"

# --------------------------------------------------------------- install
qemu-img create -q -f qcow2 "$work/disk.qcow2" "${LAB_DISK_SIZE:-4G}"
DISK=(-drive "file=$work/disk.qcow2,if=none,id=d0,format=qcow2" -device virtio-blk-pci,drive=d0,bootindex=1)
echo "== install: $URL/xenlab-amd64.img.zst ($(stat -c %s "$art/xenlab-amd64.img.zst") bytes) to a ${LAB_DISK_SIZE:-4G} qcow2"
vm install "${KERNEL[@]}" -append "$BASE lab.image=$URL/xenlab-amd64.img.zst lab.sha256=$SHA lab.metadata=$URL/lease.env" "${DISK[@]}"
t_start=$(wait_line install 'LAB-INSTALL stage=start' 120)
t_write=$(wait_line install 'LAB-INSTALL stage=writing percent=0 ' 120)
t_done=$(wait_line install 'LAB-INSTALL stage=(done|failed)' 900)
wait_exit 60
grep -a 'LAB-INSTALL' "$work/install.log"
grep -aq 'LAB-INSTALL stage=done sha256=ok' "$work/install.log" || { echo "install failed" >&2; exit 1; }
done_line=$(grep -a -o 'LAB-INSTALL stage=done.*' "$work/install.log")
n_progress=$(grep -ac 'LAB-INSTALL stage=writing' "$work/install.log")
disk_alloc=$(qemu-img info --output=json "$work/disk.qcow2" | awk -F': *' '/"actual-size"/ { gsub(/,/, "", $2); print $2 }')

# ---------------------------------------------------------- boot the disk
echo "== boot from disk"
vm disk "${DISK[@]}"
# SSH answering, polled once a second from the VM's start, in the background.
( while :; do
    if in_ns ssh -i "$work/id_ed25519" -o BatchMode=yes -o ConnectTimeout=2 -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@$IP true 2>/dev/null; then
      elapsed disk > "$work/ssh-ok"; break
    fi
    sleep 1
  done ) &
poller=$!
pids+=($poller)
t_grub=$(wait_line disk 'GNU GRUB|Booting .Debian' 120)
t_xen=$(wait_line disk '\(XEN\) Xen version' 180)
t_dom0=$(wait_line disk 'Run /init as init process|Freeing unused kernel' 300)
t_ready=$(wait_line disk 'LAB-DISK-(READY|FAILED)' 600)
ready=$(grep -a -o 'LAB-DISK-.*' "$work/disk.log" | head -n1)
echo "$ready"
case "$ready" in LAB-DISK-READY*) ;; *) echo "not ready" >&2; exit 1 ;; esac
for _ in $(seq 60); do [ -s "$work/ssh-ok" ] && break; sleep 1; done
t_ssh=$(cat "$work/ssh-ok" 2>/dev/null || echo none)
SSH=(in_ns ssh -i "$work/id_ed25519" -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no
     -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@$IP)
"${SSH[@]}" 'xl info' > "$work/xl-info.txt"
grep -E '^xen_(major|minor|extra)' "$work/xl-info.txt"
grep -qE '^xen_major *: 4$' "$work/xl-info.txt" && grep -qE '^xen_minor *: 17$' "$work/xl-info.txt" ||
  { echo "not Xen 4.17" >&2; exit 1; }
"${SSH[@]}" 'hostname; cat /proc/xen/capabilities; df -h / | tail -n1; systemd-analyze; journalctl -b -u lab-firstboot -o cat | grep lab-firstboot; systemd-analyze blame | head -n 12; systemd-analyze critical-chain lab-ready.service' |
  tee "$work/dom0.txt"
grep -qx h1 "$work/dom0.txt" || { echo "host name not set from the metadata" >&2; exit 1; }
# The host key in the ready line is the one sshd presents.
fp=$(in_ns ssh-keyscan -t ed25519 $IP 2>/dev/null | ssh-keygen -lf - | awk '{ print $2 }')
case "$ready" in *"hostkey=$fp"*) echo "host key $fp matches the ready line" ;; *) echo "host key $fp is not the ready line's" >&2; exit 1 ;; esac
"${SSH[@]}" poweroff 2>/dev/null || true
wait_exit 120

# ----------------------------------------------------------------- failures
if [ -n "$failures" ]; then
  # expect_failure NAME REASON APPEND [DISK ARGS...]
  expect_failure() {
    local name=$1 reason=$2 append=$3; shift 3
    vm "$name" "${KERNEL[@]}" -append "$BASE $append" "$@"
    local t
    t=$(wait_line "$name" 'LAB-INSTALL stage=(done|failed)' 300)
    wait_exit 60
    local line; line=$(grep -a -o 'LAB-INSTALL stage=failed.*' "$work/$name.log")
    case "$line" in
      *"reason=$reason "*) echo "ok $name: failed at ${t}s and powered off: $line" ;;
      *) echo "FAIL $name: expected reason=$reason, got: ${line:-$(grep -a 'LAB-INSTALL stage=' "$work/$name.log" | tail -n1)}" >&2; exit 1 ;;
    esac
  }
  qemu-img create -q -f qcow2 "$work/scratch.qcow2" 2G
  SCRATCH=(-drive "file=$work/scratch.qcow2,if=none,id=d0,format=qcow2" -device virtio-blk-pci,drive=d0)
  echo "== failures"
  expect_failure bad-sha sha256-mismatch \
    "lab.image=$URL/xenlab-amd64.img.zst lab.sha256=$(printf '0%.0s' $(seq 64))" "${SCRATCH[@]}"
  # the disk must not boot after a mismatch: its first MiB is zeroed
  qemu-img convert -f qcow2 -O raw "$work/scratch.qcow2" "$work/scratch.raw"
  if [ "$(head -c 1048576 "$work/scratch.raw" | tr -d '\0' | wc -c)" != 0 ]; then
    echo "FAIL bad-sha: the disk's first MiB was not zeroed" >&2; exit 1
  fi
  rm -f "$work/scratch.raw"
  expect_failure http-404 http "lab.image=$URL/no-such-image.zst lab.sha256=$SHA" "${SCRATCH[@]}"
  # the metadata names h1; this host boots as h2 (BASE's lab.host comes first)
  expect_failure other-host metadata "lab.image=$URL/xenlab-amd64.img.zst lab.sha256=$SHA lab.metadata=$URL/lease.env lab.host=h2" "${SCRATCH[@]}"
  expect_failure no-disk no-disk "lab.image=$URL/xenlab-amd64.img.zst lab.sha256=$SHA"
  expect_failure stalled stalled "lab.image=$URL/stall/xenlab-amd64.img.zst lab.sha256=$SHA lab.stall=10" "${SCRATCH[@]}"
fi

# ------------------------------------------------------------------ figures
info() { sed -n "s/^$1=//p" "$art/xenlab-amd64.img.info"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f MiB", b / 1048576 }'; }
echo
echo "== figures"
echo "image: compressed $(mib "$(info compressed_bytes)"), apparent $(mib "$(info image_bytes)"), allocated $(mib "$(info allocated_bytes)"); built in $(info build_seconds) s"
echo "install: kernel+initramfs to first line ${t_start} s, writing from ${t_write} s, done at ${t_done} s after power-on; ${n_progress} progress lines"
echo "         ${done_line#LAB-INSTALL }"
echo "         qcow2 allocated after install: $(mib "$disk_alloc")"
echo "boot from disk (s after power-on): GRUB ${t_grub}, Xen ${t_xen}, dom0 ${t_dom0}, ready line ${t_ready}, SSH answering ${t_ssh}"
