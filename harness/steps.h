/*
 * steps: executes one scenario on one backend (steps_*).
 *
 * This runs inside the runner's forked child. It opens the backend and the
 * pool through its driver, performs the steps in order, checks every
 * expectation and the pool's invariants after each step, and finishes with
 * the implicit checks every scenario has: nothing leaked (PGconn,
 * PGresult, file descriptors) and the server's backends back to zero after
 * the pool is closed. Everything that happens is written to the trace as
 * it happens (line-buffered), so if the process crashes or hangs the
 * parent still knows the last step.
 */
#ifndef PGFAULT_STEPS_H
#define PGFAULT_STEPS_H

#include <stdio.h>

#include "driver.h"
#include "scenario.h"

struct steps_options {
    const struct scn *scn;
    enum scn_backend backend;
    const struct driver_ops *driver;
    const char *driver_name;            /* as given to --driver, for the trace */
    const char *driver_command;         /* exec drivers: the command line, else NULL */
    const char *const *driver_settings; /* "key=value", every one the driver declares */
    size_t ndriver_settings;
    const char *server_conninfo; /* proxy backend: existing server, or NULL */
    unsigned long seed;
    FILE *trace;    /* where the step-by-step trace goes */
    FILE *timeline; /* machine-readable events for the HTML report, or NULL:
                     * "START_MS\tEND_MS\tKIND\tLABEL" per line, times
                     * relative to the first step */
};

/* How a case ended. CRASH and HANG here are a driver process's fate (an
 * in-process pool that crashes takes the case child with it, and the
 * runner sees the signal). */
enum steps_verdict { STEPS_PASS, STEPS_FAIL, STEPS_CRASH, STEPS_HANG, STEPS_NA };

struct steps_result {
    int passed; /* verdict == STEPS_PASS */
    enum steps_verdict verdict;
    int line;           /* scenario line of the failure, 0 for setup / implicit checks */
    char message[1024]; /* why it failed */
};

/* Runs the scenario. Returns 0 when it ran to a verdict (r says which),
 * -1 if it could not run at all (r->message says why). */
int steps_run(const struct steps_options *o, struct steps_result *r);

/* "PASS", "FAIL", "CRASH", "HANG", "N/A". */
const char *steps_verdict_name(enum steps_verdict v);

/* Milliseconds since an arbitrary start, from CLOCK_MONOTONIC. */
double steps_now_ms(void);

#endif
