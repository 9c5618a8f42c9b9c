/*
 * fakepq: an in-process fake of libpq with a scriptable fault plan.
 *
 * fakepq.c defines the PQ* functions of libpq-fe.h itself, with libpq's
 * exact signatures, so a program linked against it instead of -lpq (the
 * pool under test, the harness, the unit tests) talks to fakepq. It runs in
 * one of two modes:
 *
 *   simulated    no server at all. Each connection is one end of a
 *                socketpair(2) whose other end plays the server, so
 *                poll/epoll on PQsocket() behaves as with libpq: the fd is
 *                readable exactly when the simulated server has "sent"
 *                something (a query result, an asynchronous FATAL, EOF).
 *                Simple statements behave as on a healthy PostgreSQL 15.
 *   passthrough  every call is forwarded to the real libpq, loaded with
 *                dlopen("libpq.so.5"); PGconn and PGresult handles are
 *                fakepq wrappers around the real ones, so the fault plan
 *                applies on top of real connections.
 *
 * The default mode, before fakepq_init() is called, is passthrough with an
 * empty plan: a binary linked with fakepq behaves exactly like one linked
 * with libpq until told otherwise.
 *
 * The control API below (fakepq_*) scripts faults, reads counters and the
 * call trace, and reports leaks. Every function here and every PQ* function
 * is thread-safe in the way libpq is: any thread may call the control API
 * at any time; one PGconn is used by one thread at a time.
 *
 * Numbering: connection attempts, calls of each function, and queries are
 * counted from 1 since the last fakepq_init(); "nth" below refers to those
 * counts. Connection ids are 1, 2, 3, ... in order of creation.
 */
#ifndef PGFAULT_FAKEPQ_H
#define PGFAULT_FAKEPQ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <libpq-fe.h>

#define FAKEPQ_MUSTCHECK __attribute__((warn_unused_result))

enum fakepq_mode {
    FAKEPQ_PASSTHROUGH = 0,
    FAKEPQ_SIMULATED = 1,
};

/*
 * Puts fakepq into a mode and resets it: the fault plan, counters, trace
 * and simulated-server settings all go back to their defaults. In
 * passthrough mode it loads libpq.so.5 the first time. Connections still
 * open from before are not touched (they keep their ids and are still
 * reported by fakepq_leaks). Returns 0, or -1 with "what: why" in err
 * (e.g. "dlopen libpq.so.5: <dlerror>").
 */
int fakepq_init(enum fakepq_mode mode, char *err, size_t errlen) FAKEPQ_MUSTCHECK;

/* The current mode. */
enum fakepq_mode fakepq_get_mode(void);

/* ---- The simulated server (simulated mode only) ------------------------
 * Defaults: one role "pgfault" with password "pgfault", one database
 * "pgfault", max_connections 100, server_version 150000 ("15.x"), host
 * and port taken from the conninfo (defaults as libpq's: a Unix socket
 * in /var/run/postgresql, port 5432). A connection whose user or password
 * does not match fails with 28P01, one naming another database with 3D000,
 * one past max_connections with 53300 -- with the texts PostgreSQL 15
 * sends.
 */

/* Sets the role's password (NULL: any password accepted). Existing
 * connections are unaffected, as on a real server. */
void fakepq_sim_set_password(const char *user, const char *password);

/* Sets the one database that exists. */
void fakepq_sim_set_database(const char *dbname);

/* Sets max_connections (counting live simulated backends). */
void fakepq_sim_set_max_connections(int max_connections);

/* ---- Connect faults -------------------------------------------------------
 * A rule applies to connection attempts (PQconnectStart*, PQconnectdb*,
 * PQreset, PQping*) numbered nth .. nth+count-1, or with nth ==
 * FAKEPQ_NEXT to the next count attempts, or with count == FAKEPQ_ALL to
 * every attempt from then on. When several rules match, the oldest wins.
 * Faults apply in both modes; in passthrough mode a faulted attempt never
 * reaches the server.
 */
#define FAKEPQ_NEXT 0
#define FAKEPQ_ALL (-1)

enum fakepq_connect_fault {
    FAKEPQ_CONNECT_REFUSED,      /* fails at once, as ECONNREFUSED does */
    FAKEPQ_CONNECT_HANG,         /* PQconnectPoll waits forever on an fd never ready */
    FAKEPQ_CONNECT_SLOW,         /* completes normally after delay_ms */
    FAKEPQ_CONNECT_BAD_PASSWORD, /* FATAL 28P01 */
    FAKEPQ_CONNECT_HBA_REJECT,   /* FATAL 28000, no pg_hba.conf entry */
    FAKEPQ_CONNECT_NO_DATABASE,  /* FATAL 3D000 */
    FAKEPQ_CONNECT_TOO_MANY,     /* FATAL 53300, sorry, too many clients already */
    FAKEPQ_CONNECT_STARTING_UP,  /* FATAL 57P03, the database system is starting up */
    FAKEPQ_CONNECT__COUNT
};

/* Adds a connect rule. delay_ms is used by FAKEPQ_CONNECT_SLOW (and delays
 * the failure of the FATAL kinds if > 0). Returns a rule id > 0, or -1 if
 * an argument is out of range. */
int fakepq_fault_connect(enum fakepq_connect_fault kind, int nth, int count, int delay_ms);

/* ---- Connection faults ----------------------------------------------------
 * Break live connections, as a server or the network would:
 *   FAKEPQ_BREAK_FATAL      the server sends FATAL 57P01 "terminating
 *                           connection due to administrator command" and
 *                           closes (pg_terminate_backend, fast shutdown);
 *   FAKEPQ_BREAK_EOF        the socket is closed with no message (a NAT or
 *                           load balancer drop seen as EOF);
 *   FAKEPQ_BREAK_PARTITION  the connection stops answering: queries and
 *                           pings never complete, nothing becomes readable,
 *                           until fakepq_heal().
 * For FATAL and EOF the fd becomes readable at once and the next libpq call
 * that reads reports the error and CONNECTION_BAD, as libpq does. In
 * passthrough mode the real socket is swapped (dup2) for a socketpair end
 * carrying the same bytes a server would send, so real libpq parses them.
 *
 * Targets: one connection by id, all "idle" ones (server-side idle: no
 * command in progress and not inside a transaction, as pg_stat_activity
 * means it), or all. Returns the number of connections affected.
 */
enum fakepq_break {
    FAKEPQ_BREAK_FATAL,
    FAKEPQ_BREAK_EOF,
    FAKEPQ_BREAK_PARTITION,
};

enum fakepq_target {
    FAKEPQ_TARGET_ONE,
    FAKEPQ_TARGET_IDLE,
    FAKEPQ_TARGET_ALL,
};

int fakepq_break(enum fakepq_target target, int conn_id, enum fakepq_break how);

/* ---- Call faults ----------------------------------------------------------
 * For the calls numbered nth .. of the named function ("PQexec",
 * "PQsendQuery", "PQconnectPoll", ...; FAKEPQ_NEXT/FAKEPQ_ALL as above):
 *   fail:  the call fails the way libpq reports an internal failure (NULL
 *          result, 0 from PQsendQuery/PQconsumeInput, -1 from PQflush and
 *          PQsetnonblocking, PGRES_POLLING_FAILED, NULL from the
 *          PQconnect* functions as when libpq is out of memory), with an
 *          error message naming the fault;
 *   error: query functions produce a PGRES_FATAL_ERROR result carrying
 *          sqlstate and message (message NULL: PostgreSQL's text for that
 *          SQLSTATE where fakepq knows it). A class 08 or 57P0x sqlstate
 *          is sent as FATAL and leaves the connection CONNECTION_BAD.
 * The functions: PQconnectStartParams, PQconnectStart, PQconnectdbParams,
 * PQconnectdb, PQconnectPoll, PQexec, PQexecParams, PQsendQuery,
 * PQsendQueryParams, PQgetResult, PQconsumeInput, PQflush, PQpingParams,
 * PQcancel, PQsetnonblocking.
 * Returns a rule id > 0, or -1 if the function name is unknown.
 */
int fakepq_fault_call_fail(const char *function, int nth, int count);
int fakepq_fault_call_error(const char *function, int nth, int count, const char *sqlstate,
                            const char *message);

/* The queries numbered nth .. (PQexec, PQexecParams, PQsendQuery and
 * PQsendQueryParams count as queries) take delay_ms. Simulated: the result
 * arrives, and the fd becomes readable, delay_ms after sending. Passthrough:
 * the call waits delay_ms before forwarding (so PQsendQuery blocks).
 * Returns a rule id > 0 or -1. */
int fakepq_fault_query_delay(int nth, int count, int delay_ms);

/* Removes one rule by id. Returns 0, or -1 if no such rule. */
int fakepq_rule_remove(int rule_id);

/* Removes every rule and ends every partition (partitioned connections
 * answer again; what they were sent meanwhile is then processed). Broken
 * connections stay broken. */
void fakepq_heal(void);

/* ---- Counters, trace, leaks ---------------------------------------------- */

/* Outcome classes of connection attempts. */
enum fakepq_outcome {
    FAKEPQ_OUT_OK,
    FAKEPQ_OUT_REFUSED,
    FAKEPQ_OUT_AUTH,        /* 28P01 or 28000 */
    FAKEPQ_OUT_NO_DATABASE, /* 3D000 */
    FAKEPQ_OUT_TOO_MANY,    /* 53300 */
    FAKEPQ_OUT_STARTING_UP, /* 57P03 */
    FAKEPQ_OUT_ABANDONED,   /* finished while still connecting (hang, timeout) */
    FAKEPQ_OUT_OTHER,
    FAKEPQ_OUT__COUNT
};

struct fakepq_counters {
    long connect_attempts; /* every attempt, faulted or not */
    long connect_outcomes[FAKEPQ_OUT__COUNT];
    long live_conns;      /* PGconn objects not yet PQfinish'ed */
    long backends;        /* live conns the server side still serves (not broken) */
    long finished;        /* PQfinish calls on valid PGconn objects */
    long double_finishes; /* PQfinish on an already finished PGconn */
    long queries;         /* as counted for fakepq_fault_query_delay */
    long results_live;    /* PGresult objects not yet PQclear'ed */
    long calls;           /* every PQ* call */
    long faults_fired;    /* rule applications */
};

/* Copies the counters. */
void fakepq_get_counters(struct fakepq_counters *out);

/* One entry of the call trace: the ordered list of PQ* calls. */
struct fakepq_call {
    long seq;             /* 1, 2, ... */
    int64_t t_ns;         /* CLOCK_MONOTONIC */
    const char *function; /* static string, e.g. "PQexec" */
    int conn_id;          /* 0 if none */
    char result[64];      /* e.g. "CONNECTION_BAD", "PGRES_TUPLES_OK", "NULL", "1" */
};

/* Number of trace entries kept (the newest FAKEPQ_TRACE_MAX). */
#define FAKEPQ_TRACE_MAX 8192
size_t fakepq_trace_count(void);

/* Copies entry i (0 = oldest kept). Returns 0, or -1 if out of range. */
int fakepq_trace_get(size_t i, struct fakepq_call *out);

/* Prints the newest last_n entries (0: all kept), one per line. */
void fakepq_trace_dump(FILE *out, size_t last_n);

/* Reports connections never finished and results never cleared, each with
 * the call (seq and function) that created it, to out (may be NULL).
 * Returns how many there are. */
int fakepq_leaks(FILE *out);

/* The fakepq id of a connection (> 0), or 0 if conn is not a live fakepq
 * PGconn. */
int fakepq_conn_id(const PGconn *conn);

#endif
