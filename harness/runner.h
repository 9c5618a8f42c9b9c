/*
 * runner: runs scenarios, each scenario x backend in its own forked child
 * under a watchdog, and collects verdicts for the reporters (runner_*).
 *
 * A case is one scenario on one backend. The child writes its trace to a
 * file as it goes and its verdict at the end; the parent turns a missing
 * verdict into a failure that names the signal that killed the child or,
 * for a hang, the last step the trace shows. Cases run up to --jobs at a
 * time; --shard K/N keeps every Nth case so CI can split a run.
 */
#ifndef PGFAULT_RUNNER_H
#define PGFAULT_RUNNER_H

#include <stddef.h>

#include "scenario.h"

#define RUNNER_MUSTCHECK __attribute__((warn_unused_result))

struct runner_options {
    const char *const *paths; /* files or directories (searched for *.scn) */
    size_t npaths;
    unsigned backends;    /* enum scn_backend mask */
    const char *filter;   /* fnmatch glob on "family/name" or NULL */
    int jobs;             /* parallel cases, >= 1 */
    int shard_k, shard_n; /* run cases with index % n == k - 1; n == 0: all */
    unsigned long seed;
    const char *reports_dir;            /* junit.xml, summary.md, traces/ go here */
    const char *junit_path;             /* NULL: <reports_dir>/junit.xml */
    int tap;                            /* write TAP to stdout instead of the live lines */
    int tap_version;                    /* 13 (0 means 13: what prove accepts) or 14 */
    int verbose;                        /* print each case's trace as it completes */
    const char *driver;                 /* "pqpool", a shipped driver's name, or "exec:CMD" */
    const char *expect_failures;        /* --expect-failures FILE (baseline.h), or NULL */
    const char *const *driver_settings; /* --driver-setting KEY=VALUE, checked against the
                                         * driver's hello before any case runs */
    size_t ndriver_settings;
    const char *server_conninfo; /* --server / PGFAULT_SERVER, or NULL */
    int case_timeout_ms;         /* cap of each case's watchdog (derived from its bounds) */
};

/* RUNNER_NA: the driver cannot express the scenario (a key, metric or
 * capability it lacks); reported as skipped, never a pass or a fail. */
enum runner_status { RUNNER_PASS, RUNNER_FAIL, RUNNER_CRASH, RUNNER_HANG, RUNNER_ERROR, RUNNER_NA };

/* The verdict of one case, as the reporters see it. */
struct runner_case {
    char name[128]; /* family/name */
    char path[512]; /* scenario file */
    char description[512];
    enum scn_backend backend;
    enum runner_status status;
    double duration_ms;
    int line; /* scenario line of the failure (0: none / implicit check) */
    char message[1024];
    char *trace;          /* the whole trace text (owned) */
    char *timeline;       /* the case's timeline records (owned, may be NULL); see steps.h */
    char trace_file[600]; /* where the trace was saved under reports_dir */
    /* Judged against --expect-failures (baseline.h): */
    int expected;             /* a failure the baseline lists with this verdict */
    int unexpected;           /* the baseline expected a failure this case did not have */
    char expect_reason[1000]; /* the baseline's reason, for either */
};

/* Whether a case makes the gate red: a failure nobody expected, or an
 * expected failure that did not happen. N/A never does. */
static inline int runner_case_gate_failed(const struct runner_case *c)
{
    if (c->unexpected)
        return 1;
    return c->status != RUNNER_PASS && c->status != RUNNER_NA && !c->expected;
}

/* Runs everything the options select and writes the reports. Returns the
 * process exit code: 0 all passed, 1 some case failed, 2 usage or parse
 * error (message already printed). */
int runner_run(const struct runner_options *o);

/* Prints "family/name  backends  description" for every scenario found.
 * Returns an exit code as runner_run. */
int runner_list(const struct runner_options *o);

/* "PASS", "FAIL", "CRASH", "HANG", "ERROR", "N/A". Inline so the reporters can
 * name statuses without linking the runner. */
static inline const char *runner_status_name(enum runner_status s)
{
    static const char *const names[] = {"PASS", "FAIL", "CRASH", "HANG", "ERROR", "N/A"};
    return (unsigned)s < 6 ? names[s] : "?";
}

#endif
