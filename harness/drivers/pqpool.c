/*
 * The pqpool driver, in process: scenario `pool` settings become a struct
 * pqpool_config, pqpool's events become lines of the trace (each starting
 * with a one-word kind the HTML timeline colours by), its statistics
 * become pool.* metrics, and queries run on the PGconn it hands out with
 * libpq's asynchronous API (in pgfault, fakepq) under a deadline.
 */
#include "drivers/pqpool_driver.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "fakepq.h"
#include "pqpool.h"

/* A handle: one acquire's PGconn. Handles live until destroy, so a
 * deliberate double release reaches the pool with the same PGconn. */
struct driver_conn {
    PGconn *conn;
    struct driver_conn *next;
};

struct driver {
    struct pqpool *p;
    struct driver_start_args args;
    struct driver_info info;
    char conninfo[1024];
    char *init_sql;
    char *application_name;
    pthread_mutex_t lock; /* password, handles */
    char password[256];
    struct driver_conn *conns;
};

/* Settings that are durations in milliseconds, and where they go. */
static const struct {
    const char *key;
    size_t offset;
} durations[] = {
    {"acquire_timeout", offsetof(struct pqpool_config, acquire_timeout_ms)},
    {"connect_timeout", offsetof(struct pqpool_config, connect_timeout_ms)},
    {"idle_timeout", offsetof(struct pqpool_config, idle_timeout_ms)},
    {"max_lifetime", offsetof(struct pqpool_config, max_lifetime_ms)},
    {"validate_idle", offsetof(struct pqpool_config, validate_idle_ms)},
    {"validation_timeout", offsetof(struct pqpool_config, validation_timeout_ms)},
    {"auth_retry_after", offsetof(struct pqpool_config, auth_retry_after_ms)},
    {"backoff_initial", offsetof(struct pqpool_config, backoff_initial_ms)},
    {"backoff_max", offsetof(struct pqpool_config, backoff_max_ms)},
    {"release_timeout", offsetof(struct pqpool_config, release_timeout_ms)},
};

/* The option each scenario key becomes (every key the language has). */
static const struct {
    const char *key, *option;
} mapping[] = {
    {"max", "max_size"},
    {"min_idle", "min_idle"},
    {"acquire_timeout", "acquire_timeout_ms"},
    {"connect_timeout", "connect_timeout_ms"},
    {"idle_timeout", "idle_timeout_ms"},
    {"max_lifetime", "max_lifetime_ms"},
    {"validate_idle", "validate_idle_ms (never: -1)"},
    {"validation_timeout", "validation_timeout_ms"},
    {"auth_retry_after", "auth_retry_after_ms"},
    {"backoff_initial", "backoff_initial_ms"},
    {"backoff_max", "backoff_max_ms"},
    {"release_timeout", "release_timeout_ms"},
    {"housekeeping", "housekeeping_interval_ms (off: 0)"},
    {"init_sql", "init_sql"},
    {"application_name", "application_name"},
    {"dbname", "conninfo dbname"},
    {"password", "the password callback"},
};

static const char *const metric_names[] = {
    "total",
    "idle",
    "in_use",
    "connecting",
    "waiting",
    "auth_locked",
    "created",
    "ejected",
    "ejected.*",
    "connect_attempts",
    "connect_failures",
    "connect_failures.*",
    "acquires",
    "acquire_timeouts",
    "acquire_errors",
    "auth_failures",
    "auth_lockouts",
    "waiters_served",
    "double_releases",
    "foreign_releases",
    "validations",
    "rollbacks",
    "cancels",
};

__attribute__((format(printf, 3, 4))) static int bad(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return -1;
}

/* Applies one typed setting (the parser checked key and type). */
static int apply(struct pqpool_config *cfg, struct driver *d, const struct scn_setting *st,
                 char *err, size_t len)
{
    const char *key = st->key, *value = st->value;
    for (size_t i = 0; i < sizeof durations / sizeof durations[0]; i++) {
        if (strcmp(key, durations[i].key) == 0) {
            /* "never" (validate_idle) is -1 to pqpool, as number already is. */
            if (st->number > 24LL * 3600 * 1000)
                return bad(err, len, "%s=%s: longer than a day", key, value);
            *(int *)((char *)cfg + durations[i].offset) = (int)st->number;
            return 0;
        }
    }
    if (strcmp(key, "max") == 0)
        cfg->max_size = (int)st->number;
    else if (strcmp(key, "min_idle") == 0)
        cfg->min_idle = (int)st->number;
    else if (strcmp(key, "housekeeping") == 0)
        cfg->housekeeping_interval_ms = st->number < 0 ? 0 : (int)st->number;
    else if (strcmp(key, "init_sql") == 0) {
        free(d->init_sql);
        if (!(d->init_sql = strdup(value)))
            return bad(err, len, "out of memory");
    } else if (strcmp(key, "application_name") == 0) {
        free(d->application_name);
        if (!(d->application_name = strdup(value)))
            return bad(err, len, "out of memory");
    } else if (strcmp(key, "dbname") == 0) {
        for (const char *c = value; *c; c++)
            if (*c == ' ' || *c == '\'' || *c == '\\' || *c == '=')
                return bad(err, len, "dbname=%s: only a plain database name is accepted", value);
        size_t used = strlen(d->conninfo);
        snprintf(d->conninfo + used, sizeof d->conninfo - used, " dbname=%s", value);
    } else if (strcmp(key, "password") != 0) {
        return bad(err, len, "pool setting '%s' is not handled by the pqpool driver", key);
    }
    return 0;
}

static const char *password_fn(void *ctx)
{
    struct driver *d = ctx;
    /* Copied under the lock into a per-thread buffer, so a password change
     * running at the same time never hands out a torn string. */
    static __thread char copy[256];
    pthread_mutex_lock(&d->lock);
    snprintf(copy, sizeof copy, "%s", d->password);
    pthread_mutex_unlock(&d->lock);
    return copy;
}

/* Formats a pqpool event as one trace line starting with its kind. */
static void event_fn(void *ctx, const struct pqpool_event *ev)
{
    struct driver *dp = ctx;
    char line[700];
    const char *m = ev->message ? ev->message : "";
    char msg[400];
    snprintf(msg, sizeof msg, "%s", m);
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\t')
            *c = ' ';
    switch (ev->type) {
    case PQPOOL_EV_CONNECTED:
        snprintf(line, sizeof line, "connected conn %lu in %lldms", ev->conn_id,
                 (long long)ev->elapsed_ms);
        break;
    case PQPOOL_EV_CONNECT_FAILED:
        snprintf(line, sizeof line, "connect-failed (%s%s%s) after %lldms: %s",
                 pqpool_fail_class_name(ev->fail_class), ev->sqlstate[0] ? " " : "", ev->sqlstate,
                 (long long)ev->elapsed_ms, msg);
        break;
    case PQPOOL_EV_EJECTED:
        snprintf(line, sizeof line, "ejected conn %lu (%s)%s%s", ev->conn_id,
                 pqpool_eject_reason_name(ev->reason), msg[0] ? ": " : "", msg);
        break;
    case PQPOOL_EV_ACQUIRE_TIMEOUT:
        snprintf(line, sizeof line, "acquire-timeout after %lldms", (long long)ev->elapsed_ms);
        break;
    case PQPOOL_EV_ACQUIRE_FAILED:
        snprintf(line, sizeof line, "acquire-failed (%s) after %lldms%s%s",
                 pqpool_strerror(ev->error), (long long)ev->elapsed_ms, msg[0] ? ": " : "", msg);
        break;
    case PQPOOL_EV_AUTH_FAILED:
        snprintf(line, sizeof line, "auth-failed %s: %s", ev->sqlstate, msg);
        break;
    case PQPOOL_EV_AUTH_LOCKED:
        snprintf(line, sizeof line, "auth-locked: acquire refused without contacting the server");
        break;
    case PQPOOL_EV_WAITER_SERVED:
        snprintf(line, sizeof line, "served conn %lu after %lldms in the queue", ev->conn_id,
                 (long long)ev->elapsed_ms);
        break;
    case PQPOOL_EV_DOUBLE_RELEASE:
        snprintf(line, sizeof line, "double-release of conn %lu (ignored)", ev->conn_id);
        break;
    case PQPOOL_EV_FOREIGN_RELEASE:
        snprintf(line, sizeof line, "foreign-release of a PGconn the pool does not own (ignored)");
        break;
    case PQPOOL_EV_ROLLED_BACK:
        snprintf(line, sizeof line, "rolled-back conn %lu on release", ev->conn_id);
        break;
    case PQPOOL_EV_CANCELED:
        snprintf(line, sizeof line, "canceled conn %lu's running command on release", ev->conn_id);
        break;
    case PQPOOL_EV_CLOSED:
        snprintf(line, sizeof line, "closed");
        break;
    default:
        snprintf(line, sizeof line, "event %d", (int)ev->type);
        break;
    }
    if (dp->args.event)
        dp->args.event(dp->args.ctx, line);
}

static int start(const struct driver_start_args *a, struct driver **out, char *err, size_t len)
{
    *out = NULL;
    struct driver *d = calloc(1, sizeof *d);
    if (!d)
        return bad(err, len, "out of memory");
    d->args = *a;
    pthread_mutex_init(&d->lock, NULL);
    struct driver_info *in = &d->info;
    snprintf(in->driver, sizeof in->driver, "pqpool");
    snprintf(in->pool, sizeof in->pool, "pqpool");
    snprintf(in->version, sizeof in->version, "%s", PGFAULT_VERSION);
    for (size_t i = 0; i < sizeof mapping / sizeof mapping[0]; i++) {
        snprintf(in->keys[i].key, sizeof in->keys[i].key, "%s", mapping[i].key);
        in->keys[i].status = DRIVER_KEY_MAPPED;
        snprintf(in->keys[i].detail, sizeof in->keys[i].detail, "%s", mapping[i].option);
        in->nkeys++;
    }
    for (size_t i = 0; i < sizeof metric_names / sizeof metric_names[0]; i++)
        snprintf(in->metrics[in->nmetrics++], sizeof in->metrics[0], "%s", metric_names[i]);
    in->caps = DRIVER_CAP_MAINTAIN | DRIVER_CAP_HEALTH | DRIVER_CAP_TXSTATUS |
               DRIVER_CAP_BACKEND_PID | DRIVER_CAP_CLIENT_PORT | DRIVER_CAP_PASSWORD |
               DRIVER_CAP_INVARIANTS | DRIVER_CAP_FAKEPQ | DRIVER_CAP_ACQUIRE_TIMEOUT;
    *out = d;
    return 0;
}

static const struct driver_info *info(struct driver *d)
{
    return &d->info;
}

static int open_pool(struct driver *d, const struct driver_open_args *a, char *err, size_t len)
{
    if (d->p)
        return bad(err, len, "the pool is already open");
    snprintf(d->conninfo, sizeof d->conninfo, "host=%s port=%d user=%s dbname=%s", a->host, a->port,
             a->user, a->dbname);
    snprintf(d->password, sizeof d->password, "%s", a->password ? a->password : "");
    struct pqpool_config cfg;
    pqpool_config_init(&cfg);
    /* Scenarios are explicit about housekeeping: off unless they ask. */
    cfg.housekeeping_interval_ms = 0;
    for (size_t i = 0; i < a->nsettings; i++)
        if (apply(&cfg, d, &a->settings[i], err, len) < 0)
            return -1;
    cfg.conninfo = d->conninfo;
    cfg.init_sql = d->init_sql;
    cfg.application_name = d->application_name;
    cfg.password = password_fn;
    cfg.password_ctx = d;
    cfg.event = event_fn;
    cfg.event_ctx = d;
    return pqpool_open(&cfg, &d->p, err, len) < 0 ? -1 : 0;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void one_line(char *s)
{
    size_t l = strlen(s);
    while (l && (s[l - 1] == '\n' || s[l - 1] == ' '))
        s[--l] = '\0';
    for (char *c = s; *c; c++)
        if (*c == '\n' || *c == '\t')
            *c = ' ';
}

static enum driver_outcome acquire(struct driver *d, int timeout_ms, struct driver_conn **out,
                                   double *elapsed_ms, char *err, size_t len)
{
    *out = NULL;
    PGconn *conn = NULL;
    double t = now_ms();
    int rc = pqpool_acquire(d->p, timeout_ms, &conn);
    *elapsed_ms = now_ms() - t;
    if (rc != 0 && err && len) {
        pqpool_last_error_copy(d->p, err, len);
        one_line(err);
    }
    if (rc == 0) {
        struct driver_conn *h = calloc(1, sizeof *h);
        if (!h) {
            pqpool_release(d->p, conn);
            if (err && len)
                snprintf(err, len, "out of memory");
            return DRIVER_OTHER;
        }
        h->conn = conn;
        pthread_mutex_lock(&d->lock);
        h->next = d->conns;
        d->conns = h;
        pthread_mutex_unlock(&d->lock);
        *out = h;
        return DRIVER_OK;
    }
    switch (rc) {
    case PQPOOL_ETIMEDOUT:
        return DRIVER_TIMEOUT;
    case PQPOOL_EAUTH:
        return DRIVER_AUTH;
    case PQPOOL_ECONNECT:
        return DRIVER_CONNECT;
    case PQPOOL_ECONFIG:
        return DRIVER_CONFIG;
    case PQPOOL_ECLOSED:
        return DRIVER_CLOSED;
    default:
        if (err && len)
            snprintf(err, len, "%s", pqpool_strerror(rc));
        return DRIVER_OTHER;
    }
}

static int release(struct driver *d, struct driver_conn *c, char *err, size_t len)
{
    pqpool_release(d->p, c->conn);
    return 0;
}

static int discard(struct driver *d, struct driver_conn *c, char *err, size_t len)
{
    pqpool_discard(d->p, c->conn);
    return 0;
}

/* Runs sql asynchronously so that a partition cannot hang the case: the
 * socket is waited for with the deadline. Every result is shown to the
 * pool (pqpool_note_result), as an application using pqpool does. */
static int query(struct driver *d, struct driver_conn *c, const char *sql, int timeout_ms,
                 struct driver_result *r)
{
    PGconn *conn = c->conn;
    memset(r, 0, sizeof *r);
    double t0 = now_ms();
    double deadline = t0 + timeout_ms;
    int ok = 1, timed_out = 0;
    if (!PQsendQuery(conn, sql)) {
        ok = 0;
        snprintf(r->message, sizeof r->message, "%s", PQerrorMessage(conn));
    } else {
        for (;;) {
            while (PQflush(conn) > 0 && now_ms() < deadline) {
                struct pollfd pw = {PQsocket(conn), POLLOUT, 0};
                (void)poll(&pw, 1, 5);
            }
            if (!PQconsumeInput(conn)) {
                ok = 0;
                snprintf(r->message, sizeof r->message, "%s", PQerrorMessage(conn));
            }
            if (!PQisBusy(conn) || !ok)
                break;
            double left = deadline - now_ms();
            if (left <= 0) {
                timed_out = 1;
                break;
            }
            struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
            if (pfd.fd < 0) {
                ok = 0;
                snprintf(r->message, sizeof r->message, "%s", PQerrorMessage(conn));
                break;
            }
            (void)poll(&pfd, 1, left > 50 ? 50 : (int)left + 1);
        }
        if (!timed_out) {
            PGresult *res;
            while ((res = PQgetResult(conn)) != NULL) {
                ExecStatusType rs = PQresultStatus(res);
                pqpool_note_result(d->p, conn, res);
                if (rs == PGRES_FATAL_ERROR || rs == PGRES_BAD_RESPONSE ||
                    rs == PGRES_NONFATAL_ERROR) {
                    ok = 0;
                    const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
                    snprintf(r->sqlstate, sizeof r->sqlstate, "%s", ss ? ss : "");
                    snprintf(r->message, sizeof r->message, "%s", PQresultErrorMessage(res));
                }
                PQclear(res);
                if (PQstatus(conn) == CONNECTION_BAD)
                    break;
            }
        }
    }
    r->elapsed_ms = now_ms() - t0;
    r->outcome = timed_out ? DRIVER_Q_TIMEOUT : ok ? DRIVER_Q_OK : DRIVER_Q_ERROR;
    one_line(r->message);
    return 0;
}

static int conn_info(struct driver *d, struct driver_conn *c, struct driver_conn_info *out,
                     char *err, size_t len)
{
    out->backend_pid = PQbackendPID(c->conn);
    out->txstatus = (enum driver_txstatus)PQtransactionStatus(c->conn);
    out->fakepq_id = fakepq_conn_id(c->conn);
    out->client_port = -1;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (PQsocket(c->conn) >= 0 &&
        getsockname(PQsocket(c->conn), (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            out->client_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            out->client_port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    return 0;
}

static int health(struct driver *d, int timeout_ms, struct driver_result *r)
{
    memset(r, 0, sizeof *r);
    double t = now_ms();
    int rc = pqpool_health(d->p, timeout_ms);
    r->elapsed_ms = now_ms() - t;
    r->outcome = rc == 0 ? DRIVER_Q_OK : rc == PQPOOL_ETIMEDOUT ? DRIVER_Q_TIMEOUT : DRIVER_Q_ERROR;
    if (rc != 0)
        snprintf(r->message, sizeof r->message, "%s", pqpool_strerror(rc));
    return 0;
}

static int maintain(struct driver *d, char *err, size_t len)
{
    int rc = pqpool_maintain(d->p);
    if (rc == 0 || rc == PQPOOL_ECLOSED)
        return 0;
    return bad(err, len, "%s", pqpool_strerror(rc));
}

static int set_password(struct driver *d, const char *pw, char *err, size_t len)
{
    pthread_mutex_lock(&d->lock);
    snprintf(d->password, sizeof d->password, "%s", pw);
    pthread_mutex_unlock(&d->lock);
    return 0;
}

static int metric(struct driver *dp, const char *name, long long *v)
{
    struct pqpool_stats s;
    pqpool_stats(dp->p, &s);
    const struct {
        const char *name;
        long long value;
    } m[] = {
        {"total", s.total},
        {"idle", s.idle},
        {"in_use", s.in_use},
        {"connecting", s.connecting},
        {"waiting", s.waiting},
        {"auth_locked", s.auth_locked},
        {"created", s.created},
        {"ejected", s.ejected},
        {"connect_attempts", s.connect_attempts},
        {"connect_failures", s.connect_failures},
        {"acquires", s.acquires},
        {"acquire_timeouts", s.acquire_timeouts},
        {"acquire_errors", s.acquire_errors},
        {"auth_failures", s.auth_failures},
        {"auth_lockouts", s.auth_lockouts},
        {"waiters_served", s.waiters_served},
        {"double_releases", s.double_releases},
        {"foreign_releases", s.foreign_releases},
        {"validations", s.validations},
        {"rollbacks", s.rollbacks},
        {"cancels", s.cancels},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        if (strcmp(name, m[i].name) == 0) {
            *v = m[i].value;
            return 0;
        }
    }
    if (strncmp(name, "ejected.", 8) == 0) {
        for (int r = 0; r < PQPOOL_EJECT__COUNT; r++) {
            if (strcmp(name + 8, pqpool_eject_reason_name((enum pqpool_eject_reason)r)) == 0) {
                *v = s.ejected_by[r];
                return 0;
            }
        }
    }
    if (strncmp(name, "connect_failures.", 17) == 0) {
        for (int c = 0; c < PQPOOL_FAIL__COUNT; c++) {
            if (strcmp(name + 17, pqpool_fail_class_name((enum pqpool_fail_class)c)) == 0) {
                *v = s.connect_failures_by[c];
                return 0;
            }
        }
    }
    return -1;
}

static int check_invariants(struct driver *dp, char *err, size_t len)
{
    struct pqpool_stats s;
    pqpool_stats(dp->p, &s);
    if (s.idle < 0 || s.in_use < 0 || s.waiting < 0 || s.connecting < 0)
        return bad(err, len, "negative count (idle %d, in_use %d, waiting %d, connecting %d)",
                   s.idle, s.in_use, s.waiting, s.connecting);
    if (s.total != s.idle + s.in_use)
        return bad(err, len, "total %d != idle %d + in_use %d", s.total, s.idle, s.in_use);
    if (s.idle + s.in_use > s.max_size)
        return bad(err, len, "idle %d + in_use %d > max %d", s.idle, s.in_use, s.max_size);
    long long sum = 0;
    for (int r = 0; r < PQPOOL_EJECT__COUNT; r++)
        if (r != PQPOOL_EJECT_CLOSED)
            sum += s.ejected_by[r];
    if (sum != s.ejected)
        return bad(err, len, "ejected %lld != sum of ejected by reason %lld", s.ejected, sum);
    long long fsum = 0;
    for (int c = 0; c < PQPOOL_FAIL__COUNT; c++)
        fsum += s.connect_failures_by[c];
    if (fsum != s.connect_failures)
        return bad(err, len, "connect_failures %lld != sum by class %lld", s.connect_failures,
                   fsum);
    if (s.connect_attempts < s.created || s.connect_attempts < s.connect_failures)
        return bad(err, len, "connect_attempts %lld < created %lld or failures %lld",
                   s.connect_attempts, s.created, s.connect_failures);
    if (s.created != s.total + s.ejected + s.ejected_by[PQPOOL_EJECT_CLOSED])
        return bad(err, len,
                   "created %lld != open %d + ejected %lld + closed %lld (a connection was "
                   "lost or counted twice)",
                   s.created, s.total, s.ejected, s.ejected_by[PQPOOL_EJECT_CLOSED]);
    return 0;
}

static int close_pool(struct driver *d, char *err, size_t len)
{
    if (d->p)
        pqpool_close(d->p);
    return 0;
}

static void destroy(struct driver *d)
{
    if (!d)
        return;
    if (d->p) {
        pqpool_close(d->p);
        pqpool_free(d->p);
    }
    while (d->conns) {
        struct driver_conn *n = d->conns->next;
        free(d->conns);
        d->conns = n;
    }
    free(d->init_sql);
    free(d->application_name);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

static int fate(struct driver *d, char *why, size_t len)
{
    return 0; /* in process: a crash of the pool is a crash of the case */
}

const struct driver_ops pqpool_driver = {
    .name = "pqpool",
    .start = start,
    .info = info,
    .open = open_pool,
    .acquire = acquire,
    .release = release,
    .discard = discard,
    .query = query,
    .conn_info = conn_info,
    .health = health,
    .metric = metric,
    .maintain = maintain,
    .password = set_password,
    .check_invariants = check_invariants,
    .close = close_pool,
    .destroy = destroy,
    .fate = fate,
};
