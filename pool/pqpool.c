/*
 * pqpool: a resilient libpq connection pool (see pqpool.h for the contract).
 *
 * Structure. One mutex guards all pool state; it is never held across a
 * call that can touch the network. A connection is always in exactly one
 * state (idle, being checked out, in use, being released, being checked by
 * housekeeping); only the idle state is shared, every other state belongs
 * to one thread, which may therefore do I/O on the PGconn without the
 * mutex.
 *
 * Waiting. Each acquire that cannot be served at once queues a waiter
 * (on its own stack) ordered by arrival ticket, with its own condition
 * variable and deadline. Whenever a connection becomes idle or a slot
 * frees up, dispatch_locked() hands the connection (or the right to open a
 * new one) directly to the oldest waiter that can use it and signals that
 * waiter alone: there is no thundering herd, no barging past the queue and
 * no lost wakeup, because the hand-over is recorded in the waiter under
 * the mutex before it is signalled.
 *
 * Connecting. PQconnectStartParams + PQconnectPoll, polled against the
 * pool's CLOCK_MONOTONIC deadline. PQERRORS_VERBOSE makes libpq put the
 * SQLSTATE into the connection error message ("FATAL:  28P01: ..."), which
 * is how failures are classified without reading localized text.
 */
#include "pqpool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MSG_MAX 1024
#define PING_SQL "SELECT 1"

enum pc_state {
    PC_IDLE,      /* in the idle list */
    PC_CHECKOUT,  /* handed to an acquire that is checking it */
    PC_INUSE,     /* owned by the caller */
    PC_RELEASING, /* being cleaned by pqpool_release */
    PC_CHECKING,  /* being checked by housekeeping */
};

struct pconn {
    struct pconn *next, *prev;   /* all connections */
    struct pconn *inext, *iprev; /* idle list, most recently used first */
    PGconn *conn;
    struct pqpool *pool;
    unsigned long id;
    enum pc_state state;
    int64_t created_ms;
    int64_t idle_since_ms;
    int64_t expires_ms; /* INT64_MAX if no max lifetime */
    int broken;         /* atomic: a fatal SQLSTATE or notice was seen */
    int eject_reason;   /* while queued for finishing by housekeeping */
};

struct waiter {
    struct waiter *next, *prev;
    pthread_cond_t cond;
    uint64_t ticket;
    int64_t retry_at;   /* backoff: no new connect by this waiter before */
    struct pconn *conn; /* a connection handed over by dispatch */
    int granted;        /* a connect slot reserved for it by dispatch */
    int queued;
};

/* A copy of the lockout state taken under the mutex. */
struct lockview {
    enum pqpool_fail_class cls; /* NONE: not locked out */
    uint64_t pw_hash;
    int pw_null;
};

/* The outcome of one connect attempt. */
struct attempt {
    enum pqpool_fail_class cls; /* NONE on success */
    int contacted;              /* libpq was asked to connect */
    int locked;                 /* refused by the lockout without contacting the server */
    char sqlstate[6];
    char msg[MSG_MAX];
    int64_t elapsed_ms;
    uint64_t pw_hash;
    int pw_null;
};

struct pqpool {
    pthread_mutex_t mu;
    pthread_condattr_t condattr;
    struct pqpool_config cfg; /* strings point to the copies below */
    char *conninfo, *appname, *init_sql;

    struct pconn *all;
    struct pconn *idle_head, *idle_tail;
    int n_idle, n_inuse, n_connecting, n_refilling;
    struct waiter *wq_head, *wq_tail;
    int n_waiting;
    uint64_t next_ticket;
    unsigned long next_id;
    int closed;

    /* Lockout after an auth or config failure. */
    enum pqpool_fail_class lock_cls;
    int64_t lock_until;
    uint64_t lock_pw_hash;
    int lock_pw_null;
    char lock_msg[MSG_MAX];

    /* Backoff of housekeeping refills. */
    int64_t refill_retry_at;
    int refill_step;

    uint64_t rng;
    char last_error[MSG_MAX];
    struct pqpool_stats st;
    long long connect_attempts; /* atomic; copied into stats */

    pthread_t hk;
    int hk_started;
    pthread_cond_t hk_cond;
};

/* ---- Small helpers --------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void ms_to_timespec(int64_t ms, struct timespec *ts)
{
    ts->tv_sec = ms / 1000;
    ts->tv_nsec = (ms % 1000) * 1000000;
}

__attribute__((format(printf, 3, 4))) static void fmt(char *buf, size_t len, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, len, f, ap);
    va_end(ap);
}

/* Copies a libpq message without its trailing newline(s) and without the
 * source-code LOCATION lines that PQERRORS_VERBOSE adds. */
static void copy_msg(char *dst, size_t len, const char *src)
{
    size_t n;
    char *loc;
    if (!src)
        src = "";
    snprintf(dst, len, "%s", src);
    while ((loc = strstr(dst, "\nLOCATION:  ")) != NULL) {
        char *eol = strchr(loc + 1, '\n');
        if (eol)
            memmove(loc, eol, strlen(eol) + 1);
        else
            *loc = '\0';
    }
    n = strlen(dst);
    while (n > 0 && (dst[n - 1] == '\n' || dst[n - 1] == '\r'))
        dst[--n] = '\0';
}

static char *dup_or_null(const char *s, int *oom)
{
    char *d;
    if (!s)
        return NULL;
    d = strdup(s);
    if (!d)
        *oom = 1;
    return d;
}

/* FNV-1a: only used to notice that the password changed, not for secrecy. */
static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

/* xorshift64*, per pool, under the mutex: jitter only. */
static uint64_t rand_locked(struct pqpool *p)
{
    p->rng ^= p->rng >> 12;
    p->rng ^= p->rng << 25;
    p->rng ^= p->rng >> 27;
    return p->rng * 2685821657736338717ULL;
}

/* The next backoff step (doubling from the initial value, capped) and a
 * jittered delay drawn from [step/2, step]. */
static int64_t backoff_locked(struct pqpool *p, int *step)
{
    int s = *step;
    if (s <= 0)
        s = p->cfg.backoff_initial_ms;
    else if (s < p->cfg.backoff_max_ms / 2)
        s *= 2;
    else
        s = p->cfg.backoff_max_ms;
    if (s < 1)
        s = 1;
    *step = s;
    return s / 2 + (int64_t)(rand_locked(p) % (uint64_t)(s - s / 2 + 1));
}

/* Waits for events on fd. Returns 1 if ready (or error/hangup, which the
 * following libpq call reports), 0 on timeout or EINTR, -1 if fd is bad. */
static int wait_fd(int fd, short events, int64_t timeout_ms)
{
    struct pollfd pfd = {.fd = fd, .events = events};
    int r;
    if (fd < 0)
        return -1;
    if (timeout_ms > 1000000)
        timeout_ms = 1000000;
    if (timeout_ms < 0)
        timeout_ms = 0;
    r = poll(&pfd, 1, (int)timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : -1;
    if (r == 0)
        return 0;
    if (pfd.revents & POLLNVAL)
        return -1;
    return 1;
}

static int sqlstate_is_fatal(const char *s)
{
    if (!s)
        return 0;
    return strncmp(s, "08", 2) == 0 || strcmp(s, "57P01") == 0 || strcmp(s, "57P02") == 0 ||
           strcmp(s, "57P03") == 0;
}

static int is_sqlstate_char(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z');
}

/*
 * Classifies a connection error message written with PQERRORS_VERBOSE.
 * libpq formats each server error as "SEVERITY:  SQLSTATE: text"; the
 * severity may be translated but the two spaces and the five-character
 * code are not, so the code is found by shape. A multi-host message holds
 * one error per host: credentials outrank a missing database, which
 * outranks anything transient.
 */
static enum pqpool_fail_class classify_msg(const char *msg, char sqlstate[6])
{
    enum pqpool_fail_class best = PQPOOL_FAIL_NETWORK;
    const char *s;
    int rank = 0;

    sqlstate[0] = '\0';
    for (s = msg; s && (s = strstr(s, ":  ")) != NULL; s++) {
        const char *c = s + 3;
        int i, r;
        enum pqpool_fail_class cls;
        for (i = 0; i < 5 && is_sqlstate_char(c[i]); i++)
            ;
        if (i < 5 || c[5] != ':')
            continue;
        if (strncmp(c, "28", 2) == 0) {
            cls = PQPOOL_FAIL_AUTH;
            r = 3;
        } else if (strncmp(c, "3D000", 5) == 0) {
            cls = PQPOOL_FAIL_CONFIG;
            r = 2;
        } else {
            cls = PQPOOL_FAIL_SERVER;
            r = 1;
        }
        if (r > rank) {
            rank = r;
            best = cls;
            memcpy(sqlstate, c, 5);
            sqlstate[5] = '\0';
        }
    }
    return best;
}

/* ---- Events ------------------------------------------------------------------ */

/* pc may be given only while this thread owns it; for a connection that
 * is already back in the idle list pass conn and id copied under the
 * mutex instead (another thread may have taken and freed it since). */
static void emit_id(struct pqpool *p, enum pqpool_event_type type, PGconn *conn, unsigned long id,
                    int reason_or_class, const char *sqlstate, const char *message,
                    int64_t elapsed_ms, int error)
{
    struct pqpool_event ev;
    if (!p->cfg.event)
        return;
    memset(&ev, 0, sizeof ev);
    ev.type = type;
    ev.conn = conn;
    ev.conn_id = id;
    if (type == PQPOOL_EV_EJECTED)
        ev.reason = (enum pqpool_eject_reason)reason_or_class;
    else
        ev.fail_class = (enum pqpool_fail_class)reason_or_class;
    if (sqlstate)
        snprintf(ev.sqlstate, sizeof ev.sqlstate, "%s", sqlstate);
    ev.message = message ? message : "";
    ev.elapsed_ms = elapsed_ms;
    ev.error = error;
    p->cfg.event(p->cfg.event_ctx, &ev);
}

static void emit(struct pqpool *p, enum pqpool_event_type type, const struct pconn *pc,
                 PGconn *conn, int reason_or_class, const char *sqlstate, const char *message,
                 int64_t elapsed_ms, int error)
{
    emit_id(p, type, pc ? pc->conn : conn, pc ? pc->id : 0, reason_or_class, sqlstate, message,
            elapsed_ms, error);
}

static void set_last_error_locked(struct pqpool *p, const char *msg)
{
    copy_msg(p->last_error, sizeof p->last_error, msg);
}

/* ---- Lists (mutex held) ------------------------------------------------------- */

static void link_all(struct pqpool *p, struct pconn *pc)
{
    pc->prev = NULL;
    pc->next = p->all;
    if (p->all)
        p->all->prev = pc;
    p->all = pc;
}

static void unlink_all(struct pqpool *p, struct pconn *pc)
{
    if (pc->prev)
        pc->prev->next = pc->next;
    else
        p->all = pc->next;
    if (pc->next)
        pc->next->prev = pc->prev;
    pc->next = pc->prev = NULL;
}

static void idle_push_front(struct pqpool *p, struct pconn *pc)
{
    pc->iprev = NULL;
    pc->inext = p->idle_head;
    if (p->idle_head)
        p->idle_head->iprev = pc;
    else
        p->idle_tail = pc;
    p->idle_head = pc;
    pc->state = PC_IDLE;
    p->n_idle++;
}

static void idle_push_back(struct pqpool *p, struct pconn *pc)
{
    pc->inext = NULL;
    pc->iprev = p->idle_tail;
    if (p->idle_tail)
        p->idle_tail->inext = pc;
    else
        p->idle_head = pc;
    p->idle_tail = pc;
    pc->state = PC_IDLE;
    p->n_idle++;
}

static void idle_remove(struct pqpool *p, struct pconn *pc)
{
    if (pc->iprev)
        pc->iprev->inext = pc->inext;
    else
        p->idle_head = pc->inext;
    if (pc->inext)
        pc->inext->iprev = pc->iprev;
    else
        p->idle_tail = pc->iprev;
    pc->inext = pc->iprev = NULL;
    p->n_idle--;
}

static struct pconn *find_locked(struct pqpool *p, const PGconn *conn)
{
    struct pconn *pc;
    for (pc = p->all; pc; pc = pc->next)
        if (pc->conn == conn)
            return pc;
    return NULL;
}

static void enqueue_locked(struct pqpool *p, struct waiter *w)
{
    struct waiter *after = p->wq_tail;
    /* Keep arrival order: a waiter that leaves the queue to connect and
     * comes back keeps its place. */
    while (after && after->ticket > w->ticket)
        after = after->prev;
    w->prev = after;
    w->next = after ? after->next : p->wq_head;
    if (w->next)
        w->next->prev = w;
    else
        p->wq_tail = w;
    if (after)
        after->next = w;
    else
        p->wq_head = w;
    w->queued = 1;
    p->n_waiting++;
}

static void dequeue_locked(struct pqpool *p, struct waiter *w)
{
    if (!w->queued)
        return;
    if (w->prev)
        w->prev->next = w->next;
    else
        p->wq_head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        p->wq_tail = w->prev;
    w->next = w->prev = NULL;
    w->queued = 0;
    p->n_waiting--;
}

static int capacity_locked(const struct pqpool *p)
{
    return p->n_idle + p->n_inuse + p->n_connecting < p->cfg.max_size;
}

/* Whether a queued waiter other than w, older than w, could take what w
 * wants: any idle connection (ready == 0) or a connect slot (ready == 1,
 * only waiters not backing off). */
static int older_waiter_locked(const struct pqpool *p, const struct waiter *w, int ready,
                               int64_t now)
{
    const struct waiter *q;
    for (q = p->wq_head; q && q->ticket < w->ticket; q = q->next)
        if (q != w && (!ready || q->retry_at <= now))
            return 1;
    return 0;
}

static struct pconn *idle_pop_locked(struct pqpool *p)
{
    struct pconn *pc = p->idle_head;
    idle_remove(p, pc);
    pc->state = PC_CHECKOUT;
    p->n_inuse++;
    return pc;
}

/* Hands idle connections and free slots to the oldest waiters that can
 * use them. Called after every change that can serve a waiter. */
static void dispatch_locked(struct pqpool *p)
{
    int64_t now = now_ms();
    while (!p->closed && p->wq_head) {
        struct waiter *w = p->wq_head;
        if (p->idle_head) {
            dequeue_locked(p, w);
            w->conn = idle_pop_locked(p);
            pthread_cond_signal(&w->cond);
            continue;
        }
        if (!capacity_locked(p))
            break;
        while (w && w->retry_at > now)
            w = w->next;
        if (!w)
            break;
        dequeue_locked(p, w);
        w->granted = 1;
        p->n_connecting++;
        pthread_cond_signal(&w->cond);
    }
}

static void lockview_locked(struct pqpool *p, int64_t now, struct lockview *lv)
{
    if (p->lock_cls != PQPOOL_FAIL_NONE && now >= p->lock_until)
        p->lock_cls = PQPOOL_FAIL_NONE;
    lv->cls = p->lock_cls;
    lv->pw_hash = p->lock_pw_hash;
    lv->pw_null = p->lock_pw_null;
}

/* Books the outcome of a connect attempt (mutex held). */
static void account_attempt_locked(struct pqpool *p, const struct attempt *a, int64_t now)
{
    if (a->locked) {
        set_last_error_locked(p, p->lock_msg);
        return;
    }
    if (!a->contacted) {
        /* Failed before libpq was asked (out of memory): not an attempt. */
        if (a->cls != PQPOOL_FAIL_NONE)
            set_last_error_locked(p, a->msg);
        return;
    }
    if (a->cls == PQPOOL_FAIL_NONE) {
        p->lock_cls = PQPOOL_FAIL_NONE;
        return;
    }
    p->st.connect_failures++;
    p->st.connect_failures_by[a->cls]++;
    set_last_error_locked(p, a->msg);
    if (a->cls == PQPOOL_FAIL_AUTH)
        p->st.auth_failures++;
    if (a->cls == PQPOOL_FAIL_AUTH || a->cls == PQPOOL_FAIL_CONFIG) {
        p->lock_cls = a->cls;
        p->lock_until = now + p->cfg.auth_retry_after_ms;
        p->lock_pw_hash = a->pw_hash;
        p->lock_pw_null = a->pw_null;
        copy_msg(p->lock_msg, sizeof p->lock_msg, a->msg);
    }
}

static int class_error(enum pqpool_fail_class cls)
{
    if (cls == PQPOOL_FAIL_AUTH)
        return PQPOOL_EAUTH;
    if (cls == PQPOOL_FAIL_CONFIG)
        return PQPOOL_ECONFIG;
    return PQPOOL_ECONNECT;
}

/* ---- Bounded I/O on one connection (no mutex) --------------------------------- */

/*
 * Reads every pending result of c until the deadline. Returns 0 if all
 * were successful, 1 if one was an error (its SQLSTATE and message copied
 * out), -1 if the connection failed or is in a state that cannot be
 * drained (COPY), -2 if the deadline passed first.
 */
static int drain_bounded(PGconn *c, int64_t deadline, char *sqlstate, char *msg, size_t msglen)
{
    int rc = 0;
    for (;;) {
        PGresult *res;
        ExecStatusType st;
        int f;
        while ((f = PQflush(c)) == 1) {
            int64_t rem = deadline - now_ms();
            if (rem <= 0)
                return -2;
            if (wait_fd(PQsocket(c), POLLOUT | POLLIN, rem) < 0)
                return -1;
            if (!PQconsumeInput(c))
                return -1;
        }
        if (f < 0)
            return -1;
        while (PQisBusy(c)) {
            int64_t rem = deadline - now_ms();
            int r;
            if (rem <= 0)
                return -2;
            r = wait_fd(PQsocket(c), POLLIN, rem);
            if (r < 0)
                return -1;
            if (r > 0 && !PQconsumeInput(c))
                return -1;
        }
        res = PQgetResult(c);
        if (!res)
            break;
        st = PQresultStatus(res);
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            PQclear(res);
            return -1;
        }
        if (st == PGRES_FATAL_ERROR && rc == 0) {
            const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            rc = 1;
            if (sqlstate)
                snprintf(sqlstate, 6, "%s", ss ? ss : "");
            if (msg)
                copy_msg(msg, msglen, PQresultErrorMessage(res));
        }
        PQclear(res);
    }
    if (PQstatus(c) != CONNECTION_OK)
        return -1;
    return rc;
}

/* Sends sql without blocking and drains its results by the deadline;
 * returns as drain_bounded. The connection's blocking mode is restored. */
static int run_bounded(PGconn *c, const char *sql, int64_t deadline, char *sqlstate, char *msg,
                       size_t msglen)
{
    int was_nb = PQisnonblocking(c);
    int rc;
    if (sqlstate)
        sqlstate[0] = '\0';
    if (!was_nb && PQsetnonblocking(c, 1) != 0) {
        if (msg)
            copy_msg(msg, msglen, PQerrorMessage(c));
        return -1;
    }
    if (!PQsendQuery(c, sql)) {
        if (msg)
            copy_msg(msg, msglen, PQerrorMessage(c));
        rc = -1;
    } else {
        rc = drain_bounded(c, deadline, sqlstate, msg, msglen);
        if (rc < 0 && msg && rc == -1 && !msg[0])
            copy_msg(msg, msglen, PQerrorMessage(c));
    }
    if (!was_nb && PQstatus(c) == CONNECTION_OK)
        (void)PQsetnonblocking(c, 0);
    return rc;
}

/*
 * Looks at an idle connection's socket without waiting: an idle socket is
 * readable only if the server sent something -- a FATAL before closing,
 * EOF, a reset, or a harmless notice or ParameterStatus. Returns 1 if the
 * connection is dead, 0 if it is still usable.
 */
static int socket_dead(struct pconn *pc)
{
    PGconn *c = pc->conn;
    PGnotify *n;
    int r;
    if (__atomic_load_n(&pc->broken, __ATOMIC_ACQUIRE) || PQstatus(c) != CONNECTION_OK)
        return 1;
    r = wait_fd(PQsocket(c), POLLIN, 0);
    if (r < 0)
        return 1;
    if (r > 0) {
        if (!PQconsumeInput(c) || PQstatus(c) != CONNECTION_OK)
            return 1;
        /* Parses what arrived (a FATAL sent to an idle session reaches
         * notice_rx from here); notifications have no reader. */
        while ((n = PQnotifies(c)) != NULL)
            PQfreemem(n);
    }
    return __atomic_load_n(&pc->broken, __ATOMIC_ACQUIRE) != 0;
}

/* Notices would otherwise go to libpq's default receiver, which prints to
 * stderr. A FATAL arriving on an idle connection ends up here too (libpq
 * treats an error outside a query as a notice), so it marks the
 * connection broken. */
static void notice_rx(void *arg, const PGresult *res)
{
    struct pconn *pc = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if ((sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0)) || sqlstate_is_fatal(ss))
        __atomic_store_n(&pc->broken, 1, __ATOMIC_RELEASE);
    if (pc->pool->cfg.notice)
        pc->pool->cfg.notice(pc->pool->cfg.notice_ctx, pc->conn, res);
}

/* The cancel request needs its own TCP connection, which PQcancel opens
 * with a blocking connect; it runs in a detached thread so that a
 * blackholed server cannot stretch pqpool_release past its bound. SIGPIPE
 * is blocked in that thread because PQcancel's send() does not ask for
 * MSG_NOSIGNAL; a pending one is discarded with the thread. */
static void *cancel_main(void *arg)
{
    PGcancel *cn = arg;
    sigset_t set;
    char eb[256];
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    (void)PQcancel(cn, eb, sizeof eb);
    PQfreeCancel(cn);
    return NULL;
}

static int send_cancel(PGconn *c)
{
    PGcancel *cn = PQgetCancel(c);
    pthread_attr_t attr;
    pthread_t t;
    int rc;
    if (!cn)
        return -1;
    if (pthread_attr_init(&attr) != 0) {
        PQfreeCancel(cn);
        return -1;
    }
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    rc = pthread_create(&t, &attr, cancel_main, cn);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        PQfreeCancel(cn);
        return -1;
    }
    return 0;
}

/*
 * Makes a released connection fit for the next caller within
 * release_timeout_ms. Returns -1 if it is clean, else the eject reason.
 * *canceled / *rolled_back say what had to be done.
 */
static int clean_for_reuse(struct pqpool *p, struct pconn *pc, int *canceled, int *rolled_back)
{
    PGconn *c = pc->conn;
    int64_t deadline = now_ms() + p->cfg.release_timeout_ms;
    PGTransactionStatusType ts;
    int r;

    if (__atomic_load_n(&pc->broken, __ATOMIC_ACQUIRE) || PQstatus(c) != CONNECTION_OK)
        return PQPOOL_EJECT_BROKEN;
    if (PQpipelineStatus(c) != PQ_PIPELINE_OFF)
        return PQPOOL_EJECT_BUSY;
    ts = PQtransactionStatus(c);
    if (ts == PQTRANS_ACTIVE || PQisBusy(c)) {
        int was_nb = PQisnonblocking(c);
        /* Results may already be complete and merely unread; only a
         * command still running needs a cancel request. */
        if (PQisBusy(c) && send_cancel(c) != 0)
            return PQPOOL_EJECT_BUSY;
        if (!was_nb && PQsetnonblocking(c, 1) != 0)
            return PQPOOL_EJECT_BUSY;
        r = drain_bounded(c, deadline, NULL, NULL, 0);
        if (r < 0)
            return PQPOOL_EJECT_BUSY;
        if (!was_nb)
            (void)PQsetnonblocking(c, 0);
        *canceled = 1;
        ts = PQtransactionStatus(c);
    }
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) {
        r = run_bounded(c, "ROLLBACK", deadline, NULL, NULL, 0);
        if (r != 0 || PQtransactionStatus(c) != PQTRANS_IDLE)
            return PQPOOL_EJECT_TRANSACTION;
        *rolled_back = 1;
        ts = PQTRANS_IDLE;
    }
    if (ts != PQTRANS_IDLE)
        return PQPOOL_EJECT_BROKEN;
    if (__atomic_load_n(&pc->broken, __ATOMIC_ACQUIRE))
        return PQPOOL_EJECT_BROKEN;
    if (socket_dead(pc))
        return PQPOOL_EJECT_DEAD;
    if (now_ms() >= pc->expires_ms)
        return PQPOOL_EJECT_LIFETIME;
    return -1;
}

/*
 * Checks a connection about to be handed out. Returns -1 if it may be
 * handed out, -2 if there is no time left to validate it (it is still
 * fine to keep), else the eject reason; msg gets the ping's error.
 */
static int checkout_check(struct pqpool *p, struct pconn *pc, int64_t deadline, int *pinged,
                          char *msg, size_t msglen)
{
    int64_t now = now_ms();
    int64_t pdl;
    int r;

    if (now >= pc->expires_ms)
        return PQPOOL_EJECT_LIFETIME;
    if (socket_dead(pc)) {
        copy_msg(msg, msglen, PQerrorMessage(pc->conn));
        return PQPOOL_EJECT_DEAD;
    }
    if (p->cfg.validate_idle_ms < 0 || now - pc->idle_since_ms < p->cfg.validate_idle_ms)
        return -1;
    if (now >= deadline)
        return -2;
    pdl = now + p->cfg.validation_timeout_ms;
    if (pdl > deadline)
        pdl = deadline;
    *pinged = 1;
    r = run_bounded(pc->conn, PING_SQL, pdl, NULL, msg, msglen);
    if (r == 0)
        return -1;
    if (r == -2)
        fmt(msg, msglen, "validation ping timed out after %lld ms", (long long)(pdl - now));
    return PQPOOL_EJECT_VALIDATION;
}

/* ---- Connecting (no mutex) ---------------------------------------------------- */

/*
 * Opens one connection by the deadline and runs init_sql on it. lv is the
 * lockout seen when the slot was reserved: if it is active and the
 * password did not change, the server is not contacted. On success stores
 * a new pconn (not yet linked) in *out. Emits CONNECT_FAILED/AUTH_FAILED.
 */
static void connect_new(struct pqpool *p, int64_t deadline, const struct lockview *lv,
                        struct pconn **out, struct attempt *a)
{
    const char *kw[16], *val[16];
    char ka_idle[16], ka_int[16], ka_cnt[16], tcp_ut[16];
    char *pw = NULL;
    struct pconn *pc = NULL;
    PGconn *c = NULL;
    PostgresPollingStatusType st;
    int n = 0;
    int64_t t0 = now_ms();

    memset(a, 0, sizeof *a);
    *out = NULL;
    if (p->cfg.password) {
        const char *s = p->cfg.password(p->cfg.password_ctx);
        if (s && !(pw = strdup(s))) {
            a->cls = PQPOOL_FAIL_NETWORK;
            fmt(a->msg, sizeof a->msg, "out of memory");
            goto fail;
        }
    }
    a->pw_null = pw == NULL;
    a->pw_hash = pw ? hash_str(pw) : 0;
    if (lv->cls != PQPOOL_FAIL_NONE &&
        (!p->cfg.password || (a->pw_null == lv->pw_null && a->pw_hash == lv->pw_hash))) {
        a->cls = lv->cls;
        a->locked = 1;
        goto fail;
    }

    pc = calloc(1, sizeof *pc);
    if (!pc) {
        a->cls = PQPOOL_FAIL_NETWORK;
        fmt(a->msg, sizeof a->msg, "out of memory");
        goto fail;
    }
    pc->pool = p;

    /* Pool defaults first, so that the conninfo (expanded from dbname) can
     * override them; the callback's password last, so that it wins. */
    if (p->cfg.keepalives) {
        kw[n] = "keepalives", val[n++] = "1";
        fmt(ka_idle, sizeof ka_idle, "%d", p->cfg.keepalives_idle_s);
        kw[n] = "keepalives_idle", val[n++] = ka_idle;
        fmt(ka_int, sizeof ka_int, "%d", p->cfg.keepalives_interval_s);
        kw[n] = "keepalives_interval", val[n++] = ka_int;
        fmt(ka_cnt, sizeof ka_cnt, "%d", p->cfg.keepalives_count);
        kw[n] = "keepalives_count", val[n++] = ka_cnt;
        if (p->cfg.tcp_user_timeout_ms > 0) {
            fmt(tcp_ut, sizeof tcp_ut, "%d", p->cfg.tcp_user_timeout_ms);
            kw[n] = "tcp_user_timeout", val[n++] = tcp_ut;
        }
    }
    if (p->appname)
        kw[n] = "application_name", val[n++] = p->appname;
    kw[n] = "fallback_application_name", val[n++] = "pqpool";
    kw[n] = "dbname", val[n++] = p->conninfo;
    if (pw)
        kw[n] = "password", val[n++] = pw;
    kw[n] = NULL, val[n] = NULL;

    t0 = now_ms();
    a->contacted = 1;
    __atomic_add_fetch(&p->connect_attempts, 1, __ATOMIC_RELAXED);
    c = PQconnectStartParams(kw, val, 1);
    if (!c) {
        a->cls = PQPOOL_FAIL_NETWORK;
        fmt(a->msg, sizeof a->msg, "out of memory");
        goto fail;
    }
    /* Right away, so that a FATAL during startup carries its SQLSTATE. */
    PQsetErrorVerbosity(c, PQERRORS_VERBOSE);
    PQsetNoticeReceiver(c, notice_rx, pc);
    pc->conn = c;

    st = PQstatus(c) == CONNECTION_BAD ? PGRES_POLLING_FAILED : PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
        int64_t rem;
        int r;
        if (st == PGRES_POLLING_FAILED) {
            copy_msg(a->msg, sizeof a->msg, PQerrorMessage(c));
            a->cls = classify_msg(a->msg, a->sqlstate);
            goto fail;
        }
        rem = deadline - now_ms();
        if (rem <= 0) {
            a->cls = PQPOOL_FAIL_TIMEOUT;
            fmt(a->msg, sizeof a->msg, "connection attempt timed out after %lld ms",
                (long long)(now_ms() - t0));
            goto fail;
        }
        /* PQsocket can change between calls (next address or host). */
        r = wait_fd(PQsocket(c), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, rem);
        if (r < 0) {
            a->cls = PQPOOL_FAIL_NETWORK;
            copy_msg(a->msg, sizeof a->msg, PQerrorMessage(c));
            if (!a->msg[0])
                fmt(a->msg, sizeof a->msg, "connection has no socket");
            goto fail;
        }
        if (r == 0)
            continue;
        st = PQconnectPoll(c);
    }

    if (p->init_sql) {
        char ss[6], m[MSG_MAX - 32];
        int r = run_bounded(c, p->init_sql, deadline, ss, m, sizeof m);
        if (r != 0) {
            a->cls = PQPOOL_FAIL_INIT;
            snprintf(a->sqlstate, sizeof a->sqlstate, "%s", r == 1 ? ss : "");
            if (r == -2)
                fmt(a->msg, sizeof a->msg, "init_sql timed out after %lld ms",
                    (long long)(now_ms() - t0));
            else
                fmt(a->msg, sizeof a->msg, "init_sql failed: %s", m);
            goto fail;
        }
    }

    a->elapsed_ms = now_ms() - t0;
    pc->created_ms = pc->idle_since_ms = now_ms();
    if (pw) {
        memset(pw, 0, strlen(pw));
        free(pw);
    }
    *out = pc;
    return;

fail:
    if (a->contacted)
        a->elapsed_ms = now_ms() - t0;
    if (c)
        PQfinish(c);
    free(pc);
    if (pw) {
        memset(pw, 0, strlen(pw));
        free(pw);
    }
    if (a->contacted) {
        emit(p, PQPOOL_EV_CONNECT_FAILED, NULL, NULL, a->cls, a->sqlstate, a->msg, a->elapsed_ms,
             0);
        if (a->cls == PQPOOL_FAIL_AUTH)
            emit(p, PQPOOL_EV_AUTH_FAILED, NULL, NULL, a->cls, a->sqlstate, a->msg, a->elapsed_ms,
                 0);
    }
}

/* Links a freshly connected pconn (mutex held). */
static void adopt_locked(struct pqpool *p, struct pconn *pc, enum pc_state state)
{
    int64_t life = p->cfg.max_lifetime_ms;
    pc->id = ++p->next_id;
    link_all(p, pc);
    /* Up to 2.5 % less, so connections opened together do not all expire
     * together. */
    if (life > 0)
        pc->expires_ms = pc->created_ms + life - (int64_t)(rand_locked(p) % (life / 40 + 1));
    else
        pc->expires_ms = INT64_MAX;
    p->st.created++;
    p->lock_cls = PQPOOL_FAIL_NONE;
    if (state == PC_IDLE) {
        idle_push_front(p, pc);
    } else {
        pc->state = state;
        p->n_inuse++;
    }
}

/* Counts a connection that was finished (mutex held; it is unlinked). */
static void count_eject_locked(struct pqpool *p, int reason)
{
    p->st.ejected_by[reason]++;
    if (reason != PQPOOL_EJECT_CLOSED)
        p->st.ejected++;
}

/* Finishes a connection owned by the caller that was counted in n_inuse,
 * frees its slot (passing it on if dispatch is set) and emits the event
 * (mutex NOT held). */
static void eject_owned(struct pqpool *p, struct pconn *pc, int reason, const char *msg,
                        int dispatch)
{
    PQfinish(pc->conn);
    pthread_mutex_lock(&p->mu);
    unlink_all(p, pc);
    p->n_inuse--;
    count_eject_locked(p, reason);
    if (dispatch)
        dispatch_locked(p);
    pthread_mutex_unlock(&p->mu);
    emit(p, PQPOOL_EV_EJECTED, pc, NULL, reason, NULL, msg, 0, 0);
    free(pc);
}

/* ---- Public API ---------------------------------------------------------------- */

void pqpool_config_init(struct pqpool_config *cfg)
{
    if (!cfg)
        return;
    memset(cfg, 0, sizeof *cfg);
    cfg->conninfo = "";
    cfg->max_size = 10;
    cfg->min_idle = 2;
    cfg->acquire_timeout_ms = 2000;
    cfg->connect_timeout_ms = 2000;
    cfg->idle_timeout_ms = 30000;
    cfg->max_lifetime_ms = 30 * 60 * 1000;
    cfg->validate_idle_ms = 1000;
    cfg->validation_timeout_ms = 500;
    cfg->auth_retry_after_ms = 30000;
    cfg->backoff_initial_ms = 50;
    cfg->backoff_max_ms = 2000;
    cfg->release_timeout_ms = 1000;
    cfg->keepalives = 1;
    cfg->keepalives_idle_s = 30;
    cfg->keepalives_interval_s = 10;
    cfg->keepalives_count = 3;
    cfg->tcp_user_timeout_ms = 30000;
    cfg->housekeeping_interval_ms = 1000;
}

static void *hk_main(void *arg);

static const char *check_config(const struct pqpool_config *c)
{
    if (c->max_size < 1)
        return "max_size must be at least 1";
    if (c->min_idle < 0 || c->min_idle > c->max_size)
        return "min_idle must be between 0 and max_size";
    if (c->acquire_timeout_ms < 0 || c->connect_timeout_ms < 1)
        return "acquire_timeout_ms must be >= 0 and connect_timeout_ms >= 1";
    if (c->idle_timeout_ms < 0 || c->max_lifetime_ms < 0)
        return "idle_timeout_ms and max_lifetime_ms must be >= 0";
    if (c->validation_timeout_ms < 1)
        return "validation_timeout_ms must be >= 1";
    if (c->auth_retry_after_ms < 0 || c->release_timeout_ms < 0)
        return "auth_retry_after_ms and release_timeout_ms must be >= 0";
    if (c->backoff_initial_ms < 1 || c->backoff_max_ms < c->backoff_initial_ms)
        return "backoff_initial_ms must be >= 1 and <= backoff_max_ms";
    if (c->keepalives &&
        (c->keepalives_idle_s < 1 || c->keepalives_interval_s < 1 || c->keepalives_count < 1))
        return "keepalives_idle_s, keepalives_interval_s and keepalives_count must be >= 1";
    if (c->tcp_user_timeout_ms < 0 || c->housekeeping_interval_ms < 0)
        return "tcp_user_timeout_ms and housekeeping_interval_ms must be >= 0";
    return NULL;
}

int pqpool_open(const struct pqpool_config *cfg, struct pqpool **out, char *err, size_t errlen)
{
    struct pqpool *p = NULL;
    PQconninfoOption *opts;
    char *perr = NULL;
    const char *why;
    int oom = 0, rc;
    int mu_ok = 0, attr_ok = 0, hkc_ok = 0;

    if (err && errlen)
        err[0] = '\0';
    if (out)
        *out = NULL;
    if (!cfg || !out) {
        if (err)
            fmt(err, errlen, "pqpool_open: cfg and out must not be NULL");
        return PQPOOL_EINVAL;
    }
    if ((why = check_config(cfg)) != NULL) {
        if (err)
            fmt(err, errlen, "pqpool_open: %s", why);
        return PQPOOL_ECONFIG;
    }
    /* A conninfo libpq cannot parse will never connect: say so now rather
     * than at every acquire. */
    opts = PQconninfoParse(cfg->conninfo ? cfg->conninfo : "", &perr);
    if (!opts) {
        if (err) {
            char m[MSG_MAX];
            copy_msg(m, sizeof m, perr ? perr : "out of memory");
            fmt(err, errlen, "pqpool_open: conninfo: %s", m);
        }
        rc = perr ? PQPOOL_ECONFIG : PQPOOL_ENOMEM;
        if (perr)
            PQfreemem(perr);
        return rc;
    }
    PQconninfoFree(opts);

    p = calloc(1, sizeof *p);
    if (!p)
        goto nomem;
    p->cfg = *cfg;
    p->conninfo = dup_or_null(cfg->conninfo ? cfg->conninfo : "", &oom);
    p->appname = dup_or_null(cfg->application_name, &oom);
    p->init_sql = dup_or_null(cfg->init_sql, &oom);
    if (oom)
        goto nomem;
    p->cfg.conninfo = p->conninfo;
    p->cfg.application_name = p->appname;
    p->cfg.init_sql = p->init_sql;
    p->rng = (uint64_t)now_ms() ^ ((uint64_t)(uintptr_t)p << 16) ^ (uint64_t)getpid();
    if (p->rng == 0)
        p->rng = 88172645463325252ULL;
    p->st.max_size = cfg->max_size;

    if (pthread_mutex_init(&p->mu, NULL) != 0)
        goto nomem;
    mu_ok = 1;
    if (pthread_condattr_init(&p->condattr) != 0)
        goto nomem;
    attr_ok = 1;
    if (pthread_condattr_setclock(&p->condattr, CLOCK_MONOTONIC) != 0)
        goto nomem;
    if (pthread_cond_init(&p->hk_cond, &p->condattr) != 0)
        goto nomem;
    hkc_ok = 1;
    if (cfg->housekeeping_interval_ms > 0) {
        if (pthread_create(&p->hk, NULL, hk_main, p) != 0)
            goto nomem;
        p->hk_started = 1;
    }
    *out = p;
    return 0;

nomem:
    if (err)
        fmt(err, errlen, "pqpool_open: out of memory or threads");
    if (p) {
        if (hkc_ok)
            pthread_cond_destroy(&p->hk_cond);
        if (attr_ok)
            pthread_condattr_destroy(&p->condattr);
        if (mu_ok)
            pthread_mutex_destroy(&p->mu);
        free(p->conninfo);
        free(p->appname);
        free(p->init_sql);
        free(p);
    }
    return PQPOOL_ENOMEM;
}

int pqpool_acquire(struct pqpool *p, int timeout_ms, PGconn **out)
{
    struct waiter w;
    struct pconn *pc;
    struct pconn *giveback = NULL;
    char msg[MSG_MAX];
    int64_t t0, deadline;
    int rc, step = 0, transient = 0, waited = 0;
    enum pqpool_event_type fail_ev = PQPOOL_EV_ACQUIRE_FAILED;

    if (out)
        *out = NULL;
    if (!p || !out)
        return PQPOOL_EINVAL;
    t0 = now_ms();
    if (timeout_ms < 0)
        timeout_ms = p->cfg.acquire_timeout_ms;
    /* now_ms() truncates, so the true start may be up to 1 ms after t0:
     * one more millisecond keeps the deadline from ever firing before
     * timeout_ms has really passed (ETIMEDOUT must never come early).
     * A timeout of 0 keeps its meaning: only what is ready right now. */
    deadline = t0 + timeout_ms + (timeout_ms > 0 ? 1 : 0);
    memset(&w, 0, sizeof w);
    if (pthread_cond_init(&w.cond, &p->condattr) != 0)
        return PQPOOL_ENOMEM;
    msg[0] = '\0';

    pthread_mutex_lock(&p->mu);
    w.ticket = p->next_ticket++;
    for (;;) {
        int64_t now = now_ms();
        int reserve = 0;

        if (p->closed) {
            rc = PQPOOL_ECLOSED;
            break;
        }
        pc = NULL;
        if (w.conn) {
            pc = w.conn;
            w.conn = NULL;
        } else if (w.granted) {
            w.granted = 0;
            reserve = 1;
        } else if (!w.queued || w.retry_at <= now) {
            if (p->idle_head && !older_waiter_locked(p, &w, 0, now)) {
                pc = idle_pop_locked(p);
            } else if (capacity_locked(p) && w.retry_at <= now && now < deadline &&
                       !older_waiter_locked(p, &w, 1, now)) {
                p->n_connecting++;
                reserve = 1;
            }
        }
        if (pc || reserve)
            dequeue_locked(p, &w);
        if (reserve && now >= deadline) {
            /* Granted too late to use: pass the slot on. */
            p->n_connecting--;
            reserve = 0;
            dispatch_locked(p);
        }

        if (pc) {
            int pinged = 0, reason;
            pthread_mutex_unlock(&p->mu);
            msg[0] = '\0';
            reason = checkout_check(p, pc, deadline, &pinged, msg, sizeof msg);
            pthread_mutex_lock(&p->mu);
            if (pinged)
                p->st.validations++;
            if (reason == -1) {
                pc->state = PC_INUSE;
                p->st.acquires++;
                if (waited)
                    p->st.waiters_served++;
                pthread_mutex_unlock(&p->mu);
                if (waited)
                    emit(p, PQPOOL_EV_WAITER_SERVED, pc, NULL, 0, NULL, NULL, now_ms() - t0, 0);
                *out = pc->conn;
                pthread_cond_destroy(&w.cond);
                return 0;
            }
            if (reason == -2) {
                /* No time left to validate: keep it for someone else. */
                giveback = pc;
                rc = PQPOOL_ETIMEDOUT;
                break;
            }
            pthread_mutex_unlock(&p->mu);
            /* The freed slot stays with this acquire: no dispatch. */
            eject_owned(p, pc, reason, msg, 0);
            pthread_mutex_lock(&p->mu);
            continue;
        }

        if (reserve) {
            struct attempt a;
            struct lockview lv;
            int64_t cdl = now + p->cfg.connect_timeout_ms;
            if (cdl > deadline)
                cdl = deadline;
            lockview_locked(p, now, &lv);
            pthread_mutex_unlock(&p->mu);
            connect_new(p, cdl, &lv, &pc, &a);
            pthread_mutex_lock(&p->mu);
            p->n_connecting--;
            now = now_ms();
            account_attempt_locked(p, &a, now);
            if (pc) {
                if (p->closed) {
                    pthread_mutex_unlock(&p->mu);
                    PQfinish(pc->conn);
                    free(pc);
                    pthread_mutex_lock(&p->mu);
                    rc = PQPOOL_ECLOSED;
                    break;
                }
                adopt_locked(p, pc, PC_INUSE);
                p->st.acquires++;
                if (waited)
                    p->st.waiters_served++;
                pthread_mutex_unlock(&p->mu);
                emit(p, PQPOOL_EV_CONNECTED, pc, NULL, 0, NULL, NULL, a.elapsed_ms, 0);
                if (waited)
                    emit(p, PQPOOL_EV_WAITER_SERVED, pc, NULL, 0, NULL, NULL, now_ms() - t0, 0);
                *out = pc->conn;
                pthread_cond_destroy(&w.cond);
                return 0;
            }
            /* The reserved slot is free again; someone else may use it. */
            dispatch_locked(p);
            if (a.cls == PQPOOL_FAIL_AUTH || a.cls == PQPOOL_FAIL_CONFIG) {
                rc = class_error(a.cls);
                if (a.locked) {
                    p->st.auth_lockouts++;
                    fail_ev = PQPOOL_EV_AUTH_LOCKED;
                }
                copy_msg(msg, sizeof msg, a.locked ? p->lock_msg : a.msg);
                break;
            }
            transient = 1;
            copy_msg(msg, sizeof msg, a.msg);
            w.retry_at = now + backoff_locked(p, &step);
            continue;
        }

        if (now >= deadline) {
            rc = transient ? PQPOOL_ECONNECT : PQPOOL_ETIMEDOUT;
            if (transient)
                set_last_error_locked(p, msg);
            break;
        }
        if (!w.queued)
            enqueue_locked(p, &w);
        dispatch_locked(p);
        if (w.conn || w.granted)
            continue;
        waited = 1;
        {
            struct timespec ts;
            int64_t wake = deadline;
            if (w.retry_at > now && w.retry_at < wake)
                wake = w.retry_at;
            ms_to_timespec(wake, &ts);
            pthread_cond_timedwait(&w.cond, &p->mu, &ts);
        }
    }

    /* Failure, mutex held. Give back whatever dispatch handed over. */
    dequeue_locked(p, &w);
    if (w.granted) {
        p->n_connecting--;
        w.granted = 0;
    }
    if (w.conn) {
        giveback = w.conn;
        w.conn = NULL;
    }
    if (giveback && !p->closed) {
        /* Unchecked and unused: it goes back as it was. */
        p->n_inuse--;
        idle_push_front(p, giveback);
        giveback = NULL;
    }
    if (rc == PQPOOL_ETIMEDOUT)
        p->st.acquire_timeouts++;
    else if (rc != PQPOOL_ECLOSED)
        p->st.acquire_errors++;
    dispatch_locked(p);
    pthread_mutex_unlock(&p->mu);
    if (giveback) {
        /* The pool was closed while this connection was on its way. */
        PQfinish(giveback->conn);
        pthread_mutex_lock(&p->mu);
        unlink_all(p, giveback);
        p->n_inuse--;
        count_eject_locked(p, PQPOOL_EJECT_CLOSED);
        pthread_mutex_unlock(&p->mu);
        emit(p, PQPOOL_EV_EJECTED, giveback, NULL, PQPOOL_EJECT_CLOSED, NULL, NULL, 0, 0);
        free(giveback);
    }
    if (rc == PQPOOL_ETIMEDOUT)
        emit(p, PQPOOL_EV_ACQUIRE_TIMEOUT, NULL, NULL, 0, NULL, NULL, now_ms() - t0, rc);
    else if (rc != PQPOOL_ECLOSED)
        emit(p, fail_ev, NULL, NULL, 0, NULL, msg, now_ms() - t0, rc);
    pthread_cond_destroy(&w.cond);
    return rc;
}

/* Release and discard share this: find the connection, clean it or
 * finish it, and pass it (or its slot) on. */
static void give_back(struct pqpool *p, PGconn *conn, int discard)
{
    struct pconn *pc;
    int reason, canceled = 0, rolled_back = 0;

    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    pc = conn ? find_locked(p, conn) : NULL;
    if (!pc) {
        p->st.foreign_releases++;
        pthread_mutex_unlock(&p->mu);
        emit(p, PQPOOL_EV_FOREIGN_RELEASE, NULL, conn, 0, NULL, NULL, 0, 0);
        return;
    }
    if (pc->state != PC_INUSE) {
        p->st.double_releases++;
        pthread_mutex_unlock(&p->mu);
        emit(p, PQPOOL_EV_DOUBLE_RELEASE, NULL, conn, 0, NULL, NULL, 0, 0);
        return;
    }
    pc->state = PC_RELEASING;
    reason = discard ? PQPOOL_EJECT_DISCARDED : p->closed ? PQPOOL_EJECT_CLOSED : -2;
    pthread_mutex_unlock(&p->mu);

    if (reason == -2)
        reason = clean_for_reuse(p, pc, &canceled, &rolled_back);
    if (reason == -1) {
        pthread_mutex_lock(&p->mu);
        if (canceled)
            p->st.cancels++;
        if (rolled_back)
            p->st.rollbacks++;
        if (!p->closed) {
            unsigned long id = pc->id;
            p->n_inuse--;
            pc->idle_since_ms = now_ms();
            idle_push_front(p, pc);
            dispatch_locked(p);
            pthread_mutex_unlock(&p->mu);
            /* pc is shared again: only its copied identity is used. */
            if (canceled)
                emit_id(p, PQPOOL_EV_CANCELED, conn, id, 0, NULL, NULL, 0, 0);
            if (rolled_back)
                emit_id(p, PQPOOL_EV_ROLLED_BACK, conn, id, 0, NULL, NULL, 0, 0);
            return;
        }
        pthread_mutex_unlock(&p->mu);
        reason = PQPOOL_EJECT_CLOSED;
    }
    {
        char m[MSG_MAX];
        copy_msg(m, sizeof m, PQerrorMessage(conn));
        eject_owned(p, pc, reason, m, 1);
    }
}

void pqpool_release(struct pqpool *p, PGconn *conn)
{
    give_back(p, conn, 0);
}

void pqpool_discard(struct pqpool *p, PGconn *conn)
{
    give_back(p, conn, 1);
}

int pqpool_result_is_fatal(const PGresult *res)
{
    if (!res)
        return 0;
    return sqlstate_is_fatal(PQresultErrorField(res, PG_DIAG_SQLSTATE));
}

void pqpool_note_result(struct pqpool *p, PGconn *conn, const PGresult *res)
{
    struct pconn *pc;
    int bad;
    if (!p || !conn)
        return;
    bad = pqpool_result_is_fatal(res) || (!res && PQstatus(conn) == CONNECTION_BAD);
    if (!bad)
        return;
    pthread_mutex_lock(&p->mu);
    pc = find_locked(p, conn);
    if (pc)
        __atomic_store_n(&pc->broken, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->mu);
}

PGresult *pqpool_exec(struct pqpool *p, PGconn *conn, const char *sql)
{
    PGresult *res;
    if (!conn || !sql)
        return NULL;
    res = PQexec(conn, sql);
    pqpool_note_result(p, conn, res);
    return res;
}

/* Refills to min_idle, one connection at a time (mutex NOT held). */
static int refill(struct pqpool *p)
{
    int rc = 0;
    for (;;) {
        struct attempt a;
        struct lockview lv;
        struct pconn *pc;
        int64_t now;

        pthread_mutex_lock(&p->mu);
        now = now_ms();
        if (p->closed || p->n_idle + p->n_refilling >= p->cfg.min_idle || !capacity_locked(p) ||
            now < p->refill_retry_at) {
            pthread_mutex_unlock(&p->mu);
            break;
        }
        lockview_locked(p, now, &lv);
        p->n_connecting++;
        p->n_refilling++;
        pthread_mutex_unlock(&p->mu);

        connect_new(p, now + p->cfg.connect_timeout_ms, &lv, &pc, &a);

        pthread_mutex_lock(&p->mu);
        p->n_connecting--;
        p->n_refilling--;
        now = now_ms();
        account_attempt_locked(p, &a, now);
        if (pc && p->closed) {
            pthread_mutex_unlock(&p->mu);
            PQfinish(pc->conn);
            free(pc);
            return PQPOOL_ECLOSED;
        }
        if (pc) {
            PGconn *conn = pc->conn;
            unsigned long id;
            p->refill_step = 0;
            adopt_locked(p, pc, PC_IDLE);
            id = pc->id;
            dispatch_locked(p);
            pthread_mutex_unlock(&p->mu);
            emit_id(p, PQPOOL_EV_CONNECTED, conn, id, 0, NULL, NULL, a.elapsed_ms, 0);
            continue;
        }
        rc = class_error(a.cls);
        if (rc == PQPOOL_ECONNECT)
            p->refill_retry_at = now + backoff_locked(p, &p->refill_step);
        dispatch_locked(p);
        pthread_mutex_unlock(&p->mu);
        break;
    }
    return rc;
}

int pqpool_maintain(struct pqpool *p)
{
    struct pconn *pc, *prev, *check = NULL, *gone = NULL, **check_tail = &check;
    int64_t now;
    int surplus;

    if (!p)
        return PQPOOL_EINVAL;
    pthread_mutex_lock(&p->mu);
    if (p->closed) {
        pthread_mutex_unlock(&p->mu);
        return PQPOOL_ECLOSED;
    }
    now = now_ms();
    surplus = p->n_idle - p->cfg.min_idle;
    /* Oldest-idle first, so the surplus that times out is the least used.
     * Connections to check are taken out of the idle list so nobody else
     * touches them while their sockets are read without the mutex; the
     * inext field chains them meanwhile. */
    for (pc = p->idle_tail; pc; pc = prev) {
        int reason = -1;
        prev = pc->iprev;
        if (now >= pc->expires_ms)
            reason = PQPOOL_EJECT_LIFETIME;
        else if (p->cfg.idle_timeout_ms > 0 && surplus > 0 &&
                 now - pc->idle_since_ms >= p->cfg.idle_timeout_ms)
            reason = PQPOOL_EJECT_IDLE_TIMEOUT;
        idle_remove(p, pc);
        if (reason >= 0) {
            surplus--;
            unlink_all(p, pc);
            count_eject_locked(p, reason);
            pc->eject_reason = reason;
            pc->inext = gone;
            gone = pc;
        } else {
            pc->state = PC_CHECKING;
            p->n_inuse++;
            *check_tail = pc;
            check_tail = &pc->inext;
        }
    }
    *check_tail = NULL;
    dispatch_locked(p);
    pthread_mutex_unlock(&p->mu);

    while (gone) {
        pc = gone;
        gone = pc->inext;
        PQfinish(pc->conn);
        emit(p, PQPOOL_EV_EJECTED, pc, NULL, pc->eject_reason, NULL, NULL, 0, 0);
        free(pc);
    }
    while (check) {
        pc = check;
        check = pc->inext;
        if (socket_dead(pc)) {
            char m[MSG_MAX];
            copy_msg(m, sizeof m, PQerrorMessage(pc->conn));
            eject_owned(p, pc, PQPOOL_EJECT_DEAD, m, 1);
            continue;
        }
        pthread_mutex_lock(&p->mu);
        if (p->closed) {
            pthread_mutex_unlock(&p->mu);
            eject_owned(p, pc, PQPOOL_EJECT_CLOSED, NULL, 1);
            continue;
        }
        p->n_inuse--;
        idle_push_back(p, pc);
        dispatch_locked(p);
        pthread_mutex_unlock(&p->mu);
    }
    return refill(p);
}

void pqpool_stats(struct pqpool *p, struct pqpool_stats *out)
{
    if (!out)
        return;
    memset(out, 0, sizeof *out);
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    *out = p->st;
    out->max_size = p->cfg.max_size;
    out->idle = p->n_idle;
    out->in_use = p->n_inuse;
    out->total = p->n_idle + p->n_inuse;
    out->connecting = p->n_connecting;
    out->waiting = p->n_waiting;
    out->auth_locked = p->lock_cls != PQPOOL_FAIL_NONE && now_ms() < p->lock_until;
    out->connect_attempts = __atomic_load_n(&p->connect_attempts, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&p->mu);
}

int pqpool_health(struct pqpool *p, int timeout_ms)
{
    PGconn *c;
    char m[MSG_MAX];
    int64_t deadline;
    int rc, r;

    if (!p)
        return PQPOOL_EINVAL;
    if (timeout_ms < 0)
        timeout_ms = p->cfg.acquire_timeout_ms;
    deadline = now_ms() + timeout_ms;
    rc = pqpool_acquire(p, timeout_ms, &c);
    if (rc != 0)
        return rc;
    m[0] = '\0';
    r = run_bounded(c, "SELECT 1", deadline, NULL, m, sizeof m);
    if (r == 0) {
        pqpool_release(p, c);
        return 0;
    }
    pthread_mutex_lock(&p->mu);
    if (r == -2)
        set_last_error_locked(p, "health check: SELECT 1 timed out");
    else
        set_last_error_locked(p, m[0] ? m : "health check: SELECT 1 failed");
    pthread_mutex_unlock(&p->mu);
    pqpool_discard(p, c);
    return r == -2 ? PQPOOL_ETIMEDOUT : PQPOOL_ECONNECT;
}

size_t pqpool_last_error_copy(struct pqpool *p, char *buf, size_t len)
{
    size_t n;
    if (!p) {
        if (buf && len)
            buf[0] = '\0';
        return 0;
    }
    pthread_mutex_lock(&p->mu);
    n = strlen(p->last_error);
    if (buf && len)
        snprintf(buf, len, "%s", p->last_error);
    pthread_mutex_unlock(&p->mu);
    return n;
}

const char *pqpool_last_error(struct pqpool *p)
{
    /* Per thread, so that a pointer handed out here is never rewritten by
     * another thread's failure. */
    static __thread char copy[MSG_MAX];
    (void)pqpool_last_error_copy(p, copy, sizeof copy);
    return copy;
}

void pqpool_close(struct pqpool *p)
{
    struct pconn *pc, *gone = NULL;
    struct waiter *w;

    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    if (p->closed) {
        pthread_mutex_unlock(&p->mu);
        return;
    }
    p->closed = 1;
    for (w = p->wq_head; w; w = w->next)
        pthread_cond_signal(&w->cond);
    pthread_cond_broadcast(&p->hk_cond);
    while ((pc = p->idle_head) != NULL) {
        idle_remove(p, pc);
        unlink_all(p, pc);
        count_eject_locked(p, PQPOOL_EJECT_CLOSED);
        pc->inext = gone;
        gone = pc;
    }
    pthread_mutex_unlock(&p->mu);
    while (gone) {
        pc = gone;
        gone = pc->inext;
        PQfinish(pc->conn);
        emit(p, PQPOOL_EV_EJECTED, pc, NULL, PQPOOL_EJECT_CLOSED, NULL, NULL, 0, 0);
        free(pc);
    }
    emit(p, PQPOOL_EV_CLOSED, NULL, NULL, 0, NULL, NULL, 0, 0);
}

void pqpool_free(struct pqpool *p)
{
    struct pconn *pc;
    if (!p)
        return;
    pqpool_close(p);
    if (p->hk_started && !pthread_equal(p->hk, pthread_self()))
        pthread_join(p->hk, NULL);
    while ((pc = p->all) != NULL) {
        unlink_all(p, pc);
        PQfinish(pc->conn);
        free(pc);
    }
    pthread_cond_destroy(&p->hk_cond);
    pthread_condattr_destroy(&p->condattr);
    pthread_mutex_destroy(&p->mu);
    free(p->conninfo);
    free(p->appname);
    free(p->init_sql);
    free(p);
}

static void *hk_main(void *arg)
{
    struct pqpool *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->closed) {
        int64_t next;
        pthread_mutex_unlock(&p->mu);
        (void)pqpool_maintain(p);
        pthread_mutex_lock(&p->mu);
        next = now_ms() + p->cfg.housekeeping_interval_ms;
        while (!p->closed && now_ms() < next) {
            struct timespec ts;
            ms_to_timespec(next, &ts);
            pthread_cond_timedwait(&p->hk_cond, &p->mu, &ts);
        }
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

const char *pqpool_strerror(int code)
{
    switch (code) {
    case 0:
        return "success";
    case PQPOOL_ETIMEDOUT:
        return "timed out waiting for a free connection";
    case PQPOOL_ECONNECT:
        return "could not connect to the server";
    case PQPOOL_EAUTH:
        return "credentials rejected by the server";
    case PQPOOL_ECONFIG:
        return "configuration error (no such database or bad conninfo)";
    case PQPOOL_ECLOSED:
        return "pool closed";
    case PQPOOL_EINVAL:
        return "invalid argument";
    case PQPOOL_ENOMEM:
        return "out of memory";
    default:
        return "unknown error";
    }
}

const char *pqpool_eject_reason_name(enum pqpool_eject_reason r)
{
    static const char *const names[PQPOOL_EJECT__COUNT] = {
        "dead",      "validation",   "broken",   "busy",   "transaction",
        "discarded", "idle_timeout", "lifetime", "closed",
    };
    if ((int)r < 0 || r >= PQPOOL_EJECT__COUNT)
        return "?";
    return names[r];
}

const char *pqpool_fail_class_name(enum pqpool_fail_class c)
{
    static const char *const names[PQPOOL_FAIL__COUNT] = {
        "none", "auth", "config", "network", "timeout", "server", "init",
    };
    if ((int)c < 0 || c >= PQPOOL_FAIL__COUNT)
        return "?";
    return names[c];
}
