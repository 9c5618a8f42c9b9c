/*
 * pgserver: throwaway PostgreSQL 15 clusters for tests and scenarios.
 *
 * A cluster lives in its own temp dir (data dir, Unix socket dir, log),
 * listens on a free loopback TCP port, uses scram-sha-256 for TCP and has
 * one login role with a known password and a database of the same name.
 * As root the server runs as the `postgres` system user. Binaries come from
 * `pg_config --bindir` or /usr/lib/postgresql/<15..>/bin.
 *
 * Creating a cluster copies a template data dir made once per process, so
 * the second and later clusters cost a copy, not an initdb.
 *
 * Nothing is left behind: each cluster has a reaper process that stops the
 * server (immediate mode) and removes the temp dir when the cluster is
 * destroyed or when the owning process dies for any reason, SIGKILL
 * included. Commands (initdb, cp, pg_ctl, psql) die with the thread that
 * runs them, so none outlives its caller.
 *
 * Administrative SQL (terminate, count, ALTER ROLE) runs through psql as a
 * separate process, so it never goes through the process's own libpq (which
 * in pgfault is fakepq) and never shows up in a pool's counters.
 *
 * Functions that can fail return 0 (or a count >= 0) on success and -1 on
 * failure, filling err with "what: why" when err is not NULL.
 */
#ifndef PGFAULT_PGSERVER_H
#define PGFAULT_PGSERVER_H

#include <signal.h>
#include <stddef.h>

#define PGSERVER_MUSTCHECK __attribute__((warn_unused_result))

struct pgserver;

struct pgserver_options {
    const char *user;     /* login role; default "pgfault" */
    const char *password; /* its password; default: random, one per process */
    const char *dbname;   /* database owned by user; default "pgfault" */
    int max_connections;  /* default 100 */
    int port;             /* 0 (default): a free loopback port */
};

/* Fills o with the defaults above. The default password is 32 random
 * letters and digits, made once per process and shared by its forked
 * children, so no other local user can guess it. */
void pgserver_options_init(struct pgserver_options *o);

/* Makes this process's temp dirs (the template's and every cluster's)
 * under dir instead of $TMPDIR (or /tmp). dir must exist and be
 * traversable by the postgres user when running as root; its path must be
 * short enough for the servers' Unix sockets (70 characters). */
int pgserver_set_base_dir(const char *dir, char *err, size_t errlen) PGSERVER_MUSTCHECK;

/* A command pgserver runs (initdb, cp, pg_ctl, psql) is killed, and the
 * call fails with "interrupted", once *flag is non-zero (a signal handler
 * sets it). NULL: never. */
void pgserver_set_interrupt(volatile sig_atomic_t *flag);

/* Removes this process's template data dir (the next cluster makes a new
 * one). For a process that is done with its throwaway servers, before it
 * removes the base dir the template lives in. */
void pgserver_release_template(void);

/* Stops (immediate) every postmaster whose cluster dir is directly under
 * dir -- a template's or cluster's pgfault-* dir, found through its
 * postmaster.pid -- then removes dir, waiting up to 10 s for it to be gone
 * (a command killed a moment ago may still write into it). For cleaning up
 * after a process that can no longer do it itself. Returns 0 once dir is
 * gone, -1 if it is still there. */
int pgserver_reap_dir(const char *dir);

/* Builds this process's template data dir now (it is otherwise made by the
 * first pgserver_create). A process that forks workers calls this first,
 * so the children share one template instead of each running initdb. */
int pgserver_prepare(char *err, size_t errlen) PGSERVER_MUSTCHECK;

/* Creates a cluster (not started). On failure nothing is left behind and
 * err names the step that failed; if no server binaries are found the
 * message says to run `make deps`. */
int pgserver_create(const struct pgserver_options *o, struct pgserver **out, char *err,
                    size_t errlen) PGSERVER_MUSTCHECK;

/* Attaches to an existing server instead of creating one (pgfault run
 * --server). conninfo must be keyword=value with host, port, user,
 * password and dbname. An attached server is never started, stopped or
 * changed: those calls fail saying a throwaway server is needed; SQL runs
 * through psql as that user (so counting and terminating see that role's
 * own backends). */
int pgserver_attach(const char *conninfo, struct pgserver **out, char *err,
                    size_t errlen) PGSERVER_MUSTCHECK;

/* Starts the server and waits until it accepts connections. */
int pgserver_start(struct pgserver *s, char *err, size_t errlen) PGSERVER_MUSTCHECK;

enum pgserver_stop_mode {
    PGSERVER_STOP_SMART,     /* wait for clients to disconnect */
    PGSERVER_STOP_FAST,      /* FATAL 57P01 to every backend, clean shutdown */
    PGSERVER_STOP_IMMEDIATE, /* crash-like: backends killed, recovery on next start */
};

/* Stops the server and waits until the postmaster has exited. */
int pgserver_stop(struct pgserver *s, enum pgserver_stop_mode mode, char *err,
                  size_t errlen) PGSERVER_MUSTCHECK;

/* stop(mode) then start, on the same port. */
int pgserver_restart(struct pgserver *s, enum pgserver_stop_mode mode, char *err,
                     size_t errlen) PGSERVER_MUSTCHECK;

/* Whether the postmaster is running. */
int pgserver_running(const struct pgserver *s);

/* The TCP port, host ("127.0.0.1"), role, password and database name. */
int pgserver_port(const struct pgserver *s);
const char *pgserver_host(const struct pgserver *s);
const char *pgserver_user(const struct pgserver *s);
const char *pgserver_password(const struct pgserver *s);
const char *pgserver_dbname(const struct pgserver *s);

/* The cluster's temp dir (data dir is <dir>/data, log <dir>/server.log). */
const char *pgserver_dir(const struct pgserver *s);

/* Writes a libpq conninfo for the TCP port, the role and its password,
 * followed by extra (may be NULL), e.g. "host=127.0.0.1 port=54321
 * user=pgfault password=pgfault dbname=pgfault connect_timeout=2". Returns
 * 0, or -1 if buf is too small. */
int pgserver_conninfo(const struct pgserver *s, char *buf, size_t len, const char *extra);

/* Runs SQL through psql as the superuser over the Unix socket; the
 * unaligned, tuples-only output (trailing newline stripped) goes to out
 * (may be NULL). */
int pgserver_sql(struct pgserver *s, const char *sql, char *out, size_t outlen, char *err,
                 size_t errlen) PGSERVER_MUSTCHECK;

enum pgserver_which {
    PGSERVER_BACKENDS_ALL,     /* every client backend of the role */
    PGSERVER_BACKENDS_IDLE,    /* those in state 'idle' */
    PGSERVER_BACKENDS_APPNAME, /* those with application_name == appname */
};

/* pg_terminate_backend() on the role's client backends (never the admin
 * connection), waiting (up to 10 s) until each has exited, so its FATAL
 * has been sent when this returns. Returns how many were terminated, or
 * -1. */
int pgserver_terminate(struct pgserver *s, enum pgserver_which which, const char *appname,
                       char *err, size_t errlen);

/* Counts the role's client backends (appname NULL: all of them). Returns
 * the count, or -1. */
int pgserver_count_backends(struct pgserver *s, const char *appname, char *err, size_t errlen);

/* Sets *out to how many connection attempts the server has rejected at
 * authentication since s was created, across restarts: SQLSTATE 28P01
 * (password authentication failed, also for an unknown role over TCP) and
 * 28000 (no pg_hba.conf entry, role does not exist or may not log in).
 * Other startup FATALs (53300 too many clients, 3D000 no such database) and
 * clients that leave mid-authentication are not rejections.
 * Counted from the server's log (<dir>/server.log, one FATAL line per
 * rejection, matched by SQLSTATE), which the server writes before it answers
 * the client, so a failed connect is counted when the client sees it. Each
 * call reads only what was logged since the previous one; not for concurrent
 * use with other calls on s. An attached server (pgserver_attach) has no log
 * to read: -1, err says so; -1 too if the log cannot be read. */
int pgserver_auth_failures(struct pgserver *s, long long *out, char *err,
                           size_t errlen) PGSERVER_MUSTCHECK;

/* ALTER ROLE ... PASSWORD. Existing sessions are unaffected. */
int pgserver_set_password(struct pgserver *s, const char *password, char *err,
                          size_t errlen) PGSERVER_MUSTCHECK;

/* Sets max_connections for the next (re)start (2..10000). One slot is
 * reserved for the superuser (superuser_reserved_connections = 1), so the
 * role gets n - 1 sessions and the harness can always connect. */
int pgserver_set_max_connections(struct pgserver *s, int n, char *err,
                                 size_t errlen) PGSERVER_MUSTCHECK;

/* Stops the server (immediate) if running and removes the temp dir.
 * NULL is a no-op. */
void pgserver_destroy(struct pgserver *s);

#endif
