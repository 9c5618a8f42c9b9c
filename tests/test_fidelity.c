/*
 * Fidelity: the fake must behave like the real thing. Each test runs the
 * same sequence of libpq calls twice -- against real libpq and a real
 * PostgreSQL 15 (fakepq passthrough), and against the simulated server --
 * records what a caller can observe (statuses, SQLSTATEs, messages,
 * notices) as text, and requires the two records to be identical.
 *
 * The only normalisation: "LOCATION:" lines are dropped, since a real
 * server names its own source file and line there.
 */
#include <poll.h>
#include <setjmp.h>
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

static struct pgserver *srv;

struct record {
    char text[8192];
};

__attribute__((format(printf, 2, 3))) static void note(struct record *r, const char *fmt, ...)
{
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    /* Drop LOCATION lines inside messages. */
    char clean[2048] = "";
    size_t o = 0;
    for (char *p = line; *p;) {
        char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p + 1) : strlen(p);
        if (strncmp(p, "LOCATION:", 9) != 0 && o + len < sizeof clean) {
            memcpy(clean + o, p, len);
            o += len;
            clean[o] = '\0';
        }
        p += len;
    }
    size_t used = strlen(r->text);
    snprintf(r->text + used, sizeof r->text - used, "%s\n", clean);
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static void mode(enum fakepq_mode m)
{
    char err[256];
    assert_int_equal(fakepq_init(m, err, sizeof err), 0);
}

static void conninfo(char *buf, size_t len, const char *extra)
{
    assert_int_equal(pgserver_conninfo(srv, buf, len, extra), 0);
}

static PGconn *connect_verbose(const char *ci, struct record *r)
{
    const char *k[] = {"dbname", NULL}, *v[] = {ci, NULL};
    PGconn *c = PQconnectStartParams(k, v, 1);
    assert_non_null(c);
    PQsetErrorVerbosity(c, PQERRORS_VERBOSE);
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    double end = now_ms() + 10000;
    while (now_ms() < end) {
        st = PQconnectPoll(c);
        if (st == PGRES_POLLING_OK || st == PGRES_POLLING_FAILED)
            break;
        struct pollfd p = {PQsocket(c), st == PGRES_POLLING_WRITING ? POLLOUT : POLLIN, 0};
        (void)poll(&p, 1, 50);
    }
    note(r, "connect: %s, status %d", st == PGRES_POLLING_OK ? "OK" : "FAILED", (int)PQstatus(c));
    if (st != PGRES_POLLING_OK)
        note(r, "message: %s", PQerrorMessage(c));
    return c;
}

static void query(PGconn *c, const char *sql, struct record *r)
{
    PGresult *res = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(res);
    const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    note(r, "%s -> %s cmd '%s' sqlstate %s tx %d", sql, PQresStatus(st),
         res ? PQcmdStatus(res) : "", ss ? ss : "-", (int)PQtransactionStatus(c));
    if (st == PGRES_TUPLES_OK)
        note(r, "  %s = %s", PQfname(res, 0), PQgetvalue(res, 0, 0));
    if (st == PGRES_FATAL_ERROR)
        note(r, "  %s", PQresultErrorMessage(res));
    PQclear(res);
}

static void notice_rx(void *arg, const PGresult *res)
{
    struct record *r = arg;
    note(r, "notice: %s %s %s", PQresultErrorField(res, PG_DIAG_SEVERITY),
         PQresultErrorField(res, PG_DIAG_SQLSTATE),
         PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
}

/* What an idle connection shows after the server killed it. */
static void observe_killed_idle(PGconn *c, struct record *r)
{
    struct pollfd p = {PQsocket(c), POLLIN, 0};
    int ready = poll(&p, 1, 10000);
    note(r, "readable: %d", ready);
    note(r, "consume 1: %d, status %d", PQconsumeInput(c), (int)PQstatus(c));
    note(r, "busy: %d", PQisBusy(c));
    /* The EOF may arrive a moment after the message on a real socket. */
    p.fd = PQsocket(c);
    if (p.fd >= 0)
        (void)poll(&p, 1, 2000);
    note(r, "consume 2: %d, status %d", PQconsumeInput(c), (int)PQstatus(c));
    note(r, "message: %s", PQerrorMessage(c));
    note(r, "socket: %d", PQsocket(c) >= 0);
    note(r, "tx: %d", (int)PQtransactionStatus(c));
}

static int wait_backends(int n)
{
    char err[256];
    double end = now_ms() + 5000;
    int got;
    while ((got = pgserver_count_backends(srv, NULL, err, sizeof err)) != n && now_ms() < end)
        usleep(20000);
    return got;
}

static void compare(const struct record *real, const struct record *sim)
{
    if (strcmp(real->text, sim->text) != 0)
        fail_msg("real libpq and fakepq differ.\n--- real:\n%s--- simulated:\n%s", real->text,
                 sim->text);
}

/* ---- The sequences --------------------------------------------------------- */

static void seq_healthy(struct record *r)
{
    char ci[512];
    conninfo(ci, sizeof ci, NULL);
    PGconn *c = connect_verbose(ci, r);
    query(c, "SELECT 1", r);
    query(c, "", r);
    query(c, "BEGIN", r);
    query(c, "SELEC 1", r);
    query(c, "SELECT 1", r);
    query(c, "ROLLBACK", r);
    query(c, "SET application_name = 'x'", r);
    note(r, "server_version major: %d", PQserverVersion(c) / 10000);
    /* Asynchronous: busy until PQconsumeInput has read the arrived result. */
    note(r, "send: %d", PQsendQuery(c, "SELECT 1"));
    struct pollfd p = {PQsocket(c), POLLIN, 0};
    note(r, "readable: %d", poll(&p, 1, 5000));
    note(r, "busy before consume: %d", PQisBusy(c));
    note(r, "consume: %d", PQconsumeInput(c));
    note(r, "busy after consume: %d", PQisBusy(c));
    PGresult *res;
    while ((res = PQgetResult(c)) != NULL) {
        note(r, "result: %s", PQresStatus(PQresultStatus(res)));
        PQclear(res);
    }
    PQfinish(c);
}

static void seq_wrong_password(struct record *r)
{
    char ci[512];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=pgfault password=wrong dbname=pgfault",
             pgserver_port(srv));
    PQfinish(connect_verbose(ci, r));
}

static void seq_no_database(struct record *r)
{
    char ci[512];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=pgfault password=%s dbname=nosuch",
             pgserver_port(srv), pgserver_password(srv));
    PQfinish(connect_verbose(ci, r));
}

static void seq_terminate_idle(struct record *r, int real)
{
    char ci[512], err[512];
    conninfo(ci, sizeof ci, NULL);
    PGconn *c = connect_verbose(ci, r);
    PQsetNoticeReceiver(c, notice_rx, r);
    if (real) {
        assert_int_equal(wait_backends(1), 1);
        assert_int_equal(pgserver_terminate(srv, PGSERVER_BACKENDS_IDLE, NULL, err, sizeof err), 1);
    } else {
        assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_FATAL), 1);
    }
    observe_killed_idle(c, r);
    PQfinish(c);
}

static void seq_fast_shutdown(struct record *r, int real)
{
    char ci[512], err[512];
    conninfo(ci, sizeof ci, NULL);
    PGconn *a = connect_verbose(ci, r), *b = connect_verbose(ci, r);
    PQsetNoticeReceiver(a, notice_rx, r);
    PQsetNoticeReceiver(b, notice_rx, r);
    if (real) {
        assert_int_equal(wait_backends(2), 2);
        assert_int_equal(pgserver_stop(srv, PGSERVER_STOP_FAST, err, sizeof err), 0);
    } else {
        assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_FATAL), 2);
    }
    observe_killed_idle(a, r);
    observe_killed_idle(b, r);
    PQfinish(a);
    PQfinish(b);
    if (real)
        assert_int_equal(pgserver_start(srv, err, sizeof err), 0);
}

/* Runs a sequence in both modes and compares the records. */
#define BOTH(seq_call_real, seq_call_sim)                                                          \
    do {                                                                                           \
        static struct record real, sim;                                                            \
        memset(&real, 0, sizeof real);                                                             \
        memset(&sim, 0, sizeof sim);                                                               \
        mode(FAKEPQ_PASSTHROUGH);                                                                  \
        seq_call_real;                                                                             \
        mode(FAKEPQ_SIMULATED);                                                                    \
        /* The simulated server's port is the real one's, so messages naming                       \
         * it match; its role has the real one's (random) password. */                             \
        fakepq_sim_set_password("pgfault", pgserver_password(srv));                                \
        seq_call_sim;                                                                              \
        assert_int_equal(fakepq_leaks(stderr), 0);                                                 \
        compare(&real, &sim);                                                                      \
    } while (0)

static void test_healthy_connect_and_queries(void **state)
{
    BOTH(seq_healthy(&real), seq_healthy(&sim));
}

static void test_wrong_password(void **state)
{
    BOTH(seq_wrong_password(&real), seq_wrong_password(&sim));
}

static void test_no_such_database(void **state)
{
    BOTH(seq_no_database(&real), seq_no_database(&sim));
}

static void test_terminate_idle_backend(void **state)
{
    BOTH(seq_terminate_idle(&real, 1), seq_terminate_idle(&sim, 0));
}

static void test_fast_shutdown_with_idle_connections(void **state)
{
    BOTH(seq_fast_shutdown(&real, 1), seq_fast_shutdown(&sim, 0));
}

static int setup(void **state)
{
    char err[1024];
    if (pgserver_create(NULL, &srv, err, sizeof err) < 0 ||
        pgserver_start(srv, err, sizeof err) < 0) {
        fprintf(stderr, "setup: %s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    pgserver_destroy(srv);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_healthy_connect_and_queries),
        cmocka_unit_test(test_wrong_password),
        cmocka_unit_test(test_no_such_database),
        cmocka_unit_test(test_terminate_idle_backend),
        cmocka_unit_test(test_fast_shutdown_with_idle_connections),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("fidelity", tests, setup, teardown);
}
