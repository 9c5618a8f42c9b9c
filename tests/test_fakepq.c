/*
 * Tests of fakepq: every fault kind in simulated mode, and the ones that
 * act on real connections in passthrough mode against a throwaway server.
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

#define CI "host=127.0.0.1 port=5432 user=pgfault password=pgfault dbname=pgfault"

static struct pgserver *srv;
static char real_ci[512];

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int readable(int fd, int ms)
{
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, ms) == 1;
}

static void sim(void)
{
    char err[256];
    assert_int_equal(fakepq_init(FAKEPQ_SIMULATED, err, sizeof err), 0);
}

static void passthrough(void)
{
    char err[256];
    assert_int_equal(fakepq_init(FAKEPQ_PASSTHROUGH, err, sizeof err), 0);
}

/* Connects asynchronously with verbose errors, driving PQconnectPoll with
 * poll() until done or deadline_ms. */
static PGconn *connect_async(const char *ci, int deadline_ms, PostgresPollingStatusType *last)
{
    const char *k[] = {"dbname", NULL}, *v[] = {ci, NULL};
    PGconn *c = PQconnectStartParams(k, v, 1);
    assert_non_null(c);
    PQsetErrorVerbosity(c, PQERRORS_VERBOSE);
    double end = now_ms() + deadline_ms;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (now_ms() < end) {
        st = PQconnectPoll(c);
        if (st == PGRES_POLLING_OK || st == PGRES_POLLING_FAILED)
            break;
        struct pollfd p = {PQsocket(c), st == PGRES_POLLING_WRITING ? POLLOUT : POLLIN, 0};
        (void)poll(&p, 1, 10);
    }
    *last = st;
    return c;
}

static void notice_rx(void *arg, const PGresult *res)
{
    char *buf = arg;
    snprintf(buf, 256, "%s|%s", PQresultErrorField(res, PG_DIAG_SQLSTATE),
             PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
}

/* ---- Simulated ----------------------------------------------------------- */

static void test_sim_healthy_connect_and_queries(void **state)
{
    sim();
    PostgresPollingStatusType st;
    PGconn *c = connect_async(CI, 1000, &st);
    assert_int_equal(st, PGRES_POLLING_OK);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    assert_true(PQsocket(c) >= 0);
    assert_false(readable(PQsocket(c), 0));
    assert_int_equal(PQserverVersion(c) / 10000, 15);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "1");
    assert_string_equal(PQfname(r, 0), "?column?");
    PQclear(r);
    r = PQexec(c, "BEGIN");
    assert_int_equal(PQtransactionStatus(c), PQTRANS_INTRANS);
    PQclear(r);
    r = PQexec(c, "SELEC 1");
    assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "42601");
    PQclear(r);
    assert_int_equal(PQtransactionStatus(c), PQTRANS_INERROR);
    r = PQexec(c, "SELECT 1");
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "25P02");
    PQclear(r);
    r = PQexec(c, "ROLLBACK");
    assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
    PQclear(r);
    r = PQexec(c, "");
    assert_int_equal(PQresultStatus(r), PGRES_EMPTY_QUERY);
    PQclear(r);
    r = PQexec(c, "SELECT pg_backend_pid()");
    assert_int_equal(atoi(PQgetvalue(r, 0, 0)), PQbackendPID(c));
    PQclear(r);
    struct fakepq_counters k;
    fakepq_get_counters(&k);
    assert_int_equal(k.connect_attempts, 1);
    assert_int_equal(k.connect_outcomes[FAKEPQ_OUT_OK], 1);
    assert_int_equal(k.backends, 1);
    PQfinish(c);
    fakepq_get_counters(&k);
    assert_int_equal(k.live_conns, 0);
    assert_int_equal(k.backends, 0);
    assert_int_equal(fakepq_leaks(NULL), 0);
}

static void test_sim_connect_faults_messages(void **state)
{
    static const struct {
        enum fakepq_connect_fault f;
        const char *text;
        enum fakepq_outcome out;
    } cases[] = {
        {FAKEPQ_CONNECT_REFUSED,
         "connection to server at \"127.0.0.1\", port 5432 failed: Connection refused\n\tIs the "
         "server running on that host and accepting TCP/IP connections?\n",
         FAKEPQ_OUT_REFUSED},
        {FAKEPQ_CONNECT_BAD_PASSWORD,
         "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  28P01: password "
         "authentication failed for user \"pgfault\"\n",
         FAKEPQ_OUT_AUTH},
        {FAKEPQ_CONNECT_HBA_REJECT, "FATAL:  28000: no pg_hba.conf entry for host",
         FAKEPQ_OUT_AUTH},
        {FAKEPQ_CONNECT_NO_DATABASE, "FATAL:  3D000: database \"pgfault\" does not exist",
         FAKEPQ_OUT_NO_DATABASE},
        {FAKEPQ_CONNECT_TOO_MANY, "FATAL:  53300: sorry, too many clients already",
         FAKEPQ_OUT_TOO_MANY},
        {FAKEPQ_CONNECT_STARTING_UP, "FATAL:  57P03: the database system is starting up",
         FAKEPQ_OUT_STARTING_UP},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        sim();
        assert_true(fakepq_fault_connect(cases[i].f, FAKEPQ_NEXT, 1, 0) > 0);
        PostgresPollingStatusType st;
        PGconn *c = connect_async(CI, 1000, &st);
        assert_int_equal(st, PGRES_POLLING_FAILED);
        assert_int_equal(PQstatus(c), CONNECTION_BAD);
        if (!strstr(PQerrorMessage(c), cases[i].text))
            fail_msg("case %zu: '%s' lacks '%s'", i, PQerrorMessage(c), cases[i].text);
        struct fakepq_counters k;
        fakepq_get_counters(&k);
        assert_int_equal(k.connect_outcomes[cases[i].out], 1);
        PQfinish(c);
        /* The rule covered one attempt: the next one succeeds. */
        c = connect_async(CI, 1000, &st);
        assert_int_equal(st, PGRES_POLLING_OK);
        PQfinish(c);
    }
}

static void test_sim_connect_hang_and_slow(void **state)
{
    sim();
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_HANG, FAKEPQ_NEXT, 1, 0) > 0);
    PostgresPollingStatusType st;
    PGconn *c = connect_async(CI, 150, &st);
    assert_int_equal(st, PGRES_POLLING_READING);
    assert_false(readable(PQsocket(c), 50));
    PQfinish(c);
    struct fakepq_counters k;
    fakepq_get_counters(&k);
    assert_int_equal(k.connect_outcomes[FAKEPQ_OUT_ABANDONED], 1);

    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_SLOW, FAKEPQ_NEXT, 1, 120) > 0);
    double t = now_ms();
    c = connect_async(CI, 2000, &st);
    double took = now_ms() - t;
    assert_int_equal(st, PGRES_POLLING_OK);
    assert_true(took >= 119 && took < 1000);
    PQfinish(c);
}

static void test_sim_nth_attempt(void **state)
{
    sim();
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, 2, 1, 0) > 0);
    PGconn *a = PQconnectdb(CI), *b = PQconnectdb(CI), *c = PQconnectdb(CI);
    assert_int_equal(PQstatus(a), CONNECTION_OK);
    assert_int_equal(PQstatus(b), CONNECTION_BAD);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(a);
    PQfinish(b);
    PQfinish(c);
}

static void test_sim_server_checks_credentials_and_limits(void **state)
{
    sim();
    PGconn *c = PQconnectdb("host=127.0.0.1 port=5432 user=pgfault password=nope dbname=pgfault");
    assert_non_null(strstr(PQerrorMessage(c), "password authentication failed for user"));
    PQfinish(c);
    fakepq_sim_set_password("pgfault", "nope");
    c = PQconnectdb("host=127.0.0.1 port=5432 user=pgfault password=nope dbname=pgfault");
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
    fakepq_sim_set_password("pgfault", "pgfault");
    fakepq_sim_set_max_connections(1);
    PGconn *one = PQconnectdb(CI), *two = PQconnectdb(CI);
    assert_int_equal(PQstatus(one), CONNECTION_OK);
    assert_non_null(strstr(PQerrorMessage(two), "sorry, too many clients already"));
    PQfinish(one);
    PQfinish(two);
    c = PQconnectdb("host=127.0.0.1 port=5432 user=pgfault password=pgfault dbname=other");
    assert_non_null(strstr(PQerrorMessage(c), "database \"other\" does not exist"));
    PQfinish(c);
}

static void test_sim_break_fatal_idle(void **state)
{
    sim();
    PGconn *idle = PQconnectdb(CI), *busy = PQconnectdb(CI);
    char notice[256] = "";
    PQsetNoticeReceiver(idle, notice_rx, notice);
    PQclear(PQexec(busy, "BEGIN"));
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_FATAL), 1);
    assert_true(readable(PQsocket(idle), 100));
    assert_false(readable(PQsocket(busy), 0));
    /* As real libpq: the first read takes in the FATAL, parsing hands it
     * to the notice receiver, the next read finds the EOF behind it. */
    assert_int_equal(PQconsumeInput(idle), 1);
    assert_int_equal(PQstatus(idle), CONNECTION_OK);
    assert_string_equal(notice, "");
    assert_int_equal(PQisBusy(idle), 0);
    assert_string_equal(notice, "57P01|terminating connection due to administrator command");
    assert_true(readable(PQsocket(idle), 0));
    assert_int_equal(PQconsumeInput(idle), 0);
    assert_int_equal(PQstatus(idle), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(idle), "server closed the connection unexpectedly"));
    assert_string_equal(notice, "57P01|terminating connection due to administrator command");
    assert_int_equal(PQsocket(idle), -1);
    struct fakepq_counters k;
    fakepq_get_counters(&k);
    assert_int_equal(k.backends, 1);
    PQfinish(idle);
    PQfinish(busy);
}

static void test_sim_break_eof_during_query(void **state)
{
    sim();
    PGconn *c = PQconnectdb(CI);
    assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, 1, 500) > 0);
    assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ONE, fakepq_conn_id(c), FAKEPQ_BREAK_EOF), 1);
    assert_true(readable(PQsocket(c), 100));
    PGresult *r = PQgetResult(c);
    assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
    assert_non_null(strstr(PQresultErrorMessage(r), "server closed the connection"));
    PQclear(r);
    assert_null(PQgetResult(c));
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    PQfinish(c);
}

static void test_sim_partition_and_heal(void **state)
{
    sim();
    PGconn *c = PQconnectdb(CI);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_PARTITION), 1);
    assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
    assert_false(readable(PQsocket(c), 150));
    assert_int_equal(PQconsumeInput(c), 1);
    assert_int_equal(PQisBusy(c), 1);
    fakepq_heal();
    assert_true(readable(PQsocket(c), 200));
    assert_int_equal(PQconsumeInput(c), 1);
    assert_int_equal(PQisBusy(c), 0);
    PGresult *r = PQgetResult(c);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    assert_null(PQgetResult(c));
    PQfinish(c);
}

static void test_sim_query_delay_async(void **state)
{
    sim();
    PGconn *c = PQconnectdb(CI);
    assert_true(fakepq_fault_query_delay(FAKEPQ_NEXT, 1, 150) > 0);
    double t = now_ms();
    assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
    assert_false(readable(PQsocket(c), 50));
    assert_true(readable(PQsocket(c), 1000));
    double took = now_ms() - t;
    assert_true(took >= 145 && took < 900);
    /* As libpq: the result has arrived on the socket, but PQisBusy says
     * so only after PQconsumeInput has read it. */
    assert_int_equal(PQisBusy(c), 1);
    assert_int_equal(PQconsumeInput(c), 1);
    assert_int_equal(PQisBusy(c), 0);
    PQclear(PQgetResult(c));
    assert_null(PQgetResult(c));
    PQfinish(c);
}

static void test_sim_call_faults(void **state)
{
    sim();
    PGconn *c = PQconnectdb(CI);
    assert_true(fakepq_fault_call_fail("PQexec", FAKEPQ_NEXT, 1) > 0);
    assert_null(PQexec(c, "SELECT 1"));
    assert_non_null(strstr(PQerrorMessage(c), "injected failure of PQexec"));
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    assert_true(fakepq_fault_call_error("PQexec", FAKEPQ_NEXT, 1, "40001", NULL) > 0);
    r = PQexec(c, "SELECT 1");
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "40001");
    PQclear(r);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    assert_true(fakepq_fault_call_error("PQgetResult", FAKEPQ_NEXT, 1, "57P01", NULL) > 0);
    r = PQexec(c, "SELECT 1"); /* PQexec does not use the public PQgetResult */
    PQclear(r);
    assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
    r = PQgetResult(c);
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "57P01");
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SEVERITY), "FATAL");
    PQclear(r);
    assert_null(PQgetResult(c));
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_int_equal(fakepq_fault_call_fail("PQnoSuchThing", 1, 1), -1);
    /* A name whose failure libpq cannot report is refused, not ignored. */
    assert_int_equal(fakepq_fault_call_fail("PQisBusy", 1, 1), -1);
    PQfinish(c);

    /* PQsetnonblocking fails with -1 once, then works. */
    c = PQconnectdb(CI);
    assert_true(fakepq_fault_call_fail("PQsetnonblocking", FAKEPQ_NEXT, 1) > 0);
    assert_int_equal(PQsetnonblocking(c, 1), -1);
    assert_non_null(strstr(PQerrorMessage(c), "injected failure of PQsetnonblocking"));
    assert_int_equal(PQisnonblocking(c), 0);
    assert_int_equal(PQsetnonblocking(c, 1), 0);
    assert_int_equal(PQisnonblocking(c), 1);
    PQfinish(c);

    /* A PQconnect* failure is a NULL PGconn, as out of memory in libpq,
     * and no connection attempt. */
    struct fakepq_counters before, after;
    fakepq_get_counters(&before);
    assert_true(fakepq_fault_call_fail("PQconnectStartParams", FAKEPQ_NEXT, 1) > 0);
    const char *k[] = {"dbname", NULL}, *v[] = {CI, NULL};
    assert_null(PQconnectStartParams(k, v, 1));
    fakepq_get_counters(&after);
    assert_int_equal(after.connect_attempts, before.connect_attempts);
    PostgresPollingStatusType st;
    c = connect_async(CI, 1000, &st);
    assert_int_equal(st, PGRES_POLLING_OK);
    PQfinish(c);
}

static void test_sim_cancel(void **state)
{
    sim();
    PGconn *c = PQconnectdb(CI);
    assert_int_equal(PQsendQuery(c, "SELECT pg_sleep(30)"), 1);
    PGcancel *k = PQgetCancel(c);
    char err[256];
    assert_int_equal(PQcancel(k, err, sizeof err), 1);
    PQfreeCancel(k);
    assert_true(readable(PQsocket(c), 200));
    PGresult *r = PQgetResult(c);
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "57014");
    PQclear(r);
    assert_null(PQgetResult(c));
    PQfinish(c);
}

static void test_trace_leaks_and_double_finish(void **state)
{
    sim();
    PGconn *c = PQconnectdb(CI);
    PGresult *r = PQexec(c, "SELECT 1");
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_int_equal(fakepq_leaks(f), 2);
    fclose(f);
    assert_non_null(strstr(buf, "PGconn"));
    assert_non_null(strstr(buf, "PGresult never cleared"));
    assert_non_null(strstr(buf, "PQexec"));
    free(buf);
    int saw_poll = 0;
    for (size_t i = 0; i < fakepq_trace_count(); i++) {
        struct fakepq_call call;
        assert_int_equal(fakepq_trace_get(i, &call), 0);
        if (strcmp(call.function, "PQconnectPoll") == 0 && strcmp(call.result, "OK") == 0)
            saw_poll = 1;
    }
    assert_true(saw_poll);
    PQclear(r);
    PQfinish(c);
    PQfinish(c); /* a bug in the caller: counted, never a crash */
    struct fakepq_counters k;
    fakepq_get_counters(&k);
    assert_int_equal(k.double_finishes, 1);
    assert_int_equal(fakepq_leaks(NULL), 0);
}

/* ---- Passthrough ------------------------------------------------------------ */

static int real_setup(void **state)
{
    char err[1024];
    if (pgserver_create(NULL, &srv, err, sizeof err) < 0 ||
        pgserver_start(srv, err, sizeof err) < 0) {
        fprintf(stderr, "real_setup: %s\n", err);
        return -1;
    }
    return pgserver_conninfo(srv, real_ci, sizeof real_ci, NULL);
}

static int real_teardown(void **state)
{
    pgserver_destroy(srv);
    return 0;
}

static int server_backends(void)
{
    char err[512];
    return pgserver_count_backends(srv, NULL, err, sizeof err);
}

static void test_pass_healthy(void **state)
{
    passthrough();
    PostgresPollingStatusType st;
    PGconn *c = connect_async(real_ci, 5000, &st);
    assert_int_equal(st, PGRES_POLLING_OK);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_string_equal(PQgetvalue(r, 0, 0), "1");
    PQclear(r);
    assert_int_equal(server_backends(), 1);
    PQfinish(c);
    assert_int_equal(fakepq_leaks(NULL), 0);
}

static void test_pass_connect_fault_never_reaches_server(void **state)
{
    passthrough();
    assert_true(fakepq_fault_connect(FAKEPQ_CONNECT_BAD_PASSWORD, FAKEPQ_NEXT, 1, 0) > 0);
    PostgresPollingStatusType st;
    PGconn *c = connect_async(real_ci, 5000, &st);
    assert_int_equal(st, PGRES_POLLING_FAILED);
    assert_non_null(strstr(PQerrorMessage(c), "FATAL:  28P01: password authentication failed"));
    assert_int_equal(server_backends(), 0);
    PQfinish(c);
}

static void test_pass_break_fatal_seen_by_real_libpq(void **state)
{
    passthrough();
    PGconn *c = PQconnectdb(real_ci);
    char notice[256] = "";
    PQsetNoticeReceiver(c, notice_rx, notice);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_IDLE, 0, FAKEPQ_BREAK_FATAL), 1);
    assert_true(readable(PQsocket(c), 200));
    assert_int_equal(PQconsumeInput(c), 1);
    assert_int_equal(PQisBusy(c), 0);
    assert_string_equal(notice, "57P01|terminating connection due to administrator command");
    assert_int_equal(PQconsumeInput(c), 0);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(c), "server closed the connection unexpectedly"));
    /* The real session ended with the swap. */
    double end = now_ms() + 5000;
    while (server_backends() != 0 && now_ms() < end)
        usleep(20000);
    assert_int_equal(server_backends(), 0);
    PQfinish(c);
}

static void test_pass_partition_and_call_error(void **state)
{
    passthrough();
    PGconn *c = PQconnectdb(real_ci);
    assert_int_equal(fakepq_break(FAKEPQ_TARGET_ALL, 0, FAKEPQ_BREAK_PARTITION), 1);
    assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
    assert_false(readable(PQsocket(c), 200));
    fakepq_heal();
    /* The query sent into the partition was lost with it; the healed
     * socket answers new queries. */
    assert_true(fakepq_fault_call_error("PQexec", FAKEPQ_NEXT, 1, "40001", NULL) > 0);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "40001");
    PQclear(r);
    PQfinish(c);
    assert_int_equal(fakepq_leaks(NULL), 0);
}

int main(void)
{
    const struct CMUnitTest simulated[] = {
        cmocka_unit_test(test_sim_healthy_connect_and_queries),
        cmocka_unit_test(test_sim_connect_faults_messages),
        cmocka_unit_test(test_sim_connect_hang_and_slow),
        cmocka_unit_test(test_sim_nth_attempt),
        cmocka_unit_test(test_sim_server_checks_credentials_and_limits),
        cmocka_unit_test(test_sim_break_fatal_idle),
        cmocka_unit_test(test_sim_break_eof_during_query),
        cmocka_unit_test(test_sim_partition_and_heal),
        cmocka_unit_test(test_sim_query_delay_async),
        cmocka_unit_test(test_sim_call_faults),
        cmocka_unit_test(test_sim_cancel),
        cmocka_unit_test(test_trace_leaks_and_double_finish),
    };
    const struct CMUnitTest pass[] = {
        cmocka_unit_test(test_pass_healthy),
        cmocka_unit_test(test_pass_connect_fault_never_reaches_server),
        cmocka_unit_test(test_pass_break_fatal_seen_by_real_libpq),
        cmocka_unit_test(test_pass_partition_and_call_error),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    int failed = cmocka_run_group_tests_name("fakepq_simulated", simulated, NULL, NULL);
    failed += cmocka_run_group_tests_name("fakepq_passthrough", pass, real_setup, real_teardown);
    return failed;
}
