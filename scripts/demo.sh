#!/usr/bin/env bash
# The lab's main job, on one machine with no hardware: lab-server with its
# embedded redb store, a rack agent and two simulated hosts (QEMU VMs, each
# behind its own ipmi_sim BMC speaking IPMI over LAN, consoles over
# Serial-over-LAN), all in a fresh network namespace. It takes a guided tour
# (lease a host with profile xen, watch it boot Xen to dom0, read its
# console, release it and see it powered off), then keeps the lab up and
# prints what to type next until Enter is pressed. Everything it made is
# removed when it stops. Needs root (or sudo).
#   --tour-only   stop after the tour      --no-tour   skip the tour
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
cargo build --workspace --bins --locked
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
exec $SUDO ./target/debug/lab-demo "$@"
