#!/usr/bin/env bash
# Records a pool's expected failures for --expect-failures: runs the
# catalogue RUNS times (default 3) with one driver and its settings on the
# proxy backend, and prints an entry for every case that failed in every
# run -- with all the verdicts it took (FAIL|HANG when it varied) and, as a
# starting point for the reason you must write, the first run's message.
# A case that passed in some runs and failed in others is not entered: it
# is reported as flaky on stderr (fix the scenario or the driver first).
# Temp reports are removed on any exit.
#
# Usage: tools/record-baseline.sh DRIVER [--driver-setting K=V ...] [-- PGFAULT-RUN-OPTIONS]
#   e.g. tools/record-baseline.sh node-pg --driver-setting error_listener=off \
#            >> harness/drivers/node-pg/expected-failures.txt
set -u
[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
pgfault=${PGFAULT:-$root/build/default/pgfault}
[ -x "$pgfault" ] || { echo "record-baseline: build pgfault first (make)" >&2; exit 2; }
driver=$1
shift
args=()
while [ $# -gt 0 ]; do
    case $1 in
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
    esac
done
runs=${RUNS:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/pgfault-baseline-XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
for i in $(seq 1 "$runs"); do
    echo "record-baseline: run $i of $runs" >&2
    "$pgfault" run --backend proxy --driver "$driver" "${args[@]}" --reports "$work/$i" >"$work/$i.log" 2>&1
    rc=$?
    [ $rc -le 1 ] || { echo "record-baseline: run $i failed to run (exit $rc); see below" >&2; tail -20 "$work/$i.log" >&2; exit 2; }
done
# Columns of cases.tsv: scenario backend driver settings pool status expected unexpected line message trace
awk -F'\t' -v runs="$runs" '
FNR == 1 { next }
{
    key = $1 "\t" $2 "\t" $3 "\t" $4
    if (!(key in seen)) { order[++n] = key; msg[key] = ($9 != "0" ? "line " $9 ": " : "") $10 }
    seen[key]++
    if ($6 == "PASS" || $6 == "N/A") ok[key]++
    else if (index("|" verdicts[key] "|", "|" $6 "|") == 0)
        verdicts[key] = verdicts[key] (verdicts[key] == "" ? "" : "|") $6
}
END {
    printf "# recorded by tools/record-baseline.sh over %d runs; write each reason yourself\n", runs
    for (i = 1; i <= n; i++) {
        k = order[i]
        if (verdicts[k] == "") continue
        if (ok[k] > 0) { split(k, f, "\t"); printf "record-baseline: flaky, not entered: %s [%s]: %s in %d of %d runs\n", f[1], f[2], verdicts[k], seen[k] - ok[k], seen[k] > "/dev/stderr"; continue }
        if (seen[k] != runs) continue
        split(k, f, "\t")
        printf "%-40s %-5s %-8s %-20s %-10s TODO: %s\n", f[1], f[2], f[3], f[4], verdicts[k], msg[k]
    }
}' "$work"/*/cases.tsv
