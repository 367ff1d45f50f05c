#!/usr/bin/env bash
# Builds the fuzz targets and runs one with libFuzzer (docs/testing.md,
# "Fuzzing"). Stable Rust: the targets are built with the flags that
# `cargo fuzz build --sanitizer none` passes (SanitizerCoverage through
# -Cpasses/-Cllvm-args, all stable), so neither nightly nor cargo-fuzz is
# needed.
#
#   fuzz/run.sh TARGET [SECONDS | -runs=N] [libFuzzer options...]
#   fuzz/run.sh TARGET FILE...  run these inputs once each (a crash, a regression)
#   fuzz/run.sh --build       build every target
#   fuzz/run.sh --list        the targets
#
# The corpus grows in target/fuzz/corpus/TARGET (LAB_FUZZ_CORPUS instead of
# target/fuzz/corpus), read together with the seeds (fuzz/seeds/TARGET) and
# the kept failures (fuzz/regressions/TARGET); a crash, hang or failed
# assertion is written to fuzz/artifacts/TARGET/. LAB_FUZZ_BUILT=1 skips the
# build (fuzz/campaign.sh builds once); LAB_FUZZ_PROFILE=smoke uses the
# quicker build of fuzz/smoke.sh (uninstrumented, unoptimized dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^lab-fuzz$'; }

triple=$(rustc -vV | sed -n 's/^host: //p')
sancov="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
 --cfg fuzzing"
if [ "${LAB_FUZZ_PROFILE:-release}" = smoke ]; then
  # The main target directory and dev profile: only the project's crates
  # are compiled anew, instrumented by the wrapper (fuzz/rustc-wrapper.sh).
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
  export RUSTC_WRAPPER=$PWD/fuzz/rustc-wrapper.sh LAB_FUZZ_SANCOV=$sancov
  bin_dir=$CARGO_TARGET_DIR/debug
  build() { cargo build --manifest-path fuzz/Cargo.toml --profile dev --locked "$@"; }
else
  # Everything instrumented and optimized, in target/fuzz. --target keeps
  # the flags off build scripts and proc macros.
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}/fuzz
  export RUSTFLAGS=$sancov
  bin_dir=$CARGO_TARGET_DIR/$triple/release
  build() { cargo build --manifest-path fuzz/Cargo.toml --release --locked --target "$triple" "$@"; }
fi

case "${1:-}" in
  --list) targets; exit 0 ;;
  --build) build --bins; exit 0 ;;
  ""|-*) sed -n '8,11p' "$0" >&2; exit 2 ;;
esac
target=$1; shift
if ! targets | grep -qx "$target"; then
  echo "unknown fuzz target $target; one of:" $(targets) >&2
  exit 2
fi
limit=()
case "${1:-}" in
  ''|-*) ;;
  *[!0-9]*) ;;
  *) limit=("-max_total_time=$1"); shift ;;
esac
[ "${LAB_FUZZ_BUILT:-}" = 1 ] || build --bin "$target"
if [ -e "${1:-}" ]; then
  exec "$bin_dir/$target" -timeout=10 "$@"
fi

corpus=${LAB_FUZZ_CORPUS:-target/fuzz/corpus}/$target
artifacts=fuzz/artifacts/$target
mkdir -p "$corpus" "$artifacts"
dirs=("$corpus")
for d in "fuzz/seeds/$target" "fuzz/regressions/$target"; do
  [ -d "$d" ] && dirs+=("$d")
done
exec "$bin_dir/$target" -artifact_prefix="$artifacts/" \
  -timeout=10 -print_final_stats=1 "${limit[@]}" "$@" "${dirs[@]}"
