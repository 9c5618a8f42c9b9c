#!/usr/bin/env bash
# Proves the catalogue can fail: applies one deliberate breakage at a time
# to pool/pqpool.c, rebuilds pgfault (into build/default-mutant), runs every
# scenario on both backends and lists the scenarios that failed. A breakage
# no scenario catches is a hole in the catalogue. pool/pqpool.c is restored
# on exit, whatever happens.
#
# Usage: tools/break-pool.sh [NAME...]   (default: all breakages)
set -u
src=pool/pqpool.c
orig=$(mktemp /tmp/pgfault-pqpool-orig-XXXXXX)
cp "$src" "$orig"
trap 'cp "$orig" "$src"; rm -f "$orig"' EXIT
trap 'exit 130' INT TERM

# name | perl substitution applied to pqpool.c | what it breaks
mutants=(
"early-deadline|s/deadline = t0 \+ timeout_ms \+ \(timeout_ms > 0 \? 1 : 0\);/deadline = t0 + timeout_ms * 3 \/ 4;/|acquire gives up before its deadline"
"no-checkout-check|s/if \(socket_dead\(pc\)\) \{\n(\s+)copy_msg/if (0 \&\& socket_dead(pc)) {\n\1copy_msg/|checkout hands out connections the server closed"
"ping-without-deadline|s/pdl = now \+ p->cfg.validation_timeout_ms;/pdl = deadline;/|the checkout ping waits out the whole acquire (pgx #2394)"
"auth-is-transient|s/if \(a->cls == PQPOOL_FAIL_AUTH \|\| a->cls == PQPOOL_FAIL_CONFIG\) \{/if (0) {/; s/if \(a.cls == PQPOOL_FAIL_AUTH \|\| a.cls == PQPOOL_FAIL_CONFIG\) \{/if (0) {/|rejected credentials retried like network errors (HikariCP #282)"
"no-auth-lockout|s/if \(a->cls == PQPOOL_FAIL_AUTH \|\| a->cls == PQPOOL_FAIL_CONFIG\) \{/if (0) {/|no lockout after an auth failure: housekeeping retries"
"no-release-cleanup|s/reason = clean_for_reuse\(p, pc, &canceled, &rolled_back\);/reason = -1;/|released connections go back as they are"
"no-double-release-check|s/if \(pc->state != PC_INUSE\) \{/if (0) {/|a second release is taken as a release"
"close-keeps-waiters|s/(void pqpool_close.*?)pthread_cond_signal\(&w->cond\);/\1;/s|close does not wake queued acquires"
"no-fifo|s/(static int older_waiter_locked.*?)return 1;/\1return 0;/s|newcomers overtake queued waiters"
"init-sql-ignored|s/if \(p->init_sql\) \{/if (0) {/|init_sql never runs, so its failure goes unnoticed"
"no-retry-in-deadline|s/w.retry_at = now \+ backoff_locked\(p, &step\);\n\s+continue;/rc = PQPOOL_ECONNECT;\n            break;/|a transient failure fails the acquire at once"
"no-connect-timeout|s/int64_t cdl = now \+ p->cfg.connect_timeout_ms;/int64_t cdl = deadline;/|one connect attempt may use the whole acquire"
"no-refill|s/p->n_idle \+ p->n_refilling >= p->cfg.min_idle/1/|housekeeping never refills to min_idle"
)

want=("$@")
summary=()
for m in "${mutants[@]}"; do
    name=${m%%|*}
    rest=${m#*|}
    expr=${rest%|*}
    what=${rest##*|}
    if [ ${#want[@]} -gt 0 ] && ! printf '%s\n' "${want[@]}" | grep -qx "$name"; then
        continue
    fi
    cp "$orig" "$src"
    perl -0pi -e "$expr" "$src"
    if cmp -s "$orig" "$src"; then
        echo "break-pool: $name: the substitution matched nothing (update the script)" >&2
        summary+=("$name: NOT APPLIED")
        continue
    fi
    if ! make --no-print-directory BUILD_TAG=-mutant build/default-mutant/pgfault >/tmp/pgfault-mutant-build.log 2>&1; then
        echo "break-pool: $name: does not build" >&2
        summary+=("$name: DOES NOT BUILD")
        continue
    fi
    out=$(build/default-mutant/pgfault run --jobs 2 --reports /tmp/pgfault-mutant-reports 2>&1)
    caught=$(grep -E '^(FAIL|CRASH|HANG|ERROR) ' <<<"$out" | awk '{ print $2 "[" $3 "]" }' | tr '\n' ' ')
    echo "$name ($what): ${caught:-NOT CAUGHT}"
    summary+=("$name: ${caught:-NOT CAUGHT}")
done
cp "$orig" "$src"
rm -rf /tmp/pgfault-mutant-reports
echo
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -q 'NOT CAUGHT\|NOT APPLIED\|DOES NOT BUILD'
