/*
 * pqpool: a resilient libpq connection pool.
 *
 * A pool hands out plain libpq PGconn handles to any number of threads and
 * takes them back. It keeps these promises:
 *
 *   - pqpool_acquire never returns later than its deadline (plus scheduling
 *     slack), whatever the server does: connects are driven with
 *     PQconnectStartParams/PQconnectPoll against the pool's own millisecond
 *     clock, and every network wait (validation ping, init_sql, rollback on
 *     release) has its own bound. The pool mutex is never held during
 *     network I/O.
 *   - Dead connections (FATAL from the server, EOF, reset, a partition that
 *     makes the validation ping time out) are ejected and never handed out.
 *   - Credentials rejected by the server (SQLSTATE 28P01/28000) fail the
 *     acquire at once after exactly one attempt, and are not retried until
 *     auth_retry_after_ms has passed or the password callback yields a new
 *     password. A missing database (3D000) is likewise permanent.
 *   - Transient failures (refused, timeouts, 57P03, 53300, class 08) are
 *     retried with exponential backoff and jitter inside the deadline.
 *   - Waiters are served first-come first-served, each with its own
 *     deadline; a released connection goes straight to the oldest waiter.
 *   - The library never prints and never raises SIGPIPE (libpq sends with
 *     MSG_NOSIGNAL; the pool itself never writes to a socket).
 *
 * Threads: every function may be called from any thread at any time, except
 * pqpool_free (see there). One PGconn is used by one thread at a time, as
 * libpq requires: the thread that acquired it, until it releases it.
 *
 * Errors are negative PQPOOL_E* constants; pqpool_strerror names them and
 * pqpool_last_error gives the text of the last underlying failure.
 */
#ifndef PQPOOL_H
#define PQPOOL_H

#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PQPOOL_MUSTCHECK __attribute__((warn_unused_result))

/* A pool (opaque). Created by pqpool_open, freed by pqpool_free. */
struct pqpool;

/* Error codes: 0 is success, every failure is one of these. */
enum {
    PQPOOL_ETIMEDOUT = -1, /* no connection became free by the deadline */
    PQPOOL_ECONNECT = -2,  /* server unreachable or transiently failing until the deadline */
    PQPOOL_EAUTH = -3,     /* credentials rejected (28P01, 28000), or locked out after that */
    PQPOOL_ECONFIG = -4,   /* permanent: no such database (3D000), bad conninfo or config */
    PQPOOL_ECLOSED = -5,   /* the pool was closed */
    PQPOOL_EINVAL = -6,    /* invalid argument (NULL pool, NULL out pointer, ...) */
    PQPOOL_ENOMEM = -7,    /* out of memory or threads */
};

/* Why a connection left the pool (stats, events). */
enum pqpool_eject_reason {
    PQPOOL_EJECT_DEAD,         /* found dead while idle: FATAL, EOF, reset (socket poll) */
    PQPOOL_EJECT_VALIDATION,   /* the checkout ping failed or missed its deadline */
    PQPOOL_EJECT_BROKEN,       /* released CONNECTION_BAD or after a fatal SQLSTATE */
    PQPOOL_EJECT_BUSY,         /* released with a command running that could not be drained */
    PQPOOL_EJECT_TRANSACTION,  /* released in a transaction that could not be rolled back */
    PQPOOL_EJECT_DISCARDED,    /* pqpool_discard */
    PQPOOL_EJECT_IDLE_TIMEOUT, /* idle longer than idle_timeout_ms, above min_idle */
    PQPOOL_EJECT_LIFETIME,     /* older than max_lifetime_ms */
    PQPOOL_EJECT_CLOSED,       /* finished because the pool was closed (not in "ejected") */
    PQPOOL_EJECT__COUNT
};

/* How a connection attempt failed (stats, events). */
enum pqpool_fail_class {
    PQPOOL_FAIL_NONE,    /* no failure */
    PQPOOL_FAIL_AUTH,    /* 28P01 or 28000: credentials rejected (permanent until changed) */
    PQPOOL_FAIL_CONFIG,  /* 3D000 or an unusable conninfo (permanent) */
    PQPOOL_FAIL_NETWORK, /* no SQLSTATE: refused, unreachable, reset, name lookup */
    PQPOOL_FAIL_TIMEOUT, /* the attempt missed its deadline (connect_timeout_ms) */
    PQPOOL_FAIL_SERVER,  /* a transient SQLSTATE: 57P03, 53300, class 08, ... */
    PQPOOL_FAIL_INIT,    /* connected, but init_sql failed or missed the deadline */
    PQPOOL_FAIL__COUNT
};

/* What an event reports. */
enum pqpool_event_type {
    PQPOOL_EV_CONNECTED,       /* a new connection is ready; elapsed_ms = connect time */
    PQPOOL_EV_CONNECT_FAILED,  /* an attempt failed: fail_class, sqlstate, message, elapsed */
    PQPOOL_EV_EJECTED,         /* a connection was finished: reason, message */
    PQPOOL_EV_ACQUIRE_TIMEOUT, /* an acquire ended with ETIMEDOUT; elapsed_ms = wait */
    PQPOOL_EV_ACQUIRE_FAILED,  /* an acquire ended with ECONNECT/ECONFIG; error, message */
    PQPOOL_EV_AUTH_FAILED,     /* the server rejected the credentials: sqlstate, message */
    PQPOOL_EV_AUTH_LOCKED,     /* an acquire failed at once because of an earlier auth failure */
    PQPOOL_EV_WAITER_SERVED,   /* a queued acquire got a connection; elapsed_ms = wait */
    PQPOOL_EV_DOUBLE_RELEASE,  /* release/discard of a connection not checked out */
    PQPOOL_EV_FOREIGN_RELEASE, /* release/discard of a PGconn this pool does not own */
    PQPOOL_EV_ROLLED_BACK,     /* a connection released inside a transaction was rolled back */
    PQPOOL_EV_CANCELED,        /* a connection released with a command running was drained */
    PQPOOL_EV_CLOSED,          /* pqpool_close ran (once) */
};

/* One event. Pointers are valid only during the callback. */
struct pqpool_event {
    enum pqpool_event_type type;
    PGconn *conn;                      /* the connection concerned, or NULL; for
                                        * EV_EJECTED already finished (an identity
                                        * to compare, not to use) */
    unsigned long conn_id;             /* the pool's id of that connection (1, 2, ...), or 0 */
    enum pqpool_eject_reason reason;   /* PQPOOL_EV_EJECTED */
    enum pqpool_fail_class fail_class; /* PQPOOL_EV_CONNECT_FAILED, _AUTH_FAILED */
    char sqlstate[6];                  /* the failure's SQLSTATE, "" if none */
    const char *message;               /* server or libpq message, never NULL ("" if none) */
    int64_t elapsed_ms;                /* see the event type */
    int error;                         /* PQPOOL_E* for acquire outcomes, else 0 */
};

/*
 * Receives every event. Called from the thread that caused the event
 * (an acquiring or releasing thread, or the housekeeping thread), never
 * with the pool's mutex held: it may call pqpool_stats, pqpool_last_error
 * or even pqpool_close, but not pqpool_free. It must not keep ev pointers.
 */
typedef void (*pqpool_event_fn)(void *ctx, const struct pqpool_event *ev);

/*
 * Returns the password for the next new connection, or NULL for none (then
 * the conninfo's password, a .pgpass file or the server's trust rules
 * apply). Called for every connection the pool opens (rotating tokens),
 * and also, while the pool is locked out after an auth failure, once per
 * acquire that would need a new connection and once per housekeeping pass,
 * to see whether the password has changed. The pool copies the string at
 * once; it is never freed by the pool. May be called from any thread, never
 * with the pool's mutex held.
 */
typedef const char *(*pqpool_password_fn)(void *ctx);

/*
 * Configuration. Fill with pqpool_config_init, then change what you need.
 * All durations are milliseconds. The pool copies every string at
 * pqpool_open.
 */
struct pqpool_config {
    /* libpq conninfo string or URI (passed as dbname with expand_dbname=1,
     * so "host=a,b target_session_attrs=read-write" works). NULL = "". */
    const char *conninfo;
    int max_size;              /* most open connections (idle + in use + connecting); 10 */
    int min_idle;              /* idle connections housekeeping keeps ready; 2 */
    int acquire_timeout_ms;    /* default deadline of pqpool_acquire; 2000 */
    int connect_timeout_ms;    /* bound of one connect attempt incl. init_sql; 2000 */
    int idle_timeout_ms;       /* idle connections above min_idle are closed after; 30000
                                * (0 = never) */
    int max_lifetime_ms;       /* connections are replaced after this age, less up to 2.5 %
                                * jitter, when idle or released; 1800000 (0 = never) */
    int validate_idle_ms;      /* ping a connection idle at least this long before handing
                                * it out; 1000 (0 = always, < 0 = never) */
    int validation_timeout_ms; /* deadline of that ping (capped by the acquire's); 500 */
    int auth_retry_after_ms;   /* no new attempt after an auth/config failure for this
                                * long, unless the password changes; 30000 */
    int backoff_initial_ms;    /* first delay after a transient connect failure; 50 */
    int backoff_max_ms;        /* the delay doubles up to this; 2000. Each delay is drawn
                                * uniformly from [delay/2, delay] (jitter) */
    int release_timeout_ms;    /* bound for draining a running command or rolling back an
                                * open transaction on release; 1000 */

    /* TCP keepalives and user timeout, sent as libpq parameters (ignored by
     * libpq on Unix sockets). Values set in conninfo win. */
    int keepalives;            /* 1 = on (default), 0 = off (libpq default then applies) */
    int keepalives_idle_s;     /* 30 */
    int keepalives_interval_s; /* 10 */
    int keepalives_count;      /* 3 */
    int tcp_user_timeout_ms;   /* 30000 (0 = kernel default) */

    /* application_name for new connections (NULL: the conninfo's, else
     * fallback_application_name "pqpool"). Values set in conninfo win. */
    const char *application_name;
    /* SQL run on every new connection before it is handed out (NULL: none),
     * e.g. "SET statement_timeout = '5s'". Bounded by connect_timeout_ms;
     * if it fails, the connection is finished and the attempt counts as a
     * transient failure of class PQPOOL_FAIL_INIT. */
    const char *init_sql;

    pqpool_password_fn password; /* NULL: none */
    void *password_ctx;
    pqpool_event_fn event; /* NULL: none */
    void *event_ctx;

    /* A notice or warning from the server on a pooled connection (res is
     * the notice as a PGresult, as for PQsetNoticeReceiver). NULL: notices
     * are dropped (the pool installs its own receiver, so libpq's default
     * of printing to stderr never happens). A FATAL notice marks the
     * connection broken either way. */
    void (*notice)(void *ctx, PGconn *conn, const PGresult *res);
    void *notice_ctx;

    /* Period of the built-in housekeeping thread (pqpool_maintain);
     * 1000. 0 = no thread: call pqpool_maintain yourself. */
    int housekeeping_interval_ms;
};

/* Statistics (a snapshot; pqpool_stats). */
struct pqpool_stats {
    int max_size;
    int total;         /* open connections: idle + in_use */
    int idle;          /* ready in the pool */
    int in_use;        /* checked out (or being checked, released, validated) */
    int connecting;    /* connect attempts in progress */
    int waiting;       /* acquires queued for a connection */
    int auth_locked;   /* 1 while new connects are refused after an auth/config failure */
    long long created; /* connections successfully opened */
    long long ejected; /* connections finished for a reason other than close */
    long long ejected_by[PQPOOL_EJECT__COUNT];         /* by reason (CLOSED counted here only) */
    long long connect_attempts;                        /* connect attempts that reached libpq */
    long long connect_failures;                        /* attempts that failed, ... */
    long long connect_failures_by[PQPOOL_FAIL__COUNT]; /* ... by class */
    long long acquires;                                /* successful acquires */
    long long acquire_timeouts;                        /* acquires that ended with ETIMEDOUT */
    long long acquire_errors;   /* acquires that ended with ECONNECT/EAUTH/ECONFIG */
    long long auth_failures;    /* attempts rejected with 28P01/28000 */
    long long auth_lockouts;    /* acquires refused at once while locked out */
    long long waiters_served;   /* acquires served after queueing */
    long long double_releases;  /* release/discard of a connection not checked out */
    long long foreign_releases; /* release/discard of a PGconn the pool does not own */
    long long validations;      /* checkout pings sent */
    long long rollbacks;        /* connections rolled back on release */
    long long cancels;          /* connections drained (cancel) on release */
};

/* Fills cfg with the defaults documented in struct pqpool_config. */
void pqpool_config_init(struct pqpool_config *cfg);

/*
 * Opens a pool. Checks the configuration and parses the conninfo (without
 * contacting the server: a pool opens even while the database is down) and
 * starts the housekeeping thread if configured, which fills the pool to
 * min_idle. On success stores the pool in *out and returns 0; it is freed
 * by pqpool_free. On failure returns PQPOOL_EINVAL (NULL cfg/out),
 * PQPOOL_ECONFIG (bad value or conninfo) or PQPOOL_ENOMEM, stores NULL in
 * *out and writes "what: why" to err (if err is not NULL).
 */
int pqpool_open(const struct pqpool_config *cfg, struct pqpool **out, char *err,
                size_t errlen) PQPOOL_MUSTCHECK;

/*
 * Checks out a connection within timeout_ms (< 0: the configured
 * acquire_timeout_ms; 0: only an idle connection that needs no ping).
 * Returns 0 with the connection in *out; the caller owns it until
 * pqpool_release or pqpool_discard and must not PQfinish it. Otherwise
 * stores NULL in *out and returns
 *   PQPOOL_ETIMEDOUT  all max_size connections stayed in use;
 *   PQPOOL_ECONNECT   new connections failed transiently until the deadline
 *                     (pqpool_last_error has the last failure);
 *   PQPOOL_EAUTH      the server rejected the credentials now, or did so
 *                     earlier and neither auth_retry_after_ms has passed nor
 *                     the password changed (returned at once, no attempt);
 *   PQPOOL_ECONFIG    the database does not exist (same lockout as EAUTH);
 *   PQPOOL_ECLOSED    the pool is or was closed meanwhile;
 *   PQPOOL_EINVAL     p or out is NULL.
 * A connection that is handed out has passed a socket check (nothing
 * unexpected from the server) and, if idle for validate_idle_ms or more, a
 * ping. Blocks at most timeout_ms plus scheduling slack.
 */
int pqpool_acquire(struct pqpool *p, int timeout_ms, PGconn **out) PQPOOL_MUSTCHECK;

/*
 * Gives a connection back. The pool makes it clean before anyone else gets
 * it, within release_timeout_ms: a running command is canceled and its
 * results drained, an open or failed transaction is rolled back; if that
 * fails, or the connection is CONNECTION_BAD, or it was marked broken
 * (pqpool_note_result, a FATAL notice), it is finished and ejected. In a
 * closed pool the connection is finished. A connection the pool does not
 * own, or one already released, is left alone and reported through the
 * event callback. May block up to release_timeout_ms.
 */
void pqpool_release(struct pqpool *p, PGconn *conn);

/* Gives back a connection the caller knows is broken: it is finished and
 * its slot freed at once. Unknown or already released connections are
 * reported as by pqpool_release. */
void pqpool_discard(struct pqpool *p, PGconn *conn);

/*
 * Tells the pool about a result the caller got on conn (res may be NULL,
 * as PQexec returns on failure). The pool cannot see results by itself:
 * an error result whose SQLSTATE is of class 08 or 57P01/57P02/57P03 marks
 * the connection broken, so that release ejects it. Release also ejects a
 * connection whose PQstatus is CONNECTION_BAD, so a caller that never
 * calls this is still safe in that case. Unknown conns are ignored.
 */
void pqpool_note_result(struct pqpool *p, PGconn *conn, const PGresult *res);

/* PQexec on a pooled connection followed by pqpool_note_result. Returns
 * PQexec's result (caller PQclears it), or NULL. */
PGresult *pqpool_exec(struct pqpool *p, PGconn *conn, const char *sql) PQPOOL_MUSTCHECK;

/* Whether res carries an SQLSTATE that means the connection is gone (class
 * 08, 57P01, 57P02, 57P03). */
int pqpool_result_is_fatal(const PGresult *res);

/*
 * One housekeeping pass: checks the sockets of idle connections (ejecting
 * dead ones), closes connections idle longer than idle_timeout_ms above
 * min_idle and those older than max_lifetime_ms, and opens connections (one
 * at a time, each bounded by connect_timeout_ms) until min_idle are idle,
 * respecting the backoff after transient failures and the auth lockout.
 * Returns 0, PQPOOL_ECLOSED, PQPOOL_EINVAL, or the error of a refill
 * attempt that failed in this pass (PQPOOL_ECONNECT, _EAUTH, _ECONFIG).
 */
int pqpool_maintain(struct pqpool *p);

/* Copies a consistent snapshot of the statistics to *out. */
void pqpool_stats(struct pqpool *p, struct pqpool_stats *out);

/*
 * Readiness probe: acquires a connection and runs SELECT 1 on it, all
 * within timeout_ms (< 0: acquire_timeout_ms). Returns 0 if it worked, an
 * acquire error, PQPOOL_ETIMEDOUT if SELECT 1 did not finish in time, or
 * PQPOOL_ECONNECT if it failed (the connection is then ejected).
 */
int pqpool_health(struct pqpool *p, int timeout_ms) PQPOOL_MUSTCHECK;

/*
 * The message of the pool's last failure (a connect attempt's libpq/server
 * message such as 'FATAL:  28P01: password authentication failed for user
 * "app"', or a ping/init_sql error), "" if none. The returned string is a
 * per-thread copy, valid until the same thread calls pqpool_last_error
 * again. p NULL gives "".
 */
const char *pqpool_last_error(struct pqpool *p);

/* Same as pqpool_last_error, into buf (always NUL-terminated if len > 0).
 * Returns the message length. */
size_t pqpool_last_error_copy(struct pqpool *p, char *buf, size_t len);

/*
 * Closes the pool: every queued acquire returns PQPOOL_ECLOSED at once,
 * idle connections are finished, connections in use are finished when
 * released, later acquires fail with PQPOOL_ECLOSED, the housekeeping
 * thread is told to stop. Idempotent and safe to call concurrently with
 * anything but pqpool_free. The handle stays valid (stats, release) until
 * pqpool_free.
 */
void pqpool_close(struct pqpool *p);

/*
 * Closes the pool if needed, joins the housekeeping thread, finishes any
 * connection still checked out (its PGconn becomes invalid) and frees the
 * pool. Call it exactly once, when no other thread is inside or will enter
 * a pqpool call on p. NULL is a no-op.
 */
void pqpool_free(struct pqpool *p);

/* A static English name for an error code ("timed out", ...). */
const char *pqpool_strerror(int code);

/* Static names: "dead", "validation", "broken", "busy", "transaction",
 * "discarded", "idle_timeout", "lifetime", "closed"; and "none", "auth",
 * "config", "network", "timeout", "server", "init". "?" if out of range. */
const char *pqpool_eject_reason_name(enum pqpool_eject_reason r);
const char *pqpool_fail_class_name(enum pqpool_fail_class c);

#ifdef __cplusplus
}
#endif

#endif
