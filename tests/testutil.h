/*
 * testutil: small file helpers shared by the end-to-end tests (testutil_*).
 */
#ifndef PGFAULT_TESTUTIL_H
#define PGFAULT_TESTUTIL_H

/* Writes text to dir/rel, creating rel's directories. Returns 0 or -1. */
int testutil_write(const char *dir, const char *rel, const char *text);

/* The contents of dir/rel (at most 256 KiB) in a static buffer, or NULL if
 * it cannot be read. The next call overwrites it. */
char *testutil_slurp(const char *dir, const char *rel);

/* Runs the scenario file dir/rel with the runner, one job, reports in
 * dir/reports, and returns runner_run's exit code. */
int testutil_run(const char *dir, const char *rel, const char *driver, unsigned backends,
                 int timeout_ms);

#endif
