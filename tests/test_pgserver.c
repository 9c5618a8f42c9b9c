/*
 * Tests of the throwaway servers: real clusters, real psql, and the
 * promise that nothing is left behind -- also when the owner is killed.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <libpq-fe.h>

#include "pgserver.h"

static struct pgserver *srv;

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int setup(void **state)
{
    char err[1024];
    struct pgserver_options o;
    pgserver_options_init(&o);
    double t = now_ms();
    if (pgserver_create(&o, &srv, err, sizeof err) < 0 ||
        pgserver_start(srv, err, sizeof err) < 0) {
        fprintf(stderr, "setup: %s\n", err);
        return -1;
    }
    printf("# first cluster created and started in %.0fms\n", now_ms() - t);
    return 0;
}

static void kill_holders(void);

static int teardown(void **state)
{
    kill_holders();
    pgserver_destroy(srv);
    return 0;
}

/* Runs a psql command line through the shell and returns its first output
 * line (stdout and stderr). */
static void psql(const char *conninfo, const char *sql, char *out, size_t len)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "psql -X -A -t '%s' -c \"%s\" 2>&1", conninfo, sql);
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    out[0] = '\0';
    if (!fgets(out, (int)len, f))
        out[0] = '\0';
    out[strcspn(out, "\n")] = '\0';
    pclose(f);
}

/* Starts a shell pipeline that holds a session open, in its own process
 * group so kill_holders() ends it and everything it started. */
static pid_t holders[8];
static int nholders;

static void spawn_holder(const char *shell)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setpgid(0, 0);
        execl("/bin/sh", "sh", "-c", shell, (char *)NULL);
        _exit(127);
    }
    setpgid(pid, pid);
    holders[nholders++] = pid;
}

static void kill_holders(void)
{
    for (int i = 0; i < nholders; i++) {
        kill(-holders[i], SIGKILL);
        waitpid(holders[i], NULL, 0);
    }
    nholders = 0;
}

static int wait_count(int want, int timeout_ms)
{
    char err[512];
    double end = now_ms() + timeout_ms;
    int n;
    while ((n = pgserver_count_backends(srv, NULL, err, sizeof err)) != want && now_ms() < end)
        usleep(20000);
    return n;
}

static void test_tcp_login_with_password(void **state)
{
    char ci[512], out[512];
    assert_int_equal(pgserver_conninfo(srv, ci, sizeof ci, NULL), 0);
    psql(ci, "SELECT current_user || ' ' || current_database()", out, sizeof out);
    assert_string_equal(out, "pgfault pgfault");
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=pgfault password=wrong dbname=pgfault",
             pgserver_port(srv));
    psql(ci, "SELECT 1", out, sizeof out);
    assert_non_null(strstr(out, "password authentication failed for user \"pgfault\""));
}

static void test_sql_and_errors(void **state)
{
    char out[256], err[512];
    assert_int_equal(pgserver_sql(srv, "SELECT 6 * 7", out, sizeof out, err, sizeof err), 0);
    assert_string_equal(out, "42");
    assert_int_equal(pgserver_sql(srv, "SELEC 1", out, sizeof out, err, sizeof err), -1);
    assert_non_null(strstr(err, "syntax error"));
}

static void test_count_and_terminate(void **state)
{
    char ci[512], err[512];
    assert_int_equal(pgserver_conninfo(srv, ci, sizeof ci, "application_name=holder"), 0);
    /* Two idle sessions held open by background psql processes. */
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "psql -X '%s' -c 'SELECT pg_sleep(30)' >/dev/null 2>&1", ci);
    spawn_holder(cmd);
    snprintf(cmd, sizeof cmd, "(echo 'SELECT 1;'; sleep 30) | psql -X -q '%s' >/dev/null 2>&1", ci);
    spawn_holder(cmd);
    assert_int_equal(wait_count(2, 5000), 2);
    assert_int_equal(pgserver_count_backends(srv, "holder", err, sizeof err), 2);
    assert_int_equal(pgserver_count_backends(srv, "nobody", err, sizeof err), 0);
    /* Only the idle one goes with "idle"; the sleeping one is active. */
    double end = now_ms() + 5000;
    int n = 0;
    while ((n = pgserver_terminate(srv, PGSERVER_BACKENDS_IDLE, NULL, err, sizeof err)) == 0 &&
           now_ms() < end)
        usleep(20000);
    assert_int_equal(n, 1);
    assert_int_equal(wait_count(1, 5000), 1);
    assert_int_equal(pgserver_terminate(srv, PGSERVER_BACKENDS_APPNAME, "holder", err, sizeof err),
                     1);
    assert_int_equal(wait_count(0, 5000), 0);
    kill_holders();
}

static void test_restart_keeps_port(void **state)
{
    char err[512];
    int port = pgserver_port(srv);
    double t = now_ms();
    assert_int_equal(pgserver_restart(srv, PGSERVER_STOP_FAST, err, sizeof err), 0);
    printf("# fast restart in %.0fms\n", now_ms() - t);
    assert_int_equal(pgserver_port(srv), port);
    assert_true(pgserver_running(srv));
    assert_int_equal(pgserver_stop(srv, PGSERVER_STOP_IMMEDIATE, err, sizeof err), 0);
    assert_false(pgserver_running(srv));
    assert_int_equal(pgserver_start(srv, err, sizeof err), 0);
    assert_int_equal(pgserver_port(srv), port);
}

static void test_password_change(void **state)
{
    char ci[512], out[512], err[512], orig[128];
    snprintf(orig, sizeof orig, "%s", pgserver_password(srv));
    assert_int_equal(pgserver_set_password(srv, "rotated", err, sizeof err), 0);
    assert_string_equal(pgserver_password(srv), "rotated");
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=pgfault password=pgfault dbname=pgfault",
             pgserver_port(srv));
    psql(ci, "SELECT 1", out, sizeof out);
    assert_non_null(strstr(out, "password authentication failed"));
    assert_int_equal(pgserver_conninfo(srv, ci, sizeof ci, NULL), 0);
    psql(ci, "SELECT 1", out, sizeof out);
    assert_string_equal(out, "1");
    assert_int_equal(pgserver_set_password(srv, orig, err, sizeof err), 0);
}

static void test_max_connections(void **state)
{
    char ci[512], out[512], err[512], cmd[1200];
    assert_int_equal(pgserver_set_max_connections(srv, 1, err, sizeof err), -1);
    assert_int_equal(pgserver_set_max_connections(srv, 2, err, sizeof err), 0);
    assert_int_equal(pgserver_restart(srv, PGSERVER_STOP_FAST, err, sizeof err), 0);
    assert_int_equal(pgserver_conninfo(srv, ci, sizeof ci, NULL), 0);
    /* max 2 with one slot reserved: the role gets one session. The
     * holder reports through its own output that it is in: a superuser
     * query now could take the role's only slot (superusers may use any
     * slot), so none runs until the holder has it. */
    char mark[] = "/tmp/pgfault-test-holder-XXXXXX";
    int mfd = mkstemp(mark);
    assert_true(mfd >= 0);
    close(mfd);
    snprintf(cmd, sizeof cmd, "(echo 'SELECT 1;'; sleep 30) | psql -X -q -A -t '%s' >%s 2>&1", ci,
             mark);
    spawn_holder(cmd);
    char got[64] = "";
    double end = now_ms() + 10000;
    while (strcmp(got, "1") != 0 && now_ms() < end) {
        FILE *mf = fopen(mark, "r");
        got[0] = '\0';
        if (mf) {
            if (fgets(got, sizeof got, mf))
                got[strcspn(got, "\n")] = '\0';
            fclose(mf);
        }
        if (strcmp(got, "1") != 0)
            usleep(20000);
    }
    unlink(mark);
    assert_string_equal(got, "1");
    /* ...the second is refused with 53300, and the harness still gets in. */
    psql(ci, "SELECT 1", out, sizeof out);
    assert_non_null(strstr(out, "remaining connection slots are reserved"));
    assert_int_equal(pgserver_sql(srv, "SELECT 1", out, sizeof out, err, sizeof err), 0);
    assert_int_equal(pgserver_terminate(srv, PGSERVER_BACKENDS_ALL, NULL, err, sizeof err), 1);
    kill_holders();
    assert_int_equal(pgserver_set_max_connections(srv, 100, err, sizeof err), 0);
    assert_int_equal(pgserver_restart(srv, PGSERVER_STOP_FAST, err, sizeof err), 0);
}

static void test_second_cluster_is_fast_and_separate(void **state)
{
    char err[1024];
    struct pgserver *two = NULL;
    double t = now_ms();
    assert_int_equal(pgserver_create(NULL, &two, err, sizeof err), 0);
    assert_int_equal(pgserver_start(two, err, sizeof err), 0);
    printf("# second cluster created and started in %.0fms\n", now_ms() - t);
    assert_int_not_equal(pgserver_port(two), pgserver_port(srv));
    char dir[1100];
    snprintf(dir, sizeof dir, "%s", pgserver_dir(two));
    pgserver_destroy(two);
    struct stat st;
    assert_int_equal(stat(dir, &st), -1);
}

static long long auth_failures(struct pgserver *s)
{
    char err[512];
    long long n = -1;
    if (pgserver_auth_failures(s, &n, err, sizeof err) < 0)
        fail_msg("pgserver_auth_failures: %s", err);
    return n;
}

/* Connects with libpq (fakepq in passthrough mode, i.e. the real libpq) as
 * user with password to dbname; returns 1 if the session was set up. The
 * error message, if any, goes to msg. */
static int try_login(const char *user, const char *password, const char *dbname, char *msg,
                     size_t len)
{
    char ci[512];
    snprintf(ci, sizeof ci, "host=127.0.0.1 port=%d user=%s password=%s dbname=%s",
             pgserver_port(srv), user, password, dbname);
    PGconn *c = PQconnectdb(ci);
    assert_non_null(c);
    int ok = PQstatus(c) == CONNECTION_OK;
    snprintf(msg, len, "%s", PQerrorMessage(c));
    PQfinish(c);
    return ok;
}

static void test_auth_failures_counted_from_log(void **state)
{
    char msg[1024], err[512];
    long long base = auth_failures(srv);
    assert_true(base >= 0);
    /* Asking again without new attempts reads nothing twice. */
    assert_int_equal(auth_failures(srv), base);

    assert_false(try_login("pgfault", "wrong", "pgfault", msg, sizeof msg));
    assert_non_null(strstr(msg, "password authentication failed"));
    assert_int_equal(auth_failures(srv), base + 1);
    assert_true(try_login("pgfault", pgserver_password(srv), "pgfault", msg, sizeof msg));
    assert_int_equal(auth_failures(srv), base + 1);

    /* An unknown role over TCP is a password failure too (28P01); a role
     * that may not log in is 28000. */
    assert_false(try_login("nobody", "x", "pgfault", msg, sizeof msg));
    assert_int_equal(
        pgserver_sql(srv, "CREATE ROLE nologin PASSWORD 'x' NOLOGIN", NULL, 0, err, sizeof err), 0);
    assert_false(try_login("nologin", "x", "pgfault", msg, sizeof msg));
    assert_non_null(strstr(msg, "not permitted to log in"));
    assert_int_equal(pgserver_sql(srv, "DROP ROLE nologin", NULL, 0, err, sizeof err), 0);
    assert_int_equal(auth_failures(srv), base + 3);

    /* Not rejections: a missing database (3D000). */
    assert_false(try_login("pgfault", pgserver_password(srv), "nosuchdb", msg, sizeof msg));
    assert_non_null(strstr(msg, "does not exist"));
    assert_int_equal(auth_failures(srv), base + 3);

    /* Restarts append to the log: nothing lost, nothing counted twice,
     * also for failures not yet asked about when the server stopped. */
    for (int i = 0; i < 3; i++)
        assert_false(try_login("pgfault", "wrong", "pgfault", msg, sizeof msg));
    assert_int_equal(pgserver_restart(srv, PGSERVER_STOP_FAST, err, sizeof err), 0);
    assert_int_equal(auth_failures(srv), base + 6);
    assert_false(try_login("pgfault", "wrong", "pgfault", msg, sizeof msg));
    assert_int_equal(pgserver_restart(srv, PGSERVER_STOP_IMMEDIATE, err, sizeof err), 0);
    assert_int_equal(auth_failures(srv), base + 7);
    assert_true(try_login("pgfault", pgserver_password(srv), "pgfault", msg, sizeof msg));
    assert_int_equal(auth_failures(srv), base + 7);

    /* A second cluster counts its own, from zero, before its first start
     * too. */
    struct pgserver *two = NULL;
    assert_int_equal(pgserver_create(NULL, &two, err, sizeof err), 0);
    assert_int_equal(auth_failures(two), 0);
    assert_int_equal(pgserver_start(two, err, sizeof err), 0);
    assert_int_equal(auth_failures(two), 0);
    pgserver_destroy(two);
    assert_int_equal(auth_failures(srv), base + 7);

    /* An attached server has no log to read. */
    char ci[512];
    struct pgserver *att = NULL;
    assert_int_equal(pgserver_conninfo(srv, ci, sizeof ci, NULL), 0);
    assert_int_equal(pgserver_attach(ci, &att, err, sizeof err), 0);
    long long n = 42;
    assert_int_equal(pgserver_auth_failures(att, &n, err, sizeof err), -1);
    assert_non_null(strstr(err, "--server"));
    assert_int_equal(n, 42);
    pgserver_destroy(att);
}

/* Forks an owner that creates and starts a cluster, reports its dir and
 * postmaster pid, then waits to be killed with sig. Checks that the reaper
 * removes everything. */
static void owner_killed_leaves_nothing(int sig)
{
    int p[2];
    assert_int_equal(pipe(p), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(p[0]);
        char err[1024];
        struct pgserver *s = NULL;
        if (pgserver_create(NULL, &s, err, sizeof err) < 0 ||
            pgserver_start(s, err, sizeof err) < 0)
            _exit(1);
        char line[1200];
        int n = snprintf(line, sizeof line, "%s\n", pgserver_dir(s));
        if (write(p[1], line, (size_t)n) != n)
            _exit(1);
        for (;;)
            pause();
    }
    close(p[1]);
    char dir[1200] = "";
    FILE *f = fdopen(p[0], "r");
    assert_non_null(fgets(dir, sizeof dir, f));
    fclose(f);
    dir[strcspn(dir, "\n")] = '\0';
    char pidfile[1300];
    snprintf(pidfile, sizeof pidfile, "%s/data/postmaster.pid", dir);
    FILE *pf = fopen(pidfile, "r");
    assert_non_null(pf);
    long pm = 0;
    assert_int_equal(fscanf(pf, "%ld", &pm), 1);
    fclose(pf);
    assert_int_equal(kill((pid_t)pm, 0), 0);

    kill(pid, sig);
    waitpid(pid, NULL, 0);
    double end = now_ms() + 15000;
    struct stat st;
    while ((kill((pid_t)pm, 0) == 0 || stat(dir, &st) == 0) && now_ms() < end)
        usleep(20000);
    assert_int_equal(kill((pid_t)pm, 0), -1);
    assert_int_equal(stat(dir, &st), -1);
}

static void test_sigkill_of_owner_leaves_nothing(void **state)
{
    owner_killed_leaves_nothing(SIGKILL);
}

static void test_sigterm_of_owner_leaves_nothing(void **state)
{
    owner_killed_leaves_nothing(SIGTERM);
}

static void test_sigint_of_owner_leaves_nothing(void **state)
{
    owner_killed_leaves_nothing(SIGINT);
}

/* The default role password is not a constant anyone could know: random,
 * long, and different in another process (this binary run again). */
static void test_default_password_is_random_per_process(void **state)
{
    struct pgserver_options o;
    pgserver_options_init(&o);
    assert_string_not_equal(o.password, "pgfault");
    assert_int_equal(strlen(o.password), 32);
    for (const char *c = o.password; *c; c++)
        assert_true((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
                    (*c >= '0' && *c <= '9'));
    assert_string_equal(pgserver_password(srv), o.password);
    char cmd[600], other[128] = "";
    snprintf(cmd, sizeof cmd, "TEST_PRINT_PASSWORD=1 /proc/%ld/exe", (long)getpid());
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    assert_non_null(fgets(other, sizeof other, f));
    pclose(f);
    other[strcspn(other, "\n")] = '\0';
    assert_int_equal(strlen(other), 32);
    assert_string_not_equal(other, o.password);
}

struct sql_call {
    struct pgserver *s;
    int rc;
    char err[512];
};

static void *sql_thread(void *arg)
{
    struct sql_call *c = arg;
    c->rc = pgserver_sql(c->s, "SELECT pg_sleep(1.5) /* cmdline-probe */", NULL, 0, c->err,
                         sizeof c->err);
    return NULL;
}

/* Reads /proc/PID/cmdline with its NULs turned into blanks. */
static int cmdline_of(const char *pid, char *out, size_t len)
{
    char path[300];
    snprintf(path, sizeof path, "/proc/%s/cmdline", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(out, 1, len - 1, f);
    fclose(f);
    for (size_t i = 0; i < n; i++)
        if (out[i] == '\0')
            out[i] = ' ';
    out[n] = '\0';
    return 0;
}

/* --server's password must not reach psql's command line, which every
 * local user can read in ps. The psql pgserver runs is caught while it
 * runs, and its command line inspected. */
static void test_attached_password_not_on_command_line(void **state)
{
    char ci[600], err[512];
    const char *secret = "Sekrit-4-cmdline";
    assert_int_equal(pgserver_set_password(srv, secret, err, sizeof err), 0);
    assert_int_equal(pgserver_conninfo(srv, ci, sizeof ci, NULL), 0);
    assert_non_null(strstr(ci, secret));
    struct pgserver *att = NULL;
    assert_int_equal(pgserver_attach(ci, &att, err, sizeof err), 0);
    struct sql_call call = {att, -1, ""};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, sql_thread, &call), 0);
    int seen = 0, leaked = 0;
    double end = now_ms() + 5000;
    while (!seen && now_ms() < end) {
        DIR *d = opendir("/proc");
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            char line[4096];
            if (e->d_name[0] < '0' || e->d_name[0] > '9' ||
                cmdline_of(e->d_name, line, sizeof line) < 0)
                continue;
            if (strstr(line, "cmdline-probe") && strstr(line, "psql")) {
                seen = 1;
                leaked |= strstr(line, secret) != NULL;
            }
        }
        if (d)
            closedir(d);
        usleep(5000);
    }
    pthread_join(t, NULL);
    pgserver_destroy(att);
    struct pgserver_options o;
    pgserver_options_init(&o);
    assert_int_equal(pgserver_set_password(srv, o.password, err, sizeof err), 0);
    assert_int_equal(call.rc, 0);
    assert_true(seen);
    assert_false(leaked);
}

int main(void)
{
    if (getenv("TEST_PRINT_PASSWORD")) {
        struct pgserver_options o;
        pgserver_options_init(&o);
        printf("%s\n", o.password);
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tcp_login_with_password),
        cmocka_unit_test(test_sql_and_errors),
        cmocka_unit_test(test_count_and_terminate),
        cmocka_unit_test(test_restart_keeps_port),
        cmocka_unit_test(test_password_change),
        cmocka_unit_test(test_default_password_is_random_per_process),
        cmocka_unit_test(test_attached_password_not_on_command_line),
        cmocka_unit_test(test_max_connections),
        cmocka_unit_test(test_second_cluster_is_fast_and_separate),
        cmocka_unit_test(test_auth_failures_counted_from_log),
        cmocka_unit_test(test_sigkill_of_owner_leaves_nothing),
        cmocka_unit_test(test_sigterm_of_owner_leaves_nothing),
        cmocka_unit_test(test_sigint_of_owner_leaves_nothing),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("pgserver", tests, setup, teardown);
}
