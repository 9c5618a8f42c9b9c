/*
 * scorecard: every shipped pool on one page (pgfault scorecard,
 * scorecard_*).
 *
 * Runs the catalogue with each shipped foreign driver and each of its
 * driver settings that matter (node-postgres with and without an 'error'
 * listener) on the proxy backend, each against its committed baseline
 * (harness/drivers/NAME/expected-failures.txt), and puts their verdicts
 * next to pqpool's -- taken from the cases.tsv of the same CI job's
 * `make run` rather than run twice -- in reports/scorecard.md and
 * reports/scorecard.html: one row per scenario, one column per pool,
 * setting and backend, PASS / FAIL / CRASH / HANG / N/A, each non-pass with
 * its one-line reason and a link to its trace.
 */
#ifndef PGFAULT_SCORECARD_H
#define PGFAULT_SCORECARD_H

struct scorecard_options {
    const char *reports_dir;    /* "reports": scorecard.md/.html here, runs under scorecard/ */
    const char *pqpool_results; /* a cases.tsv of pqpool's run, or NULL to run pqpool here */
    const char *filter;         /* family/name glob, or NULL */
    int jobs;                   /* cases in parallel per run */
    int case_timeout_ms;        /* cap of each case's watchdog */
};

/* Runs and writes the scorecard. Returns the exit code: 0 when every
 * pool's verdicts match its baseline (foreign pools failing scenarios is
 * the scorecard's content, not an error), 1 when some run has a new
 * failure or an unexpected pass (or pqpool failed), 2 when a run could not
 * be made or the pages not written. */
int scorecard_run(const struct scorecard_options *o);

#endif
