/*
 * steps: executes one scenario on one backend, inside the runner's child.
 *
 * Every step is timed with CLOCK_MONOTONIC and traced before and after it
 * runs. Bounds in scenarios ("within", "not before", "eventually ...
 * within") are absolute: the scenario author states the tolerance, and
 * README documents the ones the catalogue uses. Conditions are waited for
 * by polling with a deadline, never by sleeping a fixed time.
 */
#include "steps.h"
#include "testhook.h"

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "fakepq.h"

#define MAX_SLOTS 64
#define MAX_GROUPS 16
#define MAX_GROUP_THREADS 256
#define QUERY_DEFAULT_DEADLINE_MS 10000
#define POLL_INTERVAL_MS 2
#define DRAIN_DEADLINE_MS 5000

/* A named connection: the result of an acquire step. */
struct slot {
    char name[SCN_NAME_MAX];
    struct driver_conn *conn; /* last connection it held (kept after release for "again") */
    int held;                 /* currently checked out */
    enum driver_outcome outcome;
    double elapsed_ms;
    char err[256];
    /* background acquires */
    const struct scn_step *step;
    pthread_t thread;
    int running;
    double started_ms;
    struct ctx *ctx;
};

/* A worker group or a queue of waiters. */
struct group {
    char name[SCN_NAME_MAX];
    int is_queue;
    int nthreads;
    pthread_t threads[MAX_GROUP_THREADS];
    int started;
    const struct scn_step *step;
    struct ctx *ctx;
    /* counted outcomes, guarded by ctx->lock */
    long long outcomes[SCN_OUT__COUNT + 1];
    long long acquires;
    double max_wait_ms;
    int served_seq[MAX_GROUP_THREADS]; /* queue: order in which each waiter was served */
    int next_seq;
    int joined;
};

struct group_arg {
    struct group *g;
    int index;
};

struct ctx {
    const struct steps_options *o;
    const struct driver_ops *drv;
    struct driver *d;
    const struct driver_info *info;
    struct backend *be;
    FILE *trace;
    double t0;
    pthread_mutex_t lock; /* trace, group counters */
    struct slot slots[MAX_SLOTS];
    int nslots;
    struct group groups[MAX_GROUPS];
    int ngroups;
    struct steps_result *r;
    int pool_closed;
};

double steps_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ms(double ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = {(time_t)(ms / 1000),
                          (long)((ms - (double)(long)(ms / 1000) * 1000) * 1e6)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* One trace line: time since the start, a tag (a scenario line number,
 * "event", "check"), then the text. */
__attribute__((format(printf, 3, 4))) static void trace(struct ctx *c, const char *tag,
                                                        const char *fmt, ...)
{
    char text[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&c->lock);
    fprintf(c->trace, "+%8.3fs  %-8s %s\n", (steps_now_ms() - c->t0) / 1000.0, tag, text);
    fflush(c->trace);
    pthread_mutex_unlock(&c->lock);
}

/* One timeline record: an interval (start < end) or a point. Kinds the
 * report knows: acquire, query, release, discard, fault, heal, close,
 * fail, and the first word of each pool event (connected, ejected, ...). */
__attribute__((format(printf, 5, 6))) static void
timeline(struct ctx *c, double start_ms, double end_ms, const char *kind, const char *fmt, ...)
{
    if (!c->o->timeline)
        return;
    char label[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(label, sizeof label, fmt, ap);
    va_end(ap);
    for (char *p = label; *p; p++)
        if (*p == '\t' || *p == '\n')
            *p = ' ';
    pthread_mutex_lock(&c->lock);
    fprintf(c->o->timeline, "%.3f\t%.3f\t%s\t%s\n", start_ms - c->t0, end_ms - c->t0, kind, label);
    fflush(c->o->timeline);
    pthread_mutex_unlock(&c->lock);
}

/* Records the first failure. If the driver itself broke (a driver process
 * that exited, wrote garbage or stopped answering), that is what the case
 * reports -- CRASH or HANG with what happened -- not the step it broke. */
__attribute__((format(printf, 3, 4))) static int fail(struct ctx *c, int line, const char *fmt, ...)
{
    if (!c->r->passed) {
        /* The verdict keeps the first failure; later ones (a leak found
         * while winding down) still go into the trace, so it explains the
         * time they took. */
        char later[700];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(later, sizeof later, fmt, ap);
        va_end(ap);
        trace(c, "also", "%s", later);
        return -1;
    }
    char why[700];
    int fate = c->d ? c->drv->fate(c->d, why, sizeof why) : 0;
    if (fate) {
        c->r->verdict = fate == 1 ? STEPS_CRASH : STEPS_HANG;
        snprintf(c->r->message, sizeof c->r->message, "driver %s: %s",
                 fate == 1 ? "crashed" : "hung", why);
    } else {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->r->message, sizeof c->r->message, fmt, ap);
        va_end(ap);
        c->r->verdict = STEPS_FAIL;
    }
    c->r->passed = 0;
    c->r->line = line;
    trace(c, "FAIL", "%s", c->r->message);
    double now = steps_now_ms();
    timeline(c, now, now, "fail", "%s", c->r->message);
    return -1;
}

static struct slot *find_slot(struct ctx *c, const char *name)
{
    for (int i = 0; i < c->nslots; i++)
        if (strcmp(c->slots[i].name, name) == 0)
            return &c->slots[i];
    return NULL;
}

static struct slot *get_slot(struct ctx *c, const char *name)
{
    struct slot *s = find_slot(c, name);
    if (s || c->nslots == MAX_SLOTS)
        return s;
    s = &c->slots[c->nslots++];
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->ctx = c;
    return s;
}

static struct group *find_group(struct ctx *c, const char *name)
{
    for (int i = 0; i < c->ngroups; i++)
        if (strcmp(c->groups[i].name, name) == 0)
            return &c->groups[i];
    return NULL;
}

/* ---- Callbacks the driver calls ------------------------------------------ */

static void event_cb(void *arg, const char *line)
{
    struct ctx *c = arg;
    trace(c, "event", "%s", line);
    char kind[32];
    size_t n = strcspn(line, " :");
    snprintf(kind, sizeof kind, "%.*s", (int)(n < sizeof kind ? n : sizeof kind - 1), line);
    double now = steps_now_ms();
    timeline(c, now, now, kind, "%s", line);
}

static void log_cb(void *arg, const char *line)
{
    trace(arg, "driver", "%s", line);
}

/* ---- Acquire ----------------------------------------------------------------- */

static void do_acquire(struct slot *s, int timeout_ms)
{
    struct ctx *c = s->ctx;
    struct driver_conn *conn = NULL;
    double t = steps_now_ms();
    s->err[0] = '\0';
    /* The bound is judged on the driver's own measurement around the pool
     * call, so a driver process's pipe does not count against the pool. */
    s->outcome = c->drv->acquire(c->d, timeout_ms, &conn, &s->elapsed_ms, s->err, sizeof s->err);
    double end = steps_now_ms();
    timeline(c, t, end, "acquire", "%s: %s after %.1fms", s->name, driver_outcome_name(s->outcome),
             s->elapsed_ms);
    if (s->outcome == DRIVER_OK) {
        s->conn = conn;
        s->held = 1;
    }
}

/* Checks an acquire's outcome and timing against its step. */
static int check_acquire(struct ctx *c, const struct scn_step *st, const struct slot *s)
{
    const char *detail = s->err[0] ? s->err : "";
    trace(c, "", "%s: %s after %.1fms%s%s", s->name, driver_outcome_name(s->outcome), s->elapsed_ms,
          detail[0] ? ": " : "", detail);
    if ((int)s->outcome != (int)st->expect)
        return fail(c, st->line, "acquire %s: expected %s, got %s after %.1fms%s%s", s->name,
                    scn_outcome_name(st->expect), driver_outcome_name(s->outcome), s->elapsed_ms,
                    detail[0] ? " -- " : "", detail);
    if (st->within_ms >= 0 && s->elapsed_ms > st->within_ms)
        return fail(c, st->line, "acquire %s: took %.1fms, bound is within %dms", s->name,
                    s->elapsed_ms, st->within_ms);
    if (st->not_before_ms >= 0 && s->elapsed_ms < st->not_before_ms)
        return fail(c, st->line, "acquire %s: returned %s after %.1fms, earlier than %dms", s->name,
                    driver_outcome_name(s->outcome), s->elapsed_ms, st->not_before_ms);
    return 0;
}

static void *background_acquire(void *arg)
{
    struct slot *s = arg;
    do_acquire(s, s->step->timeout_ms);
    trace(s->ctx, "", "background acquire %s finished: %s after %.1fms", s->name,
          driver_outcome_name(s->outcome), s->elapsed_ms);
    return NULL;
}

static int step_acquire(struct ctx *c, const struct scn_step *st)
{
    struct slot *s = get_slot(c, st->name);
    if (!s)
        return fail(c, st->line, "too many connection names (at most %d)", MAX_SLOTS);
    if (s->held)
        return fail(c, st->line, "acquire %s: %s still holds a connection; release it first",
                    st->name, st->name);
    if (s->running)
        return fail(c, st->line, "acquire %s: a background acquire of %s is still running",
                    st->name, st->name);
    s->step = st;
    if (st->background) {
        s->running = 1;
        s->started_ms = steps_now_ms();
        if (pthread_create(&s->thread, NULL, background_acquire, s) != 0) {
            s->running = 0;
            return fail(c, st->line, "acquire %s: cannot start a thread", st->name);
        }
        trace(c, "", "%s: acquiring in the background", st->name);
        return 0;
    }
    do_acquire(s, st->timeout_ms);
    return check_acquire(c, st, s);
}

/* ---- Worker groups and queues ----------------------------------------------- */

static void group_count(struct group *g, enum driver_outcome o, double wait_ms)
{
    int idx = o >= DRIVER_OTHER ? SCN_OUT__COUNT : (int)o;
    pthread_mutex_lock(&g->ctx->lock);
    g->outcomes[idx]++;
    g->acquires++;
    if (wait_ms > g->max_wait_ms)
        g->max_wait_ms = wait_ms;
    pthread_mutex_unlock(&g->ctx->lock);
}

static void *worker_main(void *arg)
{
    struct group_arg *ga = arg;
    struct group *g = ga->g;
    struct ctx *c = g->ctx;
    double end = steps_now_ms() + g->step->duration_ms;
    while (steps_now_ms() < end) {
        struct driver_conn *conn = NULL;
        double waited = 0;
        enum driver_outcome o = c->drv->acquire(c->d, g->step->timeout_ms, &conn, &waited, NULL, 0);
        group_count(g, o, waited);
        if (o == DRIVER_OK) {
            sleep_ms(g->step->hold_ms);
            (void)c->drv->release(c->d, conn, NULL, 0);
        } else if (o == DRIVER_CLOSED || o == DRIVER_BROKEN) {
            break;
        } else {
            sleep_ms(1); /* a failing pool must not turn a worker into a busy loop */
        }
    }
    free(ga);
    return NULL;
}

static void *queue_main(void *arg)
{
    struct group_arg *ga = arg;
    struct group *g = ga->g;
    struct ctx *c = g->ctx;
    struct driver_conn *conn = NULL;
    double waited = 0;
    enum driver_outcome o = c->drv->acquire(c->d, g->step->timeout_ms, &conn, &waited, NULL, 0);
    if (o == DRIVER_OK) {
        pthread_mutex_lock(&c->lock);
        g->served_seq[ga->index] = ++g->next_seq;
        pthread_mutex_unlock(&c->lock);
    }
    group_count(g, o, waited);
    trace(c, "", "%s[%d]: %s after %.1fms", g->name, ga->index, driver_outcome_name(o), waited);
    if (o == DRIVER_OK) {
        sleep_ms(g->step->hold_ms);
        (void)c->drv->release(c->d, conn, NULL, 0);
    }
    free(ga);
    return NULL;
}

static int metric_pool(struct ctx *c, const char *name, long long *v);

static int step_group(struct ctx *c, const struct scn_step *st)
{
    struct group *g = find_group(c, st->name);
    if (g && !g->joined)
        return fail(c, st->line, "%s: the previous %s is still running", st->name, st->name);
    if (!g) {
        if (c->ngroups == MAX_GROUPS)
            return fail(c, st->line, "too many worker groups (at most %d)", MAX_GROUPS);
        g = &c->groups[c->ngroups++];
    }
    memset(g, 0, sizeof *g);
    snprintf(g->name, sizeof g->name, "%s", st->name);
    g->is_queue = st->kind == SCN_STEP_QUEUE;
    g->step = st;
    g->ctx = c;
    g->nthreads = st->count;
    for (int i = 0; i < st->count; i++) {
        long long before = 0, now = 0;
        if (g->is_queue && metric_pool(c, "waiting", &before) < 0)
            return -1;
        struct group_arg *ga = malloc(sizeof *ga);
        if (!ga)
            return fail(c, st->line, "out of memory");
        ga->g = g;
        ga->index = i;
        if (pthread_create(&g->threads[i], NULL, g->is_queue ? queue_main : worker_main, ga)) {
            free(ga);
            g->started = i;
            return fail(c, st->line, "%s: cannot start thread %d", st->name, i);
        }
        g->started = i + 1;
        if (!g->is_queue)
            continue;
        /* A queue's order must be the order of arrival: start the next
         * waiter only once this one is queued in the pool (or was served
         * at once, or failed). */
        double deadline = steps_now_ms() + 2000;
        for (;;) {
            if (metric_pool(c, "waiting", &now) < 0)
                return -1;
            pthread_mutex_lock(&c->lock);
            long long done = g->acquires;
            pthread_mutex_unlock(&c->lock);
            if (now > before || done > i)
                break;
            if (steps_now_ms() > deadline)
                return fail(c, st->line,
                            "%s[%d] neither queued nor returned within 2s (pool.waiting = %lld)",
                            st->name, i, now);
            sleep_ms(0.5);
        }
    }
    trace(c, "", "%s: %d %s started", st->name, st->count, g->is_queue ? "waiters" : "workers");
    if (!g->is_queue) {
        /* Workers run for a set time: join them now. */
        for (int i = 0; i < g->started; i++)
            pthread_join(g->threads[i], NULL);
        g->joined = 1;
        trace(c, "",
              "%s: %lld acquires: ok %lld, timeout %lld, connect %lld, auth %lld, "
              "closed %lld; longest wait %.1fms",
              st->name, g->acquires, g->outcomes[SCN_OUT_OK], g->outcomes[SCN_OUT_TIMEOUT],
              g->outcomes[SCN_OUT_CONNECT], g->outcomes[SCN_OUT_AUTH], g->outcomes[SCN_OUT_CLOSED],
              g->max_wait_ms);
    }
    return 0;
}

static int join_group(struct ctx *c, const struct scn_step *st, struct group *g)
{
    double t = steps_now_ms();
    double deadline = st && st->within_ms >= 0 ? t + st->within_ms : -1;
    /* Threads cannot be cancelled safely mid-acquire, so wait for them
     * all, and judge the bound on how long that took. */
    for (int i = 0; i < g->started; i++)
        pthread_join(g->threads[i], NULL);
    g->joined = 1;
    double took = steps_now_ms() - t;
    trace(c, "", "%s: all %d waiters returned after %.1fms", g->name, g->started, took);
    if (deadline >= 0 && steps_now_ms() > deadline)
        return fail(c, st->line, "wait %s: waiters took %.1fms to return, bound is %dms", g->name,
                    took, st->within_ms);
    return 0;
}

static int step_wait(struct ctx *c, const struct scn_step *st)
{
    struct group *g = find_group(c, st->name);
    if (g)
        return join_group(c, st, g);
    struct slot *s = find_slot(c, st->name);
    if (!s || !s->running)
        return fail(c, st->line, "wait %s: nothing is running under that name", st->name);
    double t = steps_now_ms();
    pthread_join(s->thread, NULL);
    s->running = 0;
    double took = steps_now_ms() - t;
    if (st->within_ms >= 0 && took > st->within_ms)
        return fail(c, st->line,
                    "wait %s: the acquire returned %.1fms after the wait began, "
                    "bound is %dms",
                    st->name, took, st->within_ms);
    return check_acquire(c, s->step, s);
}

/* ---- Queries ------------------------------------------------------------------ */

static int step_query(struct ctx *c, const struct scn_step *st)
{
    struct slot *s = find_slot(c, st->name);
    if (!s || !s->held)
        return fail(c, st->line, "query on %s: %s holds no connection", st->name, st->name);
    double t0 = steps_now_ms();
    int limit = st->within_ms >= 0 ? st->within_ms : QUERY_DEFAULT_DEADLINE_MS;
    double deadline = t0 + limit;
    struct driver_result qr;
    if (c->drv->query(c->d, s->conn, st->sql, limit, &qr) < 0 || qr.outcome == DRIVER_Q_BROKEN)
        return fail(c, st->line, "query on %s: the driver failed: %s", st->name, qr.message);
    int timed_out = qr.outcome == DRIVER_Q_TIMEOUT, ok = qr.outcome == DRIVER_Q_OK;
    char sqlstate[6], errmsg[512];
    snprintf(sqlstate, sizeof sqlstate, "%s", qr.sqlstate);
    snprintf(errmsg, sizeof errmsg, "%s", qr.message);
    double took = qr.elapsed_ms;
    timeline(c, t0, steps_now_ms(), "query", "%s: %s %s%s", st->name, st->sql,
             timed_out ? "no answer"
             : ok      ? "ok"
                       : "error ",
             timed_out || ok ? "" : sqlstate);
    size_t el = strlen(errmsg);
    while (el && (errmsg[el - 1] == '\n' || errmsg[el - 1] == ' '))
        errmsg[--el] = '\0';
    if (timed_out) {
        trace(c, "", "query on %s: no answer after %.1fms", st->name, took);
        if (st->expect == SCN_OUT_OK || st->within_ms >= 0)
            return fail(c, st->line, "query on %s: no answer within %.0fms", st->name,
                        deadline - t0);
        return 0;
    }
    trace(c, "", "query on %s: %s%s%s%s after %.1fms", st->name, ok ? "ok" : "error",
          sqlstate[0] ? " " : "", sqlstate, ok ? "" : " -- ", took);
    if (!ok && errmsg[0])
        trace(c, "", "  %s", errmsg);
    if (st->expect == SCN_OUT_OK && !ok)
        return fail(c, st->line, "query on %s: expected ok, got error %s%s", st->name,
                    sqlstate[0] ? sqlstate : "(no SQLSTATE)", errmsg[0] ? "" : "");
    if (st->expect == SCN_OUT_ERROR && ok)
        return fail(c, st->line, "query on %s: expected an error, got ok", st->name);
    if (st->expect == SCN_OUT_ERROR && st->sqlstate[0] && strcmp(st->sqlstate, sqlstate) != 0)
        return fail(c, st->line, "query on %s: expected error %s, got %s (%s)", st->name,
                    st->sqlstate, sqlstate[0] ? sqlstate : "no SQLSTATE", errmsg);
    return 0;
}

/* ---- Metrics ------------------------------------------------------------------ */

static int metric_pool(struct ctx *c, const char *name, long long *v)
{
    if (c->drv->metric(c->d, name, v) < 0)
        return fail(c, 0, "the %s driver has no statistic '%s'", c->info->driver, name);
    return 0;
}

/* Resolves "source.name"; returns 0, or -1 with msg. */
static int resolve_metric(struct ctx *c, const char *metric, long long *v, char *msg, size_t msglen)
{
    const char *dot = strchr(metric, '.');
    char src[SCN_NAME_MAX];
    snprintf(src, sizeof src, "%.*s", (int)(dot - metric), metric);
    const char *name = dot + 1;
    if (strcmp(src, "pool") == 0) {
        if (c->drv->metric(c->d, name, v) < 0) {
            snprintf(msg, msglen, "the %s driver has no statistic '%s'", c->info->driver, name);
            return -1;
        }
        return 0;
    }
    if (strcmp(src, "server") == 0 || strcmp(src, "libpq") == 0 || strcmp(src, "proxy") == 0)
        return backend_metric(c->be, src, name, v, msg, msglen);
    struct group *g = find_group(c, src);
    if (g) {
        static const char *const words[] = {"ok", "timeout", "auth", "connect", "config", "closed"};
        pthread_mutex_lock(&c->lock);
        int found = 1;
        if (strcmp(name, "acquires") == 0) {
            *v = g->acquires;
        } else if (strcmp(name, "max_wait") == 0) {
            *v = (long long)(g->max_wait_ms + 0.999);
        } else if (strcmp(name, "errors") == 0) {
            *v = g->acquires - g->outcomes[SCN_OUT_OK];
        } else if (strcmp(name, "in_order") == 0) {
            /* Served in the order of arrival: the sequence numbers of the
             * served waiters increase with their index. */
            int last = 0, in_order = 1;
            for (int i = 0; i < g->started; i++) {
                if (!g->served_seq[i])
                    continue;
                if (g->served_seq[i] < last)
                    in_order = 0;
                last = g->served_seq[i];
            }
            *v = in_order;
        } else {
            found = 0;
            for (int i = 0; i < 6; i++) {
                if (strcmp(name, words[i]) == 0) {
                    *v = g->outcomes[i];
                    found = 1;
                }
            }
        }
        pthread_mutex_unlock(&c->lock);
        if (!found)
            snprintf(msg, msglen,
                     "%s has no metric '%s' (ok, timeout, auth, connect, config, closed, errors, "
                     "acquires, max_wait%s)",
                     src, name, g->is_queue ? ", in_order" : "");
        return found ? 0 : -1;
    }
    struct slot *s = find_slot(c, src);
    if (s) {
        if (strcmp(name, "elapsed") == 0)
            *v = (long long)(s->elapsed_ms + 0.999);
        else if (strcmp(name, "held") == 0)
            *v = s->held;
        else if (strcmp(name, "txstatus") == 0 && s->held) {
            /* idle 0, active 1, in transaction 2, in a failed one 3, unknown 4
             * (libpq's PQTRANS_* numbering) */
            struct driver_conn_info ci;
            if (c->drv->conn_info(c->d, s->conn, &ci, msg, msglen) < 0)
                return -1;
            if (ci.txstatus == DRIVER_TX_NONE) {
                snprintf(msg, msglen, "%s.txstatus: the driver did not report it", src);
                return -1;
            }
            *v = (long long)ci.txstatus;
        } else if (strcmp(name, "txstatus") == 0) {
            snprintf(msg, msglen, "%s.txstatus: %s holds no connection", src, src);
            return -1;
        } else {
            snprintf(msg, msglen, "%s has no metric '%s' (elapsed, held, txstatus)", src, name);
            return -1;
        }
        return 0;
    }
    snprintf(msg, msglen, "nothing named '%s' has run yet", src);
    return -1;
}

static int step_cond(struct ctx *c, const struct scn_step *st)
{
    const struct scn_cond *cd = &st->cond;
    char msg[512];
    long long v = 0;
    double t0 = steps_now_ms();
    double deadline = t0 + (st->kind == SCN_STEP_EVENTUALLY ? st->duration_ms : 0);
    for (;;) {
        if (resolve_metric(c, cd->metric, &v, msg, sizeof msg) < 0)
            return fail(c, st->line, "%s", msg);
        if (scn_compare(v, cd->op, cd->value)) {
            trace(c, "", "ok: %s = %lld%s", cd->metric, v,
                  st->kind == SCN_STEP_EVENTUALLY ? "" : "");
            if (st->kind == SCN_STEP_EVENTUALLY)
                trace(c, "", "  (held after %.1fms)", steps_now_ms() - t0);
            return 0;
        }
        if (steps_now_ms() >= deadline)
            break;
        sleep_ms(POLL_INTERVAL_MS);
    }
    if (st->kind == SCN_STEP_EVENTUALLY)
        return fail(c, st->line, "eventually %s %s %lld within %dms: still %s = %lld", cd->metric,
                    scn_op_name(cd->op), cd->value, st->duration_ms, cd->metric, v);
    return fail(c, st->line, "expect %s %s %lld: %s = %lld", cd->metric, scn_op_name(cd->op),
                cd->value, cd->metric, v);
}

/* ---- Steps --------------------------------------------------------------------- */

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the directory stream's own fd */
}

static int run_step(struct ctx *c, const struct scn_step *st)
{
    char tag[16], msg[512] = "";
    snprintf(tag, sizeof tag, "line %d", st->line);
    trace(c, tag, "%s", st->text);
    struct slot *s;
    switch (st->kind) {
    case SCN_STEP_ACQUIRE:
        return step_acquire(c, st);
    case SCN_STEP_WAIT:
        return step_wait(c, st);
    case SCN_STEP_RELEASE:
    case SCN_STEP_DISCARD:
        s = find_slot(c, st->name);
        if (!s || (!s->held && !st->again))
            return fail(c, st->line,
                        "%s %s: %s holds no connection (write 'release %s again' to test a "
                        "double release on purpose)",
                        scn_step_name(st->kind), st->name, st->name, st->name);
        /* A pool that raises on a release (say, on a deliberate second
         * one) is telling the application something: trace it, and let the
         * scenario's expectations judge the pool's state. */
        if ((st->kind == SCN_STEP_RELEASE ? c->drv->release(c->d, s->conn, msg, sizeof msg)
                                          : c->drv->discard(c->d, s->conn, msg, sizeof msg)) < 0) {
            if (c->drv->fate(c->d, NULL, 0))
                return fail(c, st->line, "%s %s", scn_step_name(st->kind), st->name);
            trace(c, "", "%s %s: the pool raised: %s", scn_step_name(st->kind), st->name, msg);
        }
        s->held = 0;
        {
            double now = steps_now_ms();
            timeline(c, now, now, scn_step_name(st->kind), "%s%s", st->name,
                     st->again ? " (again)" : "");
        }
        return 0;
    case SCN_STEP_QUERY:
        return step_query(c, st);
    case SCN_STEP_HOLD:
        sleep_ms(st->duration_ms);
        return 0;
    case SCN_STEP_MAINTAIN:
        if (c->drv->maintain(c->d, msg, sizeof msg) < 0) {
            if (c->drv->fate(c->d, NULL, 0))
                return fail(c, st->line, "maintain");
            trace(c, "", "maintain reported an error: %s", msg);
        }
        return 0;
    case SCN_STEP_WORKERS:
    case SCN_STEP_QUEUE:
        return step_group(c, st);
    case SCN_STEP_FAULT: {
        struct backend_target tgt, *target = NULL;
        if (st->fault.target == SCN_TARGET_CONN) {
            s = find_slot(c, st->fault.name);
            if (!s || !s->conn)
                return fail(c, st->line, "fault on %s: %s never held a connection", st->fault.name,
                            st->fault.name);
            struct driver_conn_info ci;
            if (c->drv->conn_info(c->d, s->conn, &ci, msg, sizeof msg) < 0)
                return fail(c, st->line, "fault on %s: conn_info: %s", st->fault.name, msg);
            tgt = (struct backend_target){ci.backend_pid, ci.client_port, ci.fakepq_id};
            target = &tgt;
        }
        double t = steps_now_ms();
        if (backend_fault(c->be, &st->fault, target, msg, sizeof msg) < 0)
            return fail(c, st->line, "fault %s: %s", scn_fault_name(st->fault.kind), msg);
        trace(c, "", "%s", msg);
        timeline(c, t, steps_now_ms(), "fault", "%s", st->text);
        return 0;
    }
    case SCN_STEP_HEAL:
        if (backend_heal(c->be, msg, sizeof msg) < 0)
            return fail(c, st->line, "heal: %s", msg);
        trace(c, "", "%s", msg);
        {
            double now = steps_now_ms();
            timeline(c, now, now, "heal", "heal");
        }
        return 0;
    case SCN_STEP_PASSWORD:
        /* Acknowledged before the next step runs. */
        if (c->drv->password(c->d, st->sql, msg, sizeof msg) < 0)
            return fail(c, st->line, "password: %s", msg);
        return 0;
    case SCN_STEP_CLOSE: {
        double t = steps_now_ms();
        int rc = c->drv->close(c->d, msg, sizeof msg);
        c->pool_closed = 1;
        timeline(c, t, steps_now_ms(), "close", "pool closed");
        if (rc < 0)
            return fail(c, st->line, "close: %s", msg);
        return 0;
    }
    case SCN_STEP_EXPECT:
    case SCN_STEP_EVENTUALLY:
        return step_cond(c, st);
    case SCN_STEP__COUNT:
        break;
    }
    return fail(c, st->line, "internal error: unknown step");
}

/* ---- Applicability ----------------------------------------------------------- */

/* Whether this driver can run this scenario on this backend. Returns 0, or
 * 1 with why: a key the driver declares unsupported, a metric or a
 * capability it lacks. Such a case is N/A -- never a pass, never a fail. */
static int not_applicable(struct ctx *c, char *why, size_t len)
{
    const struct driver_info *in = c->info;
    const struct scn *s = c->o->scn;
    const char *dname = in->driver;
    int fakepq = (in->caps & DRIVER_CAP_FAKEPQ) != 0;
    if (c->o->backend == SCN_BACKEND_FAKE && !fakepq)
        return snprintf(why, len,
                        "the fake backend simulates libpq inside pgfault; %s's pool does not "
                        "use it (use the proxy backend)",
                        dname),
               1;
    for (size_t i = 0; i < s->npool; i++) {
        const char *detail;
        int st = driver_key_status(in, s->pool[i].key, &detail);
        if (st < 0 || st == DRIVER_KEY_UNSUPPORTED)
            return snprintf(why, len, "pool %s: %s cannot honour it (%s)", s->pool[i].key, dname,
                            detail),
                   1;
    }
    for (size_t i = 0; i < s->nsteps; i++) {
        const struct scn_step *st = &s->steps[i];
        unsigned need = 0;
        const char *what = NULL;
        if ((st->kind == SCN_STEP_ACQUIRE || st->kind == SCN_STEP_WORKERS ||
             st->kind == SCN_STEP_QUEUE) &&
            st->timeout_ms >= 0 && !(in->caps & DRIVER_CAP_ACQUIRE_TIMEOUT))
            return snprintf(why, len,
                            "line %d: %s sets its own timeout, and %s's pool takes no timeout "
                            "per acquire (capability acquire_timeout)",
                            st->line, scn_step_name(st->kind), dname),
                   1;
        if (st->kind == SCN_STEP_MAINTAIN)
            need = DRIVER_CAP_MAINTAIN, what = "maintain";
        else if (st->kind == SCN_STEP_PASSWORD)
            need = DRIVER_CAP_PASSWORD, what = "password";
        else if (st->kind == SCN_STEP_QUEUE && !driver_has_metric(in, "waiting"))
            return snprintf(why, len, "line %d: a queue needs pool.waiting, which %s lacks",
                            st->line, dname),
                   1;
        else if (st->kind == SCN_STEP_FAULT) {
            const struct scn_fault *f = &st->fault;
            if ((f->kind == SCN_FAULT_CONNECT || f->kind == SCN_FAULT_CALL ||
                 f->kind == SCN_FAULT_SLOW_CONNECT) &&
                !fakepq)
                return snprintf(why, len,
                                "line %d: fault %s is injected inside fakepq; %s's pool does not "
                                "use it",
                                st->line, scn_fault_name(f->kind), dname),
                       1;
            if (f->target == SCN_TARGET_CONN && f->kind == SCN_FAULT_KILL)
                need = DRIVER_CAP_BACKEND_PID | DRIVER_CAP_CLIENT_PORT, what = "fault kill conn";
            else if (f->target == SCN_TARGET_CONN && !fakepq)
                need = DRIVER_CAP_CLIENT_PORT, what = "a fault on one connection";
        } else if (st->kind == SCN_STEP_EXPECT || st->kind == SCN_STEP_EVENTUALLY) {
            const char *m = st->cond.metric, *dot = strchr(m, '.');
            if (strncmp(m, "pool.", 5) == 0 && !driver_has_metric(in, m + 5))
                return snprintf(why, len, "line %d: %s has no metric %s", st->line, dname, m), 1;
            if (strncmp(m, "libpq.", 6) == 0 && !fakepq)
                return snprintf(why, len,
                                "line %d: %s counts calls into fakepq; %s's pool does not use it",
                                st->line, m, dname),
                       1;
            if (dot && strcmp(dot, ".txstatus") == 0)
                need = DRIVER_CAP_TXSTATUS, what = "txstatus";
        }
        if (need && (in->caps & need) != need)
            return snprintf(
                       why, len, "line %d: %s needs a capability %s lacks (%s)", st->line, what,
                       dname,
                       driver_cap_name((enum driver_cap)(need & ~in->caps & -(need & ~in->caps)))),
                   1;
    }
    return 0;
}

/* ---- The run ------------------------------------------------------------------- */

/* The server's sessions for the role back to zero, waited for with a
 * deadline (the server may need a moment to notice closed sockets). */
static void check_backends(struct ctx *c)
{
    char msg[512];
    long long backends = -1;
    double deadline = steps_now_ms() + DRAIN_DEADLINE_MS;
    for (;;) {
        if (backend_metric(c->be, "server", "backends", &backends, msg, sizeof msg) < 0) {
            fail(c, 0, "cannot count server backends: %s", msg);
            return;
        }
        if (backends == 0 || steps_now_ms() > deadline)
            break;
        sleep_ms(10);
    }
    if (backends > 0)
        fail(c, 0, "%lld server backend(s) still open %ds after the pool closed", backends,
             DRAIN_DEADLINE_MS / 1000);
    else
        trace(c, "check", "server backends back to 0");
}

/* What fakepq and this process can see of an in-process pool: no PGconn or
 * PGresult left, no file descriptor leaked. */
static void check_in_process_leaks(struct ctx *c, int fds_before)
{
    struct fakepq_counters fc;
    fakepq_get_counters(&fc);
    if (fc.double_finishes > 0)
        fail(c, 0, "the pool finished a PGconn twice (%ld double PQfinish call(s))",
             fc.double_finishes);
    int leaks = fakepq_leaks(NULL);
    if (leaks > 0) {
        trace(c, "check", "leaks:");
        pthread_mutex_lock(&c->lock);
        (void)fakepq_leaks(c->trace);
        fflush(c->trace);
        pthread_mutex_unlock(&c->lock);
        fail(c, 0, "the pool leaked %d PGconn/PGresult object(s) (see the trace)", leaks);
    }
    /* The proxy backend's proxy runs in this process and closes its two
     * sockets per connection when it sees the pool's close: wait for that
     * (with a deadline) before calling anything a leak. */
    int fds_after = count_fds();
    double fd_deadline = steps_now_ms() + DRAIN_DEADLINE_MS;
    while (fds_before >= 0 && fds_after > fds_before && steps_now_ms() < fd_deadline) {
        sleep_ms(10);
        fds_after = count_fds();
    }
    if (fds_before >= 0 && fds_after > fds_before)
        fail(c, 0, "%d file descriptor(s) leaked (%d open before the pool, %d after it closed)",
             fds_after - fds_before, fds_before, fds_after);
    else
        trace(c, "check", "no leaks: no PGconn, PGresult or file descriptor left");
}

int steps_run(const struct steps_options *o, struct steps_result *r)
{
    struct ctx *c = calloc(1, sizeof *c);
    char msg[512];
    memset(r, 0, sizeof *r);
    r->passed = 1;
    r->verdict = STEPS_PASS;
    if (!c) {
        snprintf(r->message, sizeof r->message, "out of memory");
        return -1;
    }
    c->o = o;
    c->drv = o->driver;
    c->trace = o->trace;
    c->r = r;
    c->t0 = steps_now_ms();
    pthread_mutex_init(&c->lock, NULL);
    int in_process = 0;

    trace(c, "setup", "scenario %s on the %s backend, driver %s", o->scn->name,
          scn_backend_name(o->backend), o->driver_name);
    struct driver_start_args sa = {o->driver_command, event_cb, log_cb, c};
    int src = c->drv->start(&sa, &c->d, msg, sizeof msg);
    if (src < 0) {
        fail(c, 0, "driver start: %s", msg);
        if (src == DRIVER_CRASHED || src == DRIVER_HUNG)
            r->verdict = src == DRIVER_CRASHED ? STEPS_CRASH : STEPS_HANG;
        goto out;
    }
    c->info = c->drv->info(c->d);
    in_process = (c->info->caps & DRIVER_CAP_FAKEPQ) != 0;
    trace(c, "setup", "driver %s: pool %s %s", c->info->driver, c->info->pool, c->info->version);
    for (size_t i = 0; i < o->ndriver_settings; i++)
        trace(c, "setup", "driver setting %s", o->driver_settings[i]);
    if (not_applicable(c, msg, sizeof msg)) {
        r->passed = 0;
        r->verdict = STEPS_NA;
        snprintf(r->message, sizeof r->message, "%s", msg);
        trace(c, "N/A", "%s", msg);
        goto out_driver;
    }

    struct backend_options bo = {o->backend, o->scn, o->server_conninfo, o->seed};
    if (backend_open(&bo, &c->be, msg, sizeof msg) < 0) {
        fail(c, 0, "backend setup: %s", msg);
        goto out_driver;
    }
    /* The pool starts with the server's password unless the pool line says
     * otherwise (wrong-password scenarios). */
    const char *password = backend_password(c->be);
    for (size_t i = 0; i < o->scn->npool; i++)
        if (strcmp(o->scn->pool[i].key, "password") == 0)
            password = o->scn->pool[i].value;
    int fds_before = count_fds();

    const struct backend_endpoint *ep = backend_endpoint(c->be);
    struct driver_open_args a = {
        .host = ep->host,
        .port = ep->port,
        .user = ep->user,
        .dbname = ep->dbname,
        .password = password,
        .settings = o->scn->pool,
        .nsettings = o->scn->npool,
        .driver_settings = o->driver_settings,
        .ndriver_settings = o->ndriver_settings,
    };
    trace(c, "setup", "pool open: host=%s port=%d user=%s dbname=%s", a.host, a.port, a.user,
          a.dbname);
    int orc = c->drv->open(c->d, &a, msg, sizeof msg);
    if (orc == DRIVER_NA) {
        r->passed = 0;
        r->verdict = STEPS_NA;
        snprintf(r->message, sizeof r->message, "%s", msg);
        trace(c, "N/A", "%s", msg);
        goto out_backend;
    }
    if (orc < 0) {
        fail(c, 0, "pool open: %s", msg);
        goto out_backend;
    }
    trace(c, "setup", "ready in %.1fms", steps_now_ms() - c->t0);
    c->t0 = steps_now_ms(); /* step times are relative to the first step */
    /* Test-only: the case's server, proxy, pool (and driver process) are
     * all up here. */
    testhook_pause("case", NULL);

    for (size_t i = 0; i < o->scn->nsteps && r->passed; i++) {
        const struct scn_step *st = &o->scn->steps[i];
        if (run_step(c, st) < 0)
            break;
        if ((c->info->caps & DRIVER_CAP_INVARIANTS) &&
            c->drv->check_invariants(c->d, msg, sizeof msg) < 0)
            fail(c, st->line, "pool invariant broken after this step: %s", msg);
    }

    /* Wind down: join whatever still runs, close the pool, give back what
     * is still held (the pool finishes it on release), then check. */
    for (int i = 0; i < c->nslots; i++) {
        if (c->slots[i].running) {
            pthread_join(c->slots[i].thread, NULL);
            c->slots[i].running = 0;
        }
    }
    /* What the scenario still holds goes back first, as a service's
     * requests finish before it closes its pool (a pool may wait for them
     * in close). Queued waiters are joined after the close wakes them. */
    for (int i = 0; i < c->nslots; i++) {
        if (c->slots[i].held) {
            (void)c->drv->release(c->d, c->slots[i].conn, msg, sizeof msg);
            c->slots[i].held = 0;
        }
    }
    if (!c->pool_closed && c->drv->close(c->d, msg, sizeof msg) < 0)
        fail(c, 0, "closing the pool: %s", msg);
    for (int i = 0; i < c->ngroups; i++)
        if (!c->groups[i].joined)
            (void)join_group(c, NULL, &c->groups[i]);
    trace(c, "check", "pool closed");
    if (in_process) {
        c->drv->destroy(c->d);
        c->d = NULL;
        check_in_process_leaks(c, fds_before);
        check_backends(c);
    } else {
        /* A driver process's sockets close when it exits: count the
         * server's sessions while it still runs, so a pool that leaks
         * connections is caught rather than rescued by the exit. */
        check_backends(c);
    }

out_backend:
    backend_close(c->be);
out_driver:
    if (c->d) {
        /* A driver that broke during the wind-down is still the case's
         * verdict. */
        char why[700];
        int fate = c->drv->fate(c->d, why, sizeof why);
        if (fate && !r->passed) {
            trace(c, "check", "the driver %s after the verdict: %s", fate == 1 ? "crashed" : "hung",
                  why);
        } else if (fate) {
            r->passed = 0;
            r->verdict = fate == 1 ? STEPS_CRASH : STEPS_HANG;
            snprintf(r->message, sizeof r->message, "driver %s: %s", fate == 1 ? "crashed" : "hung",
                     why);
            trace(c, "FAIL", "%s", r->message);
        }
        c->drv->destroy(c->d);
        c->d = NULL;
    }
out:
    trace(c, r->passed ? "PASS" : "result", "%s",
          r->passed ? o->scn->name : steps_verdict_name(r->verdict));
    pthread_mutex_destroy(&c->lock);
    free(c);
    return 0;
}

const char *steps_verdict_name(enum steps_verdict v)
{
    static const char *const n[] = {"PASS", "FAIL", "CRASH", "HANG", "N/A"};
    return (unsigned)v < 5 ? n[v] : "?";
}
