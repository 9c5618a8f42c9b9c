/*
 * scorecard: runs the shipped foreign drivers through the runner, reads
 * every run's cases.tsv (report_cases_tsv), and lays the verdicts out as
 * one table in Markdown and HTML.
 */
#include "scorecard.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "report.h"
#include "runner.h"

#ifndef PGFAULT_DRIVERS_DIR
#define PGFAULT_DRIVERS_DIR "harness/drivers"
#endif

/* The foreign configurations on the scorecard: a shipped driver and the
 * driver settings that change what an application does around the pool.
 * (The example driver's teaching pool is documentation, not a pool a
 * service runs, so it is not here.) */
static const struct {
    const char *driver;
    const char *setting; /* one --driver-setting, or NULL */
} configs[] = {
    {"node-pg", "error_listener=on"}, {"node-pg", "error_listener=off"},
    {"sqlalchemy", "pre_ping=on"},    {"sqlalchemy", "pre_ping=off"},
    {"psycopg-pool", NULL},
};
#define NCONFIGS (sizeof configs / sizeof configs[0])

#define MAX_COLS 16
#define MAX_ROWS 256

struct cell {
    char status[8];
    int expected;
    char message[400];
    char trace[700]; /* relative to the reports dir */
};

struct column {
    char title[200]; /* "node-pg (pg 8.23.1) error_listener=off [proxy]" */
    char backend[8];
    char run_dir[600]; /* relative to the reports dir: where its traces are */
    int gate;          /* the run's exit code */
};

struct card {
    struct column cols[MAX_COLS];
    int ncols;
    char rows[MAX_ROWS][128];
    int nrows;
    struct cell cells[MAX_ROWS][MAX_COLS];
};

static int row_of(struct card *k, const char *scenario)
{
    for (int i = 0; i < k->nrows; i++)
        if (strcmp(k->rows[i], scenario) == 0)
            return i;
    if (k->nrows == MAX_ROWS)
        return -1;
    snprintf(k->rows[k->nrows], sizeof k->rows[0], "%s", scenario);
    return k->nrows++;
}

/* Splits a TSV line in place into at most n fields. */
static int split(char *line, char **f, int n)
{
    int k = 0;
    f[k++] = line;
    for (char *p = line; *p && k < n; p++) {
        if (*p == '\t') {
            *p = '\0';
            f[k++] = p + 1;
        }
    }
    char *nl = strchr(f[k - 1], '\n');
    if (nl)
        *nl = '\0';
    return k;
}

/* Adds the columns of one run's cases.tsv: one per backend it ran. run_dir
 * is where its traces live, relative to the reports dir. */
static int read_run(struct card *k, const char *tsv, const char *run_dir, const char *label,
                    int gate)
{
    FILE *f = fopen(tsv, "r");
    if (!f) {
        fprintf(stderr, "scorecard: %s: %s\n", tsv, strerror(errno));
        return -1;
    }
    char line[4096];
    int first = 1;
    while (fgets(line, sizeof line, f)) {
        if (first) {
            first = 0;
            continue; /* the header */
        }
        char *fl[12];
        if (split(line, fl, 12) != 12)
            continue;
        /* scenario backend driver settings pool status expected unexpected line message trace
         * baseline */
        int col = -1;
        for (int c = 0; c < k->ncols; c++)
            if (strcmp(k->cols[c].run_dir, run_dir) == 0 && strcmp(k->cols[c].backend, fl[1]) == 0)
                col = c;
        if (col < 0) {
            if (k->ncols == MAX_COLS)
                continue;
            col = k->ncols++;
            struct column *cl = &k->cols[col];
            snprintf(cl->backend, sizeof cl->backend, "%s", fl[1]);
            snprintf(cl->run_dir, sizeof cl->run_dir, "%s", run_dir);
            snprintf(cl->title, sizeof cl->title, "%s (%s)%s%s [%s]", label, fl[4],
                     strcmp(fl[3], "-") ? " " : "", strcmp(fl[3], "-") ? fl[3] : "", fl[1]);
            cl->gate = gate;
        }
        int row = row_of(k, fl[0]);
        if (row < 0)
            continue;
        struct cell *ce = &k->cells[row][col];
        snprintf(ce->status, sizeof ce->status, "%s", fl[5]);
        ce->expected = strcmp(fl[6], "1") == 0;
        if (strcmp(fl[8], "0") != 0)
            snprintf(ce->message, sizeof ce->message, "line %s: %.380s", fl[8], fl[9]);
        else
            snprintf(ce->message, sizeof ce->message, "%s", fl[9]);
        snprintf(ce->trace, sizeof ce->trace, "%s%s%s", run_dir, run_dir[0] ? "/" : "", fl[10]);
    }
    fclose(f);
    return 0;
}

static int write_md(const struct card *k, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "# pgfault scorecard\n\n"
               "Every scenario of the catalogue against every shipped pool. Foreign pools run on "
               "the proxy backend (a real PostgreSQL 15 behind the fault proxy). A non-pass is a "
               "finding about the pool; *known* marks one its baseline records. N/A: the pool "
               "cannot express the scenario (the reason says why).\n\n");
    fprintf(f, "| scenario |");
    for (int c = 0; c < k->ncols; c++)
        fprintf(f, " %s |", k->cols[c].title);
    fprintf(f, "\n|---|");
    for (int c = 0; c < k->ncols; c++)
        fprintf(f, "---|");
    fprintf(f, "\n");
    for (int r = 0; r < k->nrows; r++) {
        fprintf(f, "| `%s` |", k->rows[r]);
        for (int c = 0; c < k->ncols; c++) {
            const struct cell *ce = &k->cells[r][c];
            if (!ce->status[0]) {
                fprintf(f, " - |");
                continue;
            }
            if (strcmp(ce->status, "PASS") == 0) {
                fprintf(f, " PASS |");
                continue;
            }
            fprintf(f, " [**%s**](%s)%s: ", ce->status, ce->trace, ce->expected ? " *known*" : "");
            report_md_cell(f, ce->message, 300);
            fprintf(f, " |");
        }
        fprintf(f, "\n");
    }
    fprintf(f, "\n| totals |");
    for (int c = 0; c < k->ncols; c++) {
        int pass = 0, fail = 0, na = 0;
        for (int r = 0; r < k->nrows; r++) {
            const char *s = k->cells[r][c].status;
            pass += strcmp(s, "PASS") == 0;
            na += strcmp(s, "N/A") == 0;
            fail += s[0] && strcmp(s, "PASS") != 0 && strcmp(s, "N/A") != 0;
        }
        fprintf(f, " %d pass, %d fail/crash/hang, %d N/A |", pass, fail, na);
    }
    fprintf(f, "\n");
    return fclose(f);
}

static void html_text(FILE *f, const char *s)
{
    char *e = report_xml_escape(s);
    fputs(e ? e : "", f);
    free(e);
}

static int write_html(const struct card *k, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
               "<title>pgfault scorecard</title>\n<style>\n"
               "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}\n"
               "table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:4px 8px;"
               "vertical-align:top;text-align:left;max-width:340px}\n"
               "th{background:#f4f4f4;font-size:12px} .PASS{background:#e3f4e8}\n"
               ".FAIL,.CRASH,.HANG,.ERROR{background:#fbe3e0} .NA{background:#eee;color:#666}\n"
               ".why{font-size:11px;font-family:monospace;white-space:pre-wrap}\n"
               ".known{font-size:11px;color:#555}\n</style></head><body>\n"
               "<h1>pgfault scorecard</h1>\n<p>Every scenario against every shipped pool; "
               "foreign pools on the proxy backend. A non-pass is a finding about the pool "
               "(<i>known</i>: its baseline records it). N/A: the pool cannot express the "
               "scenario.</p>\n<table>\n<tr><th>scenario</th>");
    for (int c = 0; c < k->ncols; c++) {
        fprintf(f, "<th>");
        html_text(f, k->cols[c].title);
        fprintf(f, "</th>");
    }
    fprintf(f, "</tr>\n");
    for (int r = 0; r < k->nrows; r++) {
        fprintf(f, "<tr><td><b>");
        html_text(f, k->rows[r]);
        fprintf(f, "</b></td>");
        for (int c = 0; c < k->ncols; c++) {
            const struct cell *ce = &k->cells[r][c];
            if (!ce->status[0]) {
                fprintf(f, "<td>-</td>");
                continue;
            }
            const char *cls = strcmp(ce->status, "N/A") == 0 ? "NA" : ce->status;
            fprintf(f, "<td class=\"%s\"><a href=\"", cls);
            html_text(f, ce->trace);
            fprintf(f, "\">%s</a>", ce->status);
            if (ce->expected)
                fprintf(f, " <span class=\"known\">known</span>");
            if (strcmp(ce->status, "PASS") != 0) {
                fprintf(f, "<div class=\"why\">");
                html_text(f, ce->message);
                fprintf(f, "</div>");
            }
            fprintf(f, "</td>");
        }
        fprintf(f, "</tr>\n");
    }
    fprintf(f, "</table>\n</body></html>\n");
    return fclose(f);
}

/* A run of the whole catalogue for the scorecard. */
static struct runner_options run_options(const struct scorecard_options *o, const char *driver,
                                         const char *reports, unsigned backends)
{
    struct runner_options ro = {0};
    ro.backends = backends;
    ro.filter = o->filter;
    ro.jobs = o->jobs;
    ro.seed = 1;
    ro.reports_dir = reports;
    ro.driver = driver;
    ro.case_timeout_ms = o->case_timeout_ms;
    return ro;
}

static int run_config(const struct scorecard_options *o, const char *driver, const char *setting,
                      const char *run_dir)
{
    char baseline[1024], reports[1200];
    const char *dir = getenv("PGFAULT_DRIVERS_DIR");
    snprintf(baseline, sizeof baseline, "%s/%s/expected-failures.txt",
             dir && *dir ? dir : PGFAULT_DRIVERS_DIR, driver);
    snprintf(reports, sizeof reports, "%s/%s", o->reports_dir, run_dir);
    const char *settings[1] = {setting};
    struct runner_options ro = run_options(o, driver, reports, SCN_BACKEND_PROXY);
    ro.driver_settings = setting ? settings : NULL;
    ro.ndriver_settings = setting ? 1 : 0;
    ro.expect_failures = access(baseline, R_OK) == 0 ? baseline : NULL;
    printf("\n==> scorecard: %s%s%s (baseline: %s)\n", driver, setting ? " " : "",
           setting ? setting : "", ro.expect_failures ? baseline : "none");
    fflush(stdout);
    int rc = runner_run(&ro);
    /* Without a baseline a foreign pool's failures are its content, not
     * the gate's: only a run that could not be made counts. */
    if (!ro.expect_failures && rc == 1)
        rc = 0;
    return rc;
}

int scorecard_run(const struct scorecard_options *o)
{
    struct card *k = calloc(1, sizeof *k);
    if (!k)
        return 2;
    int worst = 0;
    char tsv[1400];
    /* Like a run's reports: an interrupted scorecard leaves no old card. */
    snprintf(tsv, sizeof tsv, "%s/scorecard.md", o->reports_dir);
    unlink(tsv);
    snprintf(tsv, sizeof tsv, "%s/scorecard.html", o->reports_dir);
    unlink(tsv);
    /* pqpool: the same job's make run, or a run of its own. */
    const char *pq = o->pqpool_results;
    char pqdir[64] = "";
    if (!pq || access(pq, R_OK) != 0) {
        if (pq)
            printf("scorecard: no %s; running pqpool here\n", pq);
        snprintf(pqdir, sizeof pqdir, "scorecard/pqpool");
        char reports[1200];
        snprintf(reports, sizeof reports, "%s/%s", o->reports_dir, pqdir);
        struct runner_options ro = run_options(o, "pqpool", reports, SCN_BACKEND_ALL);
        int rc = runner_run(&ro);
        if (rc >= 128) {
            free(k);
            return rc;
        }
        worst = rc > worst ? rc : worst;
        snprintf(tsv, sizeof tsv, "%s/cases.tsv", reports);
    } else {
        snprintf(tsv, sizeof tsv, "%s", pq);
        /* Its traces are beside it: link relative to the reports dir. */
        const char *slash = strrchr(pq, '/');
        ptrdiff_t rl = (ptrdiff_t)strlen(o->reports_dir);
        ptrdiff_t n = slash ? (slash - pq) - rl - 1 : 0;
        if (slash && strncmp(pq, o->reports_dir, (size_t)rl) == 0 && pq[rl] == '/' && n > 0)
            snprintf(pqdir, sizeof pqdir, "%.*s", (int)n, pq + rl + 1);
    }
    if (read_run(k, tsv, pqdir, "pqpool", worst) < 0)
        worst = 2;
    /* pqpool has no baseline: every case of it must pass. */
    for (int c = 0; c < k->ncols; c++) {
        if (strcmp(k->cols[c].run_dir, pqdir) != 0)
            continue;
        for (int r = 0; r < k->nrows; r++) {
            const char *st = k->cells[r][c].status;
            if (st[0] && strcmp(st, "PASS") != 0 && k->cols[c].gate == 0)
                k->cols[c].gate = 1;
        }
    }
    for (int c = 0; c < k->ncols; c++)
        worst = k->cols[c].gate > worst ? k->cols[c].gate : worst;
    for (size_t i = 0; i < NCONFIGS; i++) {
        char run_dir[200];
        snprintf(run_dir, sizeof run_dir, "scorecard/%s%s%s", configs[i].driver,
                 configs[i].setting ? "-" : "", configs[i].setting ? configs[i].setting : "");
        int rc = run_config(o, configs[i].driver, configs[i].setting, run_dir);
        if (rc >= 128) {
            /* Interrupted: the whole scorecard stops, as one run would. */
            free(k);
            return rc;
        }
        worst = rc > worst ? rc : worst;
        char reports[1200];
        snprintf(reports, sizeof reports, "%s/%s/cases.tsv", o->reports_dir, run_dir);
        if (rc == 2 || read_run(k, reports, run_dir, configs[i].driver, rc) < 0)
            worst = 2;
    }
    char md[1200], html[1200];
    snprintf(md, sizeof md, "%s/scorecard.md", o->reports_dir);
    snprintf(html, sizeof html, "%s/scorecard.html", o->reports_dir);
    if (write_md(k, md) != 0 || write_html(k, html) != 0) {
        fprintf(stderr, "scorecard: cannot write %s or %s: %s\n", md, html, strerror(errno));
        worst = 2;
    }
    printf("\nscorecard: %s, %s\n", md, html);
    for (int c = 0; c < k->ncols; c++)
        printf("  %-60s %s\n", k->cols[c].title,
               k->cols[c].gate == 0   ? "as expected (every case passed, or as its baseline says)"
               : k->cols[c].gate == 1 ? "RED: a failure no baseline expects, or an unexpected pass"
                                      : "could not run");
    free(k);
    return worst;
}
