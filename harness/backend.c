/*
 * backend: the fake and proxy backends behind a scenario's pool.
 *
 * Each fault of the scenario language is mapped here to the layer that
 * can produce it faithfully. On the fake backend everything goes through
 * fakepq's fault plan. On the proxy backend network faults go to the
 * fault proxy, server events (restart, password change, terminate) to the
 * real server, and per-connection or per-call faults to fakepq, which
 * wraps the real libpq there (passthrough mode).
 */
#include "backend.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <netinet/in.h>

#include "fakepq.h"
#include "pgserver.h"
#include "proxy.h"

#define FAKE_PASSWORD "pgfault"

struct backend {
    enum scn_backend kind;
    struct backend_endpoint ep;
    char password[128];
    int stop_rule;           /* fake: the refuse rule of `fault stop`, 0 if none */
    struct pgserver *server; /* proxy: the current server (owned unless external) */
    struct pgserver *servers[2];
    int nservers;
    int current; /* index of the server the proxy points at */
    struct fproxy *proxy;
    char *external; /* --server conninfo */
};

__attribute__((format(printf, 3, 4))) static int say(char *msg, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
    return 0;
}

__attribute__((format(printf, 3, 4))) static int err(char *msg, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, len, fmt, ap);
    va_end(ap);
    return -1;
}

static int scenario_needs_failover(const struct scn *s)
{
    for (size_t i = 0; i < s->nsteps; i++)
        if (s->steps[i].kind == SCN_STEP_FAULT && s->steps[i].fault.kind == SCN_FAULT_FAILOVER)
            return 1;
    return 0;
}

/* The `server` line's settings; only max_connections is known. */
static int server_settings(const struct scn *s, int *max_connections, char *msg, size_t len)
{
    *max_connections = 0;
    for (size_t i = 0; i < s->nserver; i++) {
        const struct scn_setting *st = &s->server[i];
        if (strcmp(st->key, "max_connections") == 0) {
            char *end;
            long v = strtol(st->value, &end, 10);
            if (*end || v < 1 || v > 10000)
                return err(msg, len, "%s:%d:%d: max_connections must be 1..10000, got '%s'",
                           s->path, st->line, st->col, st->value);
            *max_connections = (int)v;
        } else {
            return err(msg, len, "%s:%d:%d: unknown server setting '%s' (max_connections)", s->path,
                       st->line, st->col, st->key);
        }
    }
    return 0;
}

static int proxy_cmd(struct backend *b, char *msg, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int proxy_cmd(struct backend *b, char *msg, size_t len, const char *fmt, ...)
{
    char line[256], reply[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (fproxy_command(b->proxy, line, reply, sizeof reply) < 0 || strncmp(reply, "ok", 2) != 0)
        return err(msg, len, "proxy '%s': %s", line, reply);
    return say(msg, len, "proxy: %s -> %s", line, reply);
}

static int start_server(struct backend *b, int max_connections, char *msg, size_t len)
{
    struct pgserver_options po;
    pgserver_options_init(&po);
    if (max_connections)
        po.max_connections = max_connections;
    char e[512];
    struct pgserver *s = NULL;
    if (pgserver_create(&po, &s, e, sizeof e) < 0)
        return err(msg, len, "creating a throwaway server: %s", e);
    if (pgserver_start(s, e, sizeof e) < 0) {
        pgserver_destroy(s);
        return err(msg, len, "starting a throwaway server: %s", e);
    }
    b->servers[b->nservers++] = s;
    return 0;
}

int backend_open(const struct backend_options *o, struct backend **out, char *msg, size_t len)
{
    *out = NULL;
    struct backend *b = calloc(1, sizeof *b);
    char e[512];
    int maxc;
    if (!b)
        return err(msg, len, "out of memory");
    b->kind = o->kind;
    if (server_settings(o->scn, &maxc, msg, len) < 0)
        goto fail;

    if (o->kind == SCN_BACKEND_FAKE) {
        if (fakepq_init(FAKEPQ_SIMULATED, e, sizeof e) < 0) {
            err(msg, len, "fakepq: %s", e);
            goto fail;
        }
        if (maxc)
            fakepq_sim_set_max_connections(maxc > 1 ? maxc - 1 : 1);
        /* What fakepq's simulated server answers to. */
        b->ep = (struct backend_endpoint){"127.0.0.1", 5432, "pgfault", "pgfault"};
        snprintf(b->password, sizeof b->password, "%s", FAKE_PASSWORD);
        *out = b;
        return 0;
    }

    if (fakepq_init(FAKEPQ_PASSTHROUGH, e, sizeof e) < 0) {
        err(msg, len, "fakepq: %s", e);
        goto fail;
    }
    if (o->server_conninfo) {
        /* An existing server: faults that change the server itself fail
         * at the step, naming the reason; failover needs two servers. */
        if (scenario_needs_failover(o->scn) || maxc) {
            err(msg, len,
                "this scenario %s, which needs throwaway servers; it cannot run "
                "with --server",
                scenario_needs_failover(o->scn) ? "fails over" : "sets max_connections");
            goto fail;
        }
        if (pgserver_attach(o->server_conninfo, &b->servers[0], e, sizeof e) < 0) {
            err(msg, len, "%s", e);
            goto fail;
        }
        b->nservers = 1;
    } else {
        if (start_server(b, maxc, msg, len) < 0)
            goto fail;
        if (scenario_needs_failover(o->scn) && start_server(b, maxc, msg, len) < 0)
            goto fail;
    }
    struct pgserver *s = b->servers[0];
    struct fproxy_config pc;
    fproxy_config_init(&pc);
    pc.upstream_host = pgserver_host(s);
    pc.upstream_port = pgserver_port(s);
    pc.seed = o->seed;
    if (fproxy_open(&pc, &b->proxy, e, sizeof e) < 0) {
        err(msg, len, "starting the fault proxy: %s", e);
        goto fail;
    }
    snprintf(b->ep.host, sizeof b->ep.host, "127.0.0.1");
    b->ep.port = fproxy_port(b->proxy);
    snprintf(b->ep.user, sizeof b->ep.user, "%s", pgserver_user(s));
    snprintf(b->ep.dbname, sizeof b->ep.dbname, "%s", pgserver_dbname(s));
    snprintf(b->password, sizeof b->password, "%s", pgserver_password(s));
    *out = b;
    return 0;
fail:
    backend_close(b);
    return -1;
}

const struct backend_endpoint *backend_endpoint(const struct backend *b)
{
    return &b->ep;
}

const char *backend_password(const struct backend *b)
{
    return b->password;
}

static enum fakepq_target fake_target(const struct scn_fault *f)
{
    return f->target == SCN_TARGET_IDLE   ? FAKEPQ_TARGET_IDLE
           : f->target == SCN_TARGET_CONN ? FAKEPQ_TARGET_ONE
                                          : FAKEPQ_TARGET_ALL;
}

static const char *target_word(const struct scn_fault *f)
{
    return f->target == SCN_TARGET_IDLE ? "idle" : f->target == SCN_TARGET_CONN ? "one" : "all";
}

/* Faults fakepq performs the same way on both backends. */
static int fakepq_fault(const struct scn_fault *f, char *msg, size_t len)
{
    int n;
    switch (f->kind) {
    case SCN_FAULT_CONNECT: {
        static const char *const words[] = {"refused", "hang",        "slow",     "auth",
                                            "hba",     "no-database", "too-many", "starting-up"};
        for (int k = 0; k < 8; k++) {
            if (strcmp(words[k], f->word) == 0) {
                if (fakepq_fault_connect((enum fakepq_connect_fault)k, f->nth, f->count,
                                         f->duration_ms) < 0)
                    return err(msg, len, "fakepq rejected the connect fault");
                return say(msg, len, "libpq: connect attempts %s %s", f->word,
                           f->count < 0 ? "from now on" : "as scripted");
            }
        }
        return err(msg, len, "unknown connect fault '%s'", f->word);
    }
    case SCN_FAULT_CALL:
        if (strcmp(f->word, "fail") == 0)
            n = fakepq_fault_call_fail(f->function, f->nth, f->count);
        else
            n = fakepq_fault_call_error(f->function, f->nth, f->count, f->word, NULL);
        if (n < 0)
            return err(msg, len, "fakepq does not know the function '%s'", f->function);
        return say(msg, len, "libpq: %s will %s", f->function,
                   strcmp(f->word, "fail") == 0 ? "fail" : "return an error");
    case SCN_FAULT_SLOW_CONNECT:
        if (fakepq_fault_connect(FAKEPQ_CONNECT_SLOW, FAKEPQ_NEXT, FAKEPQ_ALL, f->duration_ms) < 0)
            return err(msg, len, "fakepq rejected the slow-connect fault");
        return say(msg, len, "libpq: new connections take %dms", f->duration_ms);
    default:
        break;
    }
    return err(msg, len, "internal: not a fakepq fault");
}

static int fake_fault(struct backend *b, const struct scn_fault *f, const struct backend_target *t,
                      char *msg, size_t len)
{
    int id = t ? t->fakepq_id : 0;
    int n;
    switch (f->kind) {
    case SCN_FAULT_KILL:
        n = fakepq_break(fake_target(f), id, FAKEPQ_BREAK_FATAL);
        return say(msg, len, "fake: FATAL 57P01 sent to %d %s connection(s)", n, target_word(f));
    case SCN_FAULT_DROP:
        n = fakepq_break(fake_target(f), id, FAKEPQ_BREAK_EOF);
        return say(msg, len, "fake: %d %s connection(s) dropped (EOF)", n, target_word(f));
    case SCN_FAULT_PARTITION:
        n = fakepq_break(fake_target(f), id, FAKEPQ_BREAK_PARTITION);
        return say(msg, len, "fake: %d %s connection(s) partitioned", n, target_word(f));
    case SCN_FAULT_REFUSE:
        fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, FAKEPQ_ALL, 0);
        return say(msg, len, "fake: new connections refused");
    case SCN_FAULT_HANG_CONNECT:
        fakepq_fault_connect(FAKEPQ_CONNECT_HANG, FAKEPQ_NEXT, FAKEPQ_ALL, 0);
        return say(msg, len, "fake: new connections hang");
    case SCN_FAULT_LATENCY:
        fakepq_fault_query_delay(FAKEPQ_NEXT, FAKEPQ_ALL, f->duration_ms);
        return say(msg, len, "fake: every query takes %dms", f->duration_ms);
    case SCN_FAULT_RESTART:
    case SCN_FAULT_FAILOVER:
        /* A restart or a failover ends every session at once; the
         * simulated server accepts new ones right away. */
        n = fakepq_break(FAKEPQ_TARGET_ALL, 0,
                         f->immediate ? FAKEPQ_BREAK_EOF : FAKEPQ_BREAK_FATAL);
        return say(msg, len, "fake: server %s, %d session(s) ended",
                   f->kind == SCN_FAULT_FAILOVER ? "failed over" : "restarted", n);
    case SCN_FAULT_STOP:
        n = fakepq_break(FAKEPQ_TARGET_ALL, 0,
                         f->immediate ? FAKEPQ_BREAK_EOF : FAKEPQ_BREAK_FATAL);
        if (!b->stop_rule)
            b->stop_rule = fakepq_fault_connect(FAKEPQ_CONNECT_REFUSED, FAKEPQ_NEXT, FAKEPQ_ALL, 0);
        return say(msg, len, "fake: server stopped, %d session(s) ended, connections refused", n);
    case SCN_FAULT_START:
        if (b->stop_rule)
            (void)fakepq_rule_remove(b->stop_rule);
        b->stop_rule = 0;
        return say(msg, len, "fake: server accepting connections again");
    case SCN_FAULT_SERVER_PASSWORD:
        fakepq_sim_set_password("pgfault", f->text);
        return say(msg, len, "fake: role password changed");
    case SCN_FAULT_MAX_CONNECTIONS:
        /* As on the proxy backend's real server, one slot stays reserved
         * for the superuser, so the role gets N - 1 sessions. */
        fakepq_sim_set_max_connections(f->number > 1 ? f->number - 1 : 1);
        return say(msg, len, "fake: max_connections = %d (%d for the role)", f->number,
                   f->number > 1 ? f->number - 1 : 1);
    case SCN_FAULT_CONNECT:
    case SCN_FAULT_CALL:
    case SCN_FAULT_SLOW_CONNECT:
        return fakepq_fault(f, msg, len);
    case SCN_FAULT_INJECT:
    case SCN_FAULT__COUNT:
        break;
    }
    return err(msg, len, "the fake backend cannot do fault '%s'", scn_fault_name(f->kind));
}

static struct pgserver *current_server(struct backend *b)
{
    return b->servers[b->current];
}

static int proxy_target(const struct scn_fault *f, char *buf, size_t len)
{
    if (f->target == SCN_TARGET_IDLE)
        return snprintf(buf, len, "idle"), 0;
    snprintf(buf, len, "all");
    return 0;
}

/*
 * Server-side faults (stop, restart, pg_terminate_backend) are done when the
 * server says so, but the pool only learns of them once the proxy has
 * passed the server's close on to it. Without waiting for that, the step
 * after the fault races the proxy's thread, and on a loaded machine an
 * acquire can still find a connection that looks alive. These two take a
 * snapshot of the proxy's server-connected paths before the fault and wait
 * (bounded) until `want` of them are closed towards the pool. The fake
 * backend needs none of this: its faults reach the sockets at once.
 */
#define CLOSE_WAIT_MS 3000
#define SNAP_MAX 256

struct conn_snap {
    unsigned long long ids[SNAP_MAX];
    int n;
};

/* Acts on the proxy's path from the pool's client port (`reset conn ID`,
 * `blackhole conn ID`): how a foreign pool's connection is targeted. */
static int proxy_conn_cmd(struct backend *b, const struct backend_target *t, const char *what,
                          char *msg, size_t len)
{
    struct fproxy_conn_info ci[SNAP_MAX];
    int open = fproxy_conns(b->proxy, ci, SNAP_MAX);
    for (int i = 0; i < open && i < SNAP_MAX; i++)
        if (t->client_port > 0 && ci[i].client_port == t->client_port)
            return proxy_cmd(b, msg, len, "%s conn %llu", what, ci[i].id);
    return err(msg, len, "proxy: no open connection from the pool's port %d", t->client_port);
}

/* The proxy's open, server-connected paths (only the one from port
 * only_port, if not 0). */
static void snap_conns(struct backend *b, struct conn_snap *sn, int only_port)
{
    struct fproxy_conn_info ci[SNAP_MAX];
    int open = fproxy_conns(b->proxy, ci, SNAP_MAX);
    sn->n = 0;
    for (int i = 0; i < open && i < SNAP_MAX; i++)
        if (ci[i].upstream_connected && !ci[i].blackholed && !ci[i].server_closed &&
            (only_port == 0 || ci[i].client_port == only_port))
            sn->ids[sn->n++] = ci[i].id;
}

static int wait_closed(struct backend *b, const struct conn_snap *sn, int want, char *msg,
                       size_t len)
{
    struct fproxy_conn_info ci[SNAP_MAX];
    struct timespec t0, t;
    if (want > sn->n)
        want = sn->n;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int open = fproxy_conns(b->proxy, ci, SNAP_MAX), closed = 0;
        if (open < 0)
            return err(msg, len, "proxy: stopped while waiting for the server's close");
        for (int k = 0; k < sn->n; k++) {
            int still = 0;
            for (int i = 0; i < open && i < SNAP_MAX; i++)
                if (ci[i].id == sn->ids[k] && !ci[i].server_closed)
                    still = 1;
            closed += !still;
        }
        if (closed >= want)
            return 0;
        clock_gettime(CLOCK_MONOTONIC, &t);
        long long ms = (t.tv_sec - t0.tv_sec) * 1000LL + (t.tv_nsec - t0.tv_nsec) / 1000000;
        if (ms >= CLOSE_WAIT_MS)
            return err(msg, len,
                       "proxy: the server closed %d connection(s) but only %d of them reached "
                       "the pool within %d ms",
                       want, closed, CLOSE_WAIT_MS);
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
}

static int proxy_fault(struct backend *b, const struct scn_fault *f, const struct backend_target *t,
                       char *msg, size_t len)
{
    char e[512], tgt[32];
    struct pgserver *s = current_server(b);
    struct conn_snap snap;
    int n;
    switch (f->kind) {
    case SCN_FAULT_KILL:
        snap_conns(b, &snap, f->target == SCN_TARGET_CONN ? t->client_port : 0);
        if (f->target == SCN_TARGET_CONN) {
            if (snap.n != 1)
                return err(msg, len, "proxy: no open connection from the pool's port %d",
                           t->client_port);
            char sql[128];
            snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%ld)", t->backend_pid);
            if (pgserver_sql(s, sql, NULL, 0, e, sizeof e) < 0)
                return err(msg, len, "%s", e);
            if (wait_closed(b, &snap, 1, msg, len) < 0)
                return -1;
            return say(msg, len, "server: backend %ld terminated", t->backend_pid);
        }
        n = pgserver_terminate(
            s, f->target == SCN_TARGET_IDLE ? PGSERVER_BACKENDS_IDLE : PGSERVER_BACKENDS_ALL, NULL,
            e, sizeof e);
        if (n < 0)
            return err(msg, len, "%s", e);
        if (wait_closed(b, &snap, n, msg, len) < 0)
            return -1;
        return say(msg, len, "server: pg_terminate_backend on %d %s backend(s)", n, target_word(f));
    case SCN_FAULT_DROP:
        if (f->target == SCN_TARGET_CONN && t->fakepq_id > 0) {
            fakepq_break(FAKEPQ_TARGET_ONE, t->fakepq_id, FAKEPQ_BREAK_EOF);
            return say(msg, len, "libpq: connection dropped");
        }
        if (f->target == SCN_TARGET_CONN)
            return proxy_conn_cmd(b, t, "reset", msg, len);
        proxy_target(f, tgt, sizeof tgt);
        return proxy_cmd(b, msg, len, "reset %s", tgt);
    case SCN_FAULT_PARTITION: {
        if (f->target == SCN_TARGET_CONN && t->fakepq_id > 0) {
            fakepq_break(FAKEPQ_TARGET_ONE, t->fakepq_id, FAKEPQ_BREAK_PARTITION);
            return say(msg, len, "libpq: connection partitioned");
        }
        if (f->target == SCN_TARGET_CONN)
            return proxy_conn_cmd(b, t, "blackhole", msg, len);
        /* A partition of the connections open now: the proxy's
         * `blackhole all` would also swallow new connections, while the
         * scenario language (like the fake) means the existing paths. */
        struct fproxy_conn_info ci[SNAP_MAX];
        int open = fproxy_conns(b->proxy, ci, SNAP_MAX);
        int done = 0;
        for (int i = 0; i < open && i < SNAP_MAX; i++) {
            if (f->target == SCN_TARGET_IDLE && ci[i].phase != FPROXY_PHASE_READY)
                continue;
            if (proxy_cmd(b, msg, len, "blackhole conn %llu", ci[i].id) < 0)
                return -1;
            done++;
        }
        return say(msg, len, "proxy: %d %s connection(s) blackholed", done, target_word(f));
    }
    case SCN_FAULT_REFUSE:
        return proxy_cmd(b, msg, len, "refuse on");
    case SCN_FAULT_HANG_CONNECT:
        return proxy_cmd(b, msg, len, "hang-connect on");
    case SCN_FAULT_LATENCY:
        return proxy_cmd(b, msg, len, "latency %d", f->duration_ms);
    case SCN_FAULT_RESTART:
        snap_conns(b, &snap, 0);
        if (pgserver_restart(s, f->immediate ? PGSERVER_STOP_IMMEDIATE : PGSERVER_STOP_FAST, e,
                             sizeof e) < 0)
            return err(msg, len, "%s", e);
        if (wait_closed(b, &snap, snap.n, msg, len) < 0)
            return -1;
        return say(msg, len, "server: restarted (%s)", f->immediate ? "immediate" : "fast");
    case SCN_FAULT_STOP:
        snap_conns(b, &snap, 0);
        if (pgserver_stop(s, f->immediate ? PGSERVER_STOP_IMMEDIATE : PGSERVER_STOP_FAST, e,
                          sizeof e) < 0)
            return err(msg, len, "%s", e);
        if (wait_closed(b, &snap, snap.n, msg, len) < 0)
            return -1;
        return say(msg, len, "server: stopped (%s)", f->immediate ? "immediate" : "fast");
    case SCN_FAULT_START:
        if (pgserver_start(s, e, sizeof e) < 0)
            return err(msg, len, "%s", e);
        return say(msg, len, "server: started");
    case SCN_FAULT_FAILOVER: {
        if (b->nservers < 2)
            return err(msg, len, "no second server (internal: failover not detected at setup)");
        b->current = 1 - b->current;
        s = current_server(b);
        return proxy_cmd(b, msg, len, "retarget %s:%d reset", pgserver_host(s), pgserver_port(s));
    }
    case SCN_FAULT_SERVER_PASSWORD:
        for (int i = 0; i < b->nservers; i++)
            if (pgserver_set_password(b->servers[i], f->text, e, sizeof e) < 0)
                return err(msg, len, "%s", e);
        return say(msg, len, "server: role password changed");
    case SCN_FAULT_MAX_CONNECTIONS:
        snap_conns(b, &snap, 0);
        if (pgserver_set_max_connections(s, f->number, e, sizeof e) < 0 ||
            pgserver_restart(s, PGSERVER_STOP_FAST, e, sizeof e) < 0)
            return err(msg, len, "%s", e);
        if (wait_closed(b, &snap, snap.n, msg, len) < 0)
            return -1;
        return say(msg, len, "server: max_connections = %d (restarted)", f->number);
    case SCN_FAULT_INJECT:
        proxy_target(f, tgt, sizeof tgt);
        return proxy_cmd(b, msg, len, "inject fatal %s %s", f->sqlstate, tgt);
    case SCN_FAULT_CONNECT:
    case SCN_FAULT_CALL:
    case SCN_FAULT_SLOW_CONNECT:
        return fakepq_fault(f, msg, len);
    case SCN_FAULT__COUNT:
        break;
    }
    return err(msg, len, "the proxy backend cannot do fault '%s'", scn_fault_name(f->kind));
}

int backend_fault(struct backend *b, const struct scn_fault *f, const struct backend_target *t,
                  char *msg, size_t len)
{
    if (f->target == SCN_TARGET_CONN && !t)
        return err(msg, len, "internal: a fault on one connection without its facts");
    if (b->kind == SCN_BACKEND_FAKE)
        return fake_fault(b, f, t, msg, len);
    return proxy_fault(b, f, t, msg, len);
}

int backend_heal(struct backend *b, char *msg, size_t len)
{
    fakepq_heal();
    b->stop_rule = 0;
    if (b->kind == SCN_BACKEND_FAKE)
        return say(msg, len, "fake: every fault removed");
    return proxy_cmd(b, msg, len, "heal");
}

int backend_metric(struct backend *b, const char *source, const char *name, long long *v, char *msg,
                   size_t len)
{
    struct fakepq_counters fc;
    /* Pool-neutral counts of the server side, for any pool: connection
     * attempts that reached the server's address, and those it rejected at
     * authentication. Fake backend: fakepq's simulated server (a refused
     * attempt never reached it). Proxy backend: the connections the proxy
     * accepted, and the server's own log (pgserver_auth_failures). */
    if (strcmp(source, "server") == 0 &&
        (strcmp(name, "connect_attempts") == 0 || strcmp(name, "auth_failures") == 0 ||
         strcmp(name, "connect_failures") == 0)) {
        int attempts = strcmp(name, "connect_attempts") == 0;
        int failures = strcmp(name, "connect_failures") == 0;
        if (b->kind == SCN_BACKEND_FAKE) {
            fakepq_get_counters(&fc);
            long reached = fc.connect_attempts - fc.connect_outcomes[FAKEPQ_OUT_REFUSED];
            *v = attempts   ? reached
                 : failures ? reached - fc.connect_outcomes[FAKEPQ_OUT_OK]
                            : fc.connect_outcomes[FAKEPQ_OUT_AUTH];
            return 0;
        }
        if (attempts || failures) {
            struct fproxy_stats ps;
            if (fproxy_get_stats(b->proxy, &ps) < 0)
                return err(msg, len, "server.%s: the proxy has stopped", name);
            /* A failed connect is one the proxy saw end before the
             * server's first ReadyForQuery. */
            *v = (long long)(attempts ? ps.accepted : ps.ended_before_ready);
            return 0;
        }
        long long total = 0;
        for (int i = 0; i < b->nservers; i++) {
            long long n = 0;
            char e[512];
            if (pgserver_auth_failures(b->servers[i], &n, e, sizeof e) < 0)
                return err(msg, len, "server.auth_failures: %s", e);
            total += n;
        }
        *v = total;
        return 0;
    }
    if (strcmp(source, "libpq") == 0 ||
        (strcmp(source, "server") == 0 && b->kind == SCN_BACKEND_FAKE)) {
        fakepq_get_counters(&fc);
        static const char *const outs[FAKEPQ_OUT__COUNT] = {
            "ok",       "refused",     "auth",      "no_database",
            "too_many", "starting_up", "abandoned", "other"};
        if (strcmp(name, "connect_attempts") == 0)
            *v = fc.connect_attempts;
        else if (strcmp(name, "live_conns") == 0)
            *v = fc.live_conns;
        else if (strcmp(name, "backends") == 0)
            *v = fc.backends;
        else if (strcmp(name, "finished") == 0)
            *v = fc.finished;
        else if (strcmp(name, "double_finishes") == 0)
            *v = fc.double_finishes;
        else if (strcmp(name, "queries") == 0)
            *v = fc.queries;
        else if (strcmp(name, "results_live") == 0)
            *v = fc.results_live;
        else if (strncmp(name, "connect_", 8) == 0) {
            for (int i = 0; i < FAKEPQ_OUT__COUNT; i++) {
                if (strcmp(name + 8, outs[i]) == 0) {
                    *v = fc.connect_outcomes[i];
                    return 0;
                }
            }
            return err(msg, len,
                       "%s.%s: unknown (connect_ok, connect_refused, connect_auth, "
                       "connect_no_database, connect_too_many, connect_starting_up, "
                       "connect_abandoned, connect_other)",
                       source, name);
        } else
            return err(msg, len,
                       "%s.%s: unknown (connect_attempts, connect_<outcome>, live_conns, "
                       "backends, finished, double_finishes, queries, results_live)",
                       source, name);
        return 0;
    }
    if (strcmp(source, "server") == 0) {
        if (strcmp(name, "backends") != 0)
            return err(msg, len,
                       "server.%s: unknown (backends, connect_attempts, connect_failures, "
                       "auth_failures)",
                       name);
        char e[512];
        long long total = 0;
        for (int i = 0; i < b->nservers; i++) {
            if (!pgserver_running(b->servers[i]))
                continue;
            int n = pgserver_count_backends(b->servers[i], NULL, e, sizeof e);
            if (n < 0)
                return err(msg, len, "server.backends: %s", e);
            total += n;
        }
        *v = total;
        return 0;
    }
    if (strcmp(source, "proxy") == 0 && b->proxy) {
        struct fproxy_stats ps;
        if (fproxy_get_stats(b->proxy, &ps) < 0)
            return err(msg, len, "proxy.%s: the proxy has stopped", name);
        if (strcmp(name, "accepted") == 0)
            *v = (long long)ps.accepted;
        else if (strcmp(name, "refused") == 0)
            *v = (long long)ps.refused;
        else if (strcmp(name, "upstream_connects") == 0)
            *v = (long long)ps.upstream_connects;
        else if (strcmp(name, "upstream_failures") == 0)
            *v = (long long)ps.upstream_failures;
        else if (strcmp(name, "ended_before_ready") == 0)
            *v = (long long)ps.ended_before_ready;
        else if (strcmp(name, "active") == 0)
            *v = (long long)ps.active;
        else if (strcmp(name, "resets") == 0)
            *v = (long long)ps.resets;
        else if (strcmp(name, "injected") == 0)
            *v = (long long)ps.injected;
        else
            return err(msg, len,
                       "proxy.%s: unknown (accepted, refused, upstream_connects, "
                       "upstream_failures, ended_before_ready, active, resets, injected)",
                       name);
        return 0;
    }
    return err(msg, len, "unknown metric source '%s'", source);
}

void backend_close(struct backend *b)
{
    if (!b)
        return;
    if (b->proxy)
        fproxy_close(b->proxy);
    for (int i = 0; i < b->nservers; i++)
        pgserver_destroy(b->servers[i]);
    free(b->external);
    free(b);
}
