/*
 * Tests of the fault proxy with real sockets: libpq (through fakepq in
 * passthrough mode, which is real libpq) against throwaway PostgreSQL
 * servers through the proxy, and plain sockets against a small echo server
 * for the byte-level faults and the 1000-connection test.
 *
 * Timing bounds are deliberately generous (a loaded 2-core machine must not
 * flake); the measured numbers are printed so a regression in "at once"
 * shows up in the log even when it stays inside the bound.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "pgserver.h"
#include "proxy.h"

/* ---- Helpers ----------------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* The two servers every test may use: A is the proxy's upstream, B the
 * failover target. */
static struct pgserver *srv_a, *srv_b;

struct fixture {
    struct fproxy *p;
    char dir[64];
    char ctl[100];
    struct echo *echo;
};

static int group_setup(void **state)
{
    struct pgserver_options o;
    pgserver_options_init(&o);
    char err[512];
    if (pgserver_create(&o, &srv_a, err, sizeof err) < 0 ||
        pgserver_start(srv_a, err, sizeof err) < 0) {
        fprintf(stderr, "test_proxy: server A: %s\n", err);
        return -1;
    }
    if (pgserver_create(&o, &srv_b, err, sizeof err) < 0 ||
        pgserver_start(srv_b, err, sizeof err) < 0) {
        fprintf(stderr, "test_proxy: server B: %s\n", err);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    pgserver_destroy(srv_a);
    pgserver_destroy(srv_b);
    srv_a = srv_b = NULL;
    return 0;
}

/* A proxy in front of server A with a control socket in a temp dir. */
static int open_proxy(struct fixture *f, const char *host, int port, unsigned long seed)
{
    snprintf(f->dir, sizeof f->dir, "/tmp/pgfault-proxytest-XXXXXX");
    if (!mkdtemp(f->dir))
        return -1;
    snprintf(f->ctl, sizeof f->ctl, "%s/ctl", f->dir);
    struct fproxy_config c;
    fproxy_config_init(&c);
    c.upstream_host = host;
    c.upstream_port = port;
    c.control_path = f->ctl;
    c.seed = seed;
    char err[256];
    if (fproxy_open(&c, &f->p, err, sizeof err) < 0) {
        fprintf(stderr, "fproxy_open: %s\n", err);
        rmdir(f->dir);
        return -1;
    }
    return 0;
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    if (!f || !srv_a || open_proxy(f, pgserver_host(srv_a), pgserver_port(srv_a), 0) < 0) {
        free(f);
        return -1;
    }
    *state = f;
    return 0;
}

static void echo_stop(struct echo *e);

static int teardown(void **state)
{
    struct fixture *f = *state;
    if (!f)
        return 0;
    fproxy_close(f->p);
    /* The proxy removes its control socket; the dir must then be empty. */
    int rc = rmdir(f->dir);
    if (f->echo)
        echo_stop(f->echo);
    free(f);
    return rc == 0 ? 0 : -1;
}

static void conninfo(char *buf, size_t len, int port, const char *extra)
{
    snprintf(buf, len, "host=127.0.0.1 port=%d user=%s password=%s dbname=%s %s", port,
             pgserver_user(srv_a), pgserver_password(srv_a), pgserver_dbname(srv_a),
             extra ? extra : "");
}

static PGconn *connect_via(struct fixture *f, const char *extra)
{
    char ci[512];
    conninfo(ci, sizeof ci, fproxy_port(f->p), extra);
    return PQconnectdb(ci);
}

static void ok(struct fixture *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Runs a command that must succeed. */
static void ok(struct fixture *f, const char *fmt, ...)
{
    char line[512], reply[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    int rc = fproxy_command(f->p, line, reply, sizeof reply);
    if (rc != 0 || strncmp(reply, "ok", 2) != 0)
        fail_msg("'%s' -> %s", line, reply);
}

static struct fproxy_stats stats(struct fixture *f)
{
    struct fproxy_stats s;
    assert_int_equal(fproxy_get_stats(f->p, &s), 0);
    return s;
}

/* Polls until the proxy has n active connections (deadline 5 s). */
static void wait_active(struct fixture *f, unsigned long long n)
{
    double t0 = now_ms();
    while (stats(f).active != n) {
        if (now_ms() - t0 > 5000)
            fail_msg("active stayed %llu, expected %llu", stats(f).active, n);
        usleep(1000);
    }
}

/* Waits up to ms for fd to become readable; returns the elapsed ms, or -1
 * on timeout. */
static double wait_readable(int fd, int ms)
{
    double t0 = now_ms();
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    for (;;) {
        double left = ms - (now_ms() - t0);
        if (left <= 0)
            return -1;
        int n = poll(&pfd, 1, (int)left + 1);
        if (n > 0)
            return now_ms() - t0;
        if (n < 0 && errno != EINTR)
            return -1;
    }
}

/* Reads input until the connection breaks or ms pass; returns the final
 * status. */
static ConnStatusType drain_until_bad(PGconn *c, int ms)
{
    double t0 = now_ms();
    while (PQstatus(c) == CONNECTION_OK && now_ms() - t0 < ms) {
        if (wait_readable(PQsocket(c), 100) < 0)
            continue;
        if (!PQconsumeInput(c))
            break;
        /* PQconsumeInput only reads; parsing (and the notice processor for
         * an ErrorResponse outside a query) happens here, as in a pool. */
        PQisBusy(c);
    }
    return PQstatus(c);
}

/* Runs a query with a deadline, as a pool would: returns the first result
 * (caller clears) or NULL if the deadline passed or the send failed. */
static PGresult *query_deadline(PGconn *c, const char *sql, int ms)
{
    if (!PQsendQuery(c, sql))
        return NULL;
    double t0 = now_ms();
    PGresult *first = NULL;
    for (;;) {
        if (!PQconsumeInput(c))
            break;
        while (!PQisBusy(c)) {
            PGresult *r = PQgetResult(c);
            if (!r)
                return first;
            if (!first)
                first = r;
            else
                PQclear(r);
        }
        double left = ms - (now_ms() - t0);
        if (left <= 0 || wait_readable(PQsocket(c), (int)left) < 0)
            break;
    }
    if (first)
        return first;
    return NULL;
}

static char notices[2048];

static void notice_capture(void *arg, const char *msg)
{
    size_t l = strlen(notices);
    snprintf(notices + l, sizeof notices - l, "%s", msg);
}

/* Connects with PQconnectStart and verbose errors set before polling, the
 * only way libpq shows a connection-time SQLSTATE. Returns the message. */
static void connect_verbose(const char *ci, char *msg, size_t len)
{
    PGconn *c = PQconnectStart(ci);
    assert_non_null(c);
    PQsetErrorVerbosity(c, PQERRORS_VERBOSE);
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    double t0 = now_ms();
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED && now_ms() - t0 < 10000) {
        struct pollfd pfd = {.fd = PQsocket(c),
                             .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        poll(&pfd, 1, 100);
        st = PQconnectPoll(c);
    }
    snprintf(msg, len, "%s", PQerrorMessage(c));
    assert_int_equal(st, PGRES_POLLING_FAILED);
    PQfinish(c);
}

/* From "FATAL:" to the end of that line. */
static void fatal_line(const char *msg, char *out, size_t len)
{
    const char *s = strstr(msg, "FATAL:");
    if (!s) {
        snprintf(out, len, "(no FATAL in: %s)", msg);
        return;
    }
    size_t n = strcspn(s, "\n");
    snprintf(out, len, "%.*s", (int)n, s);
}

/* ---- Echo server ----------------------------------------------------------------- */

/* A tiny epoll echo server on its own thread: echoes what it reads and
 * closes a connection when the peer has closed its side. */
struct echo {
    int lfd, stopfd, epfd, port;
    pthread_t t;
};

static void echo_write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, buf, n, MSG_NOSIGNAL);
        if (w > 0) {
            buf += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            poll(&pfd, 1, 100);
        } else {
            return;
        }
    }
}

static void *echo_main(void *arg)
{
    struct echo *e = arg;
    static __thread char buf[65536];
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(e->epfd, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == e->stopfd)
                return NULL;
            if (fd == e->lfd) {
                int c;
                while ((c = accept4(e->lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct epoll_event ev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(e->epfd, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r > 0) {
                echo_write_all(fd, buf, (size_t)r);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                epoll_ctl(e->epfd, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
}

static struct echo *echo_start(void)
{
    struct echo *e = calloc(1, sizeof *e);
    assert_non_null(e);
    e->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(e->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(e->lfd, 4096), 0);
    socklen_t l = sizeof sa;
    getsockname(e->lfd, (struct sockaddr *)&sa, &l);
    e->port = ntohs(sa.sin_port);
    e->stopfd = eventfd(0, 0);
    e->epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = e->lfd};
    epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->lfd, &ev);
    ev.data.fd = e->stopfd;
    epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->stopfd, &ev);
    assert_int_equal(pthread_create(&e->t, NULL, echo_main, e), 0);
    return e;
}

static void echo_stop(struct echo *e)
{
    uint64_t one = 1;
    if (write(e->stopfd, &one, sizeof one) != sizeof one)
        abort();
    pthread_join(e->t, NULL);
    /* Connections still open are closed with the process's other fds: the
     * echo server does not track them. Closing the epoll fd is enough for
     * the tests, which close their client ends first. */
    close(e->epfd);
    close(e->lfd);
    close(e->stopfd);
    free(e);
}

/* Replaces the fixture's proxy by one in front of a fresh echo server. */
static void use_echo(struct fixture *f, unsigned long seed)
{
    if (f->p) {
        fproxy_close(f->p);
        f->p = NULL;
        assert_int_equal(rmdir(f->dir), 0);
    }
    if (f->echo)
        echo_stop(f->echo);
    f->echo = echo_start();
    assert_int_equal(open_proxy(f, "127.0.0.1", f->echo->port, seed), 0);
}

static int tcp_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return fd;
}

/* Reads exactly n bytes (or until EOF/error/deadline); returns the count. */
static size_t read_n(int fd, char *buf, size_t n, int ms, int *reads)
{
    size_t got = 0;
    double t0 = now_ms();
    while (got < n) {
        double left = ms - (now_ms() - t0);
        if (left <= 0 || wait_readable(fd, (int)left) < 0)
            break;
        ssize_t r = recv(fd, buf + got, n - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
        if (reads)
            (*reads)++;
    }
    return got;
}

/* ---- Tests: pass-through and counters ------------------------------------------- */

static void test_passthrough_counts_and_phases(void **state)
{
    struct fixture *f = *state;
    for (int i = 0; i < 3; i++) {
        PGconn *c = connect_via(f, NULL);
        assert_int_equal(PQstatus(c), CONNECTION_OK);
        PGresult *r = PQexec(c, "SELECT 1");
        assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
        PQclear(r);
        PQfinish(c);
    }
    wait_active(f, 0);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 3);
    assert_int_equal(s.upstream_connects, 3);
    assert_int_equal(s.upstream_failures, 0);
    assert_int_equal(s.refused, 0);
    assert_true(s.bytes_up > 0 && s.bytes_down > 0);

    /* Phases: ready between queries, query while one runs. */
    PGconn *c = connect_via(f, "application_name=phases");
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    struct fproxy_conn_info ci[4];
    assert_int_equal(fproxy_conns(f->p, ci, 4), 1);
    assert_int_equal(ci[0].id, 4);
    assert_int_equal(ci[0].phase, FPROXY_PHASE_READY);
    assert_string_equal(ci[0].user, "pgfault");
    assert_true(ci[0].upstream_connected);
    struct sockaddr_in local;
    socklen_t ll = sizeof local;
    assert_int_equal(getsockname(PQsocket(c), (struct sockaddr *)&local, &ll), 0);
    assert_int_equal(ci[0].client_port, ntohs(local.sin_port));
    assert_int_equal(PQsendQuery(c, "SELECT pg_sleep(0.3)"), 1);
    double t0 = now_ms();
    while (fproxy_conns(f->p, ci, 4) == 1 && ci[0].phase != FPROXY_PHASE_QUERY)
        assert_true(now_ms() - t0 < 2000);
    assert_int_equal(ci[0].phase, FPROXY_PHASE_QUERY);
    PGresult *r;
    while ((r = PQgetResult(c)))
        PQclear(r);
    t0 = now_ms();
    while (fproxy_conns(f->p, ci, 4) == 1 && ci[0].phase != FPROXY_PHASE_READY)
        assert_true(now_ms() - t0 < 2000);
    assert_int_equal(ci[0].phase, FPROXY_PHASE_READY);
    char reply[512];
    assert_int_equal(fproxy_command(f->p, "conns", reply, sizeof reply), 0);
    assert_non_null(strstr(reply, "ok 1 conns: id=4 phase=ready"));
    assert_false(ci[0].server_closed);

    /* The server ends the session: once the proxy has passed that on,
     * the connection says so while the client still holds it open. */
    char err[256];
    assert_int_equal(pgserver_terminate(srv_a, PGSERVER_BACKENDS_ALL, NULL, err, sizeof err), 1);
    t0 = now_ms();
    while (fproxy_conns(f->p, ci, 4) == 1 && !ci[0].server_closed)
        assert_true(now_ms() - t0 < 2000);
    assert_int_equal(fproxy_conns(f->p, ci, 4), 1);
    assert_true(ci[0].server_closed);
    PQfinish(c);
}

/* ---- Connect faults ------------------------------------------------------------------- */

static void test_refuse_is_connection_refused(void **state)
{
    struct fixture *f = *state;
    int port = fproxy_port(f->p);
    ok(f, "refuse on");
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(c), "Connection refused"));
    PQfinish(c);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 0);
    assert_int_equal(s.upstream_connects, 0);
    assert_int_equal(s.listening, 0);
    ok(f, "refuse off");
    assert_int_equal(fproxy_port(f->p), port);
    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
    /* heal also re-opens the listener. */
    ok(f, "refuse on");
    ok(f, "heal");
    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
    assert_int_equal(stats(f).accepted, 2);
}

static void test_accept_close(void **state)
{
    struct fixture *f = *state;
    ok(f, "accept-close on");
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(c), "server closed the connection unexpectedly"));
    PQfinish(c);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 1);
    assert_int_equal(s.refused, 1);
    assert_int_equal(s.upstream_connects, 0);
    ok(f, "accept-close off");
    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
}

static void test_hang_connect_hits_connect_timeout(void **state)
{
    struct fixture *f = *state;
    ok(f, "hang-connect on");
    double t0 = now_ms();
    PGconn *c = connect_via(f, "connect_timeout=2");
    double el = now_ms() - t0;
    printf("hang-connect: libpq gave up after %.0f ms\n", el);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(c), "timeout expired"));
    PQfinish(c);
    /* libpq's connect_timeout=2 is 2 s; 3.5 s leaves room for a loaded box. */
    assert_true(el >= 1900 && el <= 3500);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 1);
    assert_int_equal(s.upstream_connects, 0);

    /* A hung connection goes on to the server on heal. */
    char ci[512];
    conninfo(ci, sizeof ci, fproxy_port(f->p), NULL);
    PGconn *h = PQconnectStart(ci);
    assert_non_null(h);
    t0 = now_ms();
    struct fproxy_conn_info info[2];
    while (fproxy_conns(f->p, info, 2) < 1)
        assert_true(now_ms() - t0 < 2000);
    assert_false(info[0].upstream_connected);
    ok(f, "heal");
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED && now_ms() - t0 < 5000) {
        struct pollfd pfd = {.fd = PQsocket(h),
                             .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        poll(&pfd, 1, 100);
        st = PQconnectPoll(h);
    }
    assert_int_equal(st, PGRES_POLLING_OK);
    PQfinish(h);
    assert_int_equal(stats(f).upstream_connects, 1);
}

/* ---- Protocol faults ------------------------------------------------------------------ */

static void test_inject_57P01_into_idle(void **state)
{
    struct fixture *f = *state;
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    notices[0] = '\0';
    PQsetNoticeProcessor(c, notice_capture, NULL);
    char reply[256];
    double t0 = now_ms();
    assert_int_equal(fproxy_command(f->p, "inject fatal 57P01 idle", reply, sizeof reply), 0);
    assert_string_equal(reply, "ok inject 57P01 1 connection");
    double el = wait_readable(PQsocket(c), 2000);
    double total = now_ms() - t0;
    printf("inject 57P01: idle client readable %.2f ms after the command returned (%.2f ms "
           "after it was sent)\n",
           el, total);
    assert_true(el >= 0 && total < 1000);
    assert_int_equal(drain_until_bad(c, 2000), CONNECTION_BAD);
    if (!strstr(notices, "FATAL:  terminating connection due to administrator command"))
        fail_msg("notices: '%s' error: '%s'", notices, PQerrorMessage(c));
    PQfinish(c);
    wait_active(f, 0);
    assert_int_equal(stats(f).injected, 1);

    /* The same through a query, as a pool meets it. */
    c = connect_via(f, NULL);
    ok(f, "inject fatal 57P01 conn 2");
    assert_true(wait_readable(PQsocket(c), 2000) >= 0);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_true(r == NULL || PQresultStatus(r) == PGRES_FATAL_ERROR);
    PQclear(r);
    assert_non_null(
        strstr(PQerrorMessage(c), "terminating connection due to administrator command"));
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    PQfinish(c);
}

static void test_inject_auth_fail_matches_real_server(void **state)
{
    struct fixture *f = *state;
    char ci[512], msg[1024], real_msg[1024], line[512], real_line[512];
    ok(f, "inject auth-fail");
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_non_null(
        strstr(PQerrorMessage(c), "FATAL:  password authentication failed for user \"pgfault\""));
    PQfinish(c);

    conninfo(ci, sizeof ci, fproxy_port(f->p), NULL);
    connect_verbose(ci, msg, sizeof msg);
    assert_non_null(
        strstr(msg, "FATAL:  28P01: password authentication failed for user \"pgfault\""));

    /* The real server's answer to a wrong password, for comparison. */
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=%s password=wrong dbname=%s",
             pgserver_port(srv_a), pgserver_user(srv_a), pgserver_dbname(srv_a));
    connect_verbose(ci, real_msg, sizeof real_msg);
    fatal_line(msg, line, sizeof line);
    fatal_line(real_msg, real_line, sizeof real_line);
    assert_string_equal(line, real_line);

    struct fproxy_stats s = stats(f);
    assert_int_equal(s.upstream_connects, 2);
    assert_int_equal(s.injected, 2);
    ok(f, "heal");
    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
}

static void test_startup_error_53300_nth(void **state)
{
    struct fixture *f = *state;
    char ci[512], msg[1024];
    ok(f, "inject startup-error 53300 nth 2");
    PGconn *c1 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c1), CONNECTION_OK);
    PGconn *c2 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c2), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(c2), "FATAL:  sorry, too many clients already"));
    PQfinish(c2);
    PGconn *c3 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c3), CONNECTION_OK);
    PQfinish(c3);
    PQfinish(c1);

    ok(f, "inject startup-error 53300");
    conninfo(ci, sizeof ci, fproxy_port(f->p), NULL);
    connect_verbose(ci, msg, sizeof msg);
    assert_non_null(strstr(msg, "FATAL:  53300: sorry, too many clients already"));
    ok(f, "heal");
    c1 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c1), CONNECTION_OK);
    PQfinish(c1);
}

/* ---- Resets, closes, partitions ----------------------------------------------------- */

static void test_reset_idle_seen_at_once(void **state)
{
    struct fixture *f = *state;
    PGconn *idle = connect_via(f, NULL);
    PGconn *busy = connect_via(f, NULL);
    assert_int_equal(PQstatus(idle), CONNECTION_OK);
    assert_int_equal(PQstatus(busy), CONNECTION_OK);
    assert_int_equal(PQsendQuery(busy, "SELECT pg_sleep(0.5)"), 1);
    struct fproxy_conn_info ci[2];
    double t0 = now_ms();
    while (fproxy_conns(f->p, ci, 2) == 2 && ci[1].phase != FPROXY_PHASE_QUERY)
        assert_true(now_ms() - t0 < 2000);
    assert_int_equal(ci[1].phase, FPROXY_PHASE_QUERY);

    char reply[256];
    t0 = now_ms();
    assert_int_equal(fproxy_command(f->p, "reset idle", reply, sizeof reply), 0);
    assert_string_equal(reply, "ok reset 1 connection");
    double el = wait_readable(PQsocket(idle), 2000);
    double total = now_ms() - t0;
    printf("reset idle: client socket readable %.2f ms after the command returned (%.2f ms "
           "after it was sent)\n",
           el, total);
    assert_true(el >= 0 && total < 1000);
    assert_int_equal(PQconsumeInput(idle), 0);
    assert_int_equal(PQstatus(idle), CONNECTION_BAD);
    /* libpq words ECONNRESET and EOF alike; RST versus FIN is checked on
     * plain sockets in test_reset_sends_rst_close_sends_fin. */
    assert_non_null(strstr(PQerrorMessage(idle), "server closed the connection unexpectedly"));
    PQfinish(idle);

    /* The busy connection was not idle and is untouched. */
    PGresult *r = PQgetResult(busy);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    while ((r = PQgetResult(busy)))
        PQclear(r);

    /* close sends a FIN: libpq sees EOF, not a reset. */
    ok(f, "close conn 2");
    assert_true(wait_readable(PQsocket(busy), 2000) >= 0);
    assert_int_equal(drain_until_bad(busy, 2000), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(busy), "server closed the connection unexpectedly"));
    PQfinish(busy);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.resets, 1);
    assert_int_equal(s.closes, 1);
}

static void test_reset_nth_future(void **state)
{
    struct fixture *f = *state;
    char reply[256];
    assert_int_equal(fproxy_command(f->p, "reset nth 2", reply, sizeof reply), 0);
    assert_string_equal(reply, "ok reset armed for connection 2");
    PGconn *c1 = connect_via(f, NULL);
    PGconn *c2 = connect_via(f, NULL);
    PGconn *c3 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c1), CONNECTION_OK);
    assert_int_equal(PQstatus(c2), CONNECTION_BAD);
    assert_int_equal(PQstatus(c3), CONNECTION_OK);
    PQfinish(c1);
    PQfinish(c2);
    PQfinish(c3);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 3);
    assert_int_equal(s.upstream_connects, 2);
    assert_int_equal(s.resets, 1);
    /* An id that was already handed out and is gone is an error. */
    assert_int_equal(fproxy_command(f->p, "reset nth 2", reply, sizeof reply), -1);
    assert_string_equal(reply, "error: reset: no open connection 2");
}

static void test_blackhole_until_deadline_then_heal(void **state)
{
    struct fixture *f = *state;
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    ok(f, "blackhole all");
    double t0 = now_ms();
    PGresult *r = query_deadline(c, "SELECT 1", 700);
    double el = now_ms() - t0;
    printf("blackhole: query gave up at its own deadline after %.0f ms\n", el);
    assert_null(r);
    assert_true(el >= 690);
    assert_int_equal(PQstatus(c), CONNECTION_OK);

    /* New connections are partitioned too and never reach the server. */
    char ci[512];
    conninfo(ci, sizeof ci, fproxy_port(f->p), NULL);
    PGconn *n = PQconnectStart(ci);
    assert_non_null(n);
    t0 = now_ms();
    struct fproxy_conn_info info[4];
    while (fproxy_conns(f->p, info, 4) < 2)
        assert_true(now_ms() - t0 < 2000);
    assert_int_equal(stats(f).upstream_connects, 1);

    ok(f, "heal");
    /* The held query is forwarded now and its result arrives. */
    t0 = now_ms();
    while (PQisBusy(c) && now_ms() - t0 < 3000) {
        wait_readable(PQsocket(c), 100);
        assert_int_equal(PQconsumeInput(c), 1);
    }
    r = PQgetResult(c);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "1");
    PQclear(r);
    while ((r = PQgetResult(c)))
        PQclear(r);
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED && now_ms() - t0 < 5000) {
        struct pollfd pfd = {.fd = PQsocket(n),
                             .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        poll(&pfd, 1, 100);
        st = PQconnectPoll(n);
    }
    assert_int_equal(st, PGRES_POLLING_OK);
    assert_int_equal(stats(f).upstream_connects, 2);
    PQfinish(n);
    PQfinish(c);
}

/* ---- Shaping -------------------------------------------------------------------------- */

static double rtt(PGconn *c)
{
    double best = 1e9;
    for (int i = 0; i < 3; i++) {
        double t0 = now_ms();
        PGresult *r = PQexec(c, "SELECT 1");
        double el = now_ms() - t0;
        assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
        PQclear(r);
        if (el < best)
            best = el;
    }
    return best;
}

static void test_latency_delays_round_trip(void **state)
{
    struct fixture *f = *state;
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    double base = rtt(c);
    ok(f, "latency 100");
    double slow = rtt(c);
    ok(f, "latency 0");
    double after = rtt(c);
    printf("latency: round trip %.2f ms direct, %.2f ms with latency 100, %.2f ms after\n", base,
           slow, after);
    /* 100 ms each way: at least 200 ms per round trip. */
    assert_true(slow >= 199 && slow < 1200);
    assert_true(after < 100);
    /* Only the downstream direction: about 100 ms. */
    ok(f, "latency 100 down");
    double half = rtt(c);
    printf("latency: %.2f ms with latency 100 down only\n", half);
    assert_true(half >= 99 && half < 199);
    PQfinish(c);
}

static void test_jitter_same_seed_same_delays(void **state)
{
    struct fixture *f = *state;
    long long totals[4];
    unsigned long seeds[4] = {42, 42, 7, 9};
    for (int k = 0; k < 4; k++) {
        use_echo(f, seeds[k]);
        ok(f, "latency 2 jitter 2");
        int fd = tcp_connect(fproxy_port(f->p));
        for (int i = 0; i < 20; i++) {
            char buf[16];
            assert_int_equal(send(fd, "ping-pong!", 10, 0), 10);
            assert_int_equal(read_n(fd, buf, 10, 3000, NULL), 10);
        }
        struct fproxy_conn_info ci;
        assert_int_equal(fproxy_conns(f->p, &ci, 1), 1);
        totals[k] = ci.delay_ms_total[0] * 1000 + ci.delay_ms_total[1];
        close(fd);
    }
    printf("jitter: delay totals seed 42: %lld, %lld; seed 7: %lld; seed 9: %lld\n", totals[0],
           totals[1], totals[2], totals[3]);
    assert_int_equal(totals[0], totals[1]);
    assert_false(totals[0] == totals[2] && totals[0] == totals[3]);
}

static void test_limit_data_slicer_bandwidth_slow_close(void **state)
{
    struct fixture *f = *state;
    use_echo(f, 0);
    char buf[65536];
    memset(buf, 'x', sizeof buf);

    /* limit-data: exactly 100 bytes come back, then EOF. */
    ok(f, "limit-data 100 down");
    int fd = tcp_connect(fproxy_port(f->p));
    assert_int_equal(send(fd, buf, 300, 0), 300);
    char in[1024];
    size_t got = read_n(fd, in, sizeof in, 3000, NULL);
    assert_int_equal(got, 100);
    close(fd);
    ok(f, "limit-data 0");

    /* slicer: 100 bytes in 10-byte pieces 20 ms apart. */
    ok(f, "slicer 10 delay 20000 down");
    fd = tcp_connect(fproxy_port(f->p));
    int reads = 0;
    double t0 = now_ms();
    assert_int_equal(send(fd, buf, 100, 0), 100);
    assert_int_equal(read_n(fd, in, 100, 3000, &reads), 100);
    double el = now_ms() - t0;
    printf("slicer: 100 bytes in %d reads over %.0f ms\n", reads, el);
    assert_true(reads >= 5);
    assert_true(el >= 160);
    close(fd);
    ok(f, "slicer 0");

    /* bandwidth: 50 KB at 100 KB/s takes about half a second. */
    ok(f, "bandwidth 100000 down");
    fd = tcp_connect(fproxy_port(f->p));
    t0 = now_ms();
    assert_int_equal(send(fd, buf, 50000, 0), 50000);
    assert_int_equal(read_n(fd, buf, 50000, 5000, NULL), 50000);
    el = now_ms() - t0;
    printf("bandwidth: 50000 bytes at 100000 B/s in %.0f ms\n", el);
    assert_true(el >= 400 && el < 3000);
    close(fd);
    ok(f, "bandwidth 0");

    /* slow-close: the echo server's close reaches the client late. */
    ok(f, "slow-close 300");
    fd = tcp_connect(fproxy_port(f->p));
    assert_int_equal(send(fd, "abc", 3, 0), 3);
    assert_int_equal(read_n(fd, in, 3, 3000, NULL), 3);
    t0 = now_ms();
    shutdown(fd, SHUT_WR);
    assert_true(wait_readable(fd, 5000) >= 0);
    assert_int_equal(recv(fd, in, sizeof in, 0), 0);
    el = now_ms() - t0;
    printf("slow-close 300: EOF after %.0f ms\n", el);
    assert_true(el >= 290 && el < 3000);
    close(fd);
    wait_active(f, 0);
    assert_int_equal(stats(f).closes, 1);
}

static void test_reset_sends_rst_close_sends_fin(void **state)
{
    struct fixture *f = *state;
    use_echo(f, 0);
    int a = tcp_connect(fproxy_port(f->p));
    int b = tcp_connect(fproxy_port(f->p));
    char in[16];
    /* Both connections carry data first, so they exist and are idle. */
    assert_int_equal(send(a, "a", 1, 0), 1);
    assert_int_equal(send(b, "b", 1, 0), 1);
    assert_int_equal(read_n(a, in, 1, 3000, NULL), 1);
    assert_int_equal(read_n(b, in, 1, 3000, NULL), 1);
    ok(f, "reset conn 1 client");
    ok(f, "close conn 2");
    assert_true(wait_readable(a, 2000) >= 0);
    errno = 0;
    assert_int_equal(recv(a, in, sizeof in, 0), -1);
    assert_int_equal(errno, ECONNRESET);
    assert_true(wait_readable(b, 2000) >= 0);
    assert_int_equal(recv(b, in, sizeof in, 0), 0);
    close(a);
    close(b);
    wait_active(f, 0);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.resets, 1);
    assert_int_equal(s.closes, 1);
}

static void test_backpressure_bounds_buffers_loses_nothing(void **state)
{
    struct fixture *f = *state;
    use_echo(f, 0);
    ok(f, "blackhole up");
    int fd = tcp_connect(fproxy_port(f->p));
    static char chunk[65536];
    memset(chunk, 'z', sizeof chunk);
    /* Flood until the client's own socket is full: the partitioned proxy
     * must stop reading instead of buffering without bound. */
    size_t sent = 0;
    double t0 = now_ms();
    for (;;) {
        ssize_t w = send(fd, chunk, sizeof chunk, MSG_DONTWAIT);
        if (w > 0) {
            sent += (size_t)w;
            continue;
        }
        assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
        /* The proxy may still be draining the kernel buffer; settle when
         * a short wait frees no room. */
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        if (poll(&pfd, 1, 200) == 0)
            break;
        assert_true(now_ms() - t0 < 10000);
    }
    struct fproxy_conn_info ci;
    assert_int_equal(fproxy_conns(f->p, &ci, 1), 1);
    printf("back-pressure: client could send %zu bytes; proxy holds %llu (limit 65536)\n", sent,
           ci.buffered[0]);
    assert_true(ci.buffered[0] > 0 && ci.buffered[0] <= 65536);
    assert_int_equal(ci.bytes_up, 0);
    assert_true(sent < 64u * 1024 * 1024);

    /* After heal every byte arrives, in both directions. */
    ok(f, "heal");
    static char in[1 << 20];
    size_t got = 0;
    while (got < sent) {
        size_t want = sent - got < sizeof in ? sent - got : sizeof in;
        size_t n = read_n(fd, in, want, 10000, NULL);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++)
            assert_true(in[i] == 'z');
        got += n;
    }
    assert_int_equal(got, sent);
    close(fd);
    wait_active(f, 0);
    assert_int_equal(stats(f).bytes_up, sent);
    assert_int_equal(stats(f).bytes_down, sent);
}

/* ---- Failover and on-query -------------------------------------------------------------- */

/* The single integer sql returns on c. */
static int query_int(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    int n = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    return n;
}

static int server_port_of(PGconn *c)
{
    return query_int(c, "SELECT current_setting('port')");
}

static void test_retarget_failover(void **state)
{
    struct fixture *f = *state;
    PGconn *c1 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c1), CONNECTION_OK);
    assert_int_equal(server_port_of(c1), pgserver_port(srv_a));
    ok(f, "retarget 127.0.0.1:%d", pgserver_port(srv_b));
    PGconn *c2 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c2), CONNECTION_OK);
    assert_int_equal(server_port_of(c2), pgserver_port(srv_b));
    /* Open connections stay where they were. */
    assert_int_equal(server_port_of(c1), pgserver_port(srv_a));

    char reply[256], line[64];
    snprintf(line, sizeof line, "retarget localhost:%d reset", pgserver_port(srv_a));
    assert_int_equal(fproxy_command(f->p, line, reply, sizeof reply), 0);
    assert_non_null(strstr(reply, "(reset 2 connections)"));
    assert_int_equal(drain_until_bad(c1, 2000), CONNECTION_BAD);
    assert_int_equal(drain_until_bad(c2, 2000), CONNECTION_BAD);
    PQfinish(c1);
    PQfinish(c2);
    PGconn *c3 = connect_via(f, NULL);
    assert_int_equal(PQstatus(c3), CONNECTION_OK);
    assert_int_equal(server_port_of(c3), pgserver_port(srv_a));
    PQfinish(c3);
}

/* Regression: a refused upstream connect must count as a failure, exactly
 * once, whichever way the proxy learns of it (the refusal can already be
 * pending when the connection is first pumped, or arrive as an epoll event),
 * and a successful connect must not count. */
static void test_upstream_refused_counts_failures(void **state)
{
    struct fixture *f = *state;
    ok(f, "retarget 127.0.0.1:1");
    for (int i = 0; i < 3; i++) {
        PGconn *c = connect_via(f, NULL);
        assert_int_equal(PQstatus(c), CONNECTION_BAD);
        PQfinish(c);
    }
    /* A plain socket that sends nothing: the proxy connects upstream at
     * accept and must count the refusal without client traffic. */
    int fd = tcp_connect(fproxy_port(f->p));
    char b;
    assert_true(wait_readable(fd, 5000) >= 0);
    assert_true(recv(fd, &b, 1, 0) <= 0);
    close(fd);
    wait_active(f, 0);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 4);
    assert_int_equal(s.upstream_connects, 4);
    assert_int_equal(s.upstream_failures, 4);

    /* A hung connection released by heal into a refusing upstream. */
    ok(f, "hang-connect on");
    fd = tcp_connect(fproxy_port(f->p));
    wait_active(f, 1);
    assert_int_equal(stats(f).upstream_connects, 4);
    ok(f, "heal");
    assert_true(wait_readable(fd, 5000) >= 0);
    assert_true(recv(fd, &b, 1, 0) <= 0);
    close(fd);
    wait_active(f, 0);
    s = stats(f);
    assert_int_equal(s.upstream_connects, 5);
    assert_int_equal(s.upstream_failures, 5);

    /* Back to a live server: successes do not count as failures. */
    ok(f, "retarget 127.0.0.1:%d", pgserver_port(srv_a));
    for (int i = 0; i < 2; i++) {
        PGconn *c = connect_via(f, NULL);
        assert_int_equal(PQstatus(c), CONNECTION_OK);
        PQfinish(c);
    }
    wait_active(f, 0);
    s = stats(f);
    assert_int_equal(s.accepted, 7);
    assert_int_equal(s.upstream_connects, 7);
    assert_int_equal(s.upstream_failures, 5);
    assert_int_equal(s.ended_before_ready, 5);
}

/* ended_before_ready counts the connections that never got a session: a
 * login the server rejects, an injected startup error, accept-close, a
 * client that leaves before its StartupMessage. Sessions that reached
 * ReadyForQuery and CancelRequests (phase raw) do not count. */
static void test_ended_before_ready(void **state)
{
    struct fixture *f = *state;
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PGcancel *cancel = PQgetCancel(c);
    assert_non_null(cancel);
    char errbuf[256];
    assert_int_equal(PQcancel(cancel, errbuf, sizeof errbuf), 1);
    PQfreeCancel(cancel);
    PQfinish(c);
    wait_active(f, 0);
    struct fproxy_stats s = stats(f);
    assert_int_equal(s.accepted, 2);
    assert_int_equal(s.ended_before_ready, 0);

    /* The real server rejects a wrong password. */
    char ci[512];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=%s password=wrong dbname=%s",
             fproxy_port(f->p), pgserver_user(srv_a), pgserver_dbname(srv_a));
    c = PQconnectdb(ci);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_non_null(strstr(PQerrorMessage(c), "password authentication failed"));
    PQfinish(c);
    wait_active(f, 0);
    assert_int_equal(stats(f).ended_before_ready, 1);

    ok(f, "inject startup-error 53300");
    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    PQfinish(c);
    ok(f, "heal");
    ok(f, "accept-close on");
    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    PQfinish(c);
    ok(f, "accept-close off");
    close(tcp_connect(fproxy_port(f->p)));
    /* The proxy may not have accepted it yet. */
    double t0 = now_ms();
    while (stats(f).accepted < 6)
        assert_true(now_ms() - t0 < 5000);
    wait_active(f, 0);
    assert_int_equal(stats(f).ended_before_ready, 4);

    c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
    wait_active(f, 0);
    s = stats(f);
    assert_int_equal(s.accepted, 7);
    assert_int_equal(s.ended_before_ready, 4);
}

static void test_on_query_rules(void **state)
{
    struct fixture *f = *state;
    ok(f, "on-query \"SELECT 42*\" error 57P01");
    ok(f, "on-query pg_sleep reset");
    ok(f, "on-query \"SELECT 'held'\" blackhole");
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    r = PQexec(c, "SELECT 42 AS answer");
    assert_true(r == NULL || PQresultStatus(r) == PGRES_FATAL_ERROR);
    PQclear(r);
    assert_non_null(
        strstr(PQerrorMessage(c), "terminating connection due to administrator command"));
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    PQfinish(c);

    c = connect_via(f, NULL);
    double t0 = now_ms();
    r = PQexec(c, "SELECT pg_sleep(10)");
    double el = now_ms() - t0;
    assert_true(r == NULL || PQresultStatus(r) == PGRES_FATAL_ERROR);
    PQclear(r);
    assert_int_equal(PQstatus(c), CONNECTION_BAD);
    assert_true(el < 2000); /* reset at once, not after the sleep */
    PQfinish(c);

    c = connect_via(f, NULL);
    r = query_deadline(c, "SELECT 'held'", 500);
    assert_null(r);
    ok(f, "heal");
    t0 = now_ms();
    while (PQisBusy(c) && now_ms() - t0 < 3000) {
        wait_readable(PQsocket(c), 100);
        assert_int_equal(PQconsumeInput(c), 1);
    }
    r = PQgetResult(c);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0), "held");
    PQclear(r);
    while ((r = PQgetResult(c)))
        PQclear(r);
    PQfinish(c);
    assert_int_equal(stats(f).query_matches, 3);
}

/* ---- Ends of stream with part of a message pending ------------------------------------------ */

/* Polls until the proxy's only connection has reached its server. */
static void wait_upstream_connected(struct fixture *f)
{
    double t0 = now_ms();
    struct fproxy_conn_info ci;
    while (fproxy_conns(f->p, &ci, 1) != 1 || !ci.upstream_connected) {
        if (now_ms() - t0 > 5000)
            fail_msg("the connection did not reach its server within 5 s");
        usleep(1000);
    }
}

/* How many backends with that pid server A has (0 or 1), asked over a
 * direct connection. */
static int backend_alive(PGconn *direct, int pid)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE pid = %d", pid);
    return query_int(direct, sql);
}

/* Regression (issue 12): a client that closed with part of a message sent
 * left its connection open for good -- the splitter held the partial
 * message, so the EOF behind it was never passed on, and the server
 * session never ended. Now the EOF follows whatever the splitter holds. */
static void test_eof_with_partial_message_is_passed_on(void **state)
{
    struct fixture *f = *state;

    /* Startup phase: one byte of a StartupMessage, then close. */
    int fd = tcp_connect(fproxy_port(f->p));
    wait_upstream_connected(f);
    assert_int_equal(send(fd, "\0", 1, 0), 1);
    close(fd);
    wait_active(f, 0);

    /* After ReadyForQuery: the header of a Query cut short, then the
     * client's FIN. The server backend must go away too. */
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    int pid = PQbackendPID(c);
    char ci[512];
    assert_int_equal(pgserver_conninfo(srv_a, ci, sizeof ci, NULL), 0);
    PGconn *direct = PQconnectdb(ci);
    assert_int_equal(PQstatus(direct), CONNECTION_OK);
    assert_int_equal(backend_alive(direct, pid), 1);
    assert_int_equal(send(PQsocket(c), "Q\0\0", 3, MSG_NOSIGNAL), 3);
    assert_int_equal(shutdown(PQsocket(c), SHUT_WR), 0);
    wait_active(f, 0);
    double t0 = now_ms();
    while (backend_alive(direct, pid) != 0) {
        if (now_ms() - t0 > 5000)
            fail_msg("server backend %d still there 5 s after its client left", pid);
        usleep(10000);
    }
    PQfinish(c);
    PQfinish(direct);

    /* The other way: a server that sends part of a message and closes. The
     * client gets those bytes, then the EOF. */
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(lfd, 4), 0);
    socklen_t sl = sizeof sa;
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sa, &sl), 0);
    ok(f, "retarget 127.0.0.1:%d", ntohs(sa.sin_port));
    fd = tcp_connect(fproxy_port(f->p));
    assert_true(wait_readable(lfd, 5000) >= 0);
    int sfd = accept(lfd, NULL, NULL);
    assert_true(sfd >= 0);
    static const char startup[] = "\0\0\0\x11\0\x03\0\0user\0x\0\0";
    assert_int_equal(send(fd, startup, 17, 0), 17);
    char buf[64];
    assert_int_equal(read_n(sfd, buf, 17, 5000, NULL), 17);
    assert_int_equal(memcmp(buf, startup, 17), 0);
    assert_int_equal(send(sfd, "R\0\0", 3, 0), 3);
    close(sfd);
    close(lfd);
    assert_int_equal(read_n(fd, buf, 3, 5000, NULL), 3);
    assert_int_equal(memcmp(buf, "R\0\0", 3), 0);
    assert_true(wait_readable(fd, 5000) >= 0);
    assert_int_equal(recv(fd, buf, sizeof buf, 0), 0);
    close(fd);
    wait_active(f, 0);
}

/* ---- Control socket ------------------------------------------------------------------------ */

static int ctl_connect_path(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return fd;
}

static int ctl_connect(struct fixture *f)
{
    return ctl_connect_path(f->ctl);
}

/* Reads one answer line. */
static void ctl_line(int fd, char *out, size_t len)
{
    size_t n = 0;
    while (n + 1 < len) {
        assert_true(wait_readable(fd, 3000) >= 0);
        char ch;
        assert_int_equal(recv(fd, &ch, 1, 0), 1);
        if (ch == '\n')
            break;
        out[n++] = ch;
    }
    out[n] = '\0';
}

static void test_control_socket_bad_input(void **state)
{
    struct fixture *f = *state;
    int fd = ctl_connect(f);
    static const char *const cases[][2] = {
        {"frobnicate", "error: unknown command 'frobnicate'"},
        {"resett all", "error: unknown command 'resett' (did you mean 'reset'?)"},
        {"latency abc", "error: latency: expected milliseconds"},
        {"reset conn 999", "error: reset: no open connection 999"},
        {"reset sideways", "error: unexpected 'sideways'"},
        {"inject fatal 9", "error: inject fatal: expected a SQLSTATE"},
        {"inject fatl 57P01", "(did you mean 'fatal'?)"},
        {"inject fatal XX123", "error: inject: no default message for SQLSTATE XX123"},
        {"refuse maybe", "error: refuse: expected on or off"},
        {"retarget nowhere", "error: retarget: expected HOST:PORT"},
        {"on-query \"unterminated", "error: unterminated quote"},
        {"on-query x explode", "error: on-query: unknown action 'explode'"},
        {"stats", "ok accepted=0 refused=0 upstream_connects=0"},
        {"help", "ok commands: reset close blackhole"},
    };
    /* Several lines in one write, and a blank line and a comment that get
     * no answer. */
    char all[2048] = "";
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        strcat(all, cases[i][0]);
        strcat(all, i == 3 ? "\r\n\n# a comment\n" : "\n");
    }
    assert_int_equal(send(fd, all, strlen(all), 0), (ssize_t)strlen(all));
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char line[1024];
        ctl_line(fd, line, sizeof line);
        if (!strstr(line, cases[i][1]))
            fail_msg("'%s' answered '%s', expected '%s'", cases[i][0], line, cases[i][1]);
    }
    /* An over-long line, split across writes. */
    char big[6000];
    memset(big, 'a', sizeof big);
    assert_int_equal(send(fd, big, 3000, 0), 3000);
    assert_int_equal(send(fd, big, 3000, 0), 3000);
    assert_int_equal(send(fd, "\nstats\n", 7, 0), 7);
    char line[1024];
    ctl_line(fd, line, sizeof line);
    assert_non_null(strstr(line, "error: line too long"));
    ctl_line(fd, line, sizeof line);
    assert_non_null(strstr(line, "ok accepted=0"));
    close(fd);

    /* The library entry point answers the same way. */
    char reply[256];
    assert_int_equal(fproxy_command(f->p, "frobnicate", reply, sizeof reply), -1);
    assert_int_equal(fproxy_command(f->p, "", reply, sizeof reply), -1);
    assert_int_equal(fproxy_command(f->p, "stats", reply, 12), 0);
    assert_string_equal(reply, "ok accepted");

    /* And the proxy still serves. */
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PQfinish(c);
    wait_active(f, 0);
    fd = ctl_connect(f);
    assert_int_equal(send(fd, "reset all\n", 10, 0), 10);
    ctl_line(fd, line, sizeof line);
    assert_string_equal(line, "ok reset 0 connections");
    close(fd);
}

/* Opens a second proxy in front of server A with its control socket at
 * path; returns what fproxy_open returned. */
static int open_second(const char *path, struct fproxy **out, char *err, size_t errlen)
{
    struct fproxy_config c;
    fproxy_config_init(&c);
    c.upstream_host = pgserver_host(srv_a);
    c.upstream_port = pgserver_port(srv_a);
    c.control_path = path;
    return fproxy_open(&c, out, err, errlen);
}

/* Sends one command on the control socket at path; returns the answer in
 * out. */
static void ctl_ask(const char *path, const char *cmd, char *out, size_t len)
{
    int fd = ctl_connect_path(path);
    assert_int_equal(send(fd, cmd, strlen(cmd), 0), (ssize_t)strlen(cmd));
    assert_int_equal(send(fd, "\n", 1, 0), 1);
    ctl_line(fd, out, len);
    close(fd);
}

/* A Unix stream socket bound to path (not listening). */
static int bind_unix(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    return fd;
}

/* Regression (issue 12): the control socket's mode came from the umask,
 * so under umask 000 any local user could steer a root-run proxy. */
static void test_control_socket_private_whatever_the_umask(void **state)
{
    struct fixture *f = *state;
    char path[128];
    snprintf(path, sizeof path, "%s/open", f->dir);
    mode_t old = umask(0);
    struct fproxy *p2 = NULL;
    char err[256];
    int rc = open_second(path, &p2, err, sizeof err);
    umask(old);
    if (rc != 0)
        fail_msg("fproxy_open: %s", err);
    struct stat st;
    int src = lstat(path, &st);
    char line[256];
    ctl_ask(path, "stats", line, sizeof line);
    fproxy_close(p2);
    assert_int_equal(src, 0);
    assert_true(S_ISSOCK(st.st_mode));
    if (st.st_mode & 077)
        fail_msg("control socket %s had mode %03o under umask 000", path,
                 (unsigned)(st.st_mode & 0777));
    assert_non_null(strstr(line, "ok accepted=0"));
    assert_int_equal(access(path, F_OK), -1);
}

/* Regression (issue 12): a second proxy with the same control path took
 * over the first one's socket, and whichever stopped first removed the
 * other's. A live socket is refused, a stale one replaced, and a proxy
 * removes only the socket it bound. */
static void test_control_socket_is_not_taken_over(void **state)
{
    struct fixture *f = *state;
    /* Something only the first proxy would answer. */
    ok(f, "refuse on");
    struct fproxy *p2 = NULL;
    char err[512], line[512];
    if (open_second(f->ctl, &p2, err, sizeof err) == 0) {
        fproxy_close(p2);
        fail_msg("a second proxy opened on the live control socket %s", f->ctl);
    }
    printf("second proxy: %s\n", err);
    assert_non_null(strstr(err, f->ctl));
    assert_non_null(strstr(err, "another proxy is listening there"));
    ctl_ask(f->ctl, "stats", line, sizeof line);
    assert_non_null(strstr(line, " listening=0"));
    ok(f, "refuse off");

    /* A socket file nobody listens on (its proxy died) is replaced. */
    char stale[128];
    snprintf(stale, sizeof stale, "%s/stale", f->dir);
    close(bind_unix(stale));
    if (open_second(stale, &p2, err, sizeof err) != 0)
        fail_msg("a stale control socket was not replaced: %s", err);
    ctl_ask(stale, "stats", line, sizeof line);
    assert_non_null(strstr(line, "ok accepted=0"));
    fproxy_close(p2);
    assert_int_equal(access(stale, F_OK), -1);

    /* Someone else's socket now at the path is left alone on stop. */
    char repl[128];
    snprintf(repl, sizeof repl, "%s/replaced", f->dir);
    if (open_second(repl, &p2, err, sizeof err) != 0)
        fail_msg("fproxy_open: %s", err);
    assert_int_equal(unlink(repl), 0);
    int sfd = bind_unix(repl);
    assert_int_equal(listen(sfd, 1), 0);
    struct stat theirs, after;
    assert_int_equal(lstat(repl, &theirs), 0);
    fproxy_close(p2);
    if (lstat(repl, &after) != 0)
        fail_msg("stopping the proxy removed someone else's socket at %s", repl);
    assert_true(after.st_ino == theirs.st_ino && after.st_dev == theirs.st_dev);
    close(sfd);
    assert_int_equal(unlink(repl), 0);
}

/* Sends "help" lines on a non-blocking control connection without reading
 * the answers, until lines have gone or the proxy has stopped taking them
 * for 500 ms; returns how many lines went. */
static size_t flood_help(int fd, size_t lines)
{
    static const char chunk[] = "help\nhelp\nhelp\nhelp\nhelp\nhelp\nhelp\nhelp\n";
    const size_t per = 5, clen = sizeof chunk - 1;
    size_t total = lines * per, sent = 0;
    double t0 = now_ms();
    while (sent < total && now_ms() - t0 < 20000) {
        size_t off = sent % clen, n = clen - off;
        if (n > total - sent)
            n = total - sent;
        ssize_t w = send(fd, chunk + off, n, MSG_NOSIGNAL);
        if (w > 0) {
            sent += (size_t)w;
            continue;
        }
        assert_true(w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR));
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        if (poll(&pfd, 1, 500) == 0)
            break;
    }
    return sent / per;
}

/* Polls until the control socket holds at least n bytes for its clients. */
static void wait_control_buffered(struct fixture *f, unsigned long long n)
{
    double t0 = now_ms();
    while (stats(f).control_buffered < n) {
        if (now_ms() - t0 > 10000)
            fail_msg("control_buffered stayed %llu, expected >= %llu", stats(f).control_buffered,
                     n);
        usleep(1000);
    }
}

/* Regression (issue 12): a control client that never read its answers
 * grew the proxy without bound (1,000,000 help lines: 290 MB). Its
 * answers are now held up to FPROXY_CONTROL_BUFFER, then the proxy stops
 * reading its commands until it reads (back-pressure, nothing lost); the
 * proxy serves everyone else meanwhile and frees what it held when the
 * client goes. */
static void test_control_client_that_never_reads_is_bounded(void **state)
{
    struct fixture *f = *state;
    char help[512];
    ctl_ask(f->ctl, "help", help, sizeof help);
    const size_t answer = strlen(help) + 1;

    int fd = ctl_connect(f);
    assert_int_equal(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
    size_t lines = flood_help(fd, 200000);
    wait_control_buffered(f, FPROXY_CONTROL_BUFFER);
    struct fproxy_stats s = stats(f);
    printf("a control client that never reads: %zu help lines sent, %llu bytes held, at most "
           "%llu (bound %d)\n",
           lines, s.control_buffered, s.control_buffered_max, FPROXY_CONTROL_BUFFER);
    if (s.control_buffered_max > FPROXY_CONTROL_BUFFER + answer)
        fail_msg("the proxy held %llu bytes of answers for one client (bound %d + one answer)",
                 s.control_buffered_max, FPROXY_CONTROL_BUFFER);

    /* Meanwhile another control client is answered and traffic flows. */
    char line[512];
    ctl_ask(f->ctl, "stats", line, sizeof line);
    assert_non_null(strstr(line, "ok accepted=0"));
    PGconn *c = connect_via(f, NULL);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    PGresult *r = PQexec(c, "SELECT 1");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    PQclear(r);
    PQfinish(c);

    /* Back-pressure loses nothing: reading, the client gets every answer. */
    size_t got = 0, partial = 0;
    static char buf[65536];
    double t0 = now_ms();
    while (got < lines) {
        if (now_ms() - t0 > 30000)
            fail_msg("%zu of %zu answers read in 30 s", got, lines);
        if (wait_readable(fd, 1000) < 0)
            continue;
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        assert_true(n > 0);
        for (ssize_t i = 0; i < n; i++, partial++) {
            if (buf[i] == '\n') {
                assert_int_equal(partial + 1, answer);
                partial = (size_t)-1;
                got++;
            }
        }
    }
    assert_int_equal(stats(f).control_buffered, 0);

    /* A client that leaves with answers held: they are freed. */
    lines = flood_help(fd, 200000);
    wait_control_buffered(f, FPROXY_CONTROL_BUFFER);
    close(fd);
    t0 = now_ms();
    while (stats(f).control_buffered != 0) {
        if (now_ms() - t0 > 5000)
            fail_msg("%llu bytes still held 5 s after the control client left",
                     stats(f).control_buffered);
        usleep(1000);
    }
    assert_true(stats(f).control_buffered_max <= FPROXY_CONTROL_BUFFER + answer);
}

static void test_stop_is_idempotent(void **state)
{
    struct fixture *f = *state;
    fproxy_stop(f->p);
    fproxy_stop(f->p);
    char reply[64];
    assert_int_equal(fproxy_command(f->p, "stats", reply, sizeof reply), -1);
    assert_string_equal(reply, "error: the proxy is stopped");
    struct fproxy_stats s;
    assert_int_equal(fproxy_get_stats(f->p, &s), -1);
    assert_int_equal(fproxy_conns(f->p, NULL, 0), -1);
    /* The control socket is gone and the port is free. */
    assert_int_equal(access(f->ctl, F_OK), -1);
    fproxy_close(NULL);
}

/* ---- Scale ------------------------------------------------------------------------------ */

static void test_thousand_concurrent_connections(void **state)
{
    struct fixture *f = *state;
    enum { N = 1000, MSG = 32 };
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < 5 * N) {
        rl.rlim_cur = rl.rlim_max < 5 * N ? rl.rlim_max : 5 * N;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    assert_true(rl.rlim_cur >= 4 * N + 64);
    use_echo(f, 0);
    int *fds = calloc(N, sizeof *fds);
    assert_non_null(fds);
    double t0 = now_ms();
    for (int i = 0; i < N; i++)
        fds[i] = tcp_connect(fproxy_port(f->p));
    for (int i = 0; i < N; i++) {
        char m[48];
        snprintf(m, sizeof m, "message %05d from a client.....", i);
        assert_int_equal(send(fds[i], m, MSG, 0), MSG);
    }
    for (int i = 0; i < N; i++) {
        char m[48], want[48];
        snprintf(want, sizeof want, "message %05d from a client.....", i);
        assert_int_equal(read_n(fds[i], m, MSG, 10000, NULL), MSG);
        m[MSG] = '\0';
        assert_string_equal(m, want);
    }
    double el = now_ms() - t0;
    struct fproxy_stats s = stats(f);
    printf("1000 connections: connect + echo round trip in %.0f ms, active=%llu\n", el, s.active);
    assert_int_equal(s.accepted, N);
    assert_int_equal(s.upstream_connects, N);
    assert_int_equal(s.active, N);
    assert_int_equal(s.bytes_up, N * MSG);
    assert_int_equal(s.bytes_down, N * MSG);
    char reply[64];
    assert_int_equal(fproxy_command(f->p, "reset idle", reply, sizeof reply), 0);
    assert_string_equal(reply, "ok reset 1000 connections");
    for (int i = 0; i < N; i++) {
        char m[8];
        assert_true(wait_readable(fds[i], 5000) >= 0);
        assert_true(recv(fds[i], m, sizeof m, 0) < 0);
        close(fds[i]);
    }
    free(fds);
    wait_active(f, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_passthrough_counts_and_phases, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refuse_is_connection_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_accept_close, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hang_connect_hits_connect_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_inject_57P01_into_idle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_inject_auth_fail_matches_real_server, setup, teardown),
        cmocka_unit_test_setup_teardown(test_startup_error_53300_nth, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reset_idle_seen_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reset_nth_future, setup, teardown),
        cmocka_unit_test_setup_teardown(test_blackhole_until_deadline_then_heal, setup, teardown),
        cmocka_unit_test_setup_teardown(test_latency_delays_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_jitter_same_seed_same_delays, setup, teardown),
        cmocka_unit_test_setup_teardown(test_limit_data_slicer_bandwidth_slow_close, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_reset_sends_rst_close_sends_fin, setup, teardown),
        cmocka_unit_test_setup_teardown(test_backpressure_bounds_buffers_loses_nothing, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_retarget_failover, setup, teardown),
        cmocka_unit_test_setup_teardown(test_upstream_refused_counts_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ended_before_ready, setup, teardown),
        cmocka_unit_test_setup_teardown(test_on_query_rules, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eof_with_partial_message_is_passed_on, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_control_socket_bad_input, setup, teardown),
        cmocka_unit_test_setup_teardown(test_control_socket_private_whatever_the_umask, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_control_socket_is_not_taken_over, setup, teardown),
        cmocka_unit_test_setup_teardown(test_control_client_that_never_reads_is_bounded, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_stop_is_idempotent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_thousand_concurrent_connections, setup, teardown),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("proxy", tests, group_setup, group_teardown);
}
