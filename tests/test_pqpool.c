/*
 * Tests of pqpool (pool/pqpool.c) through fakepq.
 *
 * Group "sim": fakepq in simulated mode, faults scripted per test; every
 * behaviour of issue 3 has at least one test here that fails if the
 * behaviour is removed. Group "real": fakepq in passthrough mode against a
 * throwaway PostgreSQL (harness/pgserver), for the behaviours a real
 * server can show (dead idle connections, credentials, refused connects,
 * restart, exhaustion, SIGPIPE).
 *
 * Timing bounds: an operation with deadline D must end in [D - 2 ms,
 * D + SLACK_MS]. SLACK_MS is generous (sanitizer builds on a loaded
 * 2-core machine); the behaviours under test differ from it by seconds
 * (a connect that hangs forever, a retry storm, a 5 s query).
 *
 * Every test ends by freeing its pool and checking with fakepq that no
 * PGconn or PGresult was leaked and none was finished twice.
 */
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "fakepq.h"
#include "pgserver.h"
#include "pqpool.h"

#define SLACK_MS 400
#define SIM_CONNINFO "host=127.0.0.1 port=5432 user=pgfault dbname=pgfault"
#define NTHREADS 32

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* Polls cond every millisecond until it holds or ms pass, then asserts it. */
#define EVENTUALLY(cond, ms)                                                                       \
    do {                                                                                           \
        int64_t until_ = now_ms() + (ms);                                                          \
        while (!(cond) && now_ms() < until_)                                                       \
            sleep_ms(1);                                                                           \
        assert_true(cond);                                                                         \
    } while (0)

#define assert_between(v, lo, hi)                                                                  \
    do {                                                                                           \
        long long v_ = (long long)(v);                                                             \
        if (v_ < (long long)(lo) || v_ > (long long)(hi))                                          \
            fail_msg("%s = %lld, expected in [%lld, %lld]", #v, v_, (long long)(lo),               \
                     (long long)(hi));                                                             \
    } while (0)

/* ---- Fixture ------------------------------------------------------------------- */

struct fix {
    struct pqpool *p;
    struct pqpool_config cfg;
    pthread_mutex_t mu;
    int events[PQPOOL_EV_CLOSED + 1];
    int ejected[PQPOOL_EJECT__COUNT];
    char last_sqlstate[6];
    const char *password; /* atomic pointer to a string literal */
    int pw_calls;         /* atomic */
    struct pgserver *srv; /* real group only */
    char conninfo[512];
};

static const char *fix_password(void *ctx)
{
    struct fix *f = ctx;
    __atomic_add_fetch(&f->pw_calls, 1, __ATOMIC_RELAXED);
    return __atomic_load_n(&f->password, __ATOMIC_ACQUIRE);
}

static void set_password(struct fix *f, const char *pw)
{
    __atomic_store_n(&f->password, pw, __ATOMIC_RELEASE);
}

static void fix_event(void *ctx, const struct pqpool_event *ev)
{
    struct fix *f = ctx;
    assert_non_null(ev->message); /* the contract: never NULL */
    pthread_mutex_lock(&f->mu);
    f->events[ev->type]++;
    if (ev->type == PQPOOL_EV_EJECTED)
        f->ejected[ev->reason]++;
    if (ev->type == PQPOOL_EV_CONNECT_FAILED)
        snprintf(f->last_sqlstate, sizeof f->last_sqlstate, "%s", ev->sqlstate);
    pthread_mutex_unlock(&f->mu);
}

static int nev(struct fix *f, enum pqpool_event_type t)
{
    int n;
    pthread_mutex_lock(&f->mu);
    n = f->events[t];
    pthread_mutex_unlock(&f->mu);
    return n;
}

static struct pqpool_stats st(struct fix *f)
{
    struct pqpool_stats s;
    pqpool_stats(f->p, &s);
    return s;
}

static struct fakepq_counters ctr(void)
{
    struct fakepq_counters c;
    fakepq_get_counters(&c);
    return c;
}

/* A config for the tests: small, quiet (no housekeeping thread unless a
 * test wants it), the simulated server's credentials. */
static void fix_config(struct fix *f, const char *conninfo)
{
    pqpool_config_init(&f->cfg);
    f->cfg.conninfo = conninfo;
    f->cfg.max_size = 4;
    f->cfg.min_idle = 0;
    f->cfg.acquire_timeout_ms = 1000;
    f->cfg.connect_timeout_ms = 500;
    f->cfg.housekeeping_interval_ms = 0;
    f->cfg.password = fix_password;
    f->cfg.password_ctx = f;
    f->cfg.event = fix_event;
    f->cfg.event_ctx = f;
}

static void fix_open(struct fix *f)
{
    char err[256];
    int rc = pqpool_open(&f->cfg, &f->p, err, sizeof err);
    if (rc != 0)
        fail_msg("pqpool_open: %d %s", rc, err);
}

static int sim_setup(void **state)
{
    char err[256];
    struct fix *f = calloc(1, sizeof *f);
    assert_non_null(f);
    pthread_mutex_init(&f->mu, NULL);
    if (fakepq_init(FAKEPQ_SIMULATED, err, sizeof err) != 0)
        fail_msg("fakepq_init: %s", err);
    f->password = "pgfault";
    fix_config(f, SIM_CONNINFO);
    *state = f;
    return 0;
}

/* Frees the pool and checks that fakepq saw every PGconn and PGresult
 * released exactly once. */
static int fix_teardown(void **state)
{
    struct fix *f = *state;
    struct fakepq_counters c;
    pqpool_free(f->p);
    f->p = NULL;
    fakepq_heal();
    c = ctr();
    pgserver_destroy(f->srv);
    pthread_mutex_destroy(&f->mu);
    free(f);
    if (fakepq_leaks(stderr) != 0)
        fail_msg("fakepq reports leaked connections or results");
    assert_int_equal(c.double_finishes, 0);
    return 0;
}

/* Runs a query on a pooled connection and returns its status. */
static ExecStatusType q(struct fix *f, PGconn *c, const char *sql)
{
    PGresult *r = pqpool_exec(f->p, c, sql);
    ExecStatusType s = PQresultStatus(r);
    PQclear(r);
    return s;
}

static PGconn *must_acquire(struct fix *f, int timeout_ms)
{
    PGconn *c = NULL;
    int rc = pqpool_acquire(f->p, timeout_ms, &c);
    if (rc != 0)
        fail_msg("acquire: %s (%s)", pqpool_strerror(rc), pqpool_last_error(f->p));
    assert_non_null(c);
    return c;
}

/* Fills the idle list with n connections opened by acquires. */
static void make_idle(struct fix *f, int n)
{
    PGconn *c[16];
    int i;
    for (i = 0; i < n; i++)
        c[i] = must_acquire(f, -1);
    for (i = 0; i < n; i++)
        pqpool_release(f->p, c[i]);
    assert_int_equal(st(f).idle, n);
}

/* ---- Threads used by several tests ---------------------------------------------- */

struct worker {
    struct fix *f;
    pthread_t t;
    int idx;
    int timeout_ms;
    int hold_ms;
    int rc;
    int order;
    int64_t elapsed_ms;
    int *served; /* atomic counter giving the serving order */
};

static void *acquire_main(void *arg)
{
    struct worker *w = arg;
    PGconn *c = NULL;
    int64_t t0 = now_ms();
    w->rc = pqpool_acquire(w->f->p, w->timeout_ms, &c);
    w->elapsed_ms = now_ms() - t0;
    if (w->rc == 0) {
        w->order = __atomic_fetch_add(w->served, 1, __ATOMIC_SEQ_CST);
        if (w->hold_ms)
            sleep_ms(w->hold_ms);
        pqpool_release(w->f->p, c);
    }
    return NULL;
}

/* Starts n acquiring threads one after another, each only once the
 * previous one is queued, so their arrival order is known. */
static void start_queue(struct fix *f, struct worker *w, int n, int timeout_ms, int hold_ms,
                        int *served)
{
    int i, base = st(f).waiting;
    for (i = 0; i < n; i++) {
        w[i] = (struct worker){.f = f,
                               .idx = i,
                               .timeout_ms = timeout_ms,
                               .hold_ms = hold_ms,
                               .served = served,
                               .order = -1};
        assert_int_equal(pthread_create(&w[i].t, NULL, acquire_main, &w[i]), 0);
        EVENTUALLY(st(f).waiting == base + i + 1, 5000);
    }
}

static void join_all(struct worker *w, int n)
{
    int i;
    for (i = 0; i < n; i++)
        pthread_join(w[i].t, NULL);
}

/* ==== 0. API basics =============================================================== */

static void test_config_defaults(void **state)
{
    struct pqpool_config c;
    (void)state;
    pqpool_config_init(&c);
    assert_int_equal(c.max_size, 10);
    assert_int_equal(c.min_idle, 2);
    assert_int_equal(c.acquire_timeout_ms, 2000);
    assert_int_equal(c.connect_timeout_ms, 2000);
    assert_int_equal(c.idle_timeout_ms, 30000);
    assert_int_equal(c.max_lifetime_ms, 30 * 60 * 1000);
    assert_int_equal(c.validate_idle_ms, 1000);
    assert_int_equal(c.validation_timeout_ms, 500);
    assert_int_equal(c.auth_retry_after_ms, 30000);
    assert_int_equal(c.keepalives, 1);
    assert_true(c.backoff_initial_ms > 0 && c.backoff_max_ms >= c.backoff_initial_ms);
    pqpool_config_init(NULL);
}

static void test_open_rejects_bad_config(void **state)
{
    struct fix *f = *state;
    struct pqpool *p = (struct pqpool *)1;
    char err[256];

    assert_int_equal(pqpool_open(NULL, &p, err, sizeof err), PQPOOL_EINVAL);
    assert_null(p);
    assert_int_equal(pqpool_open(&f->cfg, NULL, NULL, 0), PQPOOL_EINVAL);

    f->cfg.max_size = 0;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    assert_non_null(strstr(err, "max_size"));
    fix_config(f, SIM_CONNINFO);
    f->cfg.min_idle = 5;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.backoff_max_ms = 1;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.keepalives_count = 0;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.connect_timeout_ms = 0;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.idle_timeout_ms = -1;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.validation_timeout_ms = 0;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.auth_retry_after_ms = -1;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    fix_config(f, SIM_CONNINFO);
    f->cfg.housekeeping_interval_ms = -1;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    /* Each remaining bound, one at a time; the message names the field. */
    {
        struct {
            size_t off;
            int value;
            const char *field;
        } bad[] = {
#define BAD(fld, v) {offsetof(struct pqpool_config, fld), v, #fld}
            BAD(min_idle, -1),
            BAD(acquire_timeout_ms, -1),
            BAD(max_lifetime_ms, -1),
            BAD(release_timeout_ms, -1),
            BAD(backoff_initial_ms, 0),
            BAD(keepalives_idle_s, 0),
            BAD(keepalives_interval_s, 0),
            BAD(tcp_user_timeout_ms, -1),
#undef BAD
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            fix_config(f, SIM_CONNINFO);
            *(int *)((char *)&f->cfg + bad[i].off) = bad[i].value;
            err[0] = '\0';
            if (pqpool_open(&f->cfg, &p, err, sizeof err) != PQPOOL_ECONFIG)
                fail_msg("%s = %d accepted", bad[i].field, bad[i].value);
            assert_null(p);
            if (!strstr(err, bad[i].field))
                fail_msg("%s = %d: message '%s' does not name it", bad[i].field, bad[i].value, err);
            /* No error buffer: still refused, nothing written. */
            assert_int_equal(pqpool_open(&f->cfg, &p, NULL, 0), PQPOOL_ECONFIG);
        }
    }
    /* Keepalive settings only matter when keepalives are on. */
    fix_config(f, SIM_CONNINFO);
    f->cfg.keepalives = 0;
    f->cfg.keepalives_count = 0;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), 0);
    pqpool_free(p);
    /* No conninfo at all means libpq's defaults, as with "". */
    fix_config(f, SIM_CONNINFO);
    f->cfg.conninfo = NULL;
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), 0);
    pqpool_free(p);

    /* A conninfo libpq cannot parse is a permanent error, found at open. */
    fix_config(f, "host=127.0.0.1 no_such_option=1");
    assert_int_equal(pqpool_open(&f->cfg, &p, err, sizeof err), PQPOOL_ECONFIG);
    assert_non_null(strstr(err, "no_such_option"));
    assert_null(p);
    assert_int_equal(pqpool_open(&f->cfg, &p, NULL, 0), PQPOOL_ECONFIG);
    assert_null(p);
    assert_int_equal(ctr().connect_attempts, 0);
}

static void test_strerror_and_names(void **state)
{
    (void)state;
    assert_string_equal(pqpool_strerror(0), "success");
    assert_non_null(strstr(pqpool_strerror(PQPOOL_ETIMEDOUT), "timed out"));
    assert_non_null(strstr(pqpool_strerror(PQPOOL_EAUTH), "credentials"));
    assert_non_null(strstr(pqpool_strerror(PQPOOL_ECONFIG), "database"));
    assert_non_null(strstr(pqpool_strerror(PQPOOL_ECONNECT), "connect"));
    assert_non_null(strstr(pqpool_strerror(PQPOOL_ECLOSED), "closed"));
    assert_non_null(strstr(pqpool_strerror(PQPOOL_EINVAL), "invalid"));
    assert_non_null(strstr(pqpool_strerror(PQPOOL_ENOMEM), "memory"));
    assert_string_equal(pqpool_strerror(-99), "unknown error");
    assert_string_equal(pqpool_eject_reason_name(PQPOOL_EJECT_DEAD), "dead");
    assert_string_equal(pqpool_eject_reason_name(PQPOOL_EJECT_CLOSED), "closed");
    assert_string_equal(pqpool_eject_reason_name(PQPOOL_EJECT__COUNT), "?");
    assert_string_equal(pqpool_fail_class_name(PQPOOL_FAIL_AUTH), "auth");
    assert_string_equal(pqpool_fail_class_name(PQPOOL_FAIL_INIT), "init");
    assert_string_equal(pqpool_fail_class_name(PQPOOL_FAIL__COUNT), "?");
    assert_string_equal(pqpool_eject_reason_name((enum pqpool_eject_reason) - 1), "?");
    assert_string_equal(pqpool_fail_class_name((enum pqpool_fail_class) - 1), "?");
}

static void test_null_arguments(void **state)
{
    struct fix *f = *state;
    PGconn *c = (PGconn *)1;
    struct pqpool_stats s;
    char buf[8];
    (void)f;
    assert_int_equal(pqpool_acquire(NULL, 10, &c), PQPOOL_EINVAL);
    assert_null(c);
    assert_int_equal(pqpool_maintain(NULL), PQPOOL_EINVAL);
    assert_int_equal(pqpool_health(NULL, 10), PQPOOL_EINVAL);
    assert_string_equal(pqpool_last_error(NULL), "");
    assert_int_equal(pqpool_last_error_copy(NULL, buf, sizeof buf), 0);
    pqpool_stats(NULL, &s);
    assert_int_equal(s.total, 0);
    pqpool_stats(NULL, NULL);
    pqpool_release(NULL, NULL);
    pqpool_discard(NULL, NULL);
    pqpool_note_result(NULL, NULL, NULL);
    assert_null(pqpool_exec(NULL, NULL, NULL));
    assert_int_equal(pqpool_result_is_fatal(NULL), 0);
    pqpool_close(NULL);
    pqpool_free(NULL);
    fix_open(f);
    assert_int_equal(pqpool_acquire(f->p, 10, NULL), PQPOOL_EINVAL);
    c = must_acquire(f, -1);
    pqpool_note_result(f->p, NULL, NULL);
    assert_null(pqpool_exec(f->p, c, NULL));
    assert_null(pqpool_exec(f->p, NULL, "SELECT 1"));
    pqpool_release(f->p, c);
    assert_int_equal(st(f).idle, 1);
}

static void test_acquire_release_reuse(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;
    struct pqpool_stats s;

    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(PQstatus(a), CONNECTION_OK);
    assert_int_equal(q(f, a, "SELECT 1"), PGRES_TUPLES_OK);
    s = st(f);
    assert_int_equal(s.in_use, 1);
    assert_int_equal(s.total, 1);
    assert_int_equal(s.created, 1);
    pqpool_release(f->p, a);
    b = must_acquire(f, -1);
    assert_ptr_equal(a, b); /* reused, not reopened */
    pqpool_release(f->p, b);
    s = st(f);
    assert_int_equal(s.idle, 1);
    assert_int_equal(s.in_use, 0);
    assert_int_equal(s.acquires, 2);
    assert_int_equal(s.connect_attempts, 1);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_int_equal(nev(f, PQPOOL_EV_CONNECTED), 1);
    /* The library never prints: the event callback got the news. */
}

/* The pool asks for keepalives and an application_name, and the conninfo
 * (given as dbname with expand_dbname) is honoured. */
static void test_connect_parameters(void **state)
{
    struct fix *f = *state;
    PGconn *c;
    fix_config(f, SIM_CONNINFO " application_name=from_conninfo");
    fix_open(f);
    c = must_acquire(f, -1);
    assert_string_equal(PQdb(c), "pgfault");
    assert_string_equal(PQuser(c), "pgfault");
    assert_string_equal(PQparameterStatus(c, "application_name"), "from_conninfo");
    pqpool_release(f->p, c);
    pqpool_free(f->p);

    fix_config(f, SIM_CONNINFO);
    f->cfg.application_name = "svc";
    fix_open(f);
    c = must_acquire(f, -1);
    assert_string_equal(PQparameterStatus(c, "application_name"), "svc");
    pqpool_release(f->p, c);
}

/* ==== 1. The deadline is a contract =============================================== */

static void test_deadline_connect_hangs(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0, el;
    int rc;

    f->cfg.connect_timeout_ms = 100;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_HANG, FAKEPQ_NEXT, FAKEPQ_ALL, 0) > 0);
    t0 = now_ms();
    rc = pqpool_acquire(f->p, 400, &c);
    el = now_ms() - t0;
    assert_int_equal(rc, PQPOOL_ECONNECT);
    assert_null(c);
    assert_between(el, 398, 400 + SLACK_MS);
    /* Its own millisecond timer, retried inside the deadline. */
    assert_true(ctr().connect_attempts >= 2);
    assert_true(st(f).connect_failures_by[PQPOOL_FAIL_TIMEOUT] >= 2);
    assert_non_null(strstr(pqpool_last_error(f->p), "timed out"));
    assert_int_equal(ctr().live_conns, 0);
    assert_int_equal(nev(f, PQPOOL_EV_ACQUIRE_FAILED), 1);
    fakepq_heal();
    c = must_acquire(f, 1000);
    pqpool_release(f->p, c);
}

/* A connect slower than the acquire deadline is cut at the deadline, not
 * at connect_timeout_ms. */
static void test_deadline_connect_slow(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0, el;
    int rc;

    f->cfg.connect_timeout_ms = 5000;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_SLOW, FAKEPQ_NEXT, FAKEPQ_ALL, 3000) > 0);
    t0 = now_ms();
    rc = pqpool_acquire(f->p, 250, &c);
    el = now_ms() - t0;
    assert_int_equal(rc, PQPOOL_ECONNECT);
    assert_between(el, 248, 250 + SLACK_MS);
    assert_int_equal(ctr().connect_attempts, 1);
}

static void test_deadline_validation_ping_hangs(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0, el;
    int rc;

    f->cfg.max_size = 1;
    f->cfg.validate_idle_ms = 0;
    f->cfg.validation_timeout_ms = 5000; /* longer than the acquire: the acquire wins */
    fix_open(f);
    make_idle(f, 1);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_PARTITION), 1);
    t0 = now_ms();
    rc = pqpool_acquire(f->p, 300, &c);
    el = now_ms() - t0;
    assert_int_equal(rc, PQPOOL_ETIMEDOUT);
    assert_between(el, 298, 300 + SLACK_MS);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_VALIDATION], 1);
    assert_int_equal(st(f).total, 0);
}

static void test_deadline_init_sql_hangs(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0, el;
    int rc;

    f->cfg.init_sql = "SET statement_timeout = '5s'";
    f->cfg.connect_timeout_ms = 5000;
    fix_open(f);
    assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, FAKEPQ_ALL, 10000) > 0);
    t0 = now_ms();
    rc = pqpool_acquire(f->p, 300, &c);
    el = now_ms() - t0;
    assert_int_equal(rc, PQPOOL_ECONNECT);
    assert_between(el, 298, 300 + SLACK_MS);
    assert_true(st(f).connect_failures_by[PQPOOL_FAIL_INIT] >= 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "init_sql"));
    assert_int_equal(st(f).total, 0);
    assert_int_equal(ctr().live_conns, 0);
}

static void test_init_sql_runs_and_failure_rejects(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int rc;

    f->cfg.init_sql = "SET statement_timeout = '5s'";
    fix_open(f);
    c = must_acquire(f, -1);
    assert_int_equal(ctr().queries, 1); /* init_sql ran once */
    pqpool_release(f->p, c);
    pqpool_free(f->p);

    fix_config(f, SIM_CONNINFO);
    f->cfg.init_sql = "SELEC 1";
    f->cfg.acquire_timeout_ms = 300;
    fix_open(f);
    rc = pqpool_acquire(f->p, -1, &c);
    assert_int_equal(rc, PQPOOL_ECONNECT);
    assert_null(c);
    assert_non_null(strstr(pqpool_last_error(f->p), "init_sql failed"));
    assert_int_equal(st(f).total, 0);
    assert_int_equal(st(f).created, 0);
    assert_int_equal(ctr().live_conns, 0);
    pqpool_free(f->p);

    /* libpq failing to run init_sql at all (here PQsetnonblocking, then
     * PQsendQuery): that connection is rejected with libpq's message, and
     * the acquire retries with a fresh one inside its deadline. */
    fix_config(f, SIM_CONNINFO);
    f->cfg.init_sql = "SET statement_timeout = '5s'";
    f->cfg.backoff_initial_ms = 1;
    fix_open(f);
    assert_true(fakepq_fault_call_fail("PQsetnonblocking", FAKEPQ_NEXT, 1) > 0);
    assert_true(fakepq_fault_call_fail("PQsendQuery", FAKEPQ_NEXT, 1) > 0);
    c = must_acquire(f, -1);
    assert_int_equal(st(f).connect_failures_by[PQPOOL_FAIL_INIT], 2);
    assert_int_equal(st(f).created, 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "injected failure"));
    pqpool_release(f->p, c);
}

static void test_deadline_all_in_use_not_early(void **state)
{
    struct fix *f = *state;
    PGconn *a, *c = NULL;
    int64_t t0, el;
    int rc;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    t0 = now_ms();
    rc = pqpool_acquire(f->p, 250, &c);
    el = now_ms() - t0;
    assert_int_equal(rc, PQPOOL_ETIMEDOUT);
    assert_between(el, 248, 250 + SLACK_MS);
    assert_int_equal(st(f).acquire_timeouts, 1);
    assert_int_equal(nev(f, PQPOOL_EV_ACQUIRE_TIMEOUT), 1);
    /* timeout 0: no wait at all. */
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, 0, &c), PQPOOL_ETIMEDOUT);
    assert_true(now_ms() - t0 < SLACK_MS);
    pqpool_release(f->p, a);
}

/* With no time left to ping an idle connection that needs it, the acquire
 * fails by its deadline and the connection stays in the pool unharmed. */
static void test_deadline_no_time_to_validate(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    long q0;

    f->cfg.validate_idle_ms = 0;
    fix_open(f);
    make_idle(f, 1);
    q0 = ctr().queries;
    assert_int_equal(pqpool_acquire(f->p, 0, &c), PQPOOL_ETIMEDOUT);
    assert_null(c);
    assert_int_equal(ctr().queries, q0);
    assert_int_equal(st(f).idle, 1);
    assert_int_equal(st(f).ejected, 0);
    c = must_acquire(f, 1000);
    pqpool_release(f->p, c);
}

/* A waiter whose slot frees before its deadline gets it: no early
 * ETIMEDOUT. */
static void test_deadline_slot_frees_in_time(void **state)
{
    struct fix *f = *state;
    struct worker w;
    PGconn *a;
    int served = 0;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    start_queue(f, &w, 1, 2000, 0, &served);
    sleep_ms(150); /* the holder's work */
    pqpool_release(f->p, a);
    join_all(&w, 1);
    assert_int_equal(w.rc, 0);
    assert_between(w.elapsed_ms, 148, 150 + SLACK_MS);
    assert_int_equal(st(f).waiters_served, 1);
    assert_int_equal(nev(f, PQPOOL_EV_WAITER_SERVED), 1);
    assert_int_equal(st(f).created, 1);
}

/* ==== 2. Dead idle connections ===================================================== */

static void test_dead_idle_found_by_housekeeping(void **state)
{
    struct fix *f = *state;
    struct fakepq_counters c0, c1;
    struct pqpool_stats s;

    f->cfg.min_idle = 2;
    fix_open(f);
    assert_int_equal(pqpool_maintain(f->p), 0);
    assert_int_equal(st(f).idle, 2);
    c0 = ctr();
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_FATAL), 2);
    assert_int_equal(pqpool_maintain(f->p), 0);
    s = st(f);
    assert_int_equal(s.ejected_by[PQPOOL_EJECT_DEAD], 2);
    assert_int_equal(s.ejected, 2);
    assert_int_equal(s.idle, 2); /* refilled */
    assert_int_equal(s.created, 4);
    c1 = ctr();
    assert_int_equal(c1.finished - c0.finished, 2); /* finished exactly once each */
    assert_int_equal(c1.double_finishes, 0);
    assert_int_equal(c1.backends, 2);
    assert_int_equal(nev(f, PQPOOL_EV_EJECTED), 2);
    pqpool_free(f->p);
    f->p = NULL;
    assert_int_equal(ctr().live_conns, 0);
}

static void test_dead_idle_eof_found_at_checkout(void **state)
{
    struct fix *f = *state;
    PGconn *c;

    f->cfg.validate_idle_ms = -1; /* no ping: the socket check alone must catch it */
    fix_open(f);
    make_idle(f, 2);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_EOF), 2);
    c = must_acquire(f, -1);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 2);
    assert_int_equal(st(f).validations, 0);
    pqpool_release(f->p, c);
    assert_int_equal(st(f).total, 1);
}

static void test_dead_idle_fatal_found_at_checkout(void **state)
{
    struct fix *f = *state;
    PGconn *c;

    f->cfg.validate_idle_ms = -1;
    fix_open(f);
    make_idle(f, 2);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_FATAL), 2);
    c = must_acquire(f, -1);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 2);
    pqpool_release(f->p, c);
}

/* A silent partition shows nothing on the socket: only the ping, with its
 * own deadline, finds it. */
static void test_partition_caught_by_ping(void **state)
{
    struct fix *f = *state;
    PGconn *c;
    int64_t t0, el;

    f->cfg.validate_idle_ms = 0;
    f->cfg.validation_timeout_ms = 100;
    f->cfg.acquire_timeout_ms = 2000;
    fix_open(f);
    make_idle(f, 2);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_PARTITION), 2);
    t0 = now_ms();
    c = must_acquire(f, -1);
    el = now_ms() - t0;
    assert_between(el, 198, 200 + SLACK_MS);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_VALIDATION], 2);
    assert_int_equal(st(f).validations, 2); /* the third connection is new: no ping */
    pqpool_release(f->p, c);
}

static void test_ping_only_after_validate_idle(void **state)
{
    struct fix *f = *state;
    PGconn *c;
    long q0;

    f->cfg.validate_idle_ms = 60000;
    fix_open(f);
    make_idle(f, 1);
    q0 = ctr().queries;
    c = must_acquire(f, -1);
    assert_int_equal(ctr().queries, q0);
    assert_int_equal(st(f).validations, 0);
    pqpool_release(f->p, c);
    pqpool_free(f->p);

    fix_config(f, SIM_CONNINFO);
    f->cfg.validate_idle_ms = 20;
    fix_open(f);
    make_idle(f, 1);
    sleep_ms(30); /* idle longer than validate_idle_ms */
    q0 = ctr().queries;
    c = must_acquire(f, -1);
    assert_int_equal(ctr().queries, q0 + 1);
    assert_int_equal(st(f).validations, 1);
    pqpool_release(f->p, c);
}

/* A ping that fails at once (the server answers with an error) ejects. */
static void test_ping_error_ejects(void **state)
{
    struct fix *f = *state;
    PGconn *c;

    f->cfg.validate_idle_ms = 0;
    fix_open(f);
    make_idle(f, 1);
    assert_true(fakepq_fault_call_fail("PQsendQuery", FAKEPQ_NEXT, 1) > 0);
    c = must_acquire(f, -1);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_VALIDATION], 1);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, c);
}

static void test_idle_timeout_above_min_idle(void **state)
{
    struct fix *f = *state;
    struct pqpool_stats s;

    f->cfg.min_idle = 1;
    f->cfg.idle_timeout_ms = 50;
    fix_open(f);
    make_idle(f, 3);
    assert_int_equal(pqpool_maintain(f->p), 0);
    assert_int_equal(st(f).idle, 3); /* not idle long enough yet */
    EVENTUALLY((pqpool_maintain(f->p), st(f).idle == 1), 3000);
    s = st(f);
    assert_int_equal(s.ejected_by[PQPOOL_EJECT_IDLE_TIMEOUT], 2);
    assert_int_equal(s.total, 1);
}

static void test_max_lifetime(void **state)
{
    struct fix *f = *state;
    PGconn *c, *d;
    int d_id;

    f->cfg.max_lifetime_ms = 80;
    fix_open(f);
    make_idle(f, 1);
    EVENTUALLY((pqpool_maintain(f->p), st(f).ejected_by[PQPOOL_EJECT_LIFETIME] == 1), 3000);
    assert_int_equal(st(f).total, 0);
    /* An in-use connection that outlives its lifetime is replaced at
     * release, and one found expired at checkout is not handed out. */
    c = must_acquire(f, -1);
    d = must_acquire(f, -1);
    d_id = fakepq_conn_id(d);
    pqpool_release(f->p, d);
    sleep_ms(100); /* both outlive their lifetime */
    pqpool_release(f->p, c);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_LIFETIME], 2);
    c = must_acquire(f, -1);
    assert_int_not_equal(fakepq_conn_id(c), d_id);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_LIFETIME], 3);
    pqpool_release(f->p, c);
}

static void test_housekeeping_thread_fills_min_idle(void **state)
{
    struct fix *f = *state;

    f->cfg.min_idle = 2;
    f->cfg.housekeeping_interval_ms = 10;
    fix_open(f);
    EVENTUALLY(st(f).idle == 2, 3000);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_EOF), 2);
    EVENTUALLY(st(f).ejected_by[PQPOOL_EJECT_DEAD] == 2 && st(f).idle == 2, 3000);
    assert_int_equal(ctr().backends, 2);
}

/* Notices never reach stderr; they go to the configured callback. */
static int notices;
static void count_notice(void *ctx, PGconn *conn, const PGresult *res)
{
    (void)ctx;
    (void)conn;
    (void)res;
    __atomic_add_fetch(&notices, 1, __ATOMIC_RELAXED);
}

static void test_fatal_notice_on_idle_marks_dead(void **state)
{
    struct fix *f = *state;
    PGconn *c;

    f->cfg.validate_idle_ms = -1;
    f->cfg.notice = count_notice;
    fix_open(f);
    make_idle(f, 1);
    notices = 0;
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_FATAL), 1);
    c = must_acquire(f, -1);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 1);
    pqpool_release(f->p, c);
}

/* ==== 3. Release hygiene ========================================================== */

static void test_release_in_transaction_rolls_back(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(q(f, a, "BEGIN"), PGRES_COMMAND_OK);
    assert_int_equal(PQtransactionStatus(a), PQTRANS_INTRANS);
    pqpool_release(f->p, a);
    b = must_acquire(f, -1);
    assert_ptr_equal(a, b);
    assert_int_equal(PQtransactionStatus(b), PQTRANS_IDLE);
    assert_int_equal(st(f).rollbacks, 1);
    assert_int_equal(nev(f, PQPOOL_EV_ROLLED_BACK), 1);
    pqpool_release(f->p, b);
}

static void test_release_in_failed_transaction_rolls_back(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(q(f, a, "BEGIN"), PGRES_COMMAND_OK);
    assert_int_equal(q(f, a, "SELEC 1"), PGRES_FATAL_ERROR);
    assert_int_equal(PQtransactionStatus(a), PQTRANS_INERROR);
    pqpool_release(f->p, a);
    b = must_acquire(f, -1);
    assert_int_equal(PQtransactionStatus(b), PQTRANS_IDLE);
    assert_int_equal(q(f, b, "SELECT 1"), PGRES_TUPLES_OK);
    assert_int_equal(st(f).rollbacks, 1);
    assert_int_equal(st(f).ejected, 0); /* a syntax error does not break a connection */
    pqpool_release(f->p, b);
}

/* libpq calls that fail outright while the pool cleans a released
 * connection (a ROLLBACK that cannot be sent, a busy connection that cannot
 * be drained): each ejects it with the right reason, none hands it out. */
static void test_release_libpq_failures_eject(void **state)
{
    struct fix *f = *state;
    PGconn *a;
    struct {
        const char *fn; /* the call that fails */
        int running;    /* a command still running (else: open transaction) */
        int reason;     /* expected eject reason */
    } cases[] = {
        {"PQsendQuery", 0, PQPOOL_EJECT_TRANSACTION},      /* ROLLBACK not sent */
        {"PQsetnonblocking", 0, PQPOOL_EJECT_TRANSACTION}, /* before ROLLBACK */
        {"PQflush", 0, PQPOOL_EJECT_TRANSACTION},          /* sending ROLLBACK */
        {"PQsetnonblocking", 1, PQPOOL_EJECT_BUSY},        /* after the cancel */
        {"PQconsumeInput", 1, PQPOOL_EJECT_BUSY},          /* draining */
    };
    size_t i;

    f->cfg.release_timeout_ms = 300;
    fix_open(f);
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        long long before;
        a = must_acquire(f, -1);
        if (cases[i].running) {
            assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, 1, 5000) > 0);
            assert_int_equal(PQsendQuery(a, "SELECT pg_sleep(5)"), 1);
        } else {
            assert_int_equal(q(f, a, "BEGIN"), PGRES_COMMAND_OK);
        }
        assert_true(fakepq_fault_call_fail(cases[i].fn, FAKEPQ_NEXT, FAKEPQ_ALL) > 0);
        before = st(f).ejected_by[cases[i].reason];
        pqpool_release(f->p, a);
        fakepq_heal();
        if (st(f).ejected_by[cases[i].reason] != before + 1)
            fail_msg("case %zu (%s fails): not ejected with reason %s", i, cases[i].fn,
                     pqpool_eject_reason_name(cases[i].reason));
        assert_int_equal(st(f).total, 0);
    }
    a = must_acquire(f, -1);
    assert_int_equal(PQtransactionStatus(a), PQTRANS_IDLE);
    pqpool_release(f->p, a);
}

/* PQconnectStartParams returning NULL (libpq out of memory) is a transient
 * failure: retried inside the deadline. */
static void test_connect_start_null_retried(void **state)
{
    struct fix *f = *state;
    PGconn *a;
    f->cfg.backoff_initial_ms = 1;
    fix_open(f);
    assert_true(fakepq_fault_call_fail("PQconnectStartParams", FAKEPQ_NEXT, 2) > 0);
    a = must_acquire(f, -1);
    assert_int_equal(st(f).connect_failures, 2);
    assert_int_equal(st(f).created, 1);
    assert_int_equal(q(f, a, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, a);
}

/* max_lifetime_ms = 0 turns the lifetime limit off. */
static void test_max_lifetime_off(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;
    f->cfg.max_lifetime_ms = 0;
    fix_open(f);
    a = must_acquire(f, -1);
    pqpool_release(f->p, a);
    pqpool_maintain(f->p);
    b = must_acquire(f, -1);
    assert_ptr_equal(a, b);
    pqpool_release(f->p, b);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_LIFETIME], 0);
}

/* A rollback that does not answer within release_timeout_ms: ejected. */
static void test_release_rollback_hangs_ejects(void **state)
{
    struct fix *f = *state;
    PGconn *a;
    int64_t t0, el;

    f->cfg.release_timeout_ms = 150;
    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(q(f, a, "BEGIN"), PGRES_COMMAND_OK);
    assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, 1, 10000) > 0);
    t0 = now_ms();
    pqpool_release(f->p, a);
    el = now_ms() - t0;
    assert_between(el, 148, 150 + SLACK_MS);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_TRANSACTION], 1);
}

/* A command still running at release: canceled and drained, or ejected
 * within release_timeout_ms -- never handed out busy. */
static void test_release_command_running(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;
    struct pqpool_stats s;
    int64_t t0, el;

    f->cfg.release_timeout_ms = 300;
    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, 1, 5000) > 0);
    assert_int_equal(PQsendQuery(a, "SELECT pg_sleep(5)"), 1);
    assert_int_equal(PQtransactionStatus(a), PQTRANS_ACTIVE);
    t0 = now_ms();
    pqpool_release(f->p, a);
    el = now_ms() - t0;
    assert_true(el <= 300 + SLACK_MS);
    s = st(f);
    assert_int_equal(s.cancels + s.ejected_by[PQPOOL_EJECT_BUSY], 1);
    b = must_acquire(f, -1);
    assert_int_equal(PQtransactionStatus(b), PQTRANS_IDLE);
    assert_int_equal(PQisBusy(b), 0);
    assert_int_equal(q(f, b, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, b);
}

/* Results that arrived but were never read are drained; the connection
 * stays. */
static void test_release_unread_results_drained(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(PQsendQuery(a, "SELECT 1"), 1);
    while (PQisBusy(a))
        assert_int_equal(PQconsumeInput(a), 1);
    assert_int_equal(PQtransactionStatus(a), PQTRANS_ACTIVE);
    pqpool_release(f->p, a);
    assert_int_equal(st(f).cancels, 1);
    assert_int_equal(st(f).ejected, 0);
    b = must_acquire(f, -1);
    assert_ptr_equal(a, b);
    assert_int_equal(PQtransactionStatus(b), PQTRANS_IDLE);
    assert_null(PQgetResult(b));
    pqpool_release(f->p, b);
    assert_int_equal(ctr().results_live, 0);
}

static void test_release_broken_connection(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;
    struct fakepq_counters c0;

    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ONE, fakepq_conn_id(a), FAKEPQ_BREAK_FATAL), 1);
    assert_int_equal(q(f, a, "SELECT 1"), PGRES_FATAL_ERROR);
    assert_int_equal(PQstatus(a), CONNECTION_BAD);
    c0 = ctr();
    pqpool_release(f->p, a);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_BROKEN], 1);
    assert_int_equal(st(f).idle, 0);
    assert_int_equal(ctr().finished - c0.finished, 1);
    b = must_acquire(f, -1);
    assert_int_equal(q(f, b, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, b);
}

/* Dropped while in use, and the caller never noticed: the release-time
 * socket check finds it. */
static void test_release_dropped_unnoticed(void **state)
{
    struct fix *f = *state;
    PGconn *a;

    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ONE, fakepq_conn_id(a), FAKEPQ_BREAK_EOF), 1);
    pqpool_release(f->p, a);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 1);
    assert_int_equal(st(f).total, 0);
}

static void test_double_release_reported(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b, *c;

    fix_open(f);
    a = must_acquire(f, -1);
    pqpool_release(f->p, a);
    pqpool_release(f->p, a);
    pqpool_discard(f->p, a);
    assert_int_equal(nev(f, PQPOOL_EV_DOUBLE_RELEASE), 2);
    assert_int_equal(st(f).double_releases, 2);
    assert_int_equal(st(f).idle, 1);
    assert_int_equal(st(f).total, 1);
    b = must_acquire(f, -1);
    c = must_acquire(f, -1);
    assert_ptr_not_equal(b, c); /* never handed out twice */
    assert_int_equal(st(f).in_use, 2);
    assert_int_equal(st(f).total, 2);
    pqpool_release(f->p, b);
    pqpool_release(f->p, c);
}

static void test_foreign_release_reported(void **state)
{
    struct fix *f = *state;
    PGconn *mine;

    fix_open(f);
    mine = PQconnectdb(SIM_CONNINFO " password=pgfault");
    assert_int_equal(PQstatus(mine), CONNECTION_OK);
    pqpool_release(f->p, mine);
    pqpool_discard(f->p, mine);
    pqpool_release(f->p, NULL);
    assert_int_equal(nev(f, PQPOOL_EV_FOREIGN_RELEASE), 3);
    assert_int_equal(st(f).foreign_releases, 3);
    assert_int_equal(st(f).total, 0);
    /* Left alone: still the caller's, still working. */
    assert_int_equal(PQstatus(mine), CONNECTION_OK);
    {
        PGresult *r = PQexec(mine, "SELECT 1");
        assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
        PQclear(r);
    }
    PQfinish(mine);
}

static void test_discard_frees_slot_for_waiter(void **state)
{
    struct fix *f = *state;
    struct worker w;
    PGconn *a;
    int served = 0;
    struct fakepq_counters c0;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    start_queue(f, &w, 1, 2000, 0, &served);
    c0 = ctr();
    pqpool_discard(f->p, a);
    join_all(&w, 1);
    assert_int_equal(w.rc, 0);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DISCARDED], 1);
    assert_int_equal(ctr().finished - c0.finished, 1);
    assert_int_equal(st(f).total, 1);
    assert_int_equal(st(f).created, 2);
}

/* ==== 4. Fatal SQLSTATEs on queries =============================================== */

static void test_fatal_sqlstate_ejects_on_release(void **state)
{
    static const char *const fatal[] = {"57P01", "57P02", "57P03", "08006", "08P01"};
    struct fix *f = *state;
    size_t i;

    fix_open(f);
    for (i = 0; i < sizeof fatal / sizeof *fatal; i++) {
        PGconn *c = must_acquire(f, -1);
        PGresult *r;
        assert_true(fakepq_fault_call_error("PQexec", FAKEPQ_NEXT, 1, fatal[i], NULL) > 0);
        r = pqpool_exec(f->p, c, "SELECT 1");
        assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
        assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), fatal[i]);
        assert_true(pqpool_result_is_fatal(r));
        PQclear(r);
        pqpool_release(f->p, c);
        assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_BROKEN], (long long)i + 1);
        assert_int_equal(st(f).idle, 0);
    }
}

static void test_nonfatal_sqlstate_keeps_connection(void **state)
{
    struct fix *f = *state;
    PGconn *c, *d;
    PGresult *r;

    fix_open(f);
    c = must_acquire(f, -1);
    assert_true(fakepq_fault_call_error("PQexec", FAKEPQ_NEXT, 1, "23505", NULL) > 0);
    r = pqpool_exec(f->p, c, "INSERT INTO t VALUES (1)");
    assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
    assert_false(pqpool_result_is_fatal(r));
    PQclear(r);
    pqpool_note_result(f->p, c, NULL); /* NULL result on a good connection: not broken */
    pqpool_release(f->p, c);
    assert_int_equal(st(f).ejected, 0);
    d = must_acquire(f, -1);
    assert_ptr_equal(c, d);
    pqpool_release(f->p, d);
}

/* A fatal SQLSTATE from the caller's own async query, reported with
 * pqpool_note_result (the way the harness does it). */
static void test_note_result_marks_broken(void **state)
{
    struct fix *f = *state;
    PGconn *c;
    PGresult *r, *last = NULL;

    fix_open(f);
    c = must_acquire(f, -1);
    assert_true(fakepq_fault_call_error("PQgetResult", FAKEPQ_NEXT, 1, "57P01", NULL) > 0);
    assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
    while ((r = PQgetResult(c)) != NULL) {
        pqpool_note_result(f->p, c, r);
        PQclear(last);
        last = r;
    }
    PQclear(last);
    pqpool_release(f->p, c);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_BROKEN], 1);
}

/* ==== 5. Credentials ============================================================== */

static void test_auth_wrong_password_fails_fast_once(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0, el;

    set_password(f, "wrong-secret");
    f->cfg.acquire_timeout_ms = 2000;
    fix_open(f);
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, -1, &c), PQPOOL_EAUTH);
    el = now_ms() - t0;
    assert_true(el < 500); /* no backoff, no retry until the deadline */
    assert_null(c);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_int_equal(ctr().connect_outcomes[FAKEPQ_OUT_AUTH], 1);
    assert_int_equal(st(f).auth_failures, 1);
    assert_int_equal(st(f).auth_locked, 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "28P01"));
    assert_string_equal(f->last_sqlstate, "28P01");
    assert_int_equal(nev(f, PQPOOL_EV_AUTH_FAILED), 1);

    /* Meanwhile: at once, same message, server not contacted. */
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, -1, &c), PQPOOL_EAUTH);
    assert_true(now_ms() - t0 < 50 + SLACK_MS / 4);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_int_equal(st(f).auth_lockouts, 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "28P01"));
    assert_int_equal(nev(f, PQPOOL_EV_AUTH_LOCKED), 1);
}

static void test_auth_hba_reject(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;

    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_HBA_REJECT, FAKEPQ_NEXT, FAKEPQ_ALL, 0) > 0);
    assert_int_equal(pqpool_acquire(f->p, 2000, &c), PQPOOL_EAUTH);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "28000"));
    assert_int_equal(st(f).connect_failures_by[PQPOOL_FAIL_AUTH], 1);
}

static void test_config_no_database(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0;

    fix_config(f, "host=127.0.0.1 port=5432 user=pgfault dbname=no_such_db");
    fix_open(f);
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, 2000, &c), PQPOOL_ECONFIG);
    assert_true(now_ms() - t0 < 500);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "3D000"));
    assert_int_equal(pqpool_acquire(f->p, 2000, &c), PQPOOL_ECONFIG);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_int_equal(st(f).connect_failures_by[PQPOOL_FAIL_CONFIG], 1);
}

/* The password callback is asked for every new connection; a changed
 * password lifts the lockout at once. */
static void test_auth_password_rotation(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b = NULL, *c;

    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(f->pw_calls, 1);
    fakepq_sim_set_password("pgfault", "rotated-1");
    assert_int_equal(q(f, a, "SELECT 1"), PGRES_TUPLES_OK); /* existing sessions live on */
    assert_int_equal(pqpool_acquire(f->p, -1, &b), PQPOOL_EAUTH);
    assert_int_equal(ctr().connect_attempts, 2);
    set_password(f, "rotated-1");
    c = must_acquire(f, -1);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    assert_int_equal(ctr().connect_attempts, 3);
    assert_int_equal(st(f).auth_locked, 0);
    pqpool_release(f->p, c);
    pqpool_release(f->p, a);
}

static void test_auth_retry_after(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0;

    set_password(f, "wrong-secret");
    f->cfg.auth_retry_after_ms = 150;
    fix_open(f);
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, -1, &c), PQPOOL_EAUTH);
    assert_int_equal(pqpool_acquire(f->p, -1, &c), PQPOOL_EAUTH);
    assert_int_equal(ctr().connect_attempts, 1);
    /* After auth_retry_after_ms the next acquire tries again, once. */
    EVENTUALLY((pqpool_acquire(f->p, -1, &c) == PQPOOL_EAUTH && ctr().connect_attempts == 2), 3000);
    assert_true(now_ms() - t0 >= 148);
    assert_int_equal(ctr().connect_attempts, 2);
}

/* Housekeeping with a wrong password: one attempt, then silence. */
static void test_auth_no_retry_storm_in_housekeeping(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;

    set_password(f, "wrong-secret");
    f->cfg.min_idle = 2;
    f->cfg.housekeeping_interval_ms = 5;
    fix_open(f);
    EVENTUALLY(ctr().connect_attempts >= 1, 2000);
    sleep_ms(300); /* sixty housekeeping passes */
    assert_int_equal(ctr().connect_attempts, 1);
    assert_int_equal(pqpool_maintain(f->p), PQPOOL_EAUTH);
    assert_int_equal(pqpool_acquire(f->p, -1, &c), PQPOOL_EAUTH);
    assert_int_equal(ctr().connect_attempts, 1);
    /* A new password: housekeeping fills the pool. */
    set_password(f, "pgfault");
    EVENTUALLY(st(f).idle == 2, 3000);
}

/* Without PQERRORS_VERBOSE set right after PQconnectStartParams the
 * SQLSTATE would not be in the message; the trace shows the order. */
static void test_auth_verbose_set_before_polling(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    size_t i, n;
    int start = -1, verbose = -1, poll = -1;

    set_password(f, "wrong-secret");
    fix_open(f);
    assert_int_equal(pqpool_acquire(f->p, -1, &c), PQPOOL_EAUTH);
    n = fakepq_trace_count();
    for (i = 0; i < n; i++) {
        struct fakepq_call call;
        assert_int_equal(fakepq_trace_get(i, &call), 0);
        if (start < 0 && strcmp(call.function, "PQconnectStartParams") == 0)
            start = (int)i;
        else if (verbose < 0 && strcmp(call.function, "PQsetErrorVerbosity") == 0)
            verbose = (int)i;
        else if (poll < 0 && strcmp(call.function, "PQconnectPoll") == 0)
            poll = (int)i;
    }
    assert_true(start >= 0 && verbose == start + 1);
    assert_true(poll > verbose);
}

/* ==== 6. Transient failures ======================================================= */

static void test_transient_refused_backoff_then_ok(void **state)
{
    struct fix *f = *state;
    PGconn *c;
    int64_t t0, el;

    f->cfg.backoff_initial_ms = 40;
    f->cfg.backoff_max_ms = 1000;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, 2, 0) > 0);
    t0 = now_ms();
    c = must_acquire(f, 2000);
    el = now_ms() - t0;
    /* Two waits: >= 20 + 40 ms with jitter drawn from [d/2, d]. */
    assert_between(el, 58, 40 + 80 + SLACK_MS);
    assert_int_equal(ctr().connect_attempts, 3);
    assert_int_equal(st(f).connect_failures_by[PQPOOL_FAIL_NETWORK], 2);
    pqpool_release(f->p, c);
}

static void test_transient_server_states_retried(void **state)
{
    static const enum fakepq_connect_fault kinds[] = {FAKEPQ_CONNECT_TOO_MANY,
                                                      FAKEPQ_CONNECT_STARTING_UP};
    static const char *const codes[] = {"53300", "57P03"};
    struct fix *f = *state;
    size_t i;

    f->cfg.backoff_initial_ms = 5;
    fix_open(f);
    for (i = 0; i < 2; i++) {
        long a0 = ctr().connect_attempts;
        PGconn *c;
        assert_true(fakepq_fault_connect(kinds[i], FAKEPQ_NEXT, 1, 0) > 0);
        c = must_acquire(f, 2000);
        assert_int_equal(ctr().connect_attempts - a0, 2);
        assert_string_equal(f->last_sqlstate, codes[i]);
        pqpool_discard(f->p, c);
    }
    assert_int_equal(st(f).connect_failures_by[PQPOOL_FAIL_SERVER], 2);
    assert_int_equal(st(f).auth_failures, 0);
}

static void test_transient_refused_until_deadline(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0, el;

    f->cfg.backoff_initial_ms = 50;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, FAKEPQ_ALL, 0) > 0);
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, 500, &c), PQPOOL_ECONNECT);
    el = now_ms() - t0;
    assert_between(el, 498, 500 + SLACK_MS);
    /* Backoff, not a busy loop: 25+50+100+200 ms > 300 ms, so <= 6 tries. */
    assert_between(ctr().connect_attempts, 3, 6);
    assert_true(strlen(pqpool_last_error(f->p)) > 0);
    assert_int_equal(st(f).acquire_errors, 1);
    /* Housekeeping backs off too. */
    f->cfg.min_idle = 1;
    pqpool_free(f->p);
    f->cfg.min_idle = 1;
    fix_open(f);
    {
        long a0 = ctr().connect_attempts;
        int i;
        for (i = 0; i < 20; i++)
            (void)pqpool_maintain(f->p);
        assert_int_equal(ctr().connect_attempts - a0, 1);
        assert_int_equal(pqpool_maintain(f->p), 0); /* backing off: no attempt, no error */
    }
}

/* The delay doubles only up to backoff_max_ms: the server is tried at
 * least every backoff_max_ms while it stays down. */
static void test_backoff_capped(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;

    f->cfg.backoff_initial_ms = 10;
    f->cfg.backoff_max_ms = 20;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, FAKEPQ_ALL, 0) > 0);
    assert_int_equal(pqpool_acquire(f->p, 300, &c), PQPOOL_ECONNECT);
    /* Uncapped (10, 20, 40, 80, 160 ms) it would be at most 6 tries. */
    assert_between(ctr().connect_attempts, 12, 40);
}

/* A housekeeping connect that completes after the pool was closed: the
 * connection is finished, not added. */
static void *maintain_main(void *arg)
{
    struct worker *w = arg;
    w->rc = pqpool_maintain(w->f->p);
    return NULL;
}

static void test_close_during_refill(void **state)
{
    struct fix *f = *state;
    struct worker w = {.f = f};

    f->cfg.min_idle = 1;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_SLOW, FAKEPQ_NEXT, 1, 200) > 0);
    assert_int_equal(pthread_create(&w.t, NULL, maintain_main, &w), 0);
    EVENTUALLY(st(f).connecting == 1, 2000);
    pqpool_close(f->p);
    join_all(&w, 1);
    assert_int_equal(w.rc, PQPOOL_ECLOSED);
    assert_int_equal(st(f).total, 0);
    assert_int_equal(ctr().live_conns, 0);
}

/* ==== 7. Failover and restart ===================================================== */

static void test_restart_recovers_without_reopen(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    struct fakepq_counters k;

    f->cfg.min_idle = 2;
    f->cfg.validate_idle_ms = -1;
    f->cfg.backoff_initial_ms = 20;
    fix_open(f);
    assert_int_equal(pqpool_maintain(f->p), 0);
    assert_int_equal(st(f).idle, 2);
    /* The server goes down: sessions end, connects are refused... */
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_FATAL), 2);
    int rule = fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, FAKEPQ_ALL, 0);
    assert_true(rule > 0);
    assert_int_equal(pqpool_acquire(f->p, 200, &c), PQPOOL_ECONNECT);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 2);
    /* ... then it is back: the next acquire succeeds. */
    assert_int_equal(fakepq_rule_remove(rule), 0);
    c = must_acquire(f, 1000);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, c);
    assert_int_equal(pqpool_maintain(f->p), 0);
    k = ctr();
    assert_int_equal(k.backends, 2);
    assert_int_equal(k.live_conns, 2); /* no stale connection kept */
    assert_int_equal(st(f).total, 2);
}

/* After a failover every old session dies while in use or idle; waiting
 * acquires get fresh connections. */
static void test_failover_kill_all_with_waiters(void **state)
{
    struct fix *f = *state;
    struct worker w[3];
    PGconn *a, *b;
    int served = 0, i;

    f->cfg.max_size = 2;
    f->cfg.validate_idle_ms = -1;
    fix_open(f);
    a = must_acquire(f, -1);
    b = must_acquire(f, -1);
    start_queue(f, w, 3, 3000, 5, &served);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_FATAL), 2);
    assert_int_equal(q(f, a, "SELECT 1"), PGRES_FATAL_ERROR);
    pqpool_release(f->p, a);
    pqpool_release(f->p, b); /* dead too, though nobody asked it */
    join_all(w, 3);
    for (i = 0; i < 3; i++)
        assert_int_equal(w[i].rc, 0);
    assert_true(st(f).ejected >= 2);
    assert_int_equal(st(f).created, 4);
}

/* ==== 8. Exhaustion: FIFO, no lost wakeup, own deadlines ========================== */

static void test_fifo_32_threads(void **state)
{
    struct fix *f = *state;
    struct worker w[NTHREADS];
    PGconn *a;
    int served = 0, i;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    start_queue(f, w, NTHREADS, 20000, 1, &served);
    assert_int_equal(st(f).waiting, NTHREADS);
    pqpool_release(f->p, a);
    join_all(w, NTHREADS);
    for (i = 0; i < NTHREADS; i++) {
        assert_int_equal(w[i].rc, 0);
        assert_int_equal(w[i].order, i); /* first come, first served */
    }
    assert_int_equal(st(f).created, 1);
    assert_int_equal(st(f).waiters_served, NTHREADS);
    assert_int_equal(st(f).waiting, 0);
}

static void test_waiters_time_out_at_own_deadlines(void **state)
{
    struct fix *f = *state;
    struct worker w[3];
    PGconn *a;
    int served = 0;

    f->cfg.max_size = 1;
    fix_open(f);
    a = must_acquire(f, -1);
    start_queue(f, &w[0], 1, 400, 0, &served);
    start_queue(f, &w[1], 1, 150, 0, &served);
    start_queue(f, &w[2], 1, 5000, 0, &served);
    join_all(&w[1], 1);
    join_all(&w[0], 1);
    assert_int_equal(w[0].rc, PQPOOL_ETIMEDOUT);
    assert_int_equal(w[1].rc, PQPOOL_ETIMEDOUT);
    assert_between(w[0].elapsed_ms, 398 - 5, 400 + SLACK_MS); /* start-up skew of 5 ms */
    assert_between(w[1].elapsed_ms, 148, 150 + SLACK_MS);
    /* The third, still queued, gets the connection as soon as it comes
     * back. */
    pqpool_release(f->p, a);
    join_all(&w[2], 1);
    assert_int_equal(w[2].rc, 0);
    assert_int_equal(st(f).acquire_timeouts, 2);
}

/* Many threads sharing few connections: nobody times out, nobody waits
 * forever, the pool never grows past max_size. */
static void test_workers_share_fairly(void **state)
{
    struct fix *f = *state;
    struct worker w[16];
    int64_t until;
    int i, ok = 0;

    f->cfg.max_size = 4;
    fix_open(f);
    until = now_ms() + 500;
    while (now_ms() < until) {
        int served = 0;
        for (i = 0; i < 16; i++) {
            w[i] = (struct worker){.f = f, .timeout_ms = 3000, .hold_ms = 1, .served = &served};
            assert_int_equal(pthread_create(&w[i].t, NULL, acquire_main, &w[i]), 0);
        }
        join_all(w, 16);
        for (i = 0; i < 16; i++) {
            assert_int_equal(w[i].rc, 0);
            ok++;
        }
        assert_true(st(f).total <= 4);
    }
    assert_true(ok >= 16);
    assert_true(st(f).created <= 4);
    assert_int_equal(st(f).acquire_timeouts, 0);
}

/* ==== 9. Close ==================================================================== */

static void *close_main(void *arg)
{
    pqpool_close(arg);
    return NULL;
}

static void test_close_wakes_waiters(void **state)
{
    struct fix *f = *state;
    struct worker w[3];
    pthread_t closers[4];
    PGconn *a, *b = NULL;
    int served = 0, i;
    int64_t t0;
    struct fakepq_counters c0;

    f->cfg.max_size = 2;
    fix_open(f);
    make_idle(f, 1);
    a = must_acquire(f, -1);
    b = must_acquire(f, -1);
    start_queue(f, w, 3, 10000, 0, &served);
    c0 = ctr();
    t0 = now_ms();
    for (i = 0; i < 4; i++) /* concurrent closes */
        assert_int_equal(pthread_create(&closers[i], NULL, close_main, f->p), 0);
    for (i = 0; i < 4; i++)
        pthread_join(closers[i], NULL);
    join_all(w, 3);
    assert_true(now_ms() - t0 < 500);
    for (i = 0; i < 3; i++)
        assert_int_equal(w[i].rc, PQPOOL_ECLOSED);
    assert_int_equal(nev(f, PQPOOL_EV_CLOSED), 1);
    assert_int_equal(ctr().finished, c0.finished); /* both connections are in use */
    pqpool_release(f->p, a);
    pqpool_release(f->p, b);
    assert_int_equal(ctr().finished - c0.finished, 2);
    assert_int_equal(ctr().live_conns, 0);
    assert_int_equal(pqpool_acquire(f->p, 1000, &b), PQPOOL_ECLOSED);
    assert_int_equal(pqpool_maintain(f->p), PQPOOL_ECLOSED);
    pqpool_close(f->p); /* idempotent */
    assert_int_equal(st(f).total, 0);
    assert_int_equal(st(f).ejected, 0); /* closing is not ejecting */
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_CLOSED], 2);
}

static void test_close_finishes_idle(void **state)
{
    struct fix *f = *state;

    f->cfg.housekeeping_interval_ms = 10;
    f->cfg.min_idle = 3;
    fix_open(f);
    EVENTUALLY(st(f).idle == 3, 3000);
    pqpool_close(f->p);
    assert_int_equal(ctr().live_conns, 0);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_CLOSED], 3);
}

/* A connect in progress when the pool closes: the new connection is
 * finished and the acquire returns ECLOSED. */
static void test_close_during_connect(void **state)
{
    struct fix *f = *state;
    struct worker w;
    int served = 0;

    f->cfg.connect_timeout_ms = 5000;
    fix_open(f);
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_SLOW, FAKEPQ_NEXT, 1, 200) > 0);
    w = (struct worker){.f = f, .timeout_ms = 5000, .served = &served};
    assert_int_equal(pthread_create(&w.t, NULL, acquire_main, &w), 0);
    EVENTUALLY(st(f).connecting == 1, 2000);
    pqpool_close(f->p);
    join_all(&w, 1);
    assert_int_equal(w.rc, PQPOOL_ECLOSED);
    assert_int_equal(ctr().live_conns, 0);
}

/* pqpool_free finishes connections still checked out. */
static void test_free_with_connection_out(void **state)
{
    struct fix *f = *state;
    PGconn *c;
    fix_open(f);
    c = must_acquire(f, -1);
    (void)c;
    pqpool_free(f->p);
    f->p = NULL;
    assert_int_equal(ctr().live_conns, 0);
}

/* ==== 10. Thread safety ============================================================ */

struct chaos {
    struct fix *f;
    int stop; /* atomic */
    int bad;  /* atomic: invariant violations seen */
    long ops; /* atomic */
};

static void *chaos_worker(void *arg)
{
    struct chaos *ch = arg;
    unsigned seed = (unsigned)(uintptr_t)pthread_self();
    while (!__atomic_load_n(&ch->stop, __ATOMIC_ACQUIRE)) {
        PGconn *c = NULL;
        int rc = pqpool_acquire(ch->f->p, 300, &c);
        if (rc == PQPOOL_ECLOSED)
            break;
        if (rc != 0)
            continue;
        switch (rand_r(&seed) % 5) {
        case 0:
            PQclear(pqpool_exec(ch->f->p, c, "BEGIN"));
            break;
        case 1:
            pqpool_discard(ch->f->p, c);
            c = NULL;
            break;
        default:
            PQclear(pqpool_exec(ch->f->p, c, "SELECT 1"));
        }
        if (c)
            pqpool_release(ch->f->p, c);
        __atomic_add_fetch(&ch->ops, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void *chaos_keeper(void *arg)
{
    struct chaos *ch = arg;
    while (!__atomic_load_n(&ch->stop, __ATOMIC_ACQUIRE)) {
        struct pqpool_stats s;
        (void)pqpool_maintain(ch->f->p);
        pqpool_stats(ch->f->p, &s);
        if (s.idle + s.in_use + s.connecting > s.max_size || s.idle < 0 || s.in_use < 0 ||
            s.waiting < 0)
            __atomic_add_fetch(&ch->bad, 1, __ATOMIC_RELAXED);
        (void)fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_EOF);
        (void)pqpool_last_error(ch->f->p);
        sleep_ms(2);
    }
    return NULL;
}

static void test_concurrent_everything(void **state)
{
    struct fix *f = *state;
    struct chaos ch = {.f = f};
    pthread_t t[8], k;
    int i;

    f->cfg.max_size = 3;
    f->cfg.min_idle = 1;
    f->cfg.validate_idle_ms = 0;
    f->cfg.housekeeping_interval_ms = 3;
    fix_open(f);
    for (i = 0; i < 8; i++)
        assert_int_equal(pthread_create(&t[i], NULL, chaos_worker, &ch), 0);
    assert_int_equal(pthread_create(&k, NULL, chaos_keeper, &ch), 0);
    sleep_ms(400);      /* the length of the run */
    pqpool_close(f->p); /* with everything still running */
    __atomic_store_n(&ch.stop, 1, __ATOMIC_RELEASE);
    for (i = 0; i < 8; i++)
        pthread_join(t[i], NULL);
    pthread_join(k, NULL);
    assert_int_equal(ch.bad, 0);
    assert_true(ch.ops > 0);
    assert_int_equal(st(f).in_use, 0);
    assert_int_equal(st(f).total, 0);
    assert_int_equal(ctr().live_conns, 0);
}

/* ==== 11. No SIGPIPE ============================================================== */

static void test_no_sigpipe_on_dropped_socket(void **state)
{
    struct fix *f = *state;
    void (*old)(int) = signal(SIGPIPE, SIG_DFL); /* a SIGPIPE would kill the test */
    PGconn *a;

    f->cfg.validate_idle_ms = 0;
    fix_open(f);
    /* Writes onto a socket whose peer is gone: the rollback at release
     * and the checkout ping. */
    a = must_acquire(f, -1);
    assert_int_equal(q(f, a, "BEGIN"), PGRES_COMMAND_OK);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ONE, fakepq_conn_id(a), FAKEPQ_BREAK_EOF), 1);
    pqpool_release(f->p, a);
    assert_int_equal(st(f).total, 0);
    make_idle(f, 1);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_EOF), 1);
    a = must_acquire(f, -1);
    pqpool_release(f->p, a);
    signal(SIGPIPE, old);
}

/* ==== Health ====================================================================== */

static void test_health(void **state)
{
    struct fix *f = *state;
    int64_t t0;

    f->cfg.max_size = 1;
    f->cfg.validate_idle_ms = -1;
    fix_open(f);
    assert_int_equal(pqpool_health(f->p, 1000), 0);
    assert_int_equal(pqpool_health(f->p, -1), 0);
    /* A query that never answers: ETIMEDOUT by the deadline. */
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_PARTITION), 1);
    t0 = now_ms();
    assert_int_equal(pqpool_health(f->p, 200), PQPOOL_ETIMEDOUT);
    assert_between(now_ms() - t0, 198, 200 + SLACK_MS);
    fakepq_heal();
    /* SELECT 1 fails. */
    assert_true(fakepq_fault_call_fail("PQsendQuery", FAKEPQ_NEXT, 1) > 0);
    assert_int_equal(pqpool_health(f->p, 1000), PQPOOL_ECONNECT);
    /* The server is unreachable. */
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, FAKEPQ_ALL, 0) > 0);
    assert_int_equal(pqpool_health(f->p, 100), PQPOOL_ECONNECT);
}

/* ==== Real server (fakepq passthrough + pgserver) ================================= */

static int real_setup(void **state)
{
    char err[512];
    struct pgserver_options o;
    struct fix *f = calloc(1, sizeof *f);
    assert_non_null(f);
    pthread_mutex_init(&f->mu, NULL);
    *state = f;
    if (fakepq_init(FAKEPQ_PASSTHROUGH, err, sizeof err) != 0)
        fail_msg("fakepq_init: %s", err);
    pgserver_options_init(&o);
    if (pgserver_create(&o, &f->srv, err, sizeof err) != 0)
        fail_msg("pgserver_create: %s", err);
    if (pgserver_start(f->srv, err, sizeof err) != 0)
        fail_msg("pgserver_start: %s", err);
    /* No password in the conninfo: the callback supplies it. */
    snprintf(f->conninfo, sizeof f->conninfo, "host=%s port=%d user=%s dbname=%s",
             pgserver_host(f->srv), pgserver_port(f->srv), pgserver_user(f->srv),
             pgserver_dbname(f->srv));
    f->password = pgserver_password(f->srv);
    fix_config(f, f->conninfo);
    return 0;
}

static int backends(struct fix *f)
{
    char err[256];
    int n = pgserver_count_backends(f->srv, NULL, err, sizeof err);
    if (n < 0)
        fail_msg("count_backends: %s", err);
    return n;
}

static void test_real_dead_idle(void **state)
{
    struct fix *f = *state;
    char err[256];
    PGconn *c;

    f->cfg.min_idle = 2;
    f->cfg.validate_idle_ms = -1;
    fix_open(f);
    assert_int_equal(pqpool_maintain(f->p), 0);
    assert_int_equal(st(f).idle, 2);
    assert_int_equal(backends(f), 2);
    /* Housekeeping finds them. */
    assert_int_equal(pgserver_terminate(f->srv, PGSERVER_BACKENDS_IDLE, NULL, err, sizeof err), 2);
    EVENTUALLY(backends(f) == 0, 5000);
    assert_int_equal(pqpool_maintain(f->p), 0);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 2);
    assert_int_equal(st(f).idle, 2);
    /* Checkout finds them. */
    assert_int_equal(pgserver_terminate(f->srv, PGSERVER_BACKENDS_IDLE, NULL, err, sizeof err), 2);
    EVENTUALLY(backends(f) == 0, 5000);
    c = must_acquire(f, -1);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 4);
    pqpool_release(f->p, c);
    assert_int_equal(ctr().double_finishes, 0);
}

/* A NOTIFY delivered to an idle LISTENing connection makes its socket
 * readable. That is not a dead connection: housekeeping reads and drops
 * the notification (nobody can receive it) and keeps the connection. */
static void test_real_notification_on_idle(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;
    struct pollfd pfd;
    int64_t until;

    f->cfg.validate_idle_ms = -1;
    fix_open(f);
    a = must_acquire(f, -1);
    b = must_acquire(f, -1);
    assert_int_equal(q(f, a, "LISTEN pgfault_test"), PGRES_COMMAND_OK);
    pqpool_release(f->p, a);
    assert_int_equal(q(f, b, "NOTIFY pgfault_test"), PGRES_COMMAND_OK);
    pqpool_release(f->p, b);
    pfd = (struct pollfd){.fd = PQsocket(a), .events = POLLIN};
    until = now_ms() + 5000;
    while (poll(&pfd, 1, 10) == 0 && now_ms() < until)
        ;
    assert_true(pfd.revents & POLLIN);
    assert_int_equal(pqpool_maintain(f->p), 0);
    assert_int_equal(st(f).ejected, 0);
    assert_int_equal(st(f).idle, 2);
    pfd.revents = 0;
    assert_int_equal(poll(&pfd, 1, 0), 0); /* consumed */
    a = must_acquire(f, -1);
    assert_int_equal(q(f, a, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, a);
}

/* A connection released in the middle of COPY OUT cannot be drained into
 * a clean state by reading results: it is ejected as busy, and the next
 * acquire gets a working one. */
static void test_real_release_during_copy(void **state)
{
    struct fix *f = *state;
    PGconn *a, *b;
    PGresult *r;

    fix_open(f);
    a = must_acquire(f, -1);
    r = PQexec(a, "COPY (SELECT generate_series(1, 3)) TO STDOUT");
    assert_int_equal(PQresultStatus(r), PGRES_COPY_OUT);
    PQclear(r);
    pqpool_release(f->p, a);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_BUSY], 1);
    assert_int_equal(st(f).total, 0);
    b = must_acquire(f, -1);
    assert_int_equal(q(f, b, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, b);
    EVENTUALLY(backends(f) == 1, 5000);
}

static void test_real_auth(void **state)
{
    struct fix *f = *state;
    PGconn *c = NULL;
    int64_t t0;

    set_password(f, "wrong-secret");
    fix_open(f);
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, 2000, &c), PQPOOL_EAUTH);
    assert_true(now_ms() - t0 < 1000);
    assert_int_equal(ctr().connect_attempts, 1);
    assert_non_null(strstr(pqpool_last_error(f->p), "28P01"));
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, 2000, &c), PQPOOL_EAUTH);
    assert_true(now_ms() - t0 < 50 + SLACK_MS / 4);
    assert_int_equal(ctr().connect_attempts, 1);
    set_password(f, pgserver_password(f->srv));
    c = must_acquire(f, 2000);
    pqpool_release(f->p, c);
    pqpool_free(f->p);
    /* No such database: ECONFIG. */
    {
        char ci[600];
        snprintf(ci, sizeof ci, "%s dbname=no_such_db", f->conninfo);
        fix_config(f, ci);
        fix_open(f);
        assert_int_equal(pqpool_acquire(f->p, 2000, &c), PQPOOL_ECONFIG);
        assert_non_null(strstr(pqpool_last_error(f->p), "3D000"));
    }
}

static void test_real_refused_then_back(void **state)
{
    struct fix *f = *state;
    char err[512];
    PGconn *c = NULL;
    int64_t t0, el;

    f->cfg.validate_idle_ms = -1;
    fix_open(f);
    make_idle(f, 1);
    if (pgserver_stop(f->srv, PGSERVER_STOP_FAST, err, sizeof err) != 0)
        fail_msg("%s", err);
    t0 = now_ms();
    assert_int_equal(pqpool_acquire(f->p, 300, &c), PQPOOL_ECONNECT);
    el = now_ms() - t0;
    assert_between(el, 298, 300 + SLACK_MS);
    assert_int_equal(st(f).ejected_by[PQPOOL_EJECT_DEAD], 1);
    assert_true(st(f).connect_failures_by[PQPOOL_FAIL_NETWORK] >= 1);
    if (pgserver_start(f->srv, err, sizeof err) != 0)
        fail_msg("%s", err);
    c = must_acquire(f, 5000);
    assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
    pqpool_release(f->p, c);
}

static void test_real_restart(void **state)
{
    static const enum pgserver_stop_mode modes[] = {PGSERVER_STOP_FAST, PGSERVER_STOP_IMMEDIATE};
    struct fix *f = *state;
    char err[512];
    size_t i;

    f->cfg.min_idle = 2;
    f->cfg.validate_idle_ms = 0;
    f->cfg.acquire_timeout_ms = 10000;
    f->cfg.housekeeping_interval_ms = 20;
    fix_open(f);
    for (i = 0; i < 2; i++) {
        long long ej = st(f).ejected;
        PGconn *c;
        EVENTUALLY(st(f).idle == 2, 5000);
        if (pgserver_restart(f->srv, modes[i], err, sizeof err) != 0)
            fail_msg("%s", err);
        c = must_acquire(f, -1);
        assert_int_equal(q(f, c, "SELECT 1"), PGRES_TUPLES_OK);
        pqpool_release(f->p, c);
        EVENTUALLY(st(f).ejected >= ej + 2, 5000);
    }
    /* Refill waits out the backoff the restart's failed attempts built
     * up (up to backoff_max_ms); a loaded sanitizer build needs margin. */
    EVENTUALLY(st(f).idle == 2, 15000);
}

static void test_real_fifo_32_threads(void **state)
{
    struct fix *f = *state;
    struct worker w[NTHREADS];
    PGconn *a, *b;
    int served = 0, i;

    f->cfg.max_size = 2;
    fix_open(f);
    a = must_acquire(f, -1);
    b = must_acquire(f, -1);
    start_queue(f, w, NTHREADS, 30000, 20, &served);
    pqpool_release(f->p, a);
    pqpool_release(f->p, b);
    join_all(w, NTHREADS);
    for (i = 0; i < NTHREADS; i++)
        assert_int_equal(w[i].rc, 0);
    /* With two connections two waiters are served at a time, so two
     * threads woken together may count themselves in either order; a
     * tolerance of two places still rejects LIFO or random service. */
    for (i = 0; i < NTHREADS; i++)
        assert_between(w[i].order, i - 2, i + 2);
    assert_int_equal(st(f).created, 2);
    assert_true(backends(f) <= 2);
}

static void test_real_no_sigpipe(void **state)
{
    struct fix *f = *state;
    void (*old)(int) = signal(SIGPIPE, SIG_DFL);
    char err[256];
    PGconn *a;

    fix_open(f);
    a = must_acquire(f, -1);
    assert_int_equal(q(f, a, "BEGIN"), PGRES_COMMAND_OK);
    assert_int_equal(pgserver_terminate(f->srv, PGSERVER_BACKENDS_ALL, NULL, err, sizeof err), 1);
    EVENTUALLY(backends(f) == 0, 5000);
    pqpool_release(f->p, a); /* ROLLBACK onto a closed socket */
    assert_int_equal(st(f).total, 0);
    assert_int_equal(st(f).ejected, 1);
    signal(SIGPIPE, old);
}

int main(void)
{
    const struct CMUnitTest sim[] = {
#define SIM(t) cmocka_unit_test_setup_teardown(t, sim_setup, fix_teardown)
        SIM(test_config_defaults),
        SIM(test_open_rejects_bad_config),
        SIM(test_strerror_and_names),
        SIM(test_null_arguments),
        SIM(test_acquire_release_reuse),
        SIM(test_connect_parameters),
        SIM(test_deadline_connect_hangs),
        SIM(test_deadline_connect_slow),
        SIM(test_deadline_validation_ping_hangs),
        SIM(test_deadline_init_sql_hangs),
        SIM(test_init_sql_runs_and_failure_rejects),
        SIM(test_deadline_all_in_use_not_early),
        SIM(test_deadline_no_time_to_validate),
        SIM(test_deadline_slot_frees_in_time),
        SIM(test_dead_idle_found_by_housekeeping),
        SIM(test_dead_idle_eof_found_at_checkout),
        SIM(test_dead_idle_fatal_found_at_checkout),
        SIM(test_partition_caught_by_ping),
        SIM(test_ping_only_after_validate_idle),
        SIM(test_ping_error_ejects),
        SIM(test_idle_timeout_above_min_idle),
        SIM(test_max_lifetime),
        SIM(test_housekeeping_thread_fills_min_idle),
        SIM(test_fatal_notice_on_idle_marks_dead),
        SIM(test_release_in_transaction_rolls_back),
        SIM(test_release_in_failed_transaction_rolls_back),
        SIM(test_release_rollback_hangs_ejects),
        SIM(test_release_libpq_failures_eject),
        SIM(test_connect_start_null_retried),
        SIM(test_max_lifetime_off),
        SIM(test_release_command_running),
        SIM(test_release_unread_results_drained),
        SIM(test_release_broken_connection),
        SIM(test_release_dropped_unnoticed),
        SIM(test_double_release_reported),
        SIM(test_foreign_release_reported),
        SIM(test_discard_frees_slot_for_waiter),
        SIM(test_fatal_sqlstate_ejects_on_release),
        SIM(test_nonfatal_sqlstate_keeps_connection),
        SIM(test_note_result_marks_broken),
        SIM(test_auth_wrong_password_fails_fast_once),
        SIM(test_auth_hba_reject),
        SIM(test_config_no_database),
        SIM(test_auth_password_rotation),
        SIM(test_auth_retry_after),
        SIM(test_auth_no_retry_storm_in_housekeeping),
        SIM(test_auth_verbose_set_before_polling),
        SIM(test_transient_refused_backoff_then_ok),
        SIM(test_transient_server_states_retried),
        SIM(test_transient_refused_until_deadline),
        SIM(test_backoff_capped),
        SIM(test_restart_recovers_without_reopen),
        SIM(test_failover_kill_all_with_waiters),
        SIM(test_fifo_32_threads),
        SIM(test_waiters_time_out_at_own_deadlines),
        SIM(test_workers_share_fairly),
        SIM(test_close_wakes_waiters),
        SIM(test_close_finishes_idle),
        SIM(test_close_during_connect),
        SIM(test_close_during_refill),
        SIM(test_free_with_connection_out),
        SIM(test_concurrent_everything),
        SIM(test_no_sigpipe_on_dropped_socket),
        SIM(test_health),
#undef SIM
    };
    const struct CMUnitTest real[] = {
#define REAL(t) cmocka_unit_test_setup_teardown(t, real_setup, fix_teardown)
        REAL(test_real_dead_idle),           REAL(test_real_notification_on_idle),
        REAL(test_real_release_during_copy), REAL(test_real_auth),
        REAL(test_real_refused_then_back),   REAL(test_real_restart),
        REAL(test_real_fifo_32_threads),     REAL(test_real_no_sigpipe),
#undef REAL
    };
    int failed = 0;
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    failed += cmocka_run_group_tests_name("pqpool_sim", sim, NULL, NULL);
    failed += cmocka_run_group_tests_name("pqpool_real", real, NULL, NULL);
    return failed;
}
