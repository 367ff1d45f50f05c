#!/bin/bash
# The chassis_control program of one simulated BMC (OpenIPMI ipmi_sim) in the
# lab in a box: it starts, stops and resets the host's QEMU VM and keeps the
# boot device. Adapted from /work/shared/lab-in-a-box/ipmi/bmc-chassis.sh.
#
# ipmi_sim's configuration names it as
#   chassis_control "/bin/bash <this file> <host dir>"
# and appends the operation:
#   <host dir> get power|boot          -> prints "power:0|1" / "boot:<device>"
#   <host dir> set power 1|0 | reset 1 | boot pxe|default|... | shutdown 1 | identify ...
# ("ipmitool chassis bootdev disk" arrives as "boot default": force boot
# from the default hard disk; "none" is no override.)
# ipmi_sim blocks while this runs (popen), so it returns quickly: QEMU is
# started with -daemonize, and every output goes to the log, never to stdout
# (except the "get" answers).
#
# <host dir>/vm.env (written by tests/labbox/bmc.rs) sets:
#   NAME MAC TAP SERIAL_PORT MEM ROM QEMU CHASSIS_LOG QEMU_LOG EXTRA_QEMU_ARGS
# and, for an aarch64 UEFI host only (ARCH defaults to x86_64):
#   ARCH=aarch64 AAVMF_CODE AAVMF_VARS
# and, for an x86_64 host with a disk (bmc.rs makes one per x86_64 host):
#   DISK   a qcow2 file, attached as virtio-blk
# Boot device (kept in <host dir>/boot until changed, across power cycles,
# like "options=persistent"; the one the VM runs with is in boot.running):
#   pxe             the NIC (x86: with QEMU's iPXE ROM) first, then the disk
#                   (x86), so that an iPXE "exit" (profile local-disk) boots it
#   anything else   x86: the disk only, the NIC without ROM; aarch64: no NIC
#                   (and no disk): nothing to boot
# Fault (read at every power-on from <host dir>/fault, written by the
# harness's set_fault and lab-demo's `fault` command; absent or empty: none;
# the one the VM runs with is in fault.running):
#   memory   the VM gets half of MEM
#   nic      the NIC drops PXE: x86 no boot ROM (SeaBIOS: "No bootable
#            device"), aarch64 the NIC on a hub port that reaches nothing
#            (no DHCP reply)
#   disk     no disk attached
# A reset (and a power cycle) after the boot device or the fault changed
# restarts QEMU with the new one, as a real BMC's next boot would;
# otherwise a reset is QEMU's system_reset.
# The VM's serial port connects to 127.0.0.1:SERIAL_PORT, the persistent
# serial relay of the host (serial-relay.py), which ipmi_sim's SOL also uses.
# QEMU runs inside ipmi_sim's network namespace (it inherits it).
d=$1; op=$2; item=$3; val=$4
[ -d "$d" ] || { echo "no host dir: $d" >&2; exit 1; }
. "$d/vm.env"
log=${CHASSIS_LOG:-$d/chassis.log}
echo "$(date +%T.%N) $op $item $val" >> "$log"
pidfile=$d/qemu.pid

# The VM runs when the pid in the pidfile is a live (not zombie) QEMU of
# this host (its command line names this pidfile: a recycled pid is not it).
running() {
  [ -f "$pidfile" ] || return 1
  local pid; pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  local state; state=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pidfile"
}

# The fault of the next power-on ("" for none; an unknown word is logged
# and ignored).
fault() {
  local f; f=$(tr -d ' \t\r\n' < "$d/fault" 2>/dev/null)
  case "$f" in
    ''|memory|nic|disk) echo "$f" ;;
    *) echo "$(date +%T.%N) unknown fault '$f' ignored" >> "$log" ;;
  esac
}

# MEM (e.g. 1G, 512M, 1024) halved, in MiB.
half_mem() {
  local m=${MEM:-1G}
  case "$m" in
    *G) echo "$(( ${m%G} * 1024 / 2 ))M" ;;
    *M) echo "$(( ${m%M} / 2 ))M" ;;
    *) echo "$(( m / 2 ))M" ;;
  esac
}

qmp() {
  python3 - "$d/qmp.sock" "$1" <<'PY' >> "$log" 2>&1
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1]); f = s.makefile('rw')
f.readline(); f.write('{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
f.write(json.dumps({"execute": sys.argv[2]}) + '\n'); f.flush(); f.readline()
PY
}

# start_vm: power on (nothing if the VM runs) with the current boot device.
start_vm() {
  running && return 0
  local boot; boot=$(cat "$d/boot" 2>/dev/null || echo default)
  local flt; flt=$(fault)
  rm -f "$pidfile" "$d/qmp.sock"
  echo "$boot" > "$d/boot.running"
  echo "$flt" > "$d/fault.running"
  local mem=${MEM:-1G}
  if [ -n "$flt" ]; then echo "$(date +%T.%N) fault: $flt" >> "$log"; fi
  [ "$flt" = memory ] && mem=$(half_mem)
  [ "$flt" = disk ] && DISK=
  if [ "${ARCH:-x86_64}" = aarch64 ]; then
    # aarch64: QEMU virt with AAVMF and a fresh copy of its variable
    # store on every power-on (no boot entries left from an earlier one).
    # ACPI off (Debian's arm64 Xen hangs silently with it); the boot menu
    # shown for 0 s (saves ~5 s before DHCP); no IPv6 PXE (after a failed
    # PXEv4 it would cost ~60 s at full CPU). PXE: the NIC is attached and
    # the firmware's own virtio-net driver netboots (no option ROM).
    # Otherwise the VM has no NIC: like an x86 host without the iPXE ROM,
    # it finds nothing to boot (no disk) instead of netbooting anyway.
    local net=()
    case "$boot" in
      pxe) net=(-netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no"
                -device "virtio-net-pci,netdev=n0,mac=$MAC,romfile=") ;;
    esac
    if [ "$flt" = nic ] && [ "$boot" = pxe ]; then
      net=(-netdev "hubport,id=n0,hubid=0" -device "virtio-net-pci,netdev=n0,mac=$MAC,romfile=")
    fi
    if ! cp "$AAVMF_VARS" "$d/AAVMF_VARS.fd" 2>> "$log"; then
      echo "$(date +%T.%N) cannot copy $AAVMF_VARS" >> "$log"; return 1
    fi
    # shellcheck disable=SC2086  # EXTRA_QEMU_ARGS is a word list
    "${QEMU:-qemu-system-aarch64}" -name "$NAME" -accel tcg \
      -M virt,virtualization=on,gic-version=3,acpi=off -cpu cortex-a57 -m "$mem" \
      -nodefaults -display none -monitor none \
      -daemonize -pidfile "$pidfile" -qmp "unix:$d/qmp.sock,server=on,wait=off" \
      -drive "if=pflash,format=raw,readonly=on,file=$AAVMF_CODE" \
      -drive "if=pflash,format=raw,file=$d/AAVMF_VARS.fd" \
      -chardev "socket,id=ser0,host=127.0.0.1,port=$SERIAL_PORT" -serial chardev:ser0 \
      "${net[@]}" \
      -boot menu=on,splash-time=0 -fw_cfg name=opt/org.tianocore/IPv6PXESupport,string=no \
      $EXTRA_QEMU_ARGS >> "${QEMU_LOG:-$d/qemu.log}" 2>&1 < /dev/null
  else
    # PXE: the NIC carries QEMU's iPXE ROM and is first in the boot order,
    # the disk second. Otherwise the NIC has no option ROM and the disk is
    # the only boot device (an empty disk: SeaBIOS finds nothing to boot).
    # virtio-net must be modern-only (disable-legacy=on, PCI id 1af4:1041):
    # SeaBIOS runs a ROM only for a device with the ROM's PCI id.
    # -nographic (not -display none): only then does SeaBIOS mirror its
    # screen, and the iPXE ROM's, to the serial port (sercon).
    local nic disk=() dboot
    case "$boot" in
      pxe) nic=",romfile=$ROM,bootindex=1"; dboot=2 ;;
      *)   nic=",romfile="; dboot=1 ;;
    esac
    # fault nic: the NIC has no boot ROM (the disk stays second).
    [ "$flt" = nic ] && nic=",romfile="
    if [ -n "${DISK:-}" ]; then
      disk=(-drive "file=$DISK,if=none,id=disk0,format=qcow2"
            -device "virtio-blk-pci,drive=disk0,bootindex=$dboot")
    fi
    # shellcheck disable=SC2086  # EXTRA_QEMU_ARGS is a word list
    "${QEMU:-qemu-system-x86_64}" -name "$NAME" -accel tcg -cpu qemu64 -m "$mem" \
      -nodefaults -nographic -monitor none \
      -daemonize -pidfile "$pidfile" -qmp "unix:$d/qmp.sock,server=on,wait=off" \
      -chardev "socket,id=ser0,host=127.0.0.1,port=$SERIAL_PORT" -serial chardev:ser0 \
      -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" \
      -device "virtio-net-pci,disable-legacy=on,netdev=n0,mac=$MAC$nic" \
      "${disk[@]}" \
      -boot strict=on $EXTRA_QEMU_ARGS >> "${QEMU_LOG:-$d/qemu.log}" 2>&1 < /dev/null
  fi
  local rc=$?
  [ $rc = 0 ] || echo "$(date +%T.%N) qemu failed to start: exit $rc" >> "$log"
  return $rc
}

# stop_vm: power off (SIGTERM: QEMU closes its disk cleanly; then SIGKILL).
stop_vm() {
  if running; then
    local pid; pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 40); do running || break; sleep 0.05; done
    running && kill -9 "$pid" 2>/dev/null
    for _ in $(seq 1 40); do running || break; sleep 0.05; done
  fi
  rm -f "$pidfile" "$d/qmp.sock"
}

case "$op $item" in
  "get power") if running; then echo power:1; else echo power:0; fi ;;
  "get boot")  echo "boot:$(cat "$d/boot" 2>/dev/null || echo default)" ;;
  "set boot")  echo "$val" > "$d/boot" ;;
  "set power")
    if [ "$val" = 1 ]; then start_vm || exit 1; else stop_vm; fi ;;
  "set reset")
    if running; then
      if [ "$(cat "$d/boot" 2>/dev/null || echo default)" != "$(cat "$d/boot.running" 2>/dev/null)" ] ||
         [ "$(fault)" != "$(cat "$d/fault.running" 2>/dev/null)" ]; then
        stop_vm; start_vm || exit 1
      else
        qmp system_reset
      fi
    fi ;;
  "set shutdown") if running; then qmp system_powerdown; fi ;;
  "set identify") : ;;
  *) echo "$(date +%T.%N) unknown operation: $*" >> "$log"; exit 1 ;;
esac
exit 0
