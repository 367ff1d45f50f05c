#!/usr/bin/env bash
# The lab's main job, on one machine: lab-server with its embedded redb store
# and the sample inventory, in loud development mode (no tokens needed).
# Prints what to type next; Ctrl-C stops it. Data lives in .lab-data/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin lab-server --bin lab
addr=${LAB_LISTEN:-127.0.0.1:7621}
cat <<TXT

lab-server is starting on $addr (store: .lab-data/lab.redb, inventory: inventory.toml).
In another terminal, try:

  export PATH=\$PWD/target/release:\$PATH LAB_SERVER=http://$addr LAB_TOKEN=\$USER
  lab hosts
  lab lease acquire --arch x86_64 --profile xen --ttl 30m
  lab lease list
  LAB_TOKEN=someone-else lab lease acquire --arch x86_64 --count 2   # waits in the queue
  lab lease release <ID>
  lab events --follow

TXT
exec ./target/release/lab-server --dev-insecure-no-auth --listen "$addr" \
  --inventory inventory.toml --data-dir .lab-data
