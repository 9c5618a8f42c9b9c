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

/* Where the pool connects: separate fields, because foreign pools (JDBC,
 * node-postgres) cannot take a libpq conninfo string. */
struct backend_endpoint {
    char host[64];
    int port;
    char user[64];
    char dbname[64];
};

/* The endpoint the pool should use and the password the server expects at
 * first. */
const struct backend_endpoint *backend_endpoint(const struct backend *b);
const char *backend_password(const struct backend *b);

/* The facts about one connection a SCN_TARGET_CONN fault needs, from the
 * pool's driver: the server backend's pid (kill), the client's local port
 * (the proxy knows its connections by it) and, for a pool inside this
 * process, fakepq's id of the PGconn (0 otherwise). */
struct backend_target {
    long backend_pid;
    int client_port;
    int fakepq_id;
};

/* Applies a fault. t describes the connection of a SCN_TARGET_CONN fault
 * (else NULL). On the proxy backend, drop/partition of one connection go
 * through fakepq when t->fakepq_id is set, else through the proxy's path
 * from t->client_port. */
int backend_fault(struct backend *b, const struct scn_fault *f, const struct backend_target *t,
                  char *msg, size_t msglen) BACKEND_MUSTCHECK;

/* Ends every network fault (fakepq rules and partitions, proxy faults). */
int backend_heal(struct backend *b, char *msg, size_t msglen) BACKEND_MUSTCHECK;

/* Resolves a metric: source is "server", "libpq" or "proxy", name the part
 * after the dot. Returns 0, or -1 with msg naming the known metrics. */
int backend_metric(struct backend *b, const char *source, const char *name, long long *value,
                   char *msg, size_t msglen) BACKEND_MUSTCHECK;

/* Tears everything down (proxy, servers); NULL is a no-op. */
void backend_close(struct backend *b);

#endif
