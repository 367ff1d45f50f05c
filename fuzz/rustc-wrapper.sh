#!/usr/bin/env bash
# RUSTC_WRAPPER of the smoke build (fuzz/run.sh with LAB_FUZZ_PROFILE=smoke):
# coverage instrumentation for the project's crates and the fuzz targets
# only. Dependencies are compiled exactly as the main workspace's dev build
# compiles them, so that build's artifacts in target/debug are reused (cargo
# does not fingerprint the wrapper; the project's crates differ from the
# main build's by their profile overrides in fuzz/Cargo.toml, so they never
# overwrite its artifacts).
rustc=$1; shift
instrument=
prev=
for a in "$@"; do
  case "$prev $a" in
    "--crate-name lab_"*) instrument=1 ;;
  esac
  case "$a" in
    */fuzz/fuzz_targets/*.rs|fuzz_targets/*.rs) instrument=1 ;;
  esac
  prev=$a
done
if [ -n "$instrument" ]; then
  # shellcheck disable=SC2086 # one flag per word
  exec "$rustc" "$@" $LAB_FUZZ_SANCOV
fi
exec "$rustc" "$@"
