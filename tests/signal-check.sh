#!/usr/bin/env bash
# The signal check: `pgfault run` is sent SIGINT, SIGTERM, SIGHUP and
# SIGKILL -- to its pid, not its group -- in each phase of a run, and must
# leave no process, no temp dir and no socket behind (after a SIGKILL: once
# the next run has started, which reaps what the dead run left). It must
# also leave no report of an earlier run in its reports dir.
#
# Phases are reached with the test-only hook PGFAULT_TEST_PAUSE (see
# harness/testhook.h): the process that reaches the phase writes its pid to
# a marker file and waits, so the signal lands exactly there.
#
#   template  the runner, its template dir made, before initdb
#   initdb    the runner, while initdb runs
#   role      the runner, while single-user postgres creates the role
#   copy      a case, while cp copies the template into its server's dir
#   case      a case, mid-case: server, proxy and pool up (pqpool)
#   driver    the same with an exec driver process (the example driver)
#
# Usage: tests/signal-check.sh PGFAULT_BINARY [TABLE.md]
# Exit status 0 when every cell is clean; the table goes to stdout and, if
# given, to TABLE.md.
set -u
pgfault=$(realpath "$1")
table=${2:-}
cd "$(dirname "$0")/.."

scenario=idle-drop/server-terminates-idle
quick=auth/wrong-password # a fast fake-backend run, to start "the next run"
root=$(mktemp -d /tmp/pgfault-sig-XXXXXX)
# The postgres user (when we are root) must traverse to its servers' dirs.
chmod 711 "$root"
cleanup() {
    # Should a check fail, nothing of ours outlives the script either.
    for p in $(procs_under "$root"); do kill -9 "$p" 2>/dev/null; done
    rm -rf "$root"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# A process's command line, NULs as blanks (nothing if it is gone).
cmdline_of() { { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null; }

# Pids of processes that belong to a run under dir: its TMPDIR in their
# environment, their working dir under it (a postmaster's is its data dir),
# or dir on their command line.
procs_under() {
    local dir=$1 p
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qx "TMPDIR=$dir/.*" ||
            [[ "$(readlink "$p/cwd" 2>/dev/null)" == "$dir"/* ]] ||
            cmdline_of "${p#/proc/}" | grep -qF "$dir/"; then
            echo "${p#/proc/}"
        fi
    done
}

rows=()
failures=0
check_one() {
    local phase=$1 sig=$2
    local dir="$root/$phase-$sig"
    mkdir -p "$dir/tmp" "$dir/reports/traces"
    chmod 711 "$dir" "$dir/tmp"
    # An earlier run's reports, which must not survive next to this run's.
    echo stale >"$dir/reports/junit.xml"
    echo stale >"$dir/reports/index.html"
    echo stale >"$dir/reports/traces/earlier.proxy.txt"
    local extra=()
    local hookphase=$phase
    if [ "$phase" = driver ]; then
        extra=(--driver example)
        hookphase=case
    fi
    PGFAULT_TEST_PAUSE="$hookphase:$dir/marker" TMPDIR="$dir/tmp" \
        "$pgfault" run -f "$scenario" -b proxy -j 1 --reports "$dir/reports" "${extra[@]}" \
        >"$dir/out" 2>&1 &
    local pid=$! end=$(($(now_ms) + 60000)) verdict="" rc=""
    while [ ! -s "$dir/marker" ] && kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$end" ]; do
        sleep 0.05
    done
    if [ ! -s "$dir/marker" ]; then
        verdict="phase not reached: $(tail -2 "$dir/out" | tr '\n' ' ')"
        kill -9 "$pid" 2>/dev/null
    else
        if [ "$phase" = driver ]; then
            local p found=""
            for p in $(procs_under "$dir"); do
                cmdline_of "$p" | grep -q "drivers/example/driver.py" &&
                    found=1
            done
            [ -n "$found" ] || verdict="no driver process of this run at the pause"
        fi
        kill "-$sig" "$pid"
    fi
    local t0
    t0=$(now_ms)
    end=$((t0 + 30000))
    while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$end" ]; do sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
        verdict="${verdict:+$verdict; }runner still running 30 s after SIG$sig"
        kill -9 "$pid"
    fi
    wait "$pid" 2>/dev/null
    rc=$?
    # The run must end because of the signal, not because its case ended
    # anyway (a runner ignoring the signal would end at its watchdog).
    local want=$((128 + $(kill -l "$sig")))
    [ "$rc" = "$want" ] || verdict="${verdict:+$verdict; }exit status $rc, expected $want"
    if [ "$sig" = KILL ]; then
        # The killed run's lock goes with its last process, which the
        # parent-death signal kills a moment after the runner: the next run
        # is started once it is free, as a user's next run would be.
        local rd
        for rd in "$dir"/tmp/pgfault-run-*; do
            [ -d "$rd" ] || continue
            flock -w 10 "$rd" true ||
                verdict="${verdict:+$verdict; }$rd still locked 10 s after SIGKILL"
        done
        # What the dead run left is reaped when the next run starts.
        TMPDIR="$dir/tmp" "$pgfault" run -f "$quick" -b fake -j 1 --reports "$dir/reports2" \
            >"$dir/next.out" 2>&1 ||
            verdict="${verdict:+$verdict; }the next run failed: $(tail -1 "$dir/next.out")"
    fi
    # Whatever still runs must go within a bounded time (reapers finish
    # their rm -rf after the runner has exited).
    end=$(($(now_ms) + 15000))
    local left files
    while :; do
        left=$(procs_under "$dir" | tr '\n' ' ')
        files=$(find "$dir/tmp" -mindepth 1 -maxdepth 1 2>/dev/null | head -3 | tr '\n' ' ')
        [ -z "$left" ] && [ -z "$files" ] && break
        [ "$(now_ms)" -ge "$end" ] && break
        sleep 0.05
    done
    local took=$(($(now_ms) - t0))
    if [ -n "$left" ]; then
        verdict="${verdict:+$verdict; }processes left: $(for p in $left; do cmdline_of "$p" | cut -c1-60 | tr -d '\n'; echo -n '; '; done)"
        for p in $left; do kill -9 "$p" 2>/dev/null; done
    fi
    [ -n "$files" ] && verdict="${verdict:+$verdict; }left in TMPDIR: $files"
    local stale
    stale=$(grep -l stale "$dir/reports/junit.xml" "$dir/reports/index.html" \
        "$dir/reports/traces/earlier.proxy.txt" 2>/dev/null | tr '\n' ' ')
    [ -n "$stale" ] && verdict="${verdict:+$verdict; }an earlier run's reports left: $stale"
    local state=clean
    if [ -n "$verdict" ]; then
        state="LEFT: $verdict"
        failures=$((failures + 1))
    fi
    rows+=("| $phase | SIG$sig | $rc | $took ms | $state |")
    echo "signal-check: $phase SIG$sig: exit $rc, clean-up $took ms: $state"
}

for phase in template initdb role copy case driver; do
    for sig in INT TERM HUP KILL; do
        check_one "$phase" "$sig"
    done
done

out() {
    echo "| phase | signal | exit | gone after | result |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
}
echo
out
[ -n "$table" ] && out >"$table"
echo "signal-check: $((${#rows[@]} - failures)) of ${#rows[@]} clean"
[ "$failures" -eq 0 ]
