#!/usr/bin/env bash
# Builds the fuzz targets and runs one with libFuzzer (docs/testing.md,
# "Fuzzing"). Stable Rust: the targets are built with the flags that
# `cargo fuzz build --sanitizer none` passes (SanitizerCoverage through
# -Cpasses/-Cllvm-args, all stable), so neither nightly nor cargo-fuzz is
# needed.
#
#   fuzz/run.sh TARGET [SECONDS | -runs=N] [libFuzzer options...]
#   fuzz/run.sh --build       build every target
#   fuzz/run.sh --list        the targets
#
# The corpus grows in target/fuzz/corpus/TARGET, read together with the
# seeds (fuzz/seeds/TARGET) and the kept crashes (fuzz/regressions/TARGET);
# a crash is written to fuzz/artifacts/TARGET/. LAB_FUZZ_BUILT=1 skips the
# build (fuzz/smoke.sh builds once).
set -euo pipefail
cd "$(dirname "$0")/.."

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^lab-fuzz$'; }

triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth \
 -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
 --cfg fuzzing"
build() {
  cargo build --manifest-path fuzz/Cargo.toml --release --locked --target "$triple" "$@"
}

case "${1:-}" in
  --list) targets; exit 0 ;;
  --build) build --bins; exit 0 ;;
  ""|-*) sed -n '9,12p' "$0" >&2; exit 2 ;;
esac
target=$1; shift
if ! targets | grep -qx "$target"; then
  echo "unknown fuzz target $target; one of:" $(targets) >&2
  exit 2
fi
limit=()
case "${1:-}" in
  ''|-*) ;;
  *) limit=("-max_total_time=$1"); shift ;;
esac
[ "${LAB_FUZZ_BUILT:-}" = 1 ] || build --bin "$target"

corpus=target/fuzz/corpus/$target
artifacts=fuzz/artifacts/$target
mkdir -p "$corpus" "$artifacts"
dirs=("$corpus")
for d in "fuzz/seeds/$target" "fuzz/regressions/$target"; do
  [ -d "$d" ] && dirs+=("$d")
done
exec "$CARGO_TARGET_DIR/$triple/release/$target" -artifact_prefix="$artifacts/" \
  -timeout=10 -print_final_stats=1 "${limit[@]}" "$@" "${dirs[@]}"
