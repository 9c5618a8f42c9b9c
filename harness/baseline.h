/*
 * baseline: known failures of a pool, for gating it in CI
 * (--expect-failures FILE, baseline_*).
 *
 * A foreign pool fails scenarios: that is a finding, recorded once with a
 * reason, and the gate then goes red only on what changed -- a new failure,
 * or an expected one that now passes (strict, as pytest's strict xfail).
 * One entry per line, blank-separated fields, `#` comments:
 *
 *   SCENARIO  BACKEND  DRIVER  SETTINGS  VERDICTS  REASON...
 *   idle-drop/server-terminates-idle  proxy  node-pg  error_listener=off  CRASH  with no 'error'
 * ...
 *
 * SETTINGS is the driver's settings as key=value joined by commas, in the
 * order the driver declares them (`-` for none); VERDICTS is one or more
 * of FAIL, CRASH, HANG, ERROR joined by `|` (a case that is sometimes FAIL
 * and sometimes HANG lists both); REASON is the rest of the line and may
 * not be empty. DRIVER is the name the driver gives in its hello.
 */
#ifndef PGFAULT_BASELINE_H
#define PGFAULT_BASELINE_H

#include <stddef.h>

#include "runner.h"

#define BASELINE_MUSTCHECK __attribute__((warn_unused_result))

struct baseline;

/* Reads path. Returns 0 and *out (free with baseline_free), or -1 with err
 * as "path:line:col: what" (the first mistake). */
int baseline_load(const char *path, struct baseline **out, char *err,
                  size_t errlen) BASELINE_MUSTCHECK;

/* Frees; NULL is a no-op. */
void baseline_free(struct baseline *b);

/* Judges the cases of a run of driver (hello name) with settings (the
 * SETTINGS field's form) against b: a failure the baseline lists with its
 * verdict becomes expected (c->expected, c->expect_reason); a pass, or a
 * failure with a verdict the entry does not list, that the baseline has
 * an entry for becomes unexpected (c->unexpected, with the message saying
 * what the baseline expected). Returns how many cases are now failures of
 * the gate (runner_case_gate_failed). */
size_t baseline_apply(const struct baseline *b, const char *driver, const char *settings,
                      struct runner_case *cases, size_t n);

#endif
