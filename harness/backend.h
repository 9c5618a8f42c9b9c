/*
 * backend: what stands behind the pool in one scenario run (backend_*).
 *
 *   fake   fakepq in simulated mode: no server, faults injected inside the
 *          fake libpq.
 *   proxy  fakepq in passthrough mode -> the fault proxy -> a throwaway
 *          PostgreSQL (or an existing one given with --server), plus a
 *          second server when a scenario fails over.
 *
 * The backend turns the scenario language's faults into actions of the
 * right layer and answers the metrics that are not the pool's own
 * (server.*, libpq.*, proxy.*). Functions returning int give 0 or -1 and
 * fill msg with "what: why" on failure (and a short description of what
 * was done on success, for the trace).
 */
#ifndef PGFAULT_BACKEND_H
#define PGFAULT_BACKEND_H

#include <stddef.h>

#include <libpq-fe.h>

#include "scenario.h"

#define BACKEND_MUSTCHECK __attribute__((warn_unused_result))

struct backend;

struct backend_options {
    enum scn_backend kind;
    const struct scn *scn;       /* for server settings and whether a second server is needed */
    const char *server_conninfo; /* proxy: use this existing server instead of a throwaway one */
    unsigned long seed;          /* proxy jitter */
};

/* Sets up the backend for one scenario run. */
int backend_open(const struct backend_options *o, struct backend **out, char *msg,
                 size_t msglen) BACKEND_MUSTCHECK;

/* The conninfo the pool should use (no password: the pool's password
 * callback supplies it) and the password the server expects at first. */
const char *backend_conninfo(const struct backend *b);
const char *backend_password(const struct backend *b);

/* Applies a fault. conn is the PGconn of a SCN_TARGET_CONN fault (else
 * NULL). */
int backend_fault(struct backend *b, const struct scn_fault *f, PGconn *conn, char *msg,
                  size_t msglen) BACKEND_MUSTCHECK;

/* Ends every network fault (fakepq rules and partitions, proxy faults). */
int backend_heal(struct backend *b, char *msg, size_t msglen) BACKEND_MUSTCHECK;

/* Resolves a metric: source is "server", "libpq" or "proxy", name the part
 * after the dot. Returns 0, or -1 with msg naming the known metrics. */
int backend_metric(struct backend *b, const char *source, const char *name, long long *value,
                   char *msg, size_t msglen) BACKEND_MUSTCHECK;

/* Tears everything down (proxy, servers); NULL is a no-op. */
void backend_close(struct backend *b);

#endif
