/*
 * report: writes a run's verdicts in the formats CI systems and people
 * read (report_*): JUnit XML (GitLab, Jenkins and the GitHub report
 * actions read it), TAP (13 or 14), and a Markdown summary.
 *
 * Each writer takes the cases in the order the runner ran them and returns
 * 0, or -1 with "what: why" in err (the file could not be written).
 */
#ifndef PGFAULT_REPORT_H
#define PGFAULT_REPORT_H

#include <stddef.h>
#include <stdio.h>

#include "runner.h"

#define REPORT_MUSTCHECK __attribute__((warn_unused_result))

/* One <testsuite name="pgfault"> with a <testcase> per scenario x backend:
 * classname the scenario family, name "name [backend]", time in seconds;
 * failures carry the message and the trace as text. */
int report_junit(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                 char *err, size_t errlen) REPORT_MUSTCHECK;

/* TAP to out: a version line (13, which Debian's prove 3.44 accepts, or
 * 14), a plan, one test point per case, YAML diagnostics (message, line,
 * duration) for failures. Test point i is cases[order[i]] (order NULL: the
 * cases' own order): the runner passes the order cases finished in, which
 * is how its live stream numbers them. */
void report_tap(FILE *out, const struct runner_case *cases, size_t n, const size_t *order,
                int version);

/* One test point (and its diagnostics) of report_tap, numbered number: for
 * the runner's live TAP stream, so both say the same. N/A is `# SKIP`, an
 * expected failure `# TODO`, an unexpected pass `not ok`. */
void report_tap_case(FILE *out, const struct runner_case *c, size_t number);

/* A Markdown summary: totals, then a table of cases with failures first. */
int report_summary_md(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                      char *err, size_t errlen) REPORT_MUSTCHECK;

/* A self-contained HTML page (no script, no network): one row per case,
 * failures first, with status, duration, a link to its trace and an inline
 * SVG timeline of acquires, queries, faults and the pool's events on the
 * case's own time axis. */
int report_html(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                char *err, size_t errlen) REPORT_MUSTCHECK;

/* The run's verdicts for other tools (the scorecard), one case per line,
 * tab-separated, after a header line naming the columns: scenario,
 * backend, driver (its hello name), settings (k=v,... or -), pool (library
 * and version), status, expected (1 if the baseline expects it), unexpected
 * (1 if the baseline expected otherwise), line, message, trace (relative to
 * the reports directory), baseline (the baseline entry's place and reason,
 * or empty). Tabs and newlines in text become spaces. */
int report_cases_tsv(const char *path, const struct runner_case *cases, size_t n,
                     const char *driver, const char *settings, const char *pool, char *err,
                     size_t errlen) REPORT_MUSTCHECK;

/* Writes s as the text of a Markdown table cell: '|' escaped, newlines as
 * blanks, cut after max characters with "...". */
void report_md_cell(FILE *out, const char *s, size_t max);

/* Escapes text for XML character data and attributes into a new string
 * (caller frees); control characters XML 1.0 forbids are dropped. */
char *report_xml_escape(const char *text);

#endif
