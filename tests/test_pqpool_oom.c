/*
 * pqpool when the system says no: out of memory, out of threads, no cancel
 * object. These paths are what a service meets under memory pressure or a
 * thread limit, and no server-side fault reaches them.
 *
 * The test links a copy of pqpool.o in which calloc, strdup, the pthread
 * init/create functions and PQgetCancel are renamed to seam_* (objcopy
 * --redefine-sym, see the Makefile), so only pqpool's own calls pass
 * through the seam below; fakepq, cmocka and libc are untouched. Each test
 * fails the Nth seam call for N = 0, 1, 2, ... until an operation completes
 * without reaching the armed call, and checks every time that the pool
 * reports the failure (PQPOOL_ENOMEM or a retried connect), stays usable,
 * and leaks nothing (fakepq's leak check here; ASan's in `make
 * test-sanitize`).
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fakepq.h"
#include "pqpool.h"

#define SIM_CONNINFO "host=127.0.0.1 port=5432 user=pgfault dbname=pgfault"
#define MAX_N 64

/* ---- The seam ------------------------------------------------------------------ */

static int seam_armed = -1; /* fail the call with this index; -1: never */
static int seam_calls;      /* calls since arm() */
static int seam_fired;
static pthread_mutex_t seam_mu = PTHREAD_MUTEX_INITIALIZER;

static void arm(int n)
{
    pthread_mutex_lock(&seam_mu);
    seam_armed = n;
    seam_calls = 0;
    seam_fired = 0;
    pthread_mutex_unlock(&seam_mu);
}

/* Disarms; returns whether the armed call was reached. */
static int disarm(void)
{
    pthread_mutex_lock(&seam_mu);
    int fired = seam_fired;
    seam_armed = -1;
    pthread_mutex_unlock(&seam_mu);
    return fired;
}

static int seam_fail(void)
{
    pthread_mutex_lock(&seam_mu);
    int fail = seam_armed >= 0 && seam_calls++ == seam_armed;
    if (fail)
        seam_fired = 1;
    pthread_mutex_unlock(&seam_mu);
    return fail;
}

void *seam_calloc(size_t n, size_t size);
char *seam_strdup(const char *s);
int seam_pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *a);
int seam_pthread_condattr_init(pthread_condattr_t *a);
int seam_pthread_condattr_setclock(pthread_condattr_t *a, clockid_t clock);
int seam_pthread_cond_init(pthread_cond_t *c, const pthread_condattr_t *a);
int seam_pthread_attr_init(pthread_attr_t *a);
int seam_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);
PGcancel *seam_PQgetCancel(PGconn *c);

void *seam_calloc(size_t n, size_t size)
{
    if (seam_fail()) {
        errno = ENOMEM;
        return NULL;
    }
    return calloc(n, size);
}

char *seam_strdup(const char *s)
{
    if (seam_fail()) {
        errno = ENOMEM;
        return NULL;
    }
    return strdup(s);
}

int seam_pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *a)
{
    return seam_fail() ? ENOMEM : pthread_mutex_init(m, a);
}

int seam_pthread_condattr_init(pthread_condattr_t *a)
{
    return seam_fail() ? ENOMEM : pthread_condattr_init(a);
}

int seam_pthread_condattr_setclock(pthread_condattr_t *a, clockid_t clock)
{
    return seam_fail() ? EINVAL : pthread_condattr_setclock(a, clock);
}

int seam_pthread_cond_init(pthread_cond_t *c, const pthread_condattr_t *a)
{
    return seam_fail() ? ENOMEM : pthread_cond_init(c, a);
}

int seam_pthread_attr_init(pthread_attr_t *a)
{
    return seam_fail() ? ENOMEM : pthread_attr_init(a);
}

int seam_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg)
{
    return seam_fail() ? EAGAIN : pthread_create(t, a, fn, arg);
}

PGcancel *seam_PQgetCancel(PGconn *c)
{
    return seam_fail() ? NULL : PQgetCancel(c);
}

/* ---- Fixture ------------------------------------------------------------------- */

static const char *password_cb(void *ctx)
{
    return "pgfault";
}

static void config(struct pqpool_config *cfg)
{
    pqpool_config_init(cfg);
    cfg->conninfo = SIM_CONNINFO;
    cfg->max_size = 2;
    cfg->min_idle = 0;
    cfg->acquire_timeout_ms = 2000;
    cfg->connect_timeout_ms = 500;
    cfg->backoff_initial_ms = 1;
    cfg->backoff_max_ms = 4;
    cfg->housekeeping_interval_ms = 0;
    cfg->password = password_cb;
}

static int setup(void **state)
{
    char err[256];
    if (fakepq_init(FAKEPQ_SIMULATED, err, sizeof err) != 0)
        fail_msg("fakepq_init: %s", err);
    return 0;
}

static int teardown(void **state)
{
    struct fakepq_counters c;
    disarm();
    fakepq_heal();
    fakepq_get_counters(&c);
    if (fakepq_leaks(stderr) != 0)
        fail_msg("fakepq reports leaked connections or results");
    assert_int_equal(c.double_finishes, 0);
    return 0;
}

static void select1(PGconn *c)
{
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
}

/* ---- Tests --------------------------------------------------------------------- */

/* Every allocation and thread call of pqpool_open fails in turn: open
 * returns PQPOOL_ENOMEM with a message and no pool, never a half-built
 * pool or a crash. */
static void test_open_every_failure(void **state)
{
    struct pqpool_config cfg;
    config(&cfg);
    cfg.application_name = "oom-test";
    cfg.init_sql = "SET statement_timeout = 1000";
    cfg.housekeeping_interval_ms = 50;
    int n;
    for (n = 0; n < MAX_N; n++) {
        struct pqpool *p = (struct pqpool *)1;
        char err[128] = "";
        arm(n);
        int rc = pqpool_open(&cfg, &p, err, sizeof err);
        int fired = disarm();
        if (!fired) {
            assert_int_equal(rc, 0);
            pqpool_free(p);
            break;
        }
        if (rc != PQPOOL_ENOMEM)
            fail_msg("failure %d: pqpool_open returned %d (%s)", n, rc, err);
        assert_null(p);
        assert_non_null(strstr(err, "out of memory"));
    }
    assert_true(n > 6); /* pool, three strings, mutex, condattr, cond, thread */
    assert_true(n < MAX_N);
}

/* Every allocation of an acquire that has to connect fails in turn. A
 * failed waiter setup is PQPOOL_ENOMEM; a connection that could not be
 * allocated (or whose password could not be copied) is retried inside the
 * deadline like any transient failure, and the acquire succeeds. */
static void test_acquire_every_failure(void **state)
{
    struct pqpool_config cfg;
    struct pqpool *p;
    char err[128];
    int n, enomem = 0, retried = 0;
    config(&cfg);
    assert_int_equal(pqpool_open(&cfg, &p, err, sizeof err), 0);
    for (n = 0; n < MAX_N; n++) {
        PGconn *c = NULL;
        struct pqpool_stats before, after;
        pqpool_stats(p, &before);
        arm(n);
        int rc = pqpool_acquire(p, -1, &c);
        int fired = disarm();
        pqpool_stats(p, &after);
        if (rc == PQPOOL_ENOMEM) {
            assert_true(fired);
            assert_null(c);
            enomem++;
            continue;
        }
        if (rc != 0)
            fail_msg("failure %d: acquire returned %s (%s)", n, pqpool_strerror(rc),
                     pqpool_last_error(p));
        select1(c);
        /* Discarded, so that the next acquire connects again. */
        pqpool_discard(p, c);
        if (fired) {
            /* Failed before libpq was asked: not a connect attempt. */
            assert_int_equal(after.connect_failures, before.connect_failures);
            retried++;
        }
        if (!fired)
            break;
    }
    assert_true(n < MAX_N);
    assert_int_equal(enomem, 1); /* the waiter's condition variable */
    assert_true(retried >= 2);   /* the password copy and the connection */
    struct pqpool_stats s;
    pqpool_stats(p, &s);
    assert_int_equal(s.total, 0);
    assert_int_equal(s.in_use, 0);
    pqpool_free(p);
}

/* A command still running at release needs a cancel request, sent from a
 * thread. When the cancel object or the thread cannot be had, the
 * connection is ejected as busy -- never handed out with a command on it. */
static void test_release_cannot_cancel(void **state)
{
    struct pqpool_config cfg;
    struct pqpool *p;
    char err[128];
    int n;
    config(&cfg);
    cfg.release_timeout_ms = 300;
    assert_int_equal(pqpool_open(&cfg, &p, err, sizeof err), 0);
    for (n = 0; n < MAX_N; n++) {
        PGconn *c = NULL;
        struct pqpool_stats before, after;
        assert_int_equal(pqpool_acquire(p, -1, &c), 0);
        assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, 1, 5000) > 0);
        assert_int_equal(PQsendQuery(c, "SELECT pg_sleep(5)"), 1);
        pqpool_stats(p, &before);
        arm(n);
        pqpool_release(p, c);
        int fired = disarm();
        fakepq_heal();
        pqpool_stats(p, &after);
        if (!fired) {
            assert_int_equal(after.cancels, before.cancels + 1);
            break;
        }
        assert_int_equal(after.ejected_by[PQPOOL_EJECT_BUSY],
                         before.ejected_by[PQPOOL_EJECT_BUSY] + 1);
        assert_int_equal(after.total, 0);
    }
    assert_int_equal(n, 3); /* PQgetCancel, pthread_attr_init, pthread_create */
    pqpool_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_open_every_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_acquire_every_failure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_release_cannot_cancel, setup, teardown),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("pqpool_oom", tests, NULL, NULL);
}
