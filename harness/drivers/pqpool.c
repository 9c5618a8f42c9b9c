/*
 * The pqpool driver: scenario `pool` settings become a struct
 * pqpool_config, pqpool's events become lines of the trace (each starting
 * with a one-word kind the HTML timeline colours by), and its statistics
 * become pool.* metrics.
 */
#include "drivers/pqpool_driver.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pqpool.h"

struct driver_pool {
    struct pqpool *p;
    const struct driver_open_args *args;
    char conninfo[1024];
    char *init_sql;
    char *application_name;
};

/* Settings that are durations in milliseconds, and where they go. */
static const struct {
    const char *key;
    size_t offset;
    int allow_never; /* accepts "never" (-1) */
} durations[] = {
    {"acquire_timeout", offsetof(struct pqpool_config, acquire_timeout_ms), 0},
    {"connect_timeout", offsetof(struct pqpool_config, connect_timeout_ms), 0},
    {"idle_timeout", offsetof(struct pqpool_config, idle_timeout_ms), 0},
    {"max_lifetime", offsetof(struct pqpool_config, max_lifetime_ms), 0},
    {"validate_idle", offsetof(struct pqpool_config, validate_idle_ms), 1},
    {"validation_timeout", offsetof(struct pqpool_config, validation_timeout_ms), 0},
    {"auth_retry_after", offsetof(struct pqpool_config, auth_retry_after_ms), 0},
    {"backoff_initial", offsetof(struct pqpool_config, backoff_initial_ms), 0},
    {"backoff_max", offsetof(struct pqpool_config, backoff_max_ms), 0},
    {"release_timeout", offsetof(struct pqpool_config, release_timeout_ms), 0},
};

static const char *const other_keys[] = {"max",    "min_idle",     "init_sql", "application_name",
                                         "dbname", "housekeeping", "password", NULL};

__attribute__((format(printf, 3, 4))) static int bad(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return -1;
}

/* "300ms", "2s", "0" -> milliseconds; -1 on error. */
static int parse_ms(const char *v)
{
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (end == v || errno || d < 0)
        return -1;
    if (strcmp(end, "s") == 0)
        d *= 1000;
    else if (strcmp(end, "ms") != 0 && !(*end == '\0' && d == 0))
        return -1;
    if (d > 24.0 * 3600 * 1000)
        return -1;
    return (int)d;
}

static int parse_count(const char *v)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (end == v || *end || errno || n < 0 || n > 10000)
        return -1;
    return (int)n;
}

/* Applies one setting to cfg (cfg may be NULL to only check it). */
static int apply(struct pqpool_config *cfg, struct driver_pool *dp, const char *key,
                 const char *value, char *err, size_t len)
{
    for (size_t i = 0; i < sizeof durations / sizeof durations[0]; i++) {
        if (strcmp(key, durations[i].key) != 0)
            continue;
        int ms = durations[i].allow_never && strcmp(value, "never") == 0 ? -1 : parse_ms(value);
        if (ms < 0 && !(durations[i].allow_never && strcmp(value, "never") == 0))
            return bad(err, len, "%s=%s: expected a duration like 300ms or 2s%s", key, value,
                       durations[i].allow_never ? ", or never" : "");
        if (cfg)
            *(int *)((char *)cfg + durations[i].offset) = ms;
        return 0;
    }
    if (strcmp(key, "max") == 0 || strcmp(key, "min_idle") == 0) {
        int n = parse_count(value);
        if (n < 0 || (n == 0 && strcmp(key, "max") == 0))
            return bad(err, len, "%s=%s: expected a whole number%s", key, value,
                       strcmp(key, "max") == 0 ? " from 1 to 10000" : " from 0 to 10000");
        if (cfg && strcmp(key, "max") == 0)
            cfg->max_size = n;
        else if (cfg)
            cfg->min_idle = n;
        return 0;
    }
    if (strcmp(key, "housekeeping") == 0) {
        int ms = strcmp(value, "off") == 0 ? 0 : parse_ms(value);
        if (ms < 0 || (ms == 0 && strcmp(value, "off") != 0))
            return bad(err, len, "housekeeping=%s: expected off or an interval like 20ms", value);
        if (cfg)
            cfg->housekeeping_interval_ms = ms;
        return 0;
    }
    if (strcmp(key, "init_sql") == 0) {
        if (dp && !(dp->init_sql = strdup(value)))
            return bad(err, len, "out of memory");
        return 0;
    }
    if (strcmp(key, "application_name") == 0) {
        if (dp && !(dp->application_name = strdup(value)))
            return bad(err, len, "out of memory");
        return 0;
    }
    if (strcmp(key, "dbname") == 0) {
        for (const char *c = value; *c; c++)
            if (*c == ' ' || *c == '\'' || *c == '\\' || *c == '=')
                return bad(err, len, "dbname=%s: only a plain database name is accepted", value);
        if (dp) {
            size_t used = strlen(dp->conninfo);
            snprintf(dp->conninfo + used, sizeof dp->conninfo - used, " dbname=%s", value);
        }
        return 0;
    }
    if (strcmp(key, "password") == 0)
        return 0; /* the runner's password callback reads it */
    char known[512] = "";
    for (size_t i = 0; i < sizeof durations / sizeof durations[0]; i++) {
        strcat(known, durations[i].key);
        strcat(known, ", ");
    }
    for (int i = 0; other_keys[i]; i++) {
        strcat(known, other_keys[i]);
        if (other_keys[i + 1])
            strcat(known, ", ");
    }
    return bad(err, len, "unknown pool setting '%s' (pqpool knows: %s)", key, known);
}

static int check_setting(const char *key, const char *value, char *err, size_t len)
{
    return apply(NULL, NULL, key, value, err, len);
}

static const char *password_fn(void *ctx)
{
    struct driver_pool *dp = ctx;
    return dp->args->password(dp->args->ctx);
}

/* Formats a pqpool event as one trace line starting with its kind. */
static void event_fn(void *ctx, const struct pqpool_event *ev)
{
    struct driver_pool *dp = ctx;
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
    dp->args->event(dp->args->ctx, line);
}

static void free_dp(struct driver_pool *dp)
{
    if (!dp)
        return;
    free(dp->init_sql);
    free(dp->application_name);
    free(dp);
}

static int open_pool(const struct driver_open_args *a, struct driver_pool **out, char *err,
                     size_t len)
{
    *out = NULL;
    struct driver_pool *dp = calloc(1, sizeof *dp);
    if (!dp)
        return bad(err, len, "out of memory");
    dp->args = a;
    snprintf(dp->conninfo, sizeof dp->conninfo, "%s", a->conninfo);
    struct pqpool_config cfg;
    pqpool_config_init(&cfg);
    /* Scenarios are explicit about housekeeping: off unless they ask. */
    cfg.housekeeping_interval_ms = 0;
    for (size_t i = 0; i < a->nsettings; i++) {
        if (apply(&cfg, dp, a->settings[i].key, a->settings[i].value, err, len) < 0) {
            free_dp(dp);
            return -1;
        }
    }
    cfg.conninfo = dp->conninfo;
    cfg.init_sql = dp->init_sql;
    cfg.application_name = dp->application_name;
    cfg.password = password_fn;
    cfg.password_ctx = dp;
    cfg.event = event_fn;
    cfg.event_ctx = dp;
    int rc = pqpool_open(&cfg, &dp->p, err, len);
    if (rc < 0) {
        free_dp(dp);
        return -1;
    }
    *out = dp;
    return 0;
}

static enum driver_outcome acquire(struct driver_pool *dp, int timeout_ms, PGconn **out, char *err,
                                   size_t len)
{
    *out = NULL;
    int rc = pqpool_acquire(dp->p, timeout_ms, out);
    if (rc != 0 && err && len)
        pqpool_last_error_copy(dp->p, err, len);
    if (rc != 0 && err && len) {
        size_t l = strlen(err);
        while (l && (err[l - 1] == '\n' || err[l - 1] == ' '))
            err[--l] = '\0';
        for (char *c = err; *c; c++)
            if (*c == '\n' || *c == '\t')
                *c = ' ';
    }
    switch (rc) {
    case 0:
        return DRIVER_OK;
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

static void release(struct driver_pool *dp, PGconn *conn)
{
    pqpool_release(dp->p, conn);
}

static void discard(struct driver_pool *dp, PGconn *conn)
{
    pqpool_discard(dp->p, conn);
}

static void note_result(struct driver_pool *dp, PGconn *conn, const PGresult *res)
{
    pqpool_note_result(dp->p, conn, res);
}

static int maintain(struct driver_pool *dp)
{
    int rc = pqpool_maintain(dp->p);
    return rc == 0 || rc == PQPOOL_ECLOSED ? 0 : -1;
}

static int metric(struct driver_pool *dp, const char *name, long long *v)
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

static int check_invariants(struct driver_pool *dp, char *err, size_t len)
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

static void close_pool(struct driver_pool *dp)
{
    pqpool_close(dp->p);
}

static void destroy(struct driver_pool *dp)
{
    pqpool_free(dp->p);
    free_dp(dp);
}

const struct driver_ops pqpool_driver = {
    .name = "pqpool",
    .check_setting = check_setting,
    .open = open_pool,
    .acquire = acquire,
    .release = release,
    .discard = discard,
    .note_result = note_result,
    .maintain = maintain,
    .metric = metric,
    .check_invariants = check_invariants,
    .close = close_pool,
    .destroy = destroy,
};
