#!/usr/bin/env bash
# The CI smoke of the fuzz targets (run by scripts/test.sh): the quicker
# build (profile `smoke` of fuzz/Cargo.toml), then every target for a few
# seconds (LAB_FUZZ_SMOKE_SECONDS, default 8) from its seeds and kept
# regressions, two at a time, with a fixed libFuzzer seed, in a fresh
# corpus. Fails on any crash, hang (10 s) or failed assertion, printing
# the file that reproduces it (fuzz/artifacts/TARGET/...).
set -euo pipefail
cd "$(dirname "$0")/.."
export LAB_FUZZ_PROFILE=smoke
./fuzz/run.sh --build
export LAB_FUZZ_CORPUS=target/fuzz/smoke-corpus LAB_FUZZ_LOGS=target/fuzz/smoke-logs
rm -rf "$LAB_FUZZ_CORPUS" "$LAB_FUZZ_LOGS"
LAB_FUZZ_BUILT=1 exec ./fuzz/campaign.sh "${LAB_FUZZ_SMOKE_SECONDS:-8}" -seed=1
