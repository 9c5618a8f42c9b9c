/*
 * driver_check: conformance checks for driver authors. Each check drives
 * the driver through the same driver_ops the runner uses (so what passes
 * here is what the runner relies on), plus a few raw requests for the
 * protocol's error replies. The messages name the operation, what was
 * expected and what came back, so a driver author can fix a driver without
 * reading C.
 */
#include "driver_check.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "driver.h"
#include "drivers/exec.h"
#include "fakepq.h"
#include "pgserver.h"

#define CONCURRENT 16
#define WAIT_MS 1000 /* how long each of the concurrent acquires waits in the pool */

struct checker {
    FILE *out;
    const struct driver_ops *ops;
    struct driver *d;
    const struct driver_info *info;
    int passed, failed;
    int broken; /* the driver crashed or hung: later checks are skipped */
};

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* Records one check. A failure caused by the driver crashing or hanging is
 * said as such, once, and ends the checks. */
__attribute__((format(printf, 3, 4))) static int check(struct checker *k, int ok, const char *fmt,
                                                       ...)
{
    char text[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (ok) {
        k->passed++;
        fprintf(k->out, "ok    %s\n", text);
        return 0;
    }
    k->failed++;
    char why[700];
    int fate = k->d ? k->ops->fate(k->d, why, sizeof why) : 0;
    if (fate) {
        fprintf(k->out, "FAIL  %s\n      the driver %s: %s\n", text,
                fate == 1 ? "CRASHED" : "HUNG (stopped answering)", why);
        k->broken = 1;
    } else {
        fprintf(k->out, "FAIL  %s\n", text);
    }
    return -1;
}

static void event_cb(void *ctx, const char *line)
{
    (void)ctx;
    (void)line; /* events are optional; the runner traces them */
}

static void log_cb(void *ctx, const char *line)
{
    struct checker *k = ctx;
    fprintf(k->out, "      driver stderr: %s\n", line);
}

/* The hello tables: every pool key of the language accounted for. */
static void check_hello(struct checker *k)
{
    const struct driver_info *in = k->info;
    check(k, 1, "hello: protocol %d, driver '%s', pool '%s' %s", DRIVER_PROTOCOL_VERSION,
          in->driver, in->pool, in->version[0] ? in->version : "(no version)");
    size_t n;
    const struct scn_pool_key *keys = scn_pool_keys(&n);
    char missing[600] = "";
    for (size_t i = 0; i < n; i++) {
        if (driver_key_status(in, keys[i].key, NULL) < 0) {
            size_t l = strlen(missing);
            snprintf(missing + l, sizeof missing - l, "%s%s", l ? ", " : "", keys[i].key);
        }
    }
    check(k, !missing[0], "hello: settings lists every scenario pool key%s%s%s",
          missing[0] ? " -- missing: " : "", missing,
          missing[0] ? " (say mapped, ignored or unsupported for each)" : "");
    char unknown[600] = "";
    for (int i = 0; i < in->nkeys; i++) {
        int known = 0;
        for (size_t j = 0; j < n; j++)
            known |= strcmp(in->keys[i].key, keys[j].key) == 0;
        if (!known) {
            size_t l = strlen(unknown);
            snprintf(unknown + l, sizeof unknown - l, "%s%s", l ? ", " : "", in->keys[i].key);
        }
    }
    check(k, !unknown[0], "hello: settings names only keys the scenario language has%s%s",
          unknown[0] ? " -- unknown: " : "", unknown);
    int reasons = 1;
    for (int i = 0; i < in->nkeys; i++)
        if (in->keys[i].status != DRIVER_KEY_MAPPED && !in->keys[i].detail[0])
            reasons = 0;
    check(k, reasons, "hello: every ignored or unsupported key gives its reason");
    check(k, in->nmetrics > 0, "hello: metrics lists at least one pool metric (%d listed)",
          in->nmetrics);
}

struct conc_arg {
    struct checker *k;
    enum driver_outcome outcome;
    double elapsed_ms;
    double wall_ms;
};

static void *conc_acquire(void *arg)
{
    struct conc_arg *a = arg;
    struct driver_conn *c = NULL;
    char err[256];
    double t = now_ms();
    a->outcome = a->k->ops->acquire(a->k->d, -1, &c, &a->elapsed_ms, err, sizeof err);
    a->wall_ms = now_ms() - t;
    if (a->outcome == DRIVER_OK)
        (void)a->k->ops->release(a->k->d, c, err, sizeof err);
    return NULL;
}

/* With every connection in use, CONCURRENT acquires are sent at once and
 * must all be in flight together: a driver that serves one request at a
 * time needs CONCURRENT x WAIT_MS for them. */
static void check_concurrency(struct checker *k, struct driver_conn **held, int nheld)
{
    const char *detail;
    int st = driver_key_status(k->info, "acquire_timeout", &detail);
    if (st != DRIVER_KEY_MAPPED) {
        check(k, 1, "concurrency: skipped -- the pool has no acquire timeout (%s)", detail);
        return;
    }
    pthread_t th[CONCURRENT];
    struct conc_arg args[CONCURRENT];
    double t = now_ms();
    int started = 0;
    for (int i = 0; i < CONCURRENT; i++) {
        args[i] = (struct conc_arg){k, DRIVER_OTHER, 0, 0};
        if (pthread_create(&th[i], NULL, conc_acquire, &args[i]) == 0)
            started++;
        else
            break;
    }
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    double wall = now_ms() - t;
    int timeouts = 0;
    for (int i = 0; i < started; i++)
        timeouts += args[i].outcome == DRIVER_TIMEOUT;
    /* Served together they take about WAIT_MS; one at a time, CONCURRENT
     * times that. Half-way is the line, generous for a loaded machine. */
    double limit = WAIT_MS * (CONCURRENT / 2.0);
    check(k, wall < limit && !k->ops->fate(k->d, NULL, 0),
          "concurrency: %d acquires in flight at once (pool full, its acquire_timeout %d ms) all "
          "returned in "
          "%.0f ms%s",
          started, WAIT_MS, wall,
          wall < limit ? ""
                       : " -- the driver serves requests one at a time; it must serve each "
                         "request on its own thread or task");
    check(k, timeouts == started,
          "concurrency: all %d waiting acquires ended 'timeout' with the pool full (%d did)",
          started, timeouts);
    (void)held;
    (void)nheld;
}

struct slow_arg {
    struct checker *k;
    struct driver_conn *c;
    struct driver_result r;
};

static void *slow_query(void *arg)
{
    struct slow_arg *a = arg;
    a->k->ops->query(a->k->d, a->c, "SELECT pg_sleep(1.5)", 5000, &a->r);
    return NULL;
}

/* While a query sleeps on the server, another request must be answered at
 * once: a driver that serves requests one at a time answers it only after
 * the query. */
static void check_served_meanwhile(struct checker *k, struct driver_conn *c)
{
    if (k->info->nmetrics == 0)
        return;
    char name[48];
    snprintf(name, sizeof name, "%s", k->info->metrics[0]);
    char *star = strchr(name, '.');
    if (star && star[1] == '*')
        return;
    struct slow_arg a = {k, c, {0}};
    pthread_t th;
    if (pthread_create(&th, NULL, slow_query, &a) != 0)
        return;
    /* Give the query time to reach the driver (not a settle sleep: the
     * check below only needs the query sent first). */
    nanosleep(&(struct timespec){0, 200 * 1000 * 1000}, NULL);
    long long v;
    double t = now_ms();
    (void)k->ops->metric(k->d, name, &v);
    double took = now_ms() - t;
    pthread_join(th, NULL);
    check(k, took < 700,
          "concurrency: metric %s answered in %.0f ms while a query slept 1.5 s on the server%s",
          name, took,
          took < 700 ? ""
                     : " -- the driver serves requests one at a time; it must serve each "
                       "request on its own thread or task");
}

static void run_checks(struct checker *k, struct pgserver *srv)
{
    char err[700];
    check_hello(k);
    if (k->broken)
        return;

    /* open, with the settings every driver can take or declines */
    struct scn_setting set[4];
    int nset = 0;
    const struct {
        const char *key, *value;
        long long number;
    } want[] = {{"max", "2", 2}, {"min_idle", "0", 0}, {"acquire_timeout", "1s", WAIT_MS}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        int st = driver_key_status(k->info, want[i].key, NULL);
        if (st == DRIVER_KEY_MAPPED || st == DRIVER_KEY_IGNORED) {
            memset(&set[nset], 0, sizeof set[nset]);
            snprintf(set[nset].key, sizeof set[nset].key, "%s", want[i].key);
            set[nset].value = (char *)want[i].value;
            set[nset].number = want[i].number;
            nset++;
        }
    }
    char ds[DRIVER_MAX_DSETTINGS][80];
    const char *dsp[DRIVER_MAX_DSETTINGS];
    int nds = driver_resolve_settings(k->info, NULL, 0, ds, err, sizeof err);
    for (int i = 0; i < nds; i++)
        dsp[i] = ds[i];
    struct driver_open_args oa = {
        .host = pgserver_host(srv),
        .port = pgserver_port(srv),
        .user = pgserver_user(srv),
        .dbname = pgserver_dbname(srv),
        .password = pgserver_password(srv),
        .settings = set,
        .nsettings = (size_t)nset,
        .driver_settings = dsp,
        .ndriver_settings = nds > 0 ? (size_t)nds : 0,
    };
    int orc = k->ops->open(k->d, &oa, err, sizeof err);
    if (check(k, orc == 0, "open: max=2 min_idle=0 acquire_timeout=1s%s%s", orc ? " -- " : "",
              orc ? err : "") < 0)
        return;

    /* acquire and its clock */
    struct driver_conn *c1 = NULL, *c2 = NULL;
    double el = 0, t = now_ms();
    enum driver_outcome o = k->ops->acquire(k->d, -1, &c1, &el, err, sizeof err);
    double wall = now_ms() - t;
    if (check(k, o == DRIVER_OK, "acquire: outcome ok (got %s%s%s)", driver_outcome_name(o),
              err[0] ? ": " : "", o == DRIVER_OK ? "" : err) < 0)
        return;
    check(k, el >= 0 && el <= wall + 1,
          "acquire: elapsed_us is the time in the pool call, in microseconds (%.3f ms reported, "
          "%.3f ms round trip)",
          el, wall);

    /* queries */
    struct driver_result r;
    k->ops->query(k->d, c1, "SELECT 1", 5000, &r);
    check(k, r.outcome == DRIVER_Q_OK, "query SELECT 1: outcome ok (got %s%s%s)",
          r.outcome == DRIVER_Q_OK        ? "ok"
          : r.outcome == DRIVER_Q_TIMEOUT ? "timeout"
                                          : "error",
          r.message[0] ? ": " : "", r.message);
    k->ops->query(k->d, c1, "SELECT 1/0", 5000, &r);
    check(k, r.outcome == DRIVER_Q_ERROR && strcmp(r.sqlstate, "22012") == 0,
          "query SELECT 1/0: outcome error with sqlstate 22012 (got %s '%s')",
          r.outcome == DRIVER_Q_ERROR ? "error" : "not an error", r.sqlstate);
    if (k->broken)
        return;
    k->ops->query(k->d, c1, "ROLLBACK", 5000, &r);
    t = now_ms();
    k->ops->query(k->d, c1, "SELECT pg_sleep(0.3)", 5000, &r);
    wall = now_ms() - t;
    check(k, r.outcome == DRIVER_Q_OK && r.elapsed_ms >= 250 && r.elapsed_ms <= wall + 1,
          "query: elapsed_us in microseconds (pg_sleep(0.3) reported %.1f ms, round trip %.1f "
          "ms)",
          r.elapsed_ms, wall);
    t = now_ms();
    k->ops->query(k->d, c1, "SELECT pg_sleep(5)", 300, &r);
    wall = now_ms() - t;
    check(k, r.outcome == DRIVER_Q_TIMEOUT && wall < 300 + 2000,
          "query with timeout_ms 300 on pg_sleep(5): outcome timeout by the deadline (%s after "
          "%.0f ms)",
          r.outcome == DRIVER_Q_TIMEOUT ? "timeout"
          : r.outcome == DRIVER_Q_OK    ? "ok"
                                        : "error",
          wall);
    if (k->broken)
        return;

    /* per-connection facts, against the server's own view */
    struct driver_conn_info ci;
    if (check(k, k->ops->conn_info(k->d, c1, &ci, err, sizeof err) == 0, "conn_info%s%s",
              err[0] && ci.backend_pid < 0 ? ": " : "",
              err[0] && ci.backend_pid < 0 ? err : "") == 0) {
        if (k->info->caps & DRIVER_CAP_BACKEND_PID) {
            char sql[160], outb[64] = "", e2[256];
            snprintf(sql, sizeof sql,
                     "SELECT count(*) FROM pg_stat_activity WHERE pid = %ld AND usename = '%s'",
                     ci.backend_pid, pgserver_user(srv));
            int rc = pgserver_sql(srv, sql, outb, sizeof outb, e2, sizeof e2);
            check(k, rc == 0 && strcmp(outb, "1") == 0,
                  "conn_info: backend_pid %ld is a backend of role %s on the server",
                  ci.backend_pid, pgserver_user(srv));
        }
        if (k->info->caps & DRIVER_CAP_CLIENT_PORT)
            check(k, ci.client_port > 0 && ci.client_port < 65536,
                  "conn_info: client_port is a TCP port (%d)", ci.client_port);
        if (k->info->caps & DRIVER_CAP_TXSTATUS)
            check(k, ci.txstatus >= DRIVER_TX_IDLE && ci.txstatus <= DRIVER_TX_UNKNOWN,
                  "conn_info: txstatus is one of idle, active, intrans, inerror, unknown");
    }

    /* metrics */
    long long v = -1;
    int mrc;
    if (driver_has_metric(k->info, "in_use")) {
        mrc = k->ops->metric(k->d, "in_use", &v);
        check(k, mrc == 0 && v == 1, "metric in_use: 1 with one connection out (got %lld)", v);
    }
    for (int i = 0; i < k->info->nmetrics; i++) {
        const char *m = k->info->metrics[i];
        if (strchr(m, '*'))
            continue;
        v = -1;
        mrc = k->ops->metric(k->d, m, &v);
        check(k, mrc == 0, "metric %s: answered (%lld)", m, v);
        if (k->broken)
            return;
    }
    check_served_meanwhile(k, c1);
    if (k->broken)
        return;

    /* error replies and unknown fields (exec drivers: the raw protocol) */
    if (k->ops == &exec_driver) {
        char reply[800];
        int rc = exec_driver_raw(k->d, "{\"op\":\"frobnicate\"}", 5000, reply, sizeof reply, err,
                                 sizeof err);
        check(k, rc == 1, "unknown op 'frobnicate': an \"ok\": false reply with an error (%s)",
              rc == 0   ? "got ok: true"
              : rc == 1 ? err
                        : err);
        if (k->broken)
            return;
        rc = exec_driver_raw(k->d, "{\"op\":\"release\",\"conn\":\"no-such-handle-42\"}", 5000,
                             reply, sizeof reply, err, sizeof err);
        check(k, rc == 1, "release of an unknown handle: an \"ok\": false reply (%s)",
              rc == 0 ? reply : err);
        if (k->broken)
            return;
        rc = exec_driver_raw(k->d, "{\"op\":\"metric\",\"name\":\"no_such_metric_x\"}", 5000, reply,
                             sizeof reply, err, sizeof err);
        check(k, rc == 1, "metric of an unknown name: an \"ok\": false reply (%s)",
              rc == 0 ? reply : err);
        if (k->broken)
            return;
        rc = exec_driver_raw(k->d, "{\"op\":\"metric\",\"name\":\"idle\",\"from_the_future\":1}",
                             5000, reply, sizeof reply, err, sizeof err);
        if (driver_has_metric(k->info, "idle"))
            check(k, rc == 0,
                  "a request with a field the driver does not know is served, the field "
                  "ignored (%s)",
                  rc == 0 ? "ok" : err);
        if (k->broken)
            return;
    }

    /* the pool full: a second connection, then many waiters at once */
    o = k->ops->acquire(k->d, -1, &c2, &el, err, sizeof err);
    check(k, o == DRIVER_OK, "acquire a second connection: ok (got %s)", driver_outcome_name(o));
    if (k->broken)
        return;
    if (o == DRIVER_OK && driver_key_status(k->info, "max", NULL) == DRIVER_KEY_MAPPED) {
        struct driver_conn *held[2] = {c1, c2};
        check_concurrency(k, held, 2);
        if (k->broken)
            return;
        if (k->info->caps & DRIVER_CAP_ACQUIRE_TIMEOUT) {
            struct driver_conn *c4 = NULL;
            t = now_ms();
            o = k->ops->acquire(k->d, 300, &c4, &el, err, sizeof err);
            wall = now_ms() - t;
            check(k, o == DRIVER_TIMEOUT && el >= 300 && wall < 300 + 1000,
                  "acquire with its own timeout_ms 300, the pool full: timeout after %.0f ms (got "
                  "%s)",
                  el, driver_outcome_name(o));
            if (o == DRIVER_OK)
                (void)k->ops->release(k->d, c4, err, sizeof err);
        }
    }

    /* release, discard, the password push */
    check(k, k->ops->release(k->d, c1, err, sizeof err) == 0, "release: ok");
    if (c2)
        check(k, k->ops->discard(k->d, c2, err, sizeof err) == 0, "discard: ok");
    if (k->broken)
        return;
    if (k->info->caps & DRIVER_CAP_PASSWORD) {
        char e2[256];
        int rc = pgserver_set_password(srv, "rotated-pw-1", e2, sizeof e2);
        check(k, rc == 0 && k->ops->password(k->d, "rotated-pw-1", err, sizeof err) == 0,
              "password: acknowledged%s%s", rc ? " -- server: " : "", rc ? e2 : "");
        /* Take every connection the pool may hold idle, so one is new. */
        struct driver_conn *a = NULL, *b = NULL, *c = NULL;
        enum driver_outcome oa1 = k->ops->acquire(k->d, -1, &a, &el, err, sizeof err);
        enum driver_outcome ob = k->ops->acquire(k->d, -1, &b, &el, err, sizeof err);
        (void)c;
        check(k, oa1 == DRIVER_OK && ob == DRIVER_OK,
              "password: new connections use the pushed password (%s, %s%s%s)",
              driver_outcome_name(oa1), driver_outcome_name(ob), err[0] ? ": " : "", err);
        if (a)
            (void)k->ops->release(k->d, a, err, sizeof err);
        if (b)
            (void)k->ops->release(k->d, b, err, sizeof err);
    }
    if (k->info->caps & DRIVER_CAP_HEALTH) {
        k->ops->health(k->d, 5000, &r);
        check(k, r.outcome == DRIVER_Q_OK, "health: ok against a healthy server%s%s",
              r.message[0] ? ": " : "", r.message);
    }
    if (k->info->caps & DRIVER_CAP_MAINTAIN)
        check(k, k->ops->maintain(k->d, err, sizeof err) == 0, "maintain: ok");
    if (k->broken)
        return;

    /* close, and what follows */
    check(k, k->ops->close(k->d, err, sizeof err) == 0, "close: outcome ok%s%s",
          err[0] ? " -- " : "", err);
    if (k->broken)
        return;
    struct driver_conn *c3 = NULL;
    o = k->ops->acquire(k->d, -1, &c3, &el, err, sizeof err);
    /* What a closed pool does is the pool's behaviour, not the driver's
     * conformance (hygiene/close-with-waiters judges it; SQLAlchemy's
     * dispose() leaves a working pool): any outcome is a valid answer. */
    check(k, o != DRIVER_BROKEN, "acquire after close: answered (the pool's answer: %s)",
          driver_outcome_name(o));
    if (o == DRIVER_OK && c3)
        (void)k->ops->release(k->d, c3, err, sizeof err);
    (void)k->ops->close(k->d, err, sizeof err);
    check(k, !k->ops->fate(k->d, NULL, 0), "close twice: answered (the pool's answer: %s)",
          err[0] ? err : "ok");
}

int driver_check_run(const char *name, FILE *out)
{
    const char *command = NULL;
    const struct driver_ops *ops = driver_find(name, &command);
    if (!ops) {
        fprintf(out, "driver-check: unknown driver '%s' (known:", name);
        for (const char *const *n = driver_names(); *n; n++)
            fprintf(out, " %s", *n);
        fprintf(out, ")\n");
        return 2;
    }
    struct checker k = {.out = out, .ops = ops};
    char err[700];
    struct pgserver *srv = NULL;
    if (pgserver_create(NULL, &srv, err, sizeof err) < 0 ||
        pgserver_start(srv, err, sizeof err) < 0) {
        fprintf(out, "driver-check: cannot start a throwaway server: %s\n", err);
        pgserver_destroy(srv);
        return 2;
    }
    fprintf(out, "driver-check: %s%s%s\n", name, command ? " -> " : "", command ? command : "");
    struct driver_start_args sa = {command, event_cb, log_cb, &k};
    double t = now_ms();
    int rc = ops->start(&sa, &k.d, err, sizeof err);
    if (rc < 0) {
        k.failed++;
        fprintf(out, "FAIL  start and hello: %s\n", err);
    } else {
        k.info = ops->info(k.d);
        /* An in-process pool reaches the server through fakepq. */
        if ((k.info->caps & DRIVER_CAP_FAKEPQ) &&
            fakepq_init(FAKEPQ_PASSTHROUGH, err, sizeof err) < 0)
            fprintf(out, "driver-check: fakepq: %s\n", err);
        check(&k, now_ms() - t < 10000, "start: hello answered in %.0f ms", now_ms() - t);
        run_checks(&k, srv);
        if (k.broken)
            fprintf(out, "      (the remaining checks were skipped)\n");
        ops->destroy(k.d);
    }
    pgserver_destroy(srv);
    fprintf(out, "driver-check: %d passed, %d failed\n", k.passed, k.failed);
    return k.failed ? 1 : 0;
}
