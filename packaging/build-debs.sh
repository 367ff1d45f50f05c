#!/usr/bin/env bash
# Build the Debian packages lab-server, lab-agent, lab (the CLI) and
# lab-pxe-assets from this workspace with cargo-deb (the metadata is in the
# crates' Cargo.toml; cargo-deb itself is installed by scripts/deps.sh).
#
# Usage: packaging/build-debs.sh [--out DIR] [--profile NAME] [--no-build] [--fast]
#   --out DIR       where the .debs go (default: target/debian)
#   --profile NAME  cargo profile of the binaries (default: release)
#   --no-build      package the binaries already in target/<profile>/
#   --fast          lighter compression (tests)
#
# Steps: build the three binaries; generate their man pages (hidden
# `manpage DIR` subcommands, clap_mangen; gzipped as Debian wants) and the
# CLI's bash, zsh and fish completions (`lab completions SHELL`) into
# target/<profile>/lab-docs/, where the package metadata takes them from;
# run cargo deb for each binary package (binaries stripped); build
# lab-pxe-assets (data only, Architecture: all) with dpkg-deb from
# pxe-assets/ and packaging/lab-pxe-assets/. Prints the paths of the .debs,
# one a line.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/debian profile=release build=1 fast=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --fast) fast=(--fast); shift ;;
    *) echo "usage: $0 [--out DIR] [--profile NAME] [--no-build] [--fast]" >&2; exit 2 ;;
  esac
done
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: run scripts/deps.sh" >&2; exit 1; }

if [ "$build" = 1 ]; then
  cargo build --locked --profile "$profile" -p lab-server -p lab-agent -p lab-cli >&2
fi
case $profile in dev | test) dir=debug ;; *) dir=$profile ;; esac
bin=${CARGO_TARGET_DIR:-target}/$dir
for b in lab lab-server lab-agent; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is not built (drop --no-build)" >&2; exit 1; }
done

docs=$bin/lab-docs
rm -rf "$docs"
mkdir -p "$docs/completions"
"$bin/lab" manpage "$docs/man/lab"
"$bin/lab-server" manpage "$docs/man/lab-server"
"$bin/lab-agent" manpage "$docs/man/lab-agent"
"$bin/lab" completions bash > "$docs/completions/lab.bash"
"$bin/lab" completions zsh > "$docs/completions/_lab"
"$bin/lab" completions fish > "$docs/completions/lab.fish"
gzip -9n "$docs"/man/*/*.1

mkdir -p "$out"
for pkg in lab-server lab-agent lab-cli; do
  # -q: cargo-deb warns that it is not meant for dev profiles; the packaging
  # test packages the debug binaries all the same, to avoid a release build.
  cargo deb -q --no-build --strip --locked -p "$pkg" --profile "$profile" \
    --output "$out" "${fast[@]}"
done

# lab-pxe-assets: the templates and scripts of pxe-assets/ (not the
# artifacts cache, not the lab-in-a-box test files).
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)-1
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
share=$stage/usr/share/lab/pxe-assets doc=$stage/usr/share/doc/lab-pxe-assets
install -d "$share/grub" "$share/profiles" "$share/initramfs" "$doc" "$stage/DEBIAN"
# Where the agent's shipped config finds the artifacts (fetch-artifacts.sh
# fills it): present and empty, so that the agent starts before the fetch.
install -d "$stage/var/cache/lab/artifacts"
install -m 0644 pxe-assets/boot.ipxe "$share/"
install -m 0644 pxe-assets/grub/grub.cfg "$share/grub/"
install -m 0644 pxe-assets/profiles/*.j2 "$share/profiles/"
install -m 0755 pxe-assets/initramfs/init "$share/initramfs/"
install -m 0755 pxe-assets/fetch-artifacts.sh "$share/"
install -m 0644 pxe-assets/README.md packaging/lab-pxe-assets/copyright "$doc/"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" packaging/lab-pxe-assets/control \
  > "$stage/DEBIAN/control"
(cd "$stage" && find usr var -type f -exec md5sum {} + | sort -k2 > DEBIAN/md5sums)
deb=$out/lab-pxe-assets_${version}_all.deb
dpkg-deb --root-owner-group -Zxz ${fast:+-z1} --build "$stage" "$deb" >/dev/null
echo "$deb"
