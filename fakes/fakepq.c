/*
 * fakepq: an in-process fake of libpq with a scriptable fault plan.
 *
 * This file defines libpq's PQ* functions. A binary linked with it instead
 * of -lpq gets either a simulated PostgreSQL 15 (no server at all) or the
 * real libpq, loaded with dlopen, with faults layered on top. The PGconn
 * and PGresult handles are always fakepq's own structs; in passthrough
 * mode they wrap the real ones.
 *
 * Simulated connections own one end of a socketpair; the other end is the
 * "server". Whenever the simulated server has something for the client (a
 * result, an error, EOF) a byte is written to (or the server end closed),
 * so poll() on PQsocket() behaves as with a real socket. Delayed events
 * (slow connects, slow queries) are written by a timer thread when due.
 *
 * One mutex guards everything; it is never held while a call blocks or
 * while the real libpq runs.
 */
#include "fakepq.h"

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- Real libpq -------------------------------------------------------------- */

/* Every real function fakepq forwards to, loaded by name. */
#define REAL_FUNCS(X)                                                                              \
    X(PGconn *, PQconnectStartParams, (const char *const *, const char *const *, int))             \
    X(PGconn *, PQconnectdbParams, (const char *const *, const char *const *, int))                \
    X(PostgresPollingStatusType, PQconnectPoll, (PGconn *))                                        \
    X(ConnStatusType, PQstatus, (const PGconn *))                                                  \
    X(int, PQsocket, (const PGconn *))                                                             \
    X(char *, PQerrorMessage, (const PGconn *))                                                    \
    X(PGVerbosity, PQsetErrorVerbosity, (PGconn *, PGVerbosity))                                   \
    X(void, PQfinish, (PGconn *))                                                                  \
    X(void, PQreset, (PGconn *))                                                                   \
    X(PGresult *, PQexec, (PGconn *, const char *))                                                \
    X(PGresult *, PQexecParams,                                                                    \
      (PGconn *, const char *, int, const Oid *, const char *const *, const int *, const int *,    \
       int))                                                                                       \
    X(int, PQsendQuery, (PGconn *, const char *))                                                  \
    X(int, PQsendQueryParams,                                                                      \
      (PGconn *, const char *, int, const Oid *, const char *const *, const int *, const int *,    \
       int))                                                                                       \
    X(PGresult *, PQgetResult, (PGconn *))                                                         \
    X(int, PQconsumeInput, (PGconn *))                                                             \
    X(int, PQisBusy, (PGconn *))                                                                   \
    X(int, PQflush, (PGconn *))                                                                    \
    X(int, PQsetnonblocking, (PGconn *, int))                                                      \
    X(int, PQisnonblocking, (const PGconn *))                                                      \
    X(ExecStatusType, PQresultStatus, (const PGresult *))                                          \
    X(char *, PQresultErrorField, (const PGresult *, int))                                         \
    X(char *, PQresultErrorMessage, (const PGresult *))                                            \
    X(int, PQntuples, (const PGresult *))                                                          \
    X(int, PQnfields, (const PGresult *))                                                          \
    X(char *, PQfname, (const PGresult *, int))                                                    \
    X(char *, PQgetvalue, (const PGresult *, int, int))                                            \
    X(int, PQgetisnull, (const PGresult *, int, int))                                              \
    X(int, PQgetlength, (const PGresult *, int, int))                                              \
    X(char *, PQcmdStatus, (PGresult *))                                                           \
    X(char *, PQcmdTuples, (PGresult *))                                                           \
    X(void, PQclear, (PGresult *))                                                                 \
    X(PGTransactionStatusType, PQtransactionStatus, (const PGconn *))                              \
    X(const char *, PQparameterStatus, (const PGconn *, const char *))                             \
    X(int, PQserverVersion, (const PGconn *))                                                      \
    X(int, PQprotocolVersion, (const PGconn *))                                                    \
    X(int, PQbackendPID, (const PGconn *))                                                         \
    X(PGPing, PQpingParams, (const char *const *, const char *const *, int))                       \
    X(PGcancel *, PQgetCancel, (PGconn *))                                                         \
    X(int, PQcancel, (PGcancel *, char *, int))                                                    \
    X(void, PQfreeCancel, (PGcancel *))                                                            \
    X(PQconninfoOption *, PQconninfoParse, (const char *, char **))                                \
    X(void, PQconninfoFree, (PQconninfoOption *))                                                  \
    X(int, PQconnectionUsedPassword, (const PGconn *))                                             \
    X(char *, PQdb, (const PGconn *))                                                              \
    X(char *, PQuser, (const PGconn *))                                                            \
    X(char *, PQhost, (const PGconn *))                                                            \
    X(char *, PQport, (const PGconn *))                                                            \
    X(char *, PQpass, (const PGconn *))                                                            \
    X(char *, PQescapeLiteral, (PGconn *, const char *, size_t))                                   \
    X(char *, PQescapeIdentifier, (PGconn *, const char *, size_t))                                \
    X(PQnoticeReceiver, PQsetNoticeReceiver, (PGconn *, PQnoticeReceiver, void *))                 \
    X(PQnoticeProcessor, PQsetNoticeProcessor, (PGconn *, PQnoticeProcessor, void *))              \
    X(int, PQlibVersion, (void))                                                                   \
    X(PGnotify *, PQnotifies, (PGconn *))                                                          \
    X(PGpipelineStatus, PQpipelineStatus, (const PGconn *))                                        \
    X(void, PQfreemem, (void *))

#define DECLARE_REAL(ret, name, args) ret(*name) args;
static struct {
    REAL_FUNCS(DECLARE_REAL)
} real;
static void *real_handle;

/* ---- State ------------------------------------------------------------------------- */

enum conn_kind { CONN_SIM, CONN_REAL, CONN_FAILED };

enum sim_phase { PH_START, PH_WAIT, PH_DONE };

struct pg_result {
    PGresult *real; /* passthrough: the real result */
    ExecStatusType status;
    char cmd[64];
    int nfields, ntuples;
    char fname[4][64];
    char *values[4]; /* one row at most, owned */
    char severity[16], sqlstate[6];
    char *primary; /* owned */
    char *message; /* full formatted message (owned), "" if none */
    long seq;      /* creating call */
    const char *creator;
    int id;
    struct pg_result *next, *prev; /* live list */
};

struct pending {
    PGresult *res;
    struct pending *next;
};

struct pg_conn {
    int id;
    enum conn_kind kind;
    PGconn *real;
    int finished;
    long seq;
    const char *creator;
    struct pg_conn *next, *prev; /* live list */

    /* simulated and failed connections */
    ConnStatusType status;
    char errmsg[2048];
    PGVerbosity verbosity;
    int fd, srv; /* client end (PQsocket), server end */
    int pid;
    char host[256], port[16], user[64], password[128], dbname[64], appname[64];
    int used_password;
    /* connect */
    enum sim_phase phase;
    int fault;        /* enum fakepq_connect_fault, or -1 */
    int64_t ready_ms; /* connect: when the server answers (-1: never) */
    int counted_backend;
    /* queries */
    PGTransactionStatusType tx;
    int busy;
    int64_t result_at; /* when the pending results arrive */
    int result_read;   /* PQconsumeInput ran after they arrived: as in libpq, only
                        * then does PQisBusy say they can be read without waiting */
    struct pending *results;
    int nonblocking;
    /* faults */
    enum { BRK_NONE, BRK_FATAL, BRK_EOF } broken;
    int partitioned;
    int saved_fd;           /* passthrough partition: the real socket, kept */
    int die_after;          /* an injected fatal error: the connection goes bad after it */
    int fatal_read;         /* an idle FATAL was read ... */
    int fatal_noticed;      /* ... and parsed: passed to the notice receiver */
    char override_err[512]; /* passthrough: an injected failure's message */
    int connect_timeout_s;
    int outcome_counted;
    PQnoticeReceiver notice_rx;
    void *notice_rx_arg;
    PQnoticeProcessor notice_proc;
    void *notice_proc_arg;
    char settings[8][2][64];
    int nsettings;
};

struct pg_cancel {
    PGcancel *real;
    int conn_id;
};

enum rule_kind { R_CONNECT, R_CALL_FAIL, R_CALL_ERROR, R_QUERY_DELAY };

struct rule {
    int id;
    enum rule_kind kind;
    int connect_fault;
    char function[32];
    char sqlstate[6];
    char message[256];
    int has_message;
    long first, last; /* numbers it applies to; last < 0: no end */
    int delay_ms;
    struct rule *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t timer_cond;
static enum fakepq_mode mode = FAKEPQ_PASSTHROUGH;
static struct rule *rules;
static int next_rule_id = 1;
static struct fakepq_counters counters;
static struct fakepq_call trace_ring[FAKEPQ_TRACE_MAX];
static long trace_seq;
static struct pg_conn *conns;
static struct pg_result *results;
static int next_conn_id = 1;
static int next_pid = 40000;
static char sim_user[64] = "pgfault", sim_password[128] = "pgfault", sim_db[64] = "pgfault";
static int sim_password_any;
static int sim_max_connections = 100;

/* Per-function call counts for call faults. */
#define MAX_FUNCS 64
static char func_names[MAX_FUNCS][32];
static long func_counts[MAX_FUNCS];
static int nfuncs;

/* Timer: writes a byte to a simulated server end when due. */
struct timer {
    int conn_id;
    int64_t due;
    struct timer *next;
};
static struct timer *timers;
static pthread_t timer_thread;
static int timer_started;

static const char EOF_MSG[] = "server closed the connection unexpectedly\n"
                              "\tThis probably means the server terminated abnormally\n"
                              "\tbefore or while processing the request.\n";
static const char ADMIN_MSG[] = "terminating connection due to administrator command";

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int load_real_locked(char *err, size_t errlen)
{
    if (real_handle)
        return 0;
    void *h = dlopen("libpq.so.5", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        if (err)
            snprintf(err, errlen, "dlopen libpq.so.5: %s", dlerror());
        return -1;
    }
#define LOAD_REAL(ret, name, args)                                                                 \
    *(void **)(&real.name) = dlsym(h, #name);                                                      \
    if (!real.name) {                                                                              \
        if (err)                                                                                   \
            snprintf(err, errlen, "dlsym %s: not found in libpq.so.5", #name);                     \
        dlclose(h);                                                                                \
        return -1;                                                                                 \
    }
    REAL_FUNCS(LOAD_REAL)
    real_handle = h;
    return 0;
}

/* Loads the real library or dies: a fakepq call in passthrough mode without
 * it cannot do anything sensible. */
static void need_real(void)
{
    pthread_mutex_lock(&mu);
    char err[512];
    int rc = load_real_locked(err, sizeof err);
    pthread_mutex_unlock(&mu);
    if (rc < 0) {
        fprintf(stderr, "fakepq: %s\n", err);
        abort();
    }
}

/* ---- Trace and counters ---------------------------------------------------------------- */

static long trace_locked(const char *fn, int conn_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static long trace_locked(const char *fn, int conn_id, const char *fmt, ...)
{
    struct fakepq_call *c = &trace_ring[trace_seq % FAKEPQ_TRACE_MAX];
    c->seq = ++trace_seq;
    c->t_ns = now_ns();
    c->function = fn;
    c->conn_id = conn_id;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->result, sizeof c->result, fmt, ap);
    va_end(ap);
    counters.calls++;
    return c->seq;
}

#define TRACE(fn, conn, ...)                                                                       \
    do {                                                                                           \
        pthread_mutex_lock(&mu);                                                                   \
        trace_locked(fn, conn ? (conn)->id : 0, __VA_ARGS__);                                      \
        pthread_mutex_unlock(&mu);                                                                 \
    } while (0)

static long count_call_locked(const char *fn)
{
    for (int i = 0; i < nfuncs; i++)
        if (strcmp(func_names[i], fn) == 0)
            return ++func_counts[i];
    if (nfuncs == MAX_FUNCS)
        return 0;
    snprintf(func_names[nfuncs], sizeof func_names[0], "%s", fn);
    func_counts[nfuncs] = 1;
    return func_counts[nfuncs++];
}

static int rule_applies(const struct rule *r, long n)
{
    return n >= r->first && (r->last < 0 || n <= r->last);
}

/* The first call rule (fail or error) for this call of fn, or NULL. */
static struct rule *call_rule_locked(const char *fn)
{
    long n = count_call_locked(fn);
    for (struct rule *r = rules; r; r = r->next) {
        if ((r->kind == R_CALL_FAIL || r->kind == R_CALL_ERROR) && strcmp(r->function, fn) == 0 &&
            rule_applies(r, n)) {
            counters.faults_fired++;
            return r;
        }
    }
    return NULL;
}

/* ---- Results ---------------------------------------------------------------------------- */

static PGresult *result_new_locked(ExecStatusType st, const char *creator)
{
    PGresult *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->status = st;
    r->message = strdup("");
    r->creator = creator;
    r->seq = trace_seq;
    r->next = results;
    if (results)
        results->prev = r;
    results = r;
    counters.results_live++;
    return r;
}

static PGresult *wrap_result(PGresult *realres, const char *creator)
{
    if (!realres)
        return NULL;
    pthread_mutex_lock(&mu);
    PGresult *r = result_new_locked(PGRES_COMMAND_OK, creator);
    if (r)
        r->real = realres;
    pthread_mutex_unlock(&mu);
    if (!r)
        real.PQclear(realres);
    return r;
}

static void result_free_locked(PGresult *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else if (results == r)
        results = r->next;
    if (r->next)
        r->next->prev = r->prev;
    counters.results_live--;
    for (int i = 0; i < 4; i++)
        free(r->values[i]);
    free(r->primary);
    free(r->message);
    free(r);
}

/* Known message texts of the SQLSTATEs fakepq produces. */
static const char *sqlstate_text(const char *s)
{
    static const struct {
        const char *code, *text;
    } known[] = {
        {"57P01", ADMIN_MSG},
        {"57P02", "terminating connection due to crash of another server process"},
        {"57P03", "the database system is starting up"},
        {"57014", "canceling statement due to user request"},
        {"53300", "sorry, too many clients already"},
        {"08006", "connection failure"},
        {"08003", "connection does not exist"},
        {"40001", "could not serialize access due to concurrent update"},
        {"40P01", "deadlock detected"},
        {"25P02", "current transaction is aborted, commands ignored until end of transaction "
                  "block"},
        {"42501", "permission denied"},
        {"22012", "division by zero"},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(known[i].code, s) == 0)
            return known[i].text;
    return "injected error";
}

static int sqlstate_fatal(const char *s)
{
    return strncmp(s, "08", 2) == 0 || strcmp(s, "57P01") == 0 || strcmp(s, "57P02") == 0 ||
           strcmp(s, "57P03") == 0;
}

/* An error result as libpq formats it for the given verbosity. */
static PGresult *error_result_locked(const char *severity, const char *sqlstate,
                                     const char *primary, const char *extra_lines, PGVerbosity v,
                                     const char *creator)
{
    PGresult *r = result_new_locked(PGRES_FATAL_ERROR, creator);
    if (!r)
        return NULL;
    snprintf(r->severity, sizeof r->severity, "%s", severity);
    snprintf(r->sqlstate, sizeof r->sqlstate, "%s", sqlstate);
    r->primary = strdup(primary);
    char buf[1024];
    if (v == PQERRORS_VERBOSE)
        snprintf(buf, sizeof buf, "%s:  %s: %s\n%s", severity, sqlstate, primary,
                 extra_lines ? extra_lines : "");
    else if (v == PQERRORS_TERSE)
        snprintf(buf, sizeof buf, "%s:  %s\n", severity, primary);
    else
        snprintf(buf, sizeof buf, "%s:  %s\n%s", severity, primary, extra_lines ? extra_lines : "");
    free(r->message);
    r->message = strdup(buf);
    return r;
}

/* ---- Connections ------------------------------------------------------------------------- */

static PGconn *conn_new_locked(enum conn_kind kind, const char *creator)
{
    PGconn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->id = next_conn_id++;
    c->kind = kind;
    c->fd = c->srv = c->saved_fd = -1;
    c->fault = -1;
    c->verbosity = PQERRORS_DEFAULT;
    c->creator = creator;
    c->seq = trace_seq + 1;
    c->tx = PQTRANS_IDLE;
    c->status = CONNECTION_BAD;
    c->next = conns;
    if (conns)
        conns->prev = c;
    conns = c;
    counters.live_conns++;
    return c;
}

static PGconn *find_conn_locked(int id)
{
    for (PGconn *c = conns; c; c = c->next)
        if (c->id == id)
            return c;
    return NULL;
}

static int is_live_locked(const PGconn *conn)
{
    for (PGconn *c = conns; c; c = c->next)
        if (c == conn)
            return 1;
    return 0;
}

int fakepq_conn_id(const PGconn *conn)
{
    pthread_mutex_lock(&mu);
    int id = conn && is_live_locked(conn) ? conn->id : 0;
    pthread_mutex_unlock(&mu);
    return id;
}

/* Makes the client end readable: the simulated server "sends". */
static void srv_send(PGconn *c)
{
    if (c->srv >= 0) {
        char b = 'x';
        (void)send(c->srv, &b, 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
}

static void drain_fd(PGconn *c)
{
    char buf[256];
    if (c->fd < 0)
        return;
    while (recv(c->fd, buf, sizeof buf, MSG_DONTWAIT) > 0)
        ;
}

static void *timer_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        int64_t now = now_ms(), next = -1;
        struct timer **pp = &timers;
        while (*pp) {
            struct timer *t = *pp;
            if (t->due <= now) {
                PGconn *c = find_conn_locked(t->conn_id);
                if (c && !c->partitioned)
                    srv_send(c);
                *pp = t->next;
                free(t);
                continue;
            }
            if (next < 0 || t->due < next)
                next = t->due;
            pp = &t->next;
        }
        if (next < 0) {
            pthread_cond_wait(&timer_cond, &mu);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            int64_t wait = next - now;
            ts.tv_sec += wait / 1000;
            ts.tv_nsec += (wait % 1000) * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&timer_cond, &mu, &ts);
        }
    }
    return NULL;
}

static void timer_add_locked(PGconn *c, int64_t due)
{
    if (!timer_started) {
        pthread_condattr_t a;
        pthread_condattr_init(&a);
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
        pthread_cond_init(&timer_cond, &a);
        pthread_condattr_destroy(&a);
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&timer_thread, &at, timer_main, NULL) == 0)
            timer_started = 1;
        pthread_attr_destroy(&at);
    }
    struct timer *t = malloc(sizeof *t);
    if (!t)
        return;
    t->conn_id = c->id;
    t->due = due;
    t->next = timers;
    timers = t;
    pthread_cond_signal(&timer_cond);
}

static void timers_drop_locked(int conn_id)
{
    struct timer **pp = &timers;
    while (*pp) {
        if ((*pp)->conn_id == conn_id) {
            struct timer *t = *pp;
            *pp = t->next;
            free(t);
        } else {
            pp = &(*pp)->next;
        }
    }
}

static void pending_clear_locked(PGconn *c)
{
    while (c->results) {
        struct pending *p = c->results;
        c->results = p->next;
        if (p->res)
            result_free_locked(p->res);
        free(p);
    }
}

static void pending_push_locked(PGconn *c, PGresult *r)
{
    struct pending *p = calloc(1, sizeof *p), **pp = &c->results;
    if (!p)
        return;
    p->res = r;
    while (*pp)
        pp = &(*pp)->next;
    *pp = p;
}

/* The simulated server has gone: the client sees that at its next read. */
static void sim_lose_backend_locked(PGconn *c)
{
    if (c->counted_backend) {
        c->counted_backend = 0;
        counters.backends--;
    }
}

/* Applies a pending break to a simulated connection at a read. Returns 1
 * if the connection is now bad. */
static int sim_apply_break_locked(PGconn *c)
{
    if (c->broken == BRK_NONE || c->status == CONNECTION_BAD)
        return c->status == CONNECTION_BAD;
    if (c->broken == BRK_FATAL && !c->busy && !c->fatal_read) {
        /* Idle: like libpq, the first read only takes in the
         * ErrorResponse (the connection still looks fine; the next parse
         * hands it to the notice receiver) and the EOF behind it is seen
         * by the next read. */
        c->fatal_read = 1;
        return 0;
    }
    if (c->busy) {
        pending_clear_locked(c);
        if (c->broken == BRK_FATAL) {
            PGresult *r =
                error_result_locked("FATAL", "57P01", ADMIN_MSG, NULL, c->verbosity, "PQgetResult");
            if (r)
                pending_push_locked(c, r);
            snprintf(c->errmsg, sizeof c->errmsg, "FATAL:  %s\n%s", ADMIN_MSG, EOF_MSG);
        } else {
            PGresult *r = result_new_locked(PGRES_FATAL_ERROR, "PQgetResult");
            if (r) {
                free(r->message);
                r->message = strdup(EOF_MSG);
                pending_push_locked(c, r);
            }
            snprintf(c->errmsg, sizeof c->errmsg, "%s", EOF_MSG);
        }
        c->result_at = 0;
    } else {
        snprintf(c->errmsg, sizeof c->errmsg, "%s", EOF_MSG);
    }
    c->status = CONNECTION_BAD;
    c->tx = PQTRANS_UNKNOWN;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    return 1;
}

/* What libpq's input parsing does with an idle FATAL already read: it goes
 * to the notice receiver (or the default processor, which prints it). */
static void sim_parse_locked(PGconn *c)
{
    if (!c->fatal_read || c->fatal_noticed)
        return;
    c->fatal_noticed = 1;
    if (!c->notice_rx && !c->notice_proc) {
        fprintf(stderr, "FATAL:  %s\n", ADMIN_MSG);
        return;
    }
    PGresult *n = error_result_locked("FATAL", "57P01", ADMIN_MSG, NULL, c->verbosity, "notice");
    if (!n)
        return;
    n->status = PGRES_NONFATAL_ERROR;
    PQnoticeReceiver rx = c->notice_rx;
    void *rxa = c->notice_rx_arg;
    PQnoticeProcessor pr = c->notice_proc;
    void *pra = c->notice_proc_arg;
    pthread_mutex_unlock(&mu);
    if (rx)
        rx(rxa, n);
    else if (pr)
        pr(pra, n->message);
    pthread_mutex_lock(&mu);
    result_free_locked(n);
}

/* ---- Conninfo ------------------------------------------------------------------------------ */

static void opt_set(PGconn *c, const char *key, const char *val)
{
    if (!val)
        return;
    if (strcmp(key, "host") == 0 || strcmp(key, "hostaddr") == 0)
        snprintf(c->host, sizeof c->host, "%s", val);
    else if (strcmp(key, "port") == 0)
        snprintf(c->port, sizeof c->port, "%s", val);
    else if (strcmp(key, "user") == 0)
        snprintf(c->user, sizeof c->user, "%s", val);
    else if (strcmp(key, "password") == 0)
        snprintf(c->password, sizeof c->password, "%s", val);
    else if (strcmp(key, "dbname") == 0)
        snprintf(c->dbname, sizeof c->dbname, "%s", val);
    else if (strcmp(key, "connect_timeout") == 0)
        c->connect_timeout_s = atoi(val);
    else if (strcmp(key, "application_name") == 0 ||
             (strcmp(key, "fallback_application_name") == 0 && !c->appname[0]))
        snprintf(c->appname, sizeof c->appname, "%s", val);
}

/* Fills a simulated connection's parameters from keywords/values, expanding
 * a conninfo or URI given as dbname, with the real libpq's parser (so
 * syntax errors read exactly as libpq's). Returns 0, or -1 with errmsg. */
static int sim_params(PGconn *c, const char *const *keys, const char *const *vals, int expand)
{
    for (int i = 0; keys && keys[i]; i++) {
        if (!vals[i] || !vals[i][0])
            continue;
        if (expand && strcmp(keys[i], "dbname") == 0 &&
            (strchr(vals[i], '=') || strncmp(vals[i], "postgres", 8) == 0)) {
            char *err = NULL;
            PQconninfoOption *o = real.PQconninfoParse(vals[i], &err);
            if (!o) {
                snprintf(c->errmsg, sizeof c->errmsg, "%s", err ? err : "invalid conninfo\n");
                real.PQfreemem(err);
                return -1;
            }
            for (PQconninfoOption *p = o; p->keyword; p++)
                if (p->val)
                    opt_set(c, p->keyword, p->val);
            real.PQconninfoFree(o);
            continue;
        }
        opt_set(c, keys[i], vals[i]);
    }
    if (!c->host[0])
        snprintf(c->host, sizeof c->host, "/var/run/postgresql");
    if (!c->port[0])
        snprintf(c->port, sizeof c->port, "5432");
    if (!c->user[0])
        snprintf(c->user, sizeof c->user, "%s", getenv("USER") ? getenv("USER") : "postgres");
    if (!c->dbname[0])
        snprintf(c->dbname, sizeof c->dbname, "%s", c->user);
    return 0;
}

/* "connection to server at "h", port p failed: " or the socket form. */
static void conn_prefix(const PGconn *c, char *buf, size_t len)
{
    if (c->host[0] == '/')
        snprintf(buf, len, "connection to server on socket \"%s/.s.PGSQL.%s\" failed: ", c->host,
                 c->port);
    else
        snprintf(buf, len, "connection to server at \"%s\", port %s failed: ", c->host, c->port);
}

/* Sets a connection failure message as libpq 15 words it. */
static void connect_error(PGconn *c, int fault)
{
    char pre[512], body[1400];
    const char *state = NULL, *text = NULL;
    char msgbuf[600];
    switch (fault) {
    case FAKEPQ_CONNECT_REFUSED:
        snprintf(body, sizeof body,
                 "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
                 "connections?\n");
        if (c->host[0] == '/')
            snprintf(body, sizeof body,
                     "No such file or directory\n\tIs the server running locally and accepting "
                     "connections on that socket?\n");
        break;
    case FAKEPQ_CONNECT_BAD_PASSWORD:
        state = "28P01";
        snprintf(msgbuf, sizeof msgbuf, "password authentication failed for user \"%s\"", c->user);
        text = msgbuf;
        break;
    case FAKEPQ_CONNECT_HBA_REJECT:
        state = "28000";
        snprintf(msgbuf, sizeof msgbuf,
                 "no pg_hba.conf entry for host \"%s\", user \"%s\", database \"%s\", no "
                 "encryption",
                 c->host[0] == '/' ? "[local]" : c->host, c->user, c->dbname);
        text = msgbuf;
        break;
    case FAKEPQ_CONNECT_NO_DATABASE:
        state = "3D000";
        snprintf(msgbuf, sizeof msgbuf, "database \"%s\" does not exist", c->dbname);
        text = msgbuf;
        break;
    case FAKEPQ_CONNECT_TOO_MANY:
        state = "53300";
        text = "sorry, too many clients already";
        break;
    case FAKEPQ_CONNECT_STARTING_UP:
        state = "57P03";
        text = "the database system is starting up";
        break;
    default:
        snprintf(body, sizeof body, "fakepq: injected connection failure\n");
        break;
    }
    if (text) {
        if (c->verbosity == PQERRORS_VERBOSE)
            snprintf(body, sizeof body, "FATAL:  %s: %s\n", state, text);
        else
            snprintf(body, sizeof body, "FATAL:  %s\n", text);
    }
    conn_prefix(c, pre, sizeof pre);
    snprintf(c->errmsg, sizeof c->errmsg, "%s%s", pre, body);
}

static enum fakepq_outcome outcome_of(int fault)
{
    switch (fault) {
    case FAKEPQ_CONNECT_REFUSED:
        return FAKEPQ_OUT_REFUSED;
    case FAKEPQ_CONNECT_BAD_PASSWORD:
    case FAKEPQ_CONNECT_HBA_REJECT:
        return FAKEPQ_OUT_AUTH;
    case FAKEPQ_CONNECT_NO_DATABASE:
        return FAKEPQ_OUT_NO_DATABASE;
    case FAKEPQ_CONNECT_TOO_MANY:
        return FAKEPQ_OUT_TOO_MANY;
    case FAKEPQ_CONNECT_STARTING_UP:
        return FAKEPQ_OUT_STARTING_UP;
    default:
        return FAKEPQ_OUT_OTHER;
    }
}

/* The connect fault for the next attempt (counted here), or -1. */
static int connect_rule_locked(int *delay_ms)
{
    long n = ++counters.connect_attempts;
    *delay_ms = 0;
    for (struct rule *r = rules; r; r = r->next) {
        if (r->kind == R_CONNECT && rule_applies(r, n)) {
            counters.faults_fired++;
            *delay_ms = r->delay_ms;
            return r->connect_fault;
        }
    }
    return -1;
}

/* Whether a simulated attempt succeeds on the simulated server, else the
 * fault kind describing its refusal. */
static int sim_server_verdict_locked(const PGconn *c)
{
    if (strcmp(c->user, sim_user) != 0 ||
        (!sim_password_any && strcmp(c->password, sim_password) != 0))
        return FAKEPQ_CONNECT_BAD_PASSWORD;
    if (strcmp(c->dbname, sim_db) != 0)
        return FAKEPQ_CONNECT_NO_DATABASE;
    if (counters.backends >= sim_max_connections)
        return FAKEPQ_CONNECT_TOO_MANY;
    return -1;
}

/* ---- Control API --------------------------------------------------------------------------- */

int fakepq_init(enum fakepq_mode m, char *err, size_t errlen)
{
    pthread_mutex_lock(&mu);
    int rc = 0;
    /* The real library parses conninfo strings in simulated mode too. */
    if (load_real_locked(err, errlen) < 0)
        rc = -1;
    if (rc == 0) {
        mode = m;
        while (rules) {
            struct rule *r = rules;
            rules = r->next;
            free(r);
        }
        long live = counters.live_conns, res_live = counters.results_live;
        long backends = counters.backends;
        memset(&counters, 0, sizeof counters);
        counters.live_conns = live;
        counters.results_live = res_live;
        counters.backends = backends;
        nfuncs = 0;
        snprintf(sim_user, sizeof sim_user, "pgfault");
        snprintf(sim_password, sizeof sim_password, "pgfault");
        snprintf(sim_db, sizeof sim_db, "pgfault");
        sim_password_any = 0;
        sim_max_connections = 100;
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

enum fakepq_mode fakepq_get_mode(void)
{
    pthread_mutex_lock(&mu);
    enum fakepq_mode m = mode;
    pthread_mutex_unlock(&mu);
    return m;
}

void fakepq_sim_set_password(const char *user, const char *password)
{
    pthread_mutex_lock(&mu);
    if (user)
        snprintf(sim_user, sizeof sim_user, "%s", user);
    sim_password_any = password == NULL;
    snprintf(sim_password, sizeof sim_password, "%s", password ? password : "");
    pthread_mutex_unlock(&mu);
}

void fakepq_sim_set_database(const char *dbname)
{
    pthread_mutex_lock(&mu);
    snprintf(sim_db, sizeof sim_db, "%s", dbname ? dbname : "pgfault");
    pthread_mutex_unlock(&mu);
}

void fakepq_sim_set_max_connections(int n)
{
    pthread_mutex_lock(&mu);
    sim_max_connections = n > 0 ? n : 1;
    pthread_mutex_unlock(&mu);
}

static int add_rule(struct rule *proto, int nth, int count)
{
    if (count == 0 || count < FAKEPQ_ALL || nth < 0)
        return -1;
    struct rule *r = malloc(sizeof *r);
    if (!r)
        return -1;
    *r = *proto;
    pthread_mutex_lock(&mu);
    long base;
    if (r->kind == R_CONNECT)
        base = counters.connect_attempts;
    else if (r->kind == R_QUERY_DELAY)
        base = counters.queries;
    else {
        base = 0;
        for (int i = 0; i < nfuncs; i++)
            if (strcmp(func_names[i], r->function) == 0)
                base = func_counts[i];
    }
    r->first = nth == FAKEPQ_NEXT ? base + 1 : nth;
    r->last = count == FAKEPQ_ALL ? -1 : r->first + count - 1;
    r->id = next_rule_id++;
    /* Oldest rule first: append. */
    struct rule **pp = &rules;
    while (*pp)
        pp = &(*pp)->next;
    r->next = NULL;
    *pp = r;
    int id = r->id;
    pthread_mutex_unlock(&mu);
    return id;
}

int fakepq_fault_connect(enum fakepq_connect_fault kind, int nth, int count, int delay_ms)
{
    if ((int)kind < 0 || kind >= FAKEPQ_CONNECT__COUNT || delay_ms < 0)
        return -1;
    struct rule r = {0};
    r.kind = R_CONNECT;
    r.connect_fault = kind;
    r.delay_ms = delay_ms;
    return add_rule(&r, nth, count);
}

static const char *const known_funcs[] = {
    "PQconnectStartParams", "PQconnectStart", "PQconnectPoll",    "PQconnectdb",
    "PQconnectdbParams",    "PQexec",         "PQexecParams",     "PQsendQuery",
    "PQsendQueryParams",    "PQgetResult",    "PQconsumeInput",   "PQflush",
    "PQpingParams",         "PQcancel",       "PQsetnonblocking", NULL};

static int known_function(const char *fn)
{
    for (int i = 0; known_funcs[i]; i++)
        if (strcmp(known_funcs[i], fn) == 0)
            return 1;
    return 0;
}

int fakepq_fault_call_fail(const char *function, int nth, int count)
{
    if (!function || !known_function(function))
        return -1;
    struct rule r = {0};
    r.kind = R_CALL_FAIL;
    snprintf(r.function, sizeof r.function, "%s", function);
    return add_rule(&r, nth, count);
}

int fakepq_fault_call_error(const char *function, int nth, int count, const char *sqlstate,
                            const char *message)
{
    if (!function || !known_function(function) || !sqlstate || strlen(sqlstate) != 5)
        return -1;
    struct rule r = {0};
    r.kind = R_CALL_ERROR;
    snprintf(r.function, sizeof r.function, "%s", function);
    snprintf(r.sqlstate, sizeof r.sqlstate, "%s", sqlstate);
    if (message) {
        snprintf(r.message, sizeof r.message, "%s", message);
        r.has_message = 1;
    }
    return add_rule(&r, nth, count);
}

int fakepq_fault_query_delay(int nth, int count, int delay_ms)
{
    if (delay_ms < 0)
        return -1;
    struct rule r = {0};
    r.kind = R_QUERY_DELAY;
    r.delay_ms = delay_ms;
    return add_rule(&r, nth, count);
}

int fakepq_rule_remove(int id)
{
    pthread_mutex_lock(&mu);
    int rc = -1;
    for (struct rule **pp = &rules; *pp; pp = &(*pp)->next) {
        if ((*pp)->id == id) {
            struct rule *r = *pp;
            *pp = r->next;
            free(r);
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

void fakepq_heal(void)
{
    pthread_mutex_lock(&mu);
    while (rules) {
        struct rule *r = rules;
        rules = r->next;
        free(r);
    }
    for (PGconn *c = conns; c; c = c->next) {
        if (!c->partitioned)
            continue;
        c->partitioned = 0;
        if (c->kind == CONN_REAL && c->saved_fd >= 0) {
            int fd = real.PQsocket(c->real);
            if (fd >= 0)
                dup2(c->saved_fd, fd);
            close(c->saved_fd);
            c->saved_fd = -1;
            if (c->srv >= 0)
                close(c->srv);
            c->srv = -1;
        } else if (c->busy && c->result_at <= now_ms()) {
            srv_send(c);
        } else if (c->phase == PH_WAIT && c->ready_ms >= 0 && c->ready_ms <= now_ms()) {
            srv_send(c);
        }
    }
    pthread_mutex_unlock(&mu);
}

/* The ErrorResponse a server sends before closing for 57P01. */
static size_t fatal_57p01_bytes(char *buf, size_t len)
{
    const char *fields[][2] = {{"S", "FATAL"},
                               {"V", "FATAL"},
                               {"C", "57P01"},
                               {"M", ADMIN_MSG},
                               {"F", "postgres.c"},
                               {"L", "3200"},
                               {"R", "ProcessInterrupts"}};
    size_t n = 5;
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        size_t fl = strlen(fields[i][1]);
        if (n + 1 + fl + 1 + 1 > len)
            break;
        buf[n++] = fields[i][0][0];
        memcpy(buf + n, fields[i][1], fl + 1);
        n += fl + 1;
    }
    buf[n++] = '\0';
    buf[0] = 'E';
    uint32_t l = (uint32_t)(n - 1);
    buf[1] = (char)(l >> 24);
    buf[2] = (char)(l >> 16);
    buf[3] = (char)(l >> 8);
    buf[4] = (char)l;
    return n;
}

/* Breaks one connection (mutex held). Returns 1 if it was affected. */
static int break_one_locked(PGconn *c, enum fakepq_break how)
{
    ConnStatusType st = c->kind == CONN_REAL ? real.PQstatus(c->real) : c->status;
    if (c->kind == CONN_FAILED || st != CONNECTION_OK || c->broken != BRK_NONE)
        return 0;
    if (how == FAKEPQ_BREAK_PARTITION && c->partitioned)
        return 0;
    if (c->kind == CONN_REAL) {
        int fd = real.PQsocket(c->real);
        int pair[2];
        if (fd < 0 || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
            return 0;
        if (how == FAKEPQ_BREAK_PARTITION) {
            c->saved_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
            dup2(pair[0], fd);
            close(pair[0]);
            c->srv = pair[1];
            c->partitioned = 1;
            return 1;
        }
        /* Swap the real socket for one carrying what a server would
         * send: the real session ends (the server sees EOF). */
        dup2(pair[0], fd);
        close(pair[0]);
        if (how == FAKEPQ_BREAK_FATAL) {
            char msg[256];
            size_t n = fatal_57p01_bytes(msg, sizeof msg);
            (void)send(pair[1], msg, n, MSG_NOSIGNAL);
        }
        close(pair[1]);
        c->broken = how == FAKEPQ_BREAK_FATAL ? BRK_FATAL : BRK_EOF;
        sim_lose_backend_locked(c);
        return 1;
    }
    if (how == FAKEPQ_BREAK_PARTITION) {
        c->partitioned = 1;
        return 1;
    }
    c->broken = how == FAKEPQ_BREAK_FATAL ? BRK_FATAL : BRK_EOF;
    c->partitioned = 0;
    sim_lose_backend_locked(c);
    if (c->srv >= 0) {
        close(c->srv); /* EOF: the client end becomes readable */
        c->srv = -1;
    }
    return 1;
}

static int server_idle_locked(PGconn *c)
{
    if (c->kind == CONN_REAL)
        return !real.PQisBusy(c->real) && real.PQtransactionStatus(c->real) == PQTRANS_IDLE;
    return !c->busy && c->tx == PQTRANS_IDLE;
}

int fakepq_break(enum fakepq_target target, int conn_id, enum fakepq_break how)
{
    int n = 0;
    pthread_mutex_lock(&mu);
    for (PGconn *c = conns; c; c = c->next) {
        if (target == FAKEPQ_TARGET_ONE && c->id != conn_id)
            continue;
        if (target == FAKEPQ_TARGET_IDLE && !server_idle_locked(c))
            continue;
        n += break_one_locked(c, how);
    }
    counters.faults_fired += n;
    pthread_mutex_unlock(&mu);
    return n;
}

void fakepq_get_counters(struct fakepq_counters *out)
{
    pthread_mutex_lock(&mu);
    *out = counters;
    pthread_mutex_unlock(&mu);
}

size_t fakepq_trace_count(void)
{
    pthread_mutex_lock(&mu);
    size_t n = trace_seq < FAKEPQ_TRACE_MAX ? (size_t)trace_seq : FAKEPQ_TRACE_MAX;
    pthread_mutex_unlock(&mu);
    return n;
}

int fakepq_trace_get(size_t i, struct fakepq_call *out)
{
    pthread_mutex_lock(&mu);
    size_t n = trace_seq < FAKEPQ_TRACE_MAX ? (size_t)trace_seq : FAKEPQ_TRACE_MAX;
    int rc = -1;
    if (i < n) {
        long first = trace_seq - (long)n + 1;
        *out = trace_ring[(first + (long)i - 1) % FAKEPQ_TRACE_MAX];
        rc = 0;
    }
    pthread_mutex_unlock(&mu);
    return rc;
}

void fakepq_trace_dump(FILE *out, size_t last_n)
{
    size_t n = fakepq_trace_count();
    size_t from = last_n && last_n < n ? n - last_n : 0;
    for (size_t i = from; i < n; i++) {
        struct fakepq_call c;
        if (fakepq_trace_get(i, &c) == 0)
            fprintf(out, "%6ld %-22s conn %-3d -> %s\n", c.seq, c.function, c.conn_id, c.result);
    }
}

int fakepq_leaks(FILE *out)
{
    pthread_mutex_lock(&mu);
    int n = 0;
    for (PGconn *c = conns; c; c = c->next, n++)
        if (out)
            fprintf(out, "fakepq leak: PGconn %d never finished (created by call %ld, %s)\n", c->id,
                    c->seq, c->creator);
    for (PGresult *r = results; r; r = r->next, n++)
        if (out)
            fprintf(out, "fakepq leak: PGresult never cleared (created by call %ld, %s)\n", r->seq,
                    r->creator);
    pthread_mutex_unlock(&mu);
    return n;
}

/* ---- Connecting ------------------------------------------------------------------------------ */

static void count_outcome_locked(PGconn *c, enum fakepq_outcome o)
{
    if (c->outcome_counted)
        return;
    c->outcome_counted = 1;
    counters.connect_outcomes[o]++;
}

/* Classifies a real libpq connection failure by its message. */
static enum fakepq_outcome classify_real(const char *msg)
{
    if (strstr(msg, "28P01") || strstr(msg, "28000") || strstr(msg, "password authentication") ||
        strstr(msg, "pg_hba.conf"))
        return FAKEPQ_OUT_AUTH;
    if (strstr(msg, "3D000") || strstr(msg, "does not exist"))
        return FAKEPQ_OUT_NO_DATABASE;
    if (strstr(msg, "53300") || strstr(msg, "too many clients") ||
        strstr(msg, "remaining connection slots"))
        return FAKEPQ_OUT_TOO_MANY;
    if (strstr(msg, "57P03") || strstr(msg, "starting up"))
        return FAKEPQ_OUT_STARTING_UP;
    if (strstr(msg, "Connection refused"))
        return FAKEPQ_OUT_REFUSED;
    return FAKEPQ_OUT_OTHER;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* A simulated connection (also used for faulted attempts in passthrough
 * mode) that has not answered yet. */
static PGconn *sim_start_locked(const char *fn, int fault, int delay_ms, const char *const *keys,
                                const char *const *vals, int expand)
{
    PGconn *c = conn_new_locked(mode == FAKEPQ_SIMULATED ? CONN_SIM : CONN_FAILED, fn);
    if (!c)
        return NULL;
    c->fault = fault;
    c->ready_ms = delay_ms;
    if (sim_params(c, keys, vals, expand) < 0) {
        count_outcome_locked(c, FAKEPQ_OUT_OTHER);
        c->status = CONNECTION_BAD;
        return c;
    }
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) {
        snprintf(c->errmsg, sizeof c->errmsg, "could not create socket: %s\n", strerror(errno));
        count_outcome_locked(c, FAKEPQ_OUT_OTHER);
        return c;
    }
    c->fd = pair[0];
    c->srv = pair[1];
    c->status = CONNECTION_STARTED;
    c->phase = PH_START;
    return c;
}

static PGconn *connect_start(const char *fn, const char *const *keys, const char *const *vals,
                             int expand, int sync)
{
    need_real();
    pthread_mutex_lock(&mu);
    struct rule *fail = call_rule_locked(fn);
    if (fail && fail->kind == R_CALL_FAIL) {
        /* What libpq returns when it cannot allocate a PGconn: no server
         * is contacted, so it is not a connect attempt. */
        trace_locked(fn, 0, "NULL (injected)");
        pthread_mutex_unlock(&mu);
        return NULL;
    }
    int delay = 0;
    int fault = connect_rule_locked(&delay);
    trace_locked(fn, 0, "attempt %ld%s", counters.connect_attempts, fault >= 0 ? " (fault)" : "");
    if (mode == FAKEPQ_PASSTHROUGH && (fault < 0 || fault == FAKEPQ_CONNECT_SLOW)) {
        pthread_mutex_unlock(&mu);
        /* Passthrough: a slow connect waits here, then goes through. */
        if (fault == FAKEPQ_CONNECT_SLOW)
            sleep_ms(delay);
        /* Synchronous connects go to the real synchronous function: only
         * it applies connect_timeout. */
        PGconn *r = sync ? real.PQconnectdbParams(keys, vals, expand)
                         : real.PQconnectStartParams(keys, vals, expand);
        pthread_mutex_lock(&mu);
        PGconn *c = conn_new_locked(CONN_REAL, fn);
        if (!c) {
            pthread_mutex_unlock(&mu);
            real.PQfinish(r);
            return NULL;
        }
        c->real = r;
        if (!r || real.PQstatus(r) == CONNECTION_BAD)
            count_outcome_locked(c, r ? classify_real(real.PQerrorMessage(r)) : FAKEPQ_OUT_OTHER);
        else if (sync && real.PQstatus(r) == CONNECTION_OK) {
            count_outcome_locked(c, FAKEPQ_OUT_OK);
            c->counted_backend = 1;
            counters.backends++;
        }
        pthread_mutex_unlock(&mu);
        return c;
    }
    PGconn *c = sim_start_locked(fn, fault, delay, keys, vals, expand);
    pthread_mutex_unlock(&mu);
    return c;
}

/* One step of a simulated connect (mutex held). */
static PostgresPollingStatusType sim_poll_locked(PGconn *c)
{
    if (c->status == CONNECTION_OK)
        return PGRES_POLLING_OK;
    if (c->status == CONNECTION_BAD)
        return PGRES_POLLING_FAILED;
    int64_t now = now_ms();
    if (c->phase == PH_START) {
        if (c->fault == FAKEPQ_CONNECT_REFUSED) {
            connect_error(c, c->fault);
            c->status = CONNECTION_BAD;
            count_outcome_locked(c, FAKEPQ_OUT_REFUSED);
            return PGRES_POLLING_FAILED;
        }
        c->phase = PH_WAIT;
        c->status = CONNECTION_AWAITING_RESPONSE;
        if (c->fault == FAKEPQ_CONNECT_HANG) {
            c->ready_ms = -1;
        } else {
            int delay = (int)c->ready_ms;
            c->ready_ms = now + delay;
            if (delay <= 0)
                srv_send(c);
            else
                timer_add_locked(c, c->ready_ms);
        }
        return PGRES_POLLING_READING;
    }
    if (c->ready_ms < 0 || now < c->ready_ms || c->partitioned)
        return PGRES_POLLING_READING;
    drain_fd(c);
    int verdict = c->fault;
    if (verdict == FAKEPQ_CONNECT_SLOW)
        verdict = -1;
    if (verdict < 0 && c->kind == CONN_SIM)
        verdict = sim_server_verdict_locked(c);
    if (verdict >= 0) {
        connect_error(c, verdict);
        c->status = CONNECTION_BAD;
        count_outcome_locked(c, outcome_of(verdict));
        if (c->fd >= 0)
            close(c->fd);
        c->fd = -1;
        return PGRES_POLLING_FAILED;
    }
    c->status = CONNECTION_OK;
    c->phase = PH_DONE;
    c->pid = next_pid++;
    c->used_password = c->password[0] != '\0';
    c->counted_backend = 1;
    counters.backends++;
    count_outcome_locked(c, FAKEPQ_OUT_OK);
    return PGRES_POLLING_OK;
}

PostgresPollingStatusType PQconnectPoll(PGconn *c)
{
    if (!c)
        return PGRES_POLLING_FAILED;
    pthread_mutex_lock(&mu);
    struct rule *r = call_rule_locked("PQconnectPoll");
    PostgresPollingStatusType st;
    if (r && c->status != CONNECTION_OK) {
        snprintf(c->errmsg, sizeof c->errmsg, "fakepq: injected failure of PQconnectPoll\n");
        snprintf(c->override_err, sizeof c->override_err,
                 "fakepq: injected failure of PQconnectPoll\n");
        c->status = CONNECTION_BAD;
        count_outcome_locked(c, FAKEPQ_OUT_OTHER);
        st = PGRES_POLLING_FAILED;
    } else if (c->kind == CONN_REAL) {
        pthread_mutex_unlock(&mu);
        st = real.PQconnectPoll(c->real);
        pthread_mutex_lock(&mu);
        if (st == PGRES_POLLING_OK) {
            count_outcome_locked(c, FAKEPQ_OUT_OK);
            if (!c->counted_backend) {
                c->counted_backend = 1;
                counters.backends++;
            }
        } else if (st == PGRES_POLLING_FAILED) {
            count_outcome_locked(c, classify_real(real.PQerrorMessage(c->real)));
        }
    } else {
        st = sim_poll_locked(c);
    }
    trace_locked("PQconnectPoll", c->id, "%s",
                 st == PGRES_POLLING_OK        ? "OK"
                 : st == PGRES_POLLING_FAILED  ? "FAILED"
                 : st == PGRES_POLLING_READING ? "READING"
                                               : "WRITING");
    pthread_mutex_unlock(&mu);
    return st;
}

PGconn *PQconnectStartParams(const char *const *keywords, const char *const *values,
                             int expand_dbname)
{
    return connect_start("PQconnectStartParams", keywords, values, expand_dbname, 0);
}

PGconn *PQconnectStart(const char *conninfo)
{
    const char *keys[] = {"dbname", NULL};
    const char *vals[] = {conninfo, NULL};
    return connect_start("PQconnectStart", keys, vals, 1, 0);
}

/* Drives a connect to the end, as libpq's synchronous functions do,
 * honouring connect_timeout (whole seconds, at least 2). */
static void connect_sync(PGconn *c)
{
    int timeout_s = 0;
    pthread_mutex_lock(&mu);
    timeout_s = c->connect_timeout_s;
    pthread_mutex_unlock(&mu);
    if (timeout_s > 0 && timeout_s < 2)
        timeout_s = 2;
    int64_t deadline = timeout_s > 0 ? now_ms() + timeout_s * 1000 : -1;
    for (;;) {
        PostgresPollingStatusType st = PQconnectPoll(c);
        if (st == PGRES_POLLING_OK || st == PGRES_POLLING_FAILED)
            return;
        int fd = PQsocket(c);
        int64_t left = deadline < 0 ? 100 : deadline - now_ms();
        if (deadline >= 0 && left <= 0) {
            pthread_mutex_lock(&mu);
            char pre[512];
            conn_prefix(c, pre, sizeof pre);
            snprintf(c->errmsg, sizeof c->errmsg, "%stimeout expired\n", pre);
            c->status = CONNECTION_BAD;
            count_outcome_locked(c, FAKEPQ_OUT_ABANDONED);
            if (c->fd >= 0)
                close(c->fd);
            c->fd = -1;
            pthread_mutex_unlock(&mu);
            return;
        }
        struct pollfd p = {fd, st == PGRES_POLLING_WRITING ? POLLOUT : POLLIN, 0};
        (void)poll(&p, fd >= 0 ? 1 : 0, (int)(left > 100 ? 100 : left));
    }
}

PGconn *PQconnectdbParams(const char *const *keywords, const char *const *values, int expand_dbname)
{
    PGconn *c = connect_start("PQconnectdbParams", keywords, values, expand_dbname, 1);
    if (c && c->kind != CONN_REAL)
        connect_sync(c);
    return c;
}

PGconn *PQconnectdb(const char *conninfo)
{
    const char *keys[] = {"dbname", NULL};
    const char *vals[] = {conninfo, NULL};
    PGconn *c = connect_start("PQconnectdb", keys, vals, 1, 1);
    if (c && c->kind != CONN_REAL)
        connect_sync(c);
    return c;
}

ConnStatusType PQstatus(const PGconn *c)
{
    if (!c)
        return CONNECTION_BAD;
    if (c->kind == CONN_REAL)
        return c->die_after == 2 ? CONNECTION_BAD : real.PQstatus(c->real);
    return c->status;
}

int PQsocket(const PGconn *c)
{
    if (!c)
        return -1;
    if (c->kind == CONN_REAL)
        return real.PQsocket(c->real);
    return c->status == CONNECTION_BAD ? -1 : c->fd;
}

char *PQerrorMessage(const PGconn *c)
{
    if (!c)
        return "connection pointer is NULL\n";
    if (c->kind == CONN_REAL)
        return c->override_err[0] ? (char *)c->override_err : real.PQerrorMessage(c->real);
    return (char *)c->errmsg;
}

PGVerbosity PQsetErrorVerbosity(PGconn *c, PGVerbosity v)
{
    if (!c)
        return PQERRORS_DEFAULT;
    PGVerbosity old = c->verbosity;
    c->verbosity = v;
    TRACE("PQsetErrorVerbosity", c, "%d", (int)v);
    if (c->kind == CONN_REAL)
        return real.PQsetErrorVerbosity(c->real, v);
    return old;
}

void PQfinish(PGconn *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&mu);
    if (!is_live_locked(c)) {
        counters.double_finishes++;
        trace_locked("PQfinish", 0, "not a live PGconn (double finish?)");
        pthread_mutex_unlock(&mu);
        return;
    }
    trace_locked("PQfinish", c->id, "finished");
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    counters.live_conns--;
    counters.finished++;
    sim_lose_backend_locked(c);
    if (c->status != CONNECTION_OK && c->phase == PH_WAIT)
        count_outcome_locked(c, FAKEPQ_OUT_ABANDONED);
    if (c->kind == CONN_REAL && !c->outcome_counted && real.PQstatus(c->real) != CONNECTION_OK)
        count_outcome_locked(c, FAKEPQ_OUT_ABANDONED);
    timers_drop_locked(c->id);
    pending_clear_locked(c);
    pthread_mutex_unlock(&mu);
    if (c->fd >= 0)
        close(c->fd);
    if (c->srv >= 0)
        close(c->srv);
    if (c->saved_fd >= 0)
        close(c->saved_fd);
    if (c->kind == CONN_REAL)
        real.PQfinish(c->real);
    free(c);
}

void PQreset(PGconn *c)
{
    if (!c)
        return;
    if (c->kind == CONN_REAL) {
        pthread_mutex_lock(&mu);
        counters.connect_attempts++;
        trace_locked("PQreset", c->id, "forwarded");
        c->broken = BRK_NONE;
        c->die_after = 0;
        c->override_err[0] = '\0';
        pthread_mutex_unlock(&mu);
        real.PQreset(c->real);
        return;
    }
    pthread_mutex_lock(&mu);
    int delay = 0;
    int fault = connect_rule_locked(&delay);
    trace_locked("PQreset", c->id, "attempt %ld", counters.connect_attempts);
    sim_lose_backend_locked(c);
    pending_clear_locked(c);
    timers_drop_locked(c->id);
    if (c->fd >= 0)
        close(c->fd);
    if (c->srv >= 0)
        close(c->srv);
    c->fd = c->srv = -1;
    int pair[2];
    c->status = CONNECTION_BAD;
    c->broken = BRK_NONE;
    c->partitioned = 0;
    c->busy = 0;
    c->tx = PQTRANS_IDLE;
    c->outcome_counted = 0;
    c->fault = fault;
    c->ready_ms = delay;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0) {
        c->fd = pair[0];
        c->srv = pair[1];
        c->status = CONNECTION_STARTED;
        c->phase = PH_START;
    }
    pthread_mutex_unlock(&mu);
    connect_sync(c);
}

/* ---- Simulated SQL ------------------------------------------------------------------------------
 */

static void lower_word(const char *s, char *out, size_t len)
{
    size_t i = 0;
    while (*s && isspace((unsigned char)*s))
        s++;
    while (*s && (isalnum((unsigned char)*s) || *s == '_') && i + 1 < len)
        out[i++] = (char)tolower((unsigned char)*s++);
    out[i] = '\0';
}

static PGresult *tuples_locked(const char *fname, const char *value)
{
    PGresult *r = result_new_locked(PGRES_TUPLES_OK, "query");
    if (!r)
        return NULL;
    r->nfields = 1;
    r->ntuples = 1;
    snprintf(r->fname[0], sizeof r->fname[0], "%s", fname);
    r->values[0] = strdup(value);
    snprintf(r->cmd, sizeof r->cmd, "SELECT 1");
    return r;
}

static PGresult *command_locked(const char *tag)
{
    PGresult *r = result_new_locked(PGRES_COMMAND_OK, "query");
    if (r)
        snprintf(r->cmd, sizeof r->cmd, "%s", tag);
    return r;
}

static void notice_locked(PGconn *c, const char *text)
{
    if (!c->notice_rx && !c->notice_proc)
        return;
    PGresult *n = error_result_locked("WARNING", "25P01", text, NULL, c->verbosity, "notice");
    if (!n)
        return;
    n->status = PGRES_NONFATAL_ERROR;
    PQnoticeReceiver rx = c->notice_rx;
    void *rxa = c->notice_rx_arg;
    PQnoticeProcessor pr = c->notice_proc;
    void *pra = c->notice_proc_arg;
    pthread_mutex_unlock(&mu);
    if (rx)
        rx(rxa, n);
    else if (pr)
        pr(pra, n->message);
    pthread_mutex_lock(&mu);
    result_free_locked(n);
}

/* One statement on the simulated server: its result, transaction status
 * updated. *delay_ms gets extra time (pg_sleep). */
static PGresult *sim_statement_locked(PGconn *c, const char *sql, int *delay_ms)
{
    char w[32], w2[32];
    lower_word(sql, w, sizeof w);
    const char *rest = sql;
    while (*rest && isspace((unsigned char)*rest))
        rest++;
    rest += strlen(w);
    lower_word(rest, w2, sizeof w2);
    int aborted = c->tx == PQTRANS_INERROR;
    if (aborted && strcmp(w, "rollback") != 0 && strcmp(w, "abort") != 0 &&
        strcmp(w, "commit") != 0 && strcmp(w, "end") != 0)
        return error_result_locked("ERROR", "25P02", sqlstate_text("25P02"), NULL, c->verbosity,
                                   "query");
    PGresult *r = NULL;
    if (!w[0]) {
        r = result_new_locked(PGRES_EMPTY_QUERY, "query");
    } else if (strcmp(w, "select") == 0) {
        char lower[256];
        size_t i = 0;
        for (const char *p = rest; *p && i + 1 < sizeof lower; p++)
            if (!isspace((unsigned char)*p))
                lower[i++] = (char)tolower((unsigned char)*p);
        lower[i] = '\0';
        char num[32];
        if (strcmp(lower, "pg_backend_pid()") == 0) {
            snprintf(num, sizeof num, "%d", c->pid);
            r = tuples_locked("pg_backend_pid", num);
        } else if (strncmp(lower, "pg_sleep(", 9) == 0) {
            *delay_ms += (int)(atof(lower + 9) * 1000);
            r = tuples_locked("pg_sleep", "");
        } else if (strspn(lower, "0123456789") == strlen(lower) && lower[0]) {
            r = tuples_locked("?column?", lower);
        }
    } else if ((strcmp(w, "begin") == 0) ||
               (strcmp(w, "start") == 0 && strcmp(w2, "transaction") == 0)) {
        if (c->tx == PQTRANS_INTRANS)
            notice_locked(c, "there is already a transaction in progress");
        c->tx = PQTRANS_INTRANS;
        return command_locked("BEGIN");
    } else if (strcmp(w, "commit") == 0 || strcmp(w, "end") == 0) {
        if (c->tx == PQTRANS_IDLE)
            notice_locked(c, "there is no transaction in progress");
        int was_aborted = c->tx == PQTRANS_INERROR;
        c->tx = PQTRANS_IDLE;
        return command_locked(was_aborted ? "ROLLBACK" : "COMMIT");
    } else if (strcmp(w, "rollback") == 0 || strcmp(w, "abort") == 0) {
        if (c->tx == PQTRANS_IDLE)
            notice_locked(c, "there is no transaction in progress");
        c->tx = PQTRANS_IDLE;
        return command_locked("ROLLBACK");
    } else if (strcmp(w, "set") == 0) {
        if (c->nsettings < 8 && w2[0]) {
            snprintf(c->settings[c->nsettings][0], 64, "%s", w2);
            const char *v = strpbrk(rest, "=");
            if (!v) {
                const char *to = strstr(rest, " to ");
                if (!to)
                    to = strstr(rest, " TO ");
                v = to ? to + 3 : NULL;
            } else {
                v++;
            }
            char val[64] = "";
            if (v) {
                while (*v == ' ' || *v == '\'')
                    v++;
                snprintf(val, sizeof val, "%s", v);
                val[strcspn(val, "'; ")] = '\0';
            }
            snprintf(c->settings[c->nsettings++][1], 64, "%s", val);
        }
        return command_locked("SET");
    } else if (strcmp(w, "show") == 0) {
        for (int i = c->nsettings - 1; i >= 0; i--)
            if (strcmp(c->settings[i][0], w2) == 0)
                return tuples_locked(w2, c->settings[i][1]);
    } else if (strcmp(w, "discard") == 0 && strcmp(w2, "all") == 0) {
        if (c->tx != PQTRANS_IDLE)
            return error_result_locked("ERROR", "25001",
                                       "DISCARD ALL cannot run inside a transaction block", NULL,
                                       c->verbosity, "query");
        c->nsettings = 0;
        return command_locked("DISCARD ALL");
    } else if (strcmp(w, "reset") == 0 && strcmp(w2, "all") == 0) {
        c->nsettings = 0;
        return command_locked("RESET");
    }
    if (r)
        return r;
    /* Anything else: what PostgreSQL says about a statement it cannot
     * parse, pointing at the first word. */
    char primary[128], extra[600];
    char first[64];
    const char *t = sql;
    while (*t && isspace((unsigned char)*t))
        t++;
    size_t fl = strcspn(t, " \t\n;(");
    snprintf(first, sizeof first, "%.*s", (int)(fl < 63 ? fl : 63), t);
    snprintf(primary, sizeof primary, "syntax error at or near \"%s\"", first);
    snprintf(extra, sizeof extra, "LINE 1: %.500s\n        ^\n", t);
    r = error_result_locked("ERROR", "42601", primary, extra, c->verbosity, "query");
    if (c->tx == PQTRANS_INTRANS)
        c->tx = PQTRANS_INERROR;
    return r;
}

/* Queues the results of a query string (statements split at ';'). */
static void sim_query_locked(PGconn *c, const char *sql, int *delay_ms)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", sql);
    char *p = buf;
    int any = 0;
    for (;;) {
        char *semi = p;
        int inq = 0;
        while (*semi && (inq || *semi != ';')) {
            if (*semi == '\'')
                inq = !inq;
            semi++;
        }
        int last = *semi == '\0';
        *semi = '\0';
        char *q = p;
        while (*q && isspace((unsigned char)*q))
            q++;
        if (*q || (!any && last)) {
            PGresult *r = sim_statement_locked(c, q, delay_ms);
            any = 1;
            if (r) {
                pending_push_locked(c, r);
                if (r->status == PGRES_FATAL_ERROR)
                    break; /* the server stops at the first error */
            }
        }
        if (last)
            break;
        p = semi + 1;
    }
}

/* Sends a query on a simulated connection. Returns 1, or 0 with errmsg. */
static int sim_send_locked(PGconn *c, const char *fn, const char *sql)
{
    if (c->status != CONNECTION_OK) {
        snprintf(c->errmsg, sizeof c->errmsg, "no connection to the server\n");
        return 0;
    }
    if (c->busy) {
        snprintf(c->errmsg, sizeof c->errmsg, "another command is already in progress\n");
        return 0;
    }
    struct rule *r = call_rule_locked(fn);
    if (r && r->kind == R_CALL_FAIL) {
        snprintf(c->errmsg, sizeof c->errmsg, "fakepq: injected failure of %s\n", fn);
        return 0;
    }
    long qn = ++counters.queries;
    int delay = 0;
    for (struct rule *q = rules; q; q = q->next) {
        if (q->kind == R_QUERY_DELAY && rule_applies(q, qn)) {
            delay = q->delay_ms;
            counters.faults_fired++;
            break;
        }
    }
    c->errmsg[0] = '\0';
    if (r && r->kind == R_CALL_ERROR) {
        int fatal = sqlstate_fatal(r->sqlstate);
        PGresult *e = error_result_locked(fatal ? "FATAL" : "ERROR", r->sqlstate,
                                          r->has_message ? r->message : sqlstate_text(r->sqlstate),
                                          NULL, c->verbosity, fn);
        if (e)
            pending_push_locked(c, e);
        if (fatal)
            c->die_after = 1;
        else if (c->tx == PQTRANS_INTRANS)
            c->tx = PQTRANS_INERROR;
    } else if (c->broken == BRK_NONE) {
        sim_query_locked(c, sql, &delay);
    }
    c->busy = 1;
    c->result_at = now_ms() + delay;
    c->result_read = 0;
    if (!c->partitioned) {
        if (delay <= 0 || c->broken != BRK_NONE)
            srv_send(c);
        else
            timer_add_locked(c, c->result_at);
    }
    return 1;
}

static int sim_ready_locked(PGconn *c)
{
    if (!c->busy)
        return 1;
    if (c->broken != BRK_NONE)
        return 1;
    return !c->partitioned && now_ms() >= c->result_at;
}

/* The next result of a simulated connection, waiting for it if needed. */
static PGresult *sim_get_result_locked(PGconn *c)
{
    while (c->busy && !sim_ready_locked(c)) {
        int64_t wait = c->partitioned ? 50 : c->result_at - now_ms();
        int fd = c->fd;
        pthread_mutex_unlock(&mu);
        struct pollfd p = {fd, POLLIN, 0};
        (void)poll(&p, fd >= 0 ? 1 : 0, (int)(wait > 50 ? 50 : wait < 1 ? 1 : wait));
        pthread_mutex_lock(&mu);
    }
    if (!c->busy)
        return NULL;
    if (c->broken != BRK_NONE)
        sim_apply_break_locked(c);
    drain_fd(c);
    if (c->results) {
        struct pending *p = c->results;
        c->results = p->next;
        PGresult *r = p->res;
        free(p);
        return r;
    }
    c->busy = 0;
    if (c->die_after) {
        c->die_after = 0;
        c->broken = BRK_EOF;
        sim_lose_backend_locked(c);
        snprintf(c->errmsg, sizeof c->errmsg, "%s", EOF_MSG);
        c->status = CONNECTION_BAD;
        c->tx = PQTRANS_UNKNOWN;
        if (c->fd >= 0)
            close(c->fd);
        c->fd = -1;
    }
    return NULL;
}

/* ---- Query functions
 * ------------------------------------------------------------------------------ */

static const char *status_name(ExecStatusType s)
{
    switch (s) {
    case PGRES_EMPTY_QUERY:
        return "PGRES_EMPTY_QUERY";
    case PGRES_COMMAND_OK:
        return "PGRES_COMMAND_OK";
    case PGRES_TUPLES_OK:
        return "PGRES_TUPLES_OK";
    case PGRES_FATAL_ERROR:
        return "PGRES_FATAL_ERROR";
    case PGRES_NONFATAL_ERROR:
        return "PGRES_NONFATAL_ERROR";
    default:
        return "PGRES_other";
    }
}

/* Passthrough: applies a call fault before forwarding. Returns 1 if the
 * call must fail (errmsg set), 2 if an error result was queued, 0 to
 * forward. The mutex is held. */
static int real_call_fault_locked(PGconn *c, const char *fn, int is_query)
{
    struct rule *r = call_rule_locked(fn);
    if (is_query) {
        long qn = ++counters.queries;
        for (struct rule *q = rules; q; q = q->next) {
            if (q->kind == R_QUERY_DELAY && rule_applies(q, qn)) {
                counters.faults_fired++;
                int d = q->delay_ms;
                pthread_mutex_unlock(&mu);
                sleep_ms(d);
                pthread_mutex_lock(&mu);
                break;
            }
        }
    }
    if (!r)
        return 0;
    if (r->kind == R_CALL_FAIL) {
        snprintf(c->override_err, sizeof c->override_err, "fakepq: injected failure of %s\n", fn);
        return 1;
    }
    int fatal = sqlstate_fatal(r->sqlstate);
    PGresult *e = error_result_locked(fatal ? "FATAL" : "ERROR", r->sqlstate,
                                      r->has_message ? r->message : sqlstate_text(r->sqlstate),
                                      NULL, c->verbosity, fn);
    if (e)
        pending_push_locked(c, e);
    c->busy = 1;
    if (fatal) {
        /* The session really ends, as it would after a FATAL. */
        break_one_locked(c, FAKEPQ_BREAK_EOF);
        c->die_after = 2;
    }
    return 2;
}

PGresult *PQexec(PGconn *c, const char *sql)
{
    if (!c)
        return NULL;
    pthread_mutex_lock(&mu);
    if (c->kind == CONN_REAL) {
        int f = real_call_fault_locked(c, "PQexec", 1);
        if (f) {
            PGresult *r = NULL;
            if (f == 2 && c->results) {
                struct pending *p = c->results;
                c->results = p->next;
                r = p->res;
                free(p);
            }
            c->busy = 0;
            trace_locked("PQexec", c->id, "%s", r ? "injected error" : "NULL (injected)");
            pthread_mutex_unlock(&mu);
            return r;
        }
        c->override_err[0] = '\0';
        pthread_mutex_unlock(&mu);
        PGresult *r = wrap_result(real.PQexec(c->real, sql), "PQexec");
        TRACE("PQexec", c, "%s", r ? status_name(real.PQresultStatus(r->real)) : "NULL");
        return r;
    }
    if (!sim_send_locked(c, "PQexec", sql)) {
        trace_locked("PQexec", c->id, "NULL");
        pthread_mutex_unlock(&mu);
        return NULL;
    }
    PGresult *last = NULL, *r;
    while ((r = sim_get_result_locked(c)) != NULL) {
        if (last)
            result_free_locked(last);
        last = r;
    }
    last = last ? last : NULL;
    if (last)
        last->creator = "PQexec";
    trace_locked("PQexec", c->id, "%s", last ? status_name(last->status) : "NULL");
    pthread_mutex_unlock(&mu);
    return last;
}

PGresult *PQexecParams(PGconn *c, const char *sql, int n, const Oid *types,
                       const char *const *values, const int *lengths, const int *formats,
                       int result_format)
{
    if (!c)
        return NULL;
    if (c->kind == CONN_REAL) {
        pthread_mutex_lock(&mu);
        int f = real_call_fault_locked(c, "PQexecParams", 1);
        PGresult *r = NULL;
        if (f == 2 && c->results) {
            struct pending *p = c->results;
            c->results = p->next;
            r = p->res;
            free(p);
        }
        if (f)
            c->busy = 0;
        pthread_mutex_unlock(&mu);
        if (f)
            return r;
        return wrap_result(
            real.PQexecParams(c->real, sql, n, types, values, lengths, formats, result_format),
            "PQexecParams");
    }
    return PQexec(c, sql);
}

int PQsendQuery(PGconn *c, const char *sql)
{
    if (!c)
        return 0;
    pthread_mutex_lock(&mu);
    int ok;
    if (c->kind == CONN_REAL) {
        int f = real_call_fault_locked(c, "PQsendQuery", 1);
        if (f) {
            ok = f == 2;
        } else {
            c->override_err[0] = '\0';
            pthread_mutex_unlock(&mu);
            ok = real.PQsendQuery(c->real, sql);
            pthread_mutex_lock(&mu);
        }
    } else {
        ok = sim_send_locked(c, "PQsendQuery", sql);
    }
    trace_locked("PQsendQuery", c->id, "%d", ok);
    pthread_mutex_unlock(&mu);
    return ok;
}

int PQsendQueryParams(PGconn *c, const char *sql, int n, const Oid *types,
                      const char *const *values, const int *lengths, const int *formats,
                      int result_format)
{
    if (!c)
        return 0;
    if (c->kind == CONN_REAL) {
        pthread_mutex_lock(&mu);
        int f = real_call_fault_locked(c, "PQsendQueryParams", 1);
        pthread_mutex_unlock(&mu);
        if (f)
            return f == 2;
        return real.PQsendQueryParams(c->real, sql, n, types, values, lengths, formats,
                                      result_format);
    }
    return PQsendQuery(c, sql);
}

PGresult *PQgetResult(PGconn *c)
{
    if (!c)
        return NULL;
    pthread_mutex_lock(&mu);
    PGresult *r = NULL;
    struct rule *rule = call_rule_locked("PQgetResult");
    if (c->kind == CONN_REAL) {
        if (c->busy) {
            /* Injected results first. */
            if (c->results) {
                struct pending *p = c->results;
                c->results = p->next;
                r = p->res;
                free(p);
            } else {
                c->busy = 0;
            }
            trace_locked("PQgetResult", c->id, "%s", r ? "injected" : "NULL");
            pthread_mutex_unlock(&mu);
            return r;
        }
        if (rule && rule->kind == R_CALL_ERROR) {
            int fatal = sqlstate_fatal(rule->sqlstate);
            r = error_result_locked(fatal ? "FATAL" : "ERROR", rule->sqlstate,
                                    rule->has_message ? rule->message
                                                      : sqlstate_text(rule->sqlstate),
                                    NULL, c->verbosity, "PQgetResult");
            if (fatal) {
                break_one_locked(c, FAKEPQ_BREAK_EOF);
                c->die_after = 2;
            }
            /* Drain the real result the server sent, then report ours. */
            pthread_mutex_unlock(&mu);
            PGresult *x;
            while ((x = real.PQgetResult(c->real)) != NULL)
                real.PQclear(x);
            TRACE("PQgetResult", c, "injected %s", rule->sqlstate);
            return r;
        }
        pthread_mutex_unlock(&mu);
        r = wrap_result(real.PQgetResult(c->real), "PQgetResult");
        TRACE("PQgetResult", c, "%s", r ? status_name(real.PQresultStatus(r->real)) : "NULL");
        return r;
    }
    if (rule && rule->kind == R_CALL_ERROR && c->busy) {
        /* Replace what the query would have produced. */
        pending_clear_locked(c);
        int fatal = sqlstate_fatal(rule->sqlstate);
        r = error_result_locked(fatal ? "FATAL" : "ERROR", rule->sqlstate,
                                rule->has_message ? rule->message : sqlstate_text(rule->sqlstate),
                                NULL, c->verbosity, "PQgetResult");
        if (fatal)
            c->die_after = 1;
        else if (c->tx == PQTRANS_INTRANS)
            c->tx = PQTRANS_INERROR;
        c->result_at = 0;
        trace_locked("PQgetResult", c->id, "injected %s", rule->sqlstate);
        pthread_mutex_unlock(&mu);
        return r;
    }
    sim_parse_locked(c);
    r = sim_get_result_locked(c);
    if (r)
        r->creator = "PQgetResult";
    trace_locked("PQgetResult", c->id, "%s", r ? status_name(r->status) : "NULL");
    pthread_mutex_unlock(&mu);
    return r;
}

int PQconsumeInput(PGconn *c)
{
    if (!c)
        return 0;
    pthread_mutex_lock(&mu);
    struct rule *rule = call_rule_locked("PQconsumeInput");
    int ok;
    if (rule && rule->kind == R_CALL_FAIL) {
        snprintf(c->kind == CONN_REAL ? c->override_err : c->errmsg,
                 c->kind == CONN_REAL ? sizeof c->override_err : sizeof c->errmsg,
                 "fakepq: injected failure of PQconsumeInput\n");
        ok = 0;
    } else if (c->kind == CONN_REAL) {
        if (c->busy) {
            ok = 1;
        } else {
            pthread_mutex_unlock(&mu);
            ok = real.PQconsumeInput(c->real);
            pthread_mutex_lock(&mu);
        }
    } else if (c->status != CONNECTION_OK) {
        ok = 0;
    } else if (c->broken != BRK_NONE) {
        ok = !sim_apply_break_locked(c);
    } else {
        drain_fd(c);
        if (c->busy && sim_ready_locked(c))
            c->result_read = 1;
        ok = 1;
    }
    trace_locked("PQconsumeInput", c->id, "%d", ok);
    pthread_mutex_unlock(&mu);
    return ok;
}

int PQisBusy(PGconn *c)
{
    if (!c)
        return 0;
    pthread_mutex_lock(&mu);
    int busy;
    if (c->kind == CONN_REAL) {
        if (c->busy) {
            busy = 0;
        } else {
            pthread_mutex_unlock(&mu);
            busy = real.PQisBusy(c->real);
            pthread_mutex_lock(&mu);
        }
    } else {
        sim_parse_locked(c);
        if (c->broken != BRK_NONE && c->busy)
            sim_apply_break_locked(c);
        /* Arrived is not enough: libpq reports a result only once
         * PQconsumeInput has read it off the socket. */
        busy = c->busy && !(sim_ready_locked(c) && (c->result_read || c->broken != BRK_NONE));
    }
    pthread_mutex_unlock(&mu);
    return busy;
}

int PQflush(PGconn *c)
{
    if (!c)
        return -1;
    pthread_mutex_lock(&mu);
    struct rule *rule = call_rule_locked("PQflush");
    pthread_mutex_unlock(&mu);
    if (rule && rule->kind == R_CALL_FAIL)
        return -1;
    if (c->kind == CONN_REAL)
        return real.PQflush(c->real);
    return 0;
}

int PQsetnonblocking(PGconn *c, int arg)
{
    if (!c)
        return -1;
    pthread_mutex_lock(&mu);
    struct rule *r = call_rule_locked("PQsetnonblocking");
    if (r && r->kind == R_CALL_FAIL) {
        /* libpq fails this only when it cannot flush pending output. */
        snprintf(c->kind == CONN_REAL ? c->override_err : c->errmsg,
                 c->kind == CONN_REAL ? sizeof c->override_err : sizeof c->errmsg,
                 "fakepq: injected failure of PQsetnonblocking\n");
        trace_locked("PQsetnonblocking", c->id, "-1 (injected)");
        pthread_mutex_unlock(&mu);
        return -1;
    }
    pthread_mutex_unlock(&mu);
    TRACE("PQsetnonblocking", c, "%d", arg);
    if (c->kind == CONN_REAL)
        return real.PQsetnonblocking(c->real, arg);
    c->nonblocking = arg;
    return 0;
}

int PQisnonblocking(const PGconn *c)
{
    if (!c)
        return 0;
    if (c->kind == CONN_REAL)
        return real.PQisnonblocking(c->real);
    return c->nonblocking;
}

/* ---- Results
 * ------------------------------------------------------------------------------------------ */

ExecStatusType PQresultStatus(const PGresult *r)
{
    if (!r)
        return PGRES_FATAL_ERROR;
    return r->real ? real.PQresultStatus(r->real) : r->status;
}

char *PQresStatus(ExecStatusType s)
{
    static char *const names[] = {
        "PGRES_EMPTY_QUERY",    "PGRES_COMMAND_OK",    "PGRES_TUPLES_OK",
        "PGRES_COPY_OUT",       "PGRES_COPY_IN",       "PGRES_BAD_RESPONSE",
        "PGRES_NONFATAL_ERROR", "PGRES_FATAL_ERROR",   "PGRES_COPY_BOTH",
        "PGRES_SINGLE_TUPLE",   "PGRES_PIPELINE_SYNC", "PGRES_PIPELINE_ABORTED"};
    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "invalid ExecStatusType code";
}

char *PQresultErrorField(const PGresult *r, int code)
{
    if (!r)
        return NULL;
    if (r->real)
        return real.PQresultErrorField(r->real, code);
    switch (code) {
    case PG_DIAG_SEVERITY:
    case PG_DIAG_SEVERITY_NONLOCALIZED:
        return r->severity[0] ? (char *)r->severity : NULL;
    case PG_DIAG_SQLSTATE:
        return r->sqlstate[0] ? (char *)r->sqlstate : NULL;
    case PG_DIAG_MESSAGE_PRIMARY:
        return r->primary;
    default:
        return NULL;
    }
}

char *PQresultErrorMessage(const PGresult *r)
{
    if (!r)
        return "";
    return r->real ? real.PQresultErrorMessage(r->real) : r->message ? r->message : "";
}

int PQntuples(const PGresult *r)
{
    return !r ? 0 : r->real ? real.PQntuples(r->real) : r->ntuples;
}

int PQnfields(const PGresult *r)
{
    return !r ? 0 : r->real ? real.PQnfields(r->real) : r->nfields;
}

char *PQfname(const PGresult *r, int f)
{
    if (!r)
        return NULL;
    if (r->real)
        return real.PQfname(r->real, f);
    return f >= 0 && f < r->nfields ? (char *)r->fname[f] : NULL;
}

char *PQgetvalue(const PGresult *r, int row, int f)
{
    if (!r)
        return NULL;
    if (r->real)
        return real.PQgetvalue(r->real, row, f);
    if (row < 0 || row >= r->ntuples || f < 0 || f >= r->nfields)
        return NULL;
    return r->values[f];
}

int PQgetisnull(const PGresult *r, int row, int f)
{
    if (!r)
        return 1;
    if (r->real)
        return real.PQgetisnull(r->real, row, f);
    return !(row >= 0 && row < r->ntuples && f >= 0 && f < r->nfields && r->values[f]);
}

int PQgetlength(const PGresult *r, int row, int f)
{
    if (!r)
        return 0;
    if (r->real)
        return real.PQgetlength(r->real, row, f);
    char *v = PQgetvalue(r, row, f);
    return v ? (int)strlen(v) : 0;
}

char *PQcmdStatus(PGresult *r)
{
    if (!r)
        return NULL;
    return r->real ? real.PQcmdStatus(r->real) : r->cmd;
}

char *PQcmdTuples(PGresult *r)
{
    if (!r)
        return "";
    if (r->real)
        return real.PQcmdTuples(r->real);
    return r->status == PGRES_TUPLES_OK ? "1" : "";
}

void PQclear(PGresult *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&mu);
    int live = 0;
    for (PGresult *x = results; x; x = x->next)
        if (x == r)
            live = 1;
    if (!live) {
        trace_locked("PQclear", 0, "not a live PGresult (double clear?)");
        pthread_mutex_unlock(&mu);
        return;
    }
    PGresult *realres = r->real;
    result_free_locked(r);
    pthread_mutex_unlock(&mu);
    if (realres)
        real.PQclear(realres);
}

/* ---- Connection facts
 * --------------------------------------------------------------------------------- */

PGTransactionStatusType PQtransactionStatus(const PGconn *c)
{
    if (!c)
        return PQTRANS_UNKNOWN;
    if (c->kind == CONN_REAL)
        return c->die_after == 2 ? PQTRANS_UNKNOWN : real.PQtransactionStatus(c->real);
    if (c->status != CONNECTION_OK)
        return PQTRANS_UNKNOWN;
    return c->busy ? PQTRANS_ACTIVE : c->tx;
}

const char *PQparameterStatus(const PGconn *c, const char *name)
{
    if (!c || !name)
        return NULL;
    if (c->kind == CONN_REAL)
        return real.PQparameterStatus(c->real, name);
    if (c->status != CONNECTION_OK)
        return NULL;
    static const char *const table[][2] = {
        {"server_version", "15.18 (Debian 15.18-0+deb12u1)"},
        {"server_encoding", "UTF8"},
        {"client_encoding", "UTF8"},
        {"integer_datetimes", "on"},
        {"standard_conforming_strings", "on"},
        {"TimeZone", "Etc/UTC"},
        {"DateStyle", "ISO, MDY"},
        {"IntervalStyle", "postgres"},
        {"is_superuser", "off"},
        {"default_transaction_read_only", "off"},
        {"in_hot_standby", "off"},
    };
    if (strcmp(name, "application_name") == 0)
        return c->appname;
    if (strcmp(name, "session_authorization") == 0)
        return c->user;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(table[i][0], name) == 0)
            return table[i][1];
    return NULL;
}

int PQserverVersion(const PGconn *c)
{
    if (!c)
        return 0;
    if (c->kind == CONN_REAL)
        return real.PQserverVersion(c->real);
    return c->status == CONNECTION_OK ? 150018 : 0;
}

int PQprotocolVersion(const PGconn *c)
{
    if (!c)
        return 0;
    if (c->kind == CONN_REAL)
        return real.PQprotocolVersion(c->real);
    return c->status == CONNECTION_BAD ? 0 : 3;
}

int PQbackendPID(const PGconn *c)
{
    if (!c)
        return 0;
    if (c->kind == CONN_REAL)
        return real.PQbackendPID(c->real);
    return c->status == CONNECTION_OK ? c->pid : 0;
}

int PQconnectionUsedPassword(const PGconn *c)
{
    if (!c)
        return 0;
    if (c->kind == CONN_REAL)
        return real.PQconnectionUsedPassword(c->real);
    return c->used_password;
}

#define SIM_FIELD(fn, field)                                                                       \
    char *fn(const PGconn *c)                                                                      \
    {                                                                                              \
        if (!c)                                                                                    \
            return NULL;                                                                           \
        if (c->kind == CONN_REAL)                                                                  \
            return real.fn(c->real);                                                               \
        return (char *)c->field;                                                                   \
    }
SIM_FIELD(PQdb, dbname)
SIM_FIELD(PQuser, user)
SIM_FIELD(PQhost, host)
SIM_FIELD(PQport, port)
SIM_FIELD(PQpass, password)

/* ---- Pings, cancel, conninfo, misc
 * --------------------------------------------------------------- */

static PGPing ping_fault(int fault)
{
    switch (fault) {
    case FAKEPQ_CONNECT_REFUSED:
    case FAKEPQ_CONNECT_HANG:
        return PQPING_NO_RESPONSE;
    case FAKEPQ_CONNECT_STARTING_UP:
        return PQPING_REJECT;
    default:
        return PQPING_OK; /* the server answered, whatever it thought of us */
    }
}

PGPing PQpingParams(const char *const *keys, const char *const *vals, int expand)
{
    need_real();
    pthread_mutex_lock(&mu);
    int delay = 0;
    int fault = connect_rule_locked(&delay);
    struct rule *r = call_rule_locked("PQpingParams");
    trace_locked("PQpingParams", 0, "attempt %ld", counters.connect_attempts);
    enum fakepq_mode m = mode;
    pthread_mutex_unlock(&mu);
    if (r && r->kind == R_CALL_FAIL)
        return PQPING_NO_ATTEMPT;
    if (fault >= 0)
        return ping_fault(fault);
    if (m == FAKEPQ_PASSTHROUGH)
        return real.PQpingParams(keys, vals, expand);
    return PQPING_OK;
}

PGPing PQping(const char *conninfo)
{
    const char *keys[] = {"dbname", NULL};
    const char *vals[] = {conninfo, NULL};
    return PQpingParams(keys, vals, 1);
}

PGcancel *PQgetCancel(PGconn *c)
{
    if (!c)
        return NULL;
    PGcancel *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    k->conn_id = c->id;
    TRACE("PQgetCancel", c, "ok");
    if (c->kind == CONN_REAL) {
        k->real = real.PQgetCancel(c->real);
        if (!k->real) {
            free(k);
            return NULL;
        }
    } else if (c->status != CONNECTION_OK) {
        free(k);
        return NULL;
    }
    return k;
}

int PQcancel(PGcancel *k, char *errbuf, int errbufsize)
{
    if (!k)
        return 0;
    if (k->real)
        return real.PQcancel(k->real, errbuf, errbufsize);
    pthread_mutex_lock(&mu);
    struct rule *r = call_rule_locked("PQcancel");
    PGconn *c = find_conn_locked(k->conn_id);
    int ok = 1;
    if (r && r->kind == R_CALL_FAIL) {
        ok = 0;
        if (errbuf && errbufsize > 0)
            snprintf(errbuf, (size_t)errbufsize, "fakepq: injected failure of PQcancel\n");
    } else if (c && c->busy && c->broken == BRK_NONE) {
        /* The running statement ends with 57014; the rest is dropped. */
        pending_clear_locked(c);
        PGresult *e = error_result_locked("ERROR", "57014", sqlstate_text("57014"), NULL,
                                          c->verbosity, "PQgetResult");
        if (e)
            pending_push_locked(c, e);
        if (c->tx == PQTRANS_INTRANS)
            c->tx = PQTRANS_INERROR;
        c->result_at = now_ms();
        c->result_read = 0;
        if (!c->partitioned)
            srv_send(c);
    }
    trace_locked("PQcancel", k->conn_id, "%d", ok);
    pthread_mutex_unlock(&mu);
    return ok;
}

void PQfreeCancel(PGcancel *k)
{
    if (!k)
        return;
    if (k->real)
        real.PQfreeCancel(k->real);
    free(k);
}

PQconninfoOption *PQconninfoParse(const char *conninfo, char **errmsg)
{
    need_real();
    return real.PQconninfoParse(conninfo, errmsg);
}

void PQconninfoFree(PQconninfoOption *o)
{
    need_real();
    real.PQconninfoFree(o);
}

void PQfreemem(void *p)
{
    free(p);
}

int PQlibVersion(void)
{
    need_real();
    return real.PQlibVersion();
}

static char *sim_quote(const char *s, size_t len, char q)
{
    char *out = malloc(len * 2 + 4), *w = out;
    if (!out)
        return NULL;
    *w++ = q;
    for (size_t i = 0; i < len && s[i]; i++) {
        if (s[i] == q)
            *w++ = q;
        *w++ = s[i];
    }
    *w++ = q;
    *w = '\0';
    return out;
}

char *PQescapeLiteral(PGconn *c, const char *s, size_t len)
{
    if (c && c->kind == CONN_REAL)
        return real.PQescapeLiteral(c->real, s, len);
    return sim_quote(s, len, '\'');
}

char *PQescapeIdentifier(PGconn *c, const char *s, size_t len)
{
    if (c && c->kind == CONN_REAL)
        return real.PQescapeIdentifier(c->real, s, len);
    return sim_quote(s, len, '"');
}

/* Passthrough notices arrive as real PGresults: wrap them for the caller's
 * receiver, which uses fakepq's accessors. */
static void notice_trampoline(void *arg, const PGresult *realres)
{
    PGconn *c = arg;
    struct pg_result tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.real = (PGresult *)realres;
    if (c->notice_rx)
        c->notice_rx(c->notice_rx_arg, &tmp);
}

PQnoticeReceiver PQsetNoticeReceiver(PGconn *c, PQnoticeReceiver fn, void *arg)
{
    if (!c)
        return NULL;
    PQnoticeReceiver old = c->notice_rx;
    TRACE("PQsetNoticeReceiver", c, "set");
    c->notice_rx = fn;
    c->notice_rx_arg = arg;
    if (c->kind == CONN_REAL && fn)
        real.PQsetNoticeReceiver(c->real, notice_trampoline, c);
    return old;
}

PQnoticeProcessor PQsetNoticeProcessor(PGconn *c, PQnoticeProcessor fn, void *arg)
{
    if (!c)
        return NULL;
    PQnoticeProcessor old = c->notice_proc;
    c->notice_proc = fn;
    c->notice_proc_arg = arg;
    if (c->kind == CONN_REAL)
        return real.PQsetNoticeProcessor(c->real, fn, arg);
    return old;
}

PGnotify *PQnotifies(PGconn *c)
{
    /* PGnotify is a public struct freed with PQfreemem (free), so real
     * ones pass through as they are; the simulated server sends none. */
    if (!c)
        return NULL;
    if (c->kind == CONN_REAL)
        return real.PQnotifies(c->real);
    pthread_mutex_lock(&mu);
    sim_parse_locked(c);
    pthread_mutex_unlock(&mu);
    return NULL;
}

PGpipelineStatus PQpipelineStatus(const PGconn *c)
{
    if (c && c->kind == CONN_REAL)
        return real.PQpipelineStatus(c->real);
    return PQ_PIPELINE_OFF;
}
