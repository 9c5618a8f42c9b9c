#!/usr/bin/env bash
# Runs cmocka test binaries one after another and prints one closing line
# with the totals. T (a cmocka glob over test names, e.g. T='*timeout*')
# is passed through the environment; each binary applies it with
# cmocka_set_test_filter. Exit status is non-zero if any binary failed.
#
# Usage: tools/run-tests.sh BINARY...
set -u
# An empty filter would match no test: treat it as no filter.
[ -z "${T:-}" ] && unset T
passed=0 failed=0 bad=()
for bin in "$@"; do
    name=$(basename "$bin")
    out=$(mktemp)
    "$bin" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    # A binary may run several cmocka groups: add up every group's line.
    p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$out" | awk '{ s += $1 } END { if (NR) print s }')
    f=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' "$out" | awk '{ s += $1 } END { if (NR) print s }')
    rm -f "$out"
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0}))
    if [ "$rc" -ne 0 ]; then
        # A crash or a failure cmocka did not count still fails the run.
        [ -z "$f" ] && failed=$((failed + 1))
        bad+=("$name(exit $rc)")
    fi
done
echo
[ ${#bad[@]} -gt 0 ] && echo "check: failing binaries: ${bad[*]}"
echo "check: $passed passed, $failed failed"
[ ${#bad[@]} -eq 0 ]
