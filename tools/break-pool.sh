#!/usr/bin/env bash
# Proves the catalogue can fail: applies one deliberate breakage at a time
# to a copy of pool/pqpool.c in a scratch tree (the checkout is never
# touched), rebuilds pgfault there, runs every scenario on both backends and
# lists the scenarios that failed. A breakage no scenario catches, or a
# scenario no breakage makes fail, is a hole in the catalogue. The scratch
# tree is removed on exit, whatever happens.
#
# Usage: tools/break-pool.sh [NAME...]   (default: all breakages)
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/pgfault-mutant-XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
(cd "$root" && tar cf - --exclude=./build --exclude=./reports --exclude=./.git .) | tar xf - -C "$work"
src=$work/pool/pqpool.c
orig=$root/pool/pqpool.c
cd "$work" || exit 1

# name | perl substitution applied to pqpool.c | what it breaks
mutants=(
"early-deadline|s/deadline = t0 \+ timeout_ms \+ \(timeout_ms > 0 \? 1 : 0\);/deadline = t0 + timeout_ms * 3 \/ 4;/|acquire gives up before its deadline"
"no-checkout-check|s/if \(socket_dead\(pc\)\) \{\n(\s+)copy_msg/if (0 \&\& socket_dead(pc)) {\n\1copy_msg/|checkout hands out connections the server closed"
"ping-without-deadline|s/pdl = now \+ p->cfg.validation_timeout_ms;/pdl = deadline;/|the checkout ping waits out the whole acquire (pgx #2394)"
"auth-is-transient|s/if \(a->cls == PQPOOL_FAIL_AUTH \|\| a->cls == PQPOOL_FAIL_CONFIG\) \{/if (0) {/; s/if \(a.cls == PQPOOL_FAIL_AUTH \|\| a.cls == PQPOOL_FAIL_CONFIG\) \{/if (0) {/|rejected credentials retried like network errors (HikariCP #282)"
"no-auth-lockout|s/if \(a->cls == PQPOOL_FAIL_AUTH \|\| a->cls == PQPOOL_FAIL_CONFIG\) \{/if (0) {/|no lockout after an auth failure: housekeeping retries"
"no-release-cleanup|s/reason = clean_for_reuse\(p, pc, &canceled, &rolled_back\);/reason = 0 ? clean_for_reuse(p, pc, \&canceled, \&rolled_back) : -1;/|released connections go back as they are"
"no-double-release-check|s/if \(pc->state != PC_INUSE\) \{/if (0) {/|a second release is taken as a release"
"close-keeps-waiters|s/(void pqpool_close.*?)pthread_cond_signal\(&w->cond\);/\1;/s|close does not wake queued acquires"
"lifo-dispatch|s/struct waiter \*w = p->wq_head;\n(\s+)if \(p->idle_head\)/struct waiter *w = p->wq_tail;\n\1if (p->idle_head)/|a freed connection goes to the newest waiter"
"release-no-wakeup|s/idle_push_front\(p, pc\);\n(\s+)dispatch_locked\(p\);/idle_push_front(p, pc);/|a release does not wake queued acquires (lost wakeup)"
"eject-no-wakeup|s/eject_owned\(p, pc, reason, m, 1\);/eject_owned(p, pc, reason, m, 0);/|a slot freed by discarding or ejecting a returned connection wakes nobody"
"capacity-ignores-connecting|s/p->n_idle \+ p->n_inuse \+ p->n_connecting < p->cfg.max_size/p->n_idle + p->n_inuse < p->cfg.max_size/|connects in flight are not counted against max_size"
"init-sql-ignored|s/if \(p->init_sql\) \{/if (0) {/|init_sql never runs, so its failure goes unnoticed"
"no-retry-in-deadline|s/w.retry_at = now \+ backoff_locked\(p, &step\);\n\s+continue;/(void)step;\n            rc = PQPOOL_ECONNECT;\n            break;/|a transient failure fails the acquire at once"
"no-connect-timeout|s/int64_t cdl = now \+ p->cfg.connect_timeout_ms;/int64_t cdl = deadline;/|one connect attempt may use the whole acquire"
"blind-to-dead|s/(static int socket_dead\(struct pconn \*pc\)\n\{\n)/\1    return 0; \/* mutant *\/\n/|neither housekeeping nor checkout sees a closed socket"
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
    if ! make --no-print-directory build/default/pgfault >"$work/build.log" 2>&1; then
        echo "break-pool: $name: does not build" >&2
        tail -20 "$work/build.log" >&2
        summary+=("$name: DOES NOT BUILD")
        continue
    fi
    out=$(build/default/pgfault run --reports "$work/reports" 2>&1)
    caught=$(grep -E '^(FAIL|CRASH|HANG|ERROR) ' <<<"$out" | awk '{ print $2 "[" $3 "]" }' | tr '\n' ' ')
    echo "$name ($what): ${caught:-NOT CAUGHT}"
    summary+=("$name: ${caught:-NOT CAUGHT}")
    for c in $caught; do
        printf '%s %s\n' "${c%%\[*}" "$name" >>"$work/by-scenario"
    done
done
echo
echo "== by breakage"
printf '%s\n' "${summary[@]}"
echo
echo "== by scenario (the breakages each one caught)"
bad=0
if [ ${#want[@]} -eq 0 ]; then
    for f in $(cd "$work/scenarios" && find . -name '*.scn' | sed 's|^\./||; s|\.scn$||' | sort); do
        hits=$(awk -v s="$f" '$1 == s { print $2 }' "$work/by-scenario" 2>/dev/null | sort -u | tr '\n' ' ')
        echo "$f: ${hits:-CAUGHT NOTHING}"
        [ -n "$hits" ] || bad=1
    done
fi
printf '%s\n' "${summary[@]}" | grep -q 'NOT CAUGHT\|NOT APPLIED\|DOES NOT BUILD' && bad=1
exit $bad
