#!/usr/bin/env bash
# The flake check: runs the whole catalogue N times in a row while a busy
# loop occupies every core, and reports how many runs were not clean.
# A scenario that fails here is a bug in the scenario or the pool.
#
# Usage: tools/stress.sh [N] [pgfault binary]     (default 20, build/default/pgfault)
set -u
n=${1:-20}
bin=${2:-build/default/pgfault}
cores=$(nproc)
hogs=()
reports=$(mktemp -d /tmp/pgfault-stress-XXXXXX)
cleanup() {
    for h in "${hogs[@]}"; do kill "$h" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$reports"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for ((i = 0; i < cores; i++)); do
    (while :; do :; done) &
    hogs+=($!)
done
echo "stress: $n runs of the catalogue with $cores busy loops hogging the CPU"
bad=0
declare -A flaky
for ((r = 1; r <= n; r++)); do
    start=$(date +%s.%N)
    out=$("$bin" run --reports "$reports" 2>&1)
    rc=$?
    took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    failed=$(grep -E '^(FAIL|CRASH|HANG|ERROR) ' <<<"$out" | awk '{ print $2 "[" $3 "]" }')
    if [ "$rc" -ne 0 ]; then
        bad=$((bad + 1))
        for f in $failed; do flaky[$f]=$((${flaky[$f]:-0} + 1)); done
        grep -E '^      ' <<<"$out" | head -5
    fi
    echo "stress: run $r/$n: exit $rc in ${took}s ${failed:+(failed: $(echo $failed))}"
done
echo "stress: $((n - bad)) clean, $bad with failures"
for f in "${!flaky[@]}"; do echo "stress:   $f failed ${flaky[$f]} time(s)"; done
[ "$bad" -eq 0 ]
