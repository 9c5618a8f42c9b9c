/*
 * driver: how the runner talks to a pool library (driver_*).
 *
 * The runner never includes a pool's header. Each pool the harness can
 * drive has one file in harness/drivers/ that fills a struct driver_ops
 * with functions adapting the pool's API to this one; the runner picks a
 * driver by name (driver_find). A new pool is supported by adding a file
 * there and a line to the table in driver.c -- nothing else changes.
 *
 * Connections are plain libpq PGconn handles: every pool worth testing
 * hands those out, and the runner issues queries on them with libpq
 * itself (which in pgfault is fakepq).
 */
#ifndef PGFAULT_DRIVER_H
#define PGFAULT_DRIVER_H

#include <stddef.h>

#include <libpq-fe.h>

#include "scenario.h"

/* How an acquire ended, in pool-neutral terms (matches enum scn_outcome
 * for the values both have). */
enum driver_outcome {
    DRIVER_OK = SCN_OUT_OK,
    DRIVER_TIMEOUT = SCN_OUT_TIMEOUT, /* no connection free by the deadline */
    DRIVER_AUTH = SCN_OUT_AUTH,       /* credentials rejected */
    DRIVER_CONNECT = SCN_OUT_CONNECT, /* server unreachable or failing */
    DRIVER_CONFIG = SCN_OUT_CONFIG,   /* permanent configuration error */
    DRIVER_CLOSED = SCN_OUT_CLOSED,   /* the pool was closed */
    DRIVER_OTHER = 100,               /* anything else (invalid use, bug) */
};

/* What the runner gives a driver when opening a pool. */
struct driver_open_args {
    const char *conninfo;               /* the backend's server, without a password */
    const struct scn_setting *settings; /* the scenario's `pool` line */
    size_t nsettings;
    /* Returns the password to use for the next new connection; the driver
     * must call it for every connection it opens (rotation scenarios). */
    const char *(*password)(void *ctx);
    /* Receives one line of the pool's event log (the driver formats the
     * pool's events as text). May be called from any thread. */
    void (*event)(void *ctx, const char *line);
    void *ctx;
};

struct driver_pool; /* one open pool, owned by its driver */

struct driver_ops {
    const char *name; /* e.g. "pqpool" */

    /* Checks one `pool` setting without opening anything. Returns 0, or
     * -1 with err naming the key or value and what is accepted. */
    int (*check_setting)(const char *key, const char *value, char *err, size_t errlen);

    /* Opens a pool. Returns 0 and *out, or -1 with err. */
    int (*open)(const struct driver_open_args *a, struct driver_pool **out, char *err,
                size_t errlen);

    /* Acquires a connection; timeout_ms < 0 means the pool's configured
     * default. On DRIVER_OK *out is the connection; otherwise err (may be
     * NULL) gets the pool's message. */
    enum driver_outcome (*acquire)(struct driver_pool *p, int timeout_ms, PGconn **out, char *err,
                                   size_t errlen);

    /* Gives a connection back, or discards it as broken. Both must cope
     * with a connection the pool did not hand out or already took back. */
    void (*release)(struct driver_pool *p, PGconn *conn);
    void (*discard)(struct driver_pool *p, PGconn *conn);

    /* Tells the pool about a result the runner got on conn (so a pool that
     * watches SQLSTATEs can mark the connection broken). May be NULL. */
    void (*note_result)(struct driver_pool *p, PGconn *conn, const PGresult *res);

    /* One housekeeping pass. Returns 0 or -1. */
    int (*maintain)(struct driver_pool *p);

    /* Reads a statistic by name ("idle", "in_use", "total", "waiting",
     * "created", "ejected", "ejected.dead", "connect_attempts",
     * "connect_failures", "acquire_timeouts", "auth_failures", ...).
     * Returns 0, or -1 if the pool has no such statistic. */
    int (*metric)(struct driver_pool *p, const char *name, long long *value);

    /* Checks the pool's invariants (idle + in_use <= max, counters
     * consistent). Returns 0, or -1 with err saying which one broke. */
    int (*check_invariants)(struct driver_pool *p, char *err, size_t errlen);

    /* Closes the pool (waking waiters) but keeps the handle valid for
     * metric/release calls; must be idempotent. */
    void (*close)(struct driver_pool *p);

    /* Frees everything; the pool has been closed. */
    void (*destroy)(struct driver_pool *p);
};

/* The driver with this name, or NULL. */
const struct driver_ops *driver_find(const char *name);

/* The names of all drivers, NULL-terminated, for --help and errors. */
const char *const *driver_names(void);

#endif
