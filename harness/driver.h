/*
 * driver: how the runner drives a pool library (driver_*).
 *
 * The runner never includes a pool's header and never touches a PGconn.
 * A driver holds one pool for one case and answers operations on it:
 * acquire, release, discard, query, per-connection facts, metrics,
 * housekeeping, the password, close. Connections are opaque handles the
 * driver owns (struct driver_conn), valid until the driver is destroyed,
 * so a deliberate second release of the same handle is possible.
 *
 * Two kinds of drivers fill a struct driver_ops:
 *   - in-process (harness/drivers/pqpool.c): the pool is linked into the
 *     runner's case child, against fakepq, so both backends and the
 *     libpq.* counters work;
 *   - exec (harness/drivers/exec.c): a driver process in the pool's own
 *     language, spoken to over the driver protocol (docs/driver-protocol.md);
 *     proxy backend only.
 * driver_find() resolves a --driver name: a shipped driver's short name or
 * "exec:CMD ARGS".
 *
 * Every operation that talks to a driver process can find it gone (exited,
 * killed, writing garbage) or silent: then it fails, and driver_fate()
 * says what happened so the case becomes CRASH or HANG, not FAIL.
 */
#ifndef PGFAULT_DRIVER_H
#define PGFAULT_DRIVER_H

#include <stddef.h>

#include "scenario.h"

#define DRIVER_MUSTCHECK __attribute__((warn_unused_result))
#define DRIVER_PROTOCOL_VERSION 1

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
    DRIVER_BROKEN = 101,              /* the driver itself failed: see driver_fate() */
};

/* What a driver says about each scenario `pool` key. */
enum driver_key_status {
    DRIVER_KEY_UNSUPPORTED, /* no equivalent: a scenario using it is N/A */
    DRIVER_KEY_MAPPED,      /* becomes a pool option (detail names it) */
    DRIVER_KEY_IGNORED,     /* meaningless for this pool: runs without it */
};

/* Optional operations (bit mask). */
enum driver_cap {
    DRIVER_CAP_MAINTAIN = 1 << 0,
    DRIVER_CAP_HEALTH = 1 << 1,
    DRIVER_CAP_TXSTATUS = 1 << 2,
    DRIVER_CAP_BACKEND_PID = 1 << 3,
    DRIVER_CAP_CLIENT_PORT = 1 << 4,
    DRIVER_CAP_PASSWORD = 1 << 5,
    DRIVER_CAP_INVARIANTS = 1 << 6,
    DRIVER_CAP_FAKEPQ = 1 << 7,          /* the pool uses fakepq: fake backend, libpq.* metrics */
    DRIVER_CAP_ACQUIRE_TIMEOUT = 1 << 8, /* acquire honours a per-call timeout_ms */
};
#define DRIVER_NCAPS 9

#define DRIVER_MAX_KEYS 48
#define DRIVER_MAX_METRICS 64
#define DRIVER_MAX_DSETTINGS 8
#define DRIVER_MAX_DVALUES 8

/* What a driver says about itself (the protocol's `hello`). */
struct driver_info {
    char driver[64];  /* the driver's name */
    char pool[96];    /* the pool library */
    char version[64]; /* its version */
    struct {
        char key[32];
        enum driver_key_status status;
        char detail[160]; /* the option it maps to, or why not */
    } keys[DRIVER_MAX_KEYS];
    int nkeys;
    char metrics[DRIVER_MAX_METRICS][48]; /* pool.* names; "x.*" is a family */
    int nmetrics;
    unsigned caps; /* enum driver_cap */
    /* Settings of the driver itself: how the application around the pool
     * behaves (node-postgres: whether it listens for 'error'). Chosen with
     * --driver-setting KEY=VALUE; sent with open. */
    struct {
        char key[32];
        char values[DRIVER_MAX_DVALUES][32];
        int nvalues;
        char def[32];
        char meaning[200];
    } dsettings[DRIVER_MAX_DSETTINGS];
    int ndsettings;
};

/* Facts about one connection; -1 (or DRIVER_TX_NONE) where unknown. */
enum driver_txstatus {
    DRIVER_TX_IDLE,
    DRIVER_TX_ACTIVE,
    DRIVER_TX_INTRANS,
    DRIVER_TX_INERROR,
    DRIVER_TX_UNKNOWN,
    DRIVER_TX_NONE = -1
};
struct driver_conn_info {
    long backend_pid;
    int client_port;
    enum driver_txstatus txstatus;
    int fakepq_id; /* in-process drivers: fakepq's id of the PGconn */
};

/* The outcome of a query or health check. */
enum driver_query_outcome { DRIVER_Q_OK, DRIVER_Q_ERROR, DRIVER_Q_TIMEOUT, DRIVER_Q_BROKEN };
struct driver_result {
    enum driver_query_outcome outcome;
    char sqlstate[6];
    char message[512];
    double elapsed_ms; /* measured by the driver around the pool call */
};

/* What the runner gives a driver when it starts. */
struct driver_start_args {
    const char *command; /* exec drivers: the shell command line */
    /* Receives one line of the pool's event log, starting with the event's
     * one-word kind. May be called from any thread. */
    void (*event)(void *ctx, const char *line);
    /* Receives one line the driver process wrote to stderr. */
    void (*log)(void *ctx, const char *line);
    void *ctx;
};

/* What the runner gives a driver when opening the pool. */
struct driver_open_args {
    const char *host;
    int port;
    const char *user;
    const char *dbname;
    const char *password;               /* until driver_ops.password changes it */
    const struct scn_setting *settings; /* the scenario's `pool` line, typed */
    size_t nsettings;
    /* "key=value" for every driver setting the driver declared, defaults
     * filled in (driver_resolve_settings). */
    const char *const *driver_settings;
    size_t ndriver_settings;
};

struct driver;      /* one started driver, holding at most one pool */
struct driver_conn; /* a connection handle, owned by the driver */

/* Returns of open and of the operations that can make a case N/A, and of
 * a start that failed because the driver process crashed or hung. */
#define DRIVER_NA (-2)
#define DRIVER_CRASHED (-3)
#define DRIVER_HUNG (-4)

struct driver_ops {
    const char *name; /* e.g. "pqpool", "exec" */

    /* Starts the driver (an exec driver spawns its process and says hello).
     * Returns 0 and *out; DRIVER_CRASHED or DRIVER_HUNG when the driver
     * process died or stopped answering; or -1 with err. */
    int (*start)(const struct driver_start_args *a, struct driver **out, char *err, size_t errlen);

    /* What the driver said about itself; valid until destroy. */
    const struct driver_info *(*info)(struct driver *d);

    /* Opens the pool. Returns 0; DRIVER_NA with err saying which value the
     * pool cannot honour; or -1 with err. */
    int (*open)(struct driver *d, const struct driver_open_args *a, char *err, size_t errlen);

    /* Acquires a connection; timeout_ms < 0 means the pool's configured
     * default. On DRIVER_OK *out is the handle; otherwise err (may be
     * NULL) gets the pool's message. *elapsed_ms is the driver's own
     * measurement around the pool call. */
    enum driver_outcome (*acquire)(struct driver *d, int timeout_ms, struct driver_conn **out,
                                   double *elapsed_ms, char *err, size_t errlen);

    /* Gives a connection back, or discards it as broken. A handle may be
     * released more than once on purpose. Returns 0, or -1 with err (the
     * pool raised, or the driver broke). */
    int (*release)(struct driver *d, struct driver_conn *c, char *err, size_t errlen);
    int (*discard)(struct driver *d, struct driver_conn *c, char *err, size_t errlen);

    /* Runs sql on c, answering within timeout_ms (DRIVER_Q_TIMEOUT if the
     * server has not). Returns 0 with *r filled. */
    int (*query)(struct driver *d, struct driver_conn *c, const char *sql, int timeout_ms,
                 struct driver_result *r);

    /* Fills *out for c. Returns 0, or -1 with err. */
    int (*conn_info)(struct driver *d, struct driver_conn *c, struct driver_conn_info *out,
                     char *err, size_t errlen);

    /* The pool's readiness check (capability health). Returns 0 with *r. */
    int (*health)(struct driver *d, int timeout_ms, struct driver_result *r);

    /* Reads pool.<name>. Returns 0, or -1 if the pool has no such metric
     * or the driver broke. */
    int (*metric)(struct driver *d, const char *name, long long *value);

    /* One housekeeping pass (capability maintain). Returns 0 or -1. */
    int (*maintain)(struct driver *d, char *err, size_t errlen);

    /* New connections use this password from now on; returns once it is
     * in effect. Returns 0 or -1 with err. */
    int (*password)(struct driver *d, const char *password, char *err, size_t errlen);

    /* Checks the pool's invariants (capability invariants). Returns 0, or
     * -1 with err saying which one broke. */
    int (*check_invariants)(struct driver *d, char *err, size_t errlen);

    /* Closes the pool, waking waiters; the handle stays valid for
     * metric/release calls. May be called twice. Returns 0, or -1 with
     * err when closing raised. */
    int (*close)(struct driver *d, char *err, size_t errlen);

    /* Stops the driver (an exec driver's process is told to exit, then
     * killed) and frees everything, handles included. No other operation
     * may be in flight (join the threads that call them first). NULL is a
     * no-op. */
    void (*destroy)(struct driver *d);

    /* 0 while the driver works; otherwise 1 (crashed: exited, killed,
     * broke the protocol) or 2 (hung: stopped answering), with why. */
    int (*fate)(struct driver *d, char *why, size_t whylen);
};

/* Resolves a --driver name: "pqpool", a shipped driver's short name, or
 * "exec:COMMAND". Returns the ops and sets *command (NULL for in-process
 * drivers; otherwise a pointer into name or a static string) or returns
 * NULL when the name is unknown. */
const struct driver_ops *driver_find(const char *name, const char **command);

/* Names to list in --help and errors, NULL-terminated. */
const char *const *driver_names(void);

/* Names of outcomes and key statuses, for traces and reports. */
const char *driver_outcome_name(enum driver_outcome o);
const char *driver_key_status_name(enum driver_key_status s);
const char *driver_cap_name(enum driver_cap c);

/* The entry for a pool key in info, or NULL if the driver does not say. */
int driver_key_status(const struct driver_info *info, const char *key, const char **detail);

/* Checks the user's --driver-setting KEY=VALUE list against what info
 * declares and writes every declared setting as "key=value" into out (at
 * most DRIVER_MAX_DSETTINGS, each of outlen bytes), the user's value or
 * the default. Returns how many, or -1 with err naming the unknown key or
 * value and what is accepted. */
int driver_resolve_settings(const struct driver_info *info, const char *const *given, size_t ngiven,
                            char out[][80], char *err, size_t errlen);

/* Whether info lists pool.<name> (families "x.*" match "x.y"). */
int driver_has_metric(const struct driver_info *info, const char *name);

#endif
