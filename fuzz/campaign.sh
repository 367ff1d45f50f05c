#!/usr/bin/env bash
# Runs every fuzz target (or those named in LAB_FUZZ_TARGETS), two at a
# time (LAB_FUZZ_JOBS), each with the same limit, and prints one line per
# target: executions, executions per second, coverage (edges, features),
# corpus size and the crash file if any. Exits non-zero if a target failed.
#
#   fuzz/campaign.sh SECONDS [libFuzzer options...]   e.g. 8 -seed=1 (smoke)
#   fuzz/campaign.sh -runs=N [libFuzzer options...]   e.g. -runs=10000000
#
# Logs: target/fuzz/logs/TARGET.log (LAB_FUZZ_LOGS instead of
# target/fuzz/logs). Builds first unless LAB_FUZZ_BUILT=1.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '7,8p' "$0" >&2; exit 2; }
[ "${LAB_FUZZ_BUILT:-}" = 1 ] || ./fuzz/run.sh --build
targets=${LAB_FUZZ_TARGETS:-$(./fuzz/run.sh --list)}
logs=${LAB_FUZZ_LOGS:-target/fuzz/logs}
mkdir -p "$logs"

one() {
  local t=$1; shift
  if LAB_FUZZ_BUILT=1 ./fuzz/run.sh "$t" "$@" >"$logs/$t.log" 2>&1; then
    echo ok >"$logs/$t.status"
  else
    echo "failed ($?)" >"$logs/$t.status"
  fi
}
export -f one
export logs
printf '%s\n' $targets | xargs -P "${LAB_FUZZ_JOBS:-2}" -I{} bash -c 'one "$@"' _ {} "$@"

status=0
printf '%-15s %12s %8s %6s %7s %7s  %s\n' target executions exec/s cov ft corpus result
for t in $targets; do
  log=$logs/$t.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  result=$(cat "$logs/$t.status")
  if [ "$result" != ok ]; then
    status=1
    crash=$(sed -n 's/.*Test unit written to //p' "$log")
    result="$result ${crash:-see $log}"
  fi
  printf '%-15s %12s %8s %6s %7s %7s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done
exit $status
