/*
 * The exec driver: a pool in its own process, driven over the driver
 * protocol. See exec.h for the contract and docs/driver-protocol.md for
 * the protocol. JSON is read and written with jansson.
 *
 * Threads: the callers (the case's steps, its worker and queue threads)
 * send requests and wait on a condition variable for their reply; one
 * reader thread owns the driver's stdout, one its stderr. The driver's
 * fate (crashed, hung) is set once, by whoever sees it first, and wakes
 * every waiter.
 */
#include "drivers/exec.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_DEADLINE_MS 10000 /* requests that do not wait on the pool */
#define GRACE_MS 5000             /* on top of a request's own timeout */
#define EXIT_WAIT_MS 2000         /* after stdin closes, before SIGKILL */
#define TAIL_LINES 3              /* the last stderr lines a crash report quotes ... */
#define HEAD_LINES 3 /* ... and the first ones (where a dying runtime names the cause) */

struct driver_conn {
    char handle[64];
    struct driver_conn *next;
};

struct pending {
    long long id;
    json_t *reply; /* set by the reader; owned by the waiter */
    struct pending *next;
};

struct driver {
    struct driver_start_args args;
    struct driver_info info;
    pid_t pid;
    int in_fd;  /* the driver's stdin */
    int out_fd; /* its stdout */
    int err_fd; /* its stderr */
    pthread_t reader, err_reader;
    int have_reader, have_err_reader;

    pthread_mutex_t lock; /* everything below */
    pthread_cond_t cond;
    pthread_mutex_t write_lock;
    long long next_id;
    struct pending *pending;
    int fate;      /* 0 fine, 1 crashed, 2 hung */
    char why[700]; /* what happened, for the case's verdict */
    int stopping;  /* destroy() asked it to exit: an exit is no crash */
    int reaped;
    int wstatus;
    int err_eof;                /* the stderr reader has read everything */
    char head[HEAD_LINES][300]; /* its first stderr lines */
    char tail[TAIL_LINES][200]; /* its last stderr lines */
    int ntail;
    int default_acquire_ms;
    struct driver_conn *conns;
};

__attribute__((format(printf, 3, 4))) static int bad(char *err, size_t len, const char *fmt, ...)
{
    if (err && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* The first and last stderr lines, joined, for a crash message. Lock
 * held. */
static void tail_text(struct driver *d, char *out, size_t len)
{
    out[0] = '\0';
    for (int i = 0; i < d->ntail && i < HEAD_LINES; i++) {
        size_t used = strlen(out);
        snprintf(out + used, len - used, "%s%s", used ? " | " : "", d->head[i]);
    }
    int first = d->ntail > TAIL_LINES ? d->ntail - TAIL_LINES : 0;
    if (first < HEAD_LINES)
        first = HEAD_LINES;
    if (first > HEAD_LINES) {
        size_t used = strlen(out);
        snprintf(out + used, len - used, " | ...");
    }
    for (int i = first; i < d->ntail; i++) {
        size_t used = strlen(out);
        snprintf(out + used, len - used, "%s%s", used ? " | " : "", d->tail[i % TAIL_LINES]);
    }
}

/* Sets the driver's fate once and wakes every waiter. Lock held. */
__attribute__((format(printf, 3, 4))) static void set_fate(struct driver *d, int fate,
                                                           const char *fmt, ...)
{
    if (d->fate || d->stopping)
        return;
    d->fate = fate;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->why, sizeof d->why, fmt, ap);
    va_end(ap);
    pthread_cond_broadcast(&d->cond);
}

/* Waits (bounded) for the driver process to exit, and records how. Lock
 * not held. Returns 1 if it has exited. */
static int reap(struct driver *d, int wait_ms)
{
    double end = now_ms() + wait_ms;
    for (;;) {
        pthread_mutex_lock(&d->lock);
        int done = d->reaped;
        pthread_mutex_unlock(&d->lock);
        if (done)
            return 1;
        int ws;
        pid_t r = waitpid(d->pid, &ws, WNOHANG);
        if (r == d->pid || (r < 0 && errno == ECHILD)) {
            pthread_mutex_lock(&d->lock);
            d->reaped = 1;
            d->wstatus = r == d->pid ? ws : 0;
            pthread_mutex_unlock(&d->lock);
            return 1;
        }
        if (now_ms() >= end)
            return 0;
        nanosleep(&(struct timespec){0, 5 * 1000 * 1000}, NULL);
    }
}

/* Handles one line of the driver's stdout. Lock not held. */
static void handle_line(struct driver *d, const char *line)
{
    json_error_t je;
    json_t *msg = json_loads(line, 0, &je);
    if (!msg || !json_is_object(msg)) {
        pthread_mutex_lock(&d->lock);
        set_fate(d, 1, "wrote a line that is not a JSON object: '%.200s'%s", line,
                 msg ? "" : " (not JSON)");
        pthread_mutex_unlock(&d->lock);
        json_decref(msg);
        return;
    }
    json_t *ev = json_object_get(msg, "event");
    if (json_is_string(ev)) {
        const char *m = json_string_value(json_object_get(msg, "message"));
        json_t *conn = json_object_get(msg, "conn");
        char text[700], cb[80] = "";
        if (json_is_string(conn))
            snprintf(cb, sizeof cb, " [conn %s]", json_string_value(conn));
        else if (json_is_integer(conn))
            snprintf(cb, sizeof cb, " [conn %lld]", (long long)json_integer_value(conn));
        snprintf(text, sizeof text, "%s%s%s%s", json_string_value(ev), m ? ": " : "", m ? m : "",
                 cb);
        for (char *c = text; *c; c++)
            if (*c == '\n' || *c == '\t')
                *c = ' ';
        if (d->args.event)
            d->args.event(d->args.ctx, text);
        json_decref(msg);
        return;
    }
    json_t *id = json_object_get(msg, "id");
    pthread_mutex_lock(&d->lock);
    struct pending *p = NULL;
    if (json_is_integer(id))
        for (p = d->pending; p && p->id != json_integer_value(id); p = p->next)
            ;
    if (!p || p->reply) {
        set_fate(d, 1, "wrote a reply to no request in flight%s: '%.200s'",
                 !json_is_integer(id) ? " (no integer id, no event)"
                 : p                  ? " (a second reply)"
                                      : "",
                 line);
        pthread_mutex_unlock(&d->lock);
        json_decref(msg);
        return;
    }
    p->reply = msg;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
}

/* Reads lines from fd, calling fn for each. Long lines are allowed (a
 * reply quoting a big error); the buffer grows. */
static void read_lines(struct driver *d, int fd, void (*fn)(struct driver *, const char *))
{
    size_t cap = 8192, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf)
            return;
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb)
                break;
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', len - (size_t)(start - buf))) != NULL) {
            *nl = '\0';
            if (nl > start && nl[-1] == '\r')
                nl[-1] = '\0';
            if (*start)
                fn(d, start);
            start = nl + 1;
        }
        len -= (size_t)(start - buf);
        memmove(buf, start, len);
    }
    if (len) {
        buf[len] = '\0';
        fn(d, buf);
    }
    free(buf);
}

static void *reader_main(void *arg)
{
    struct driver *d = arg;
    read_lines(d, d->out_fd, handle_line);
    /* Its stdout closed: it exited (or is about to), or closed stdout on
     * its own, which no working driver does. */
    int gone = reap(d, EXIT_WAIT_MS);
    pthread_mutex_lock(&d->lock);
    /* A dying runtime may still be writing its last words to stderr: let
     * the stderr reader finish (bounded) before quoting them. */
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 500L * 1000 * 1000;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    while (!d->err_eof && pthread_cond_timedwait(&d->cond, &d->lock, &until) == 0)
        ;
    char tail[1600];
    tail_text(d, tail, sizeof tail);
    if (!gone)
        set_fate(d, 1, "closed its stdout but kept running%s%s", tail[0] ? "; stderr: " : "", tail);
    else if (WIFSIGNALED(d->wstatus))
        set_fate(d, 1, "killed by signal %d (%s)%s%s", WTERMSIG(d->wstatus),
                 strsignal(WTERMSIG(d->wstatus)), tail[0] ? "; stderr: " : "", tail);
    else
        set_fate(d, 1, "exited with status %d%s%s",
                 WIFEXITED(d->wstatus) ? WEXITSTATUS(d->wstatus) : -1, tail[0] ? "; stderr: " : "",
                 tail);
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

static void handle_err_line(struct driver *d, const char *line)
{
    pthread_mutex_lock(&d->lock);
    if (d->ntail < HEAD_LINES)
        snprintf(d->head[d->ntail], sizeof d->head[0], "%s", line);
    snprintf(d->tail[d->ntail % TAIL_LINES], sizeof d->tail[0], "%s", line);
    d->ntail++;
    pthread_mutex_unlock(&d->lock);
    if (d->args.log)
        d->args.log(d->args.ctx, line);
}

static void *err_reader_main(void *arg)
{
    struct driver *d = arg;
    read_lines(d, d->err_fd, handle_err_line);
    pthread_mutex_lock(&d->lock);
    d->err_eof = 1;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    return NULL;
}

/* Writes all of buf to the driver's stdin by the deadline. */
static int write_all(struct driver *d, const char *buf, size_t len, double deadline)
{
    while (len) {
        ssize_t n = write(d->in_fd, buf, len);
        if (n > 0) {
            buf += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN)
            return -1;
        double left = deadline - now_ms();
        if (left <= 0)
            return -2;
        struct pollfd pfd = {d->in_fd, POLLOUT, 0};
        (void)poll(&pfd, 1, left > 100 ? 100 : (int)left + 1);
    }
    return 0;
}

/*
 * Sends req (stolen) with a new id and waits for its reply. Returns the
 * reply (caller decrefs) when it says "ok": true; NULL with err otherwise:
 * an "ok": false reply's error, or the driver's fate. A missed deadline
 * makes the driver hung.
 */
static json_t *request(struct driver *d, json_t *req, int deadline_ms, char *err, size_t len)
{
    const char *op = json_string_value(json_object_get(req, "op"));
    char opname[32];
    snprintf(opname, sizeof opname, "%s", op ? op : "?");
    struct pending p = {0};
    pthread_mutex_lock(&d->lock);
    if (d->fate) {
        bad(err, len, "%s", d->why);
        pthread_mutex_unlock(&d->lock);
        json_decref(req);
        return NULL;
    }
    p.id = ++d->next_id;
    p.next = d->pending;
    d->pending = &p;
    pthread_mutex_unlock(&d->lock);

    json_object_set_new(req, "id", json_integer(p.id));
    char *text = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    double deadline = now_ms() + deadline_ms;
    int wrc = -1;
    if (text) {
        size_t tl = strlen(text);
        char *line = realloc(text, tl + 2);
        if (line) {
            text = line;
            text[tl] = '\n';
            text[tl + 1] = '\0';
            pthread_mutex_lock(&d->write_lock);
            wrc = write_all(d, text, tl + 1, deadline);
            pthread_mutex_unlock(&d->write_lock);
        }
        free(text);
    }

    pthread_mutex_lock(&d->lock);
    if (wrc == -2)
        set_fate(d, 2, "stopped reading its stdin: '%s' (id %lld) could not be sent in %d ms",
                 opname, p.id, deadline_ms);
    else if (wrc < 0 && !d->fate) {
        /* EPIPE: it is gone; the reader will say how. Give it a moment. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += EXIT_WAIT_MS / 1000 + 1;
        while (!d->fate && pthread_cond_timedwait(&d->cond, &d->lock, &ts) == 0)
            ;
        set_fate(d, 1, "its stdin is closed ('%s' could not be sent)", opname);
    }
    while (!p.reply && !d->fate) {
        double left = deadline - now_ms();
        if (left <= 0) {
            set_fate(d, 2, "no answer to '%s' (id %lld) within %.1f s", opname, p.id,
                     deadline_ms / 1000.0);
            break;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long ns = ts.tv_nsec + (long long)((left > 50 ? 50 : left) * 1e6);
        ts.tv_sec += (time_t)(ns / 1000000000);
        ts.tv_nsec = (long)(ns % 1000000000);
        pthread_cond_timedwait(&d->cond, &d->lock, &ts);
    }
    for (struct pending **pp = &d->pending; *pp; pp = &(*pp)->next) {
        if (*pp == &p) {
            *pp = p.next;
            break;
        }
    }
    json_t *reply = p.reply;
    if (!reply) {
        bad(err, len, "%s", d->why);
        pthread_mutex_unlock(&d->lock);
        return NULL;
    }
    pthread_mutex_unlock(&d->lock);
    json_t *ok = json_object_get(reply, "ok");
    if (!json_is_boolean(ok)) {
        pthread_mutex_lock(&d->lock);
        set_fate(d, 1, "its reply to '%s' has no boolean \"ok\"", opname);
        bad(err, len, "%s", d->why);
        pthread_mutex_unlock(&d->lock);
        json_decref(reply);
        return NULL;
    }
    if (!json_is_true(ok)) {
        const char *e = json_string_value(json_object_get(reply, "error"));
        bad(err, len, "%s: %s", opname, e ? e : "(the driver's error reply has no \"error\")");
        json_decref(reply);
        return NULL;
    }
    return reply;
}

static json_t *op(const char *name)
{
    json_t *o = json_object();
    json_object_set_new(o, "op", json_string(name));
    return o;
}

static const char *str(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

/* ---- hello ------------------------------------------------------------------ */

static int parse_hello(struct driver *d, json_t *r, char *err, size_t len)
{
    struct driver_info *in = &d->info;
    json_t *proto = json_object_get(r, "protocol");
    if (!json_is_integer(proto))
        return bad(err, len, "hello: the reply has no integer \"protocol\"");
    if (json_integer_value(proto) != DRIVER_PROTOCOL_VERSION)
        return bad(err, len, "hello: the driver speaks protocol %lld, pgfault speaks %d",
                   (long long)json_integer_value(proto), DRIVER_PROTOCOL_VERSION);
    snprintf(in->driver, sizeof in->driver, "%s", str(r, "driver"));
    snprintf(in->pool, sizeof in->pool, "%s", str(r, "pool"));
    snprintf(in->version, sizeof in->version, "%s", str(r, "version"));
    if (!in->driver[0] || !in->pool[0])
        return bad(err, len, "hello: \"driver\" and \"pool\" must be non-empty strings");
    json_t *settings = json_object_get(r, "settings");
    if (!json_is_object(settings))
        return bad(err, len, "hello: \"settings\" must be an object of pool keys");
    const char *key;
    json_t *v;
    json_object_foreach(settings, key, v)
    {
        if (in->nkeys == DRIVER_MAX_KEYS)
            return bad(err, len, "hello: more than %d settings", DRIVER_MAX_KEYS);
        const char *status = str(v, "status");
        enum driver_key_status st;
        if (strcmp(status, "mapped") == 0)
            st = DRIVER_KEY_MAPPED;
        else if (strcmp(status, "ignored") == 0)
            st = DRIVER_KEY_IGNORED;
        else if (strcmp(status, "unsupported") == 0)
            st = DRIVER_KEY_UNSUPPORTED;
        else
            return bad(err, len,
                       "hello: settings.%s.status is '%s' (expected mapped, ignored or "
                       "unsupported)",
                       key, status);
        snprintf(in->keys[in->nkeys].key, sizeof in->keys[0].key, "%s", key);
        in->keys[in->nkeys].status = st;
        snprintf(in->keys[in->nkeys].detail, sizeof in->keys[0].detail, "%s",
                 st == DRIVER_KEY_MAPPED ? str(v, "option") : str(v, "reason"));
        in->nkeys++;
    }
    json_t *metrics = json_object_get(r, "metrics");
    if (!json_is_array(metrics))
        return bad(err, len, "hello: \"metrics\" must be an array of names");
    size_t i;
    json_array_foreach(metrics, i, v)
    {
        if (!json_is_string(v) || in->nmetrics == DRIVER_MAX_METRICS)
            return bad(err, len, "hello: metrics[%zu] is not a name (or more than %d)", i,
                       DRIVER_MAX_METRICS);
        snprintf(in->metrics[in->nmetrics++], sizeof in->metrics[0], "%s", json_string_value(v));
    }
    json_t *ds = json_object_get(r, "driver_settings");
    if (ds && !json_is_null(ds)) {
        if (!json_is_object(ds))
            return bad(err, len, "hello: \"driver_settings\" must be an object");
        json_object_foreach(ds, key, v)
        {
            if (in->ndsettings == DRIVER_MAX_DSETTINGS)
                return bad(err, len, "hello: more than %d driver settings", DRIVER_MAX_DSETTINGS);
            typeof(in->dsettings[0]) *d0 = &in->dsettings[in->ndsettings];
            snprintf(d0->key, sizeof d0->key, "%s", key);
            json_t *vals = json_object_get(v, "values");
            const char *def = json_string_value(json_object_get(v, "default"));
            if (!json_is_array(vals) || json_array_size(vals) == 0 || !def)
                return bad(err, len,
                           "hello: driver_settings.%s needs \"values\" (an array of words) and "
                           "a \"default\"",
                           key);
            size_t j;
            json_t *w;
            int def_ok = 0;
            json_array_foreach(vals, j, w)
            {
                if (!json_is_string(w) || d0->nvalues == DRIVER_MAX_DVALUES)
                    return bad(err, len, "hello: driver_settings.%s.values[%zu] is not a word", key,
                               j);
                snprintf(d0->values[d0->nvalues++], sizeof d0->values[0], "%s",
                         json_string_value(w));
                def_ok |= strcmp(json_string_value(w), def) == 0;
            }
            if (!def_ok)
                return bad(err, len, "hello: driver_settings.%s: default '%s' is not a value", key,
                           def);
            snprintf(d0->def, sizeof d0->def, "%s", def);
            snprintf(d0->meaning, sizeof d0->meaning, "%s", str(v, "meaning"));
            in->ndsettings++;
        }
    }
    json_t *caps = json_object_get(r, "capabilities");
    if (!json_is_array(caps))
        return bad(err, len, "hello: \"capabilities\" must be an array");
    json_array_foreach(caps, i, v)
    {
        int found = 0;
        for (int k = 0; k < DRIVER_NCAPS; k++) {
            enum driver_cap c = (enum driver_cap)(1u << k);
            if (c != DRIVER_CAP_FAKEPQ && json_is_string(v) &&
                strcmp(json_string_value(v), driver_cap_name(c)) == 0) {
                in->caps |= c;
                found = 1;
            }
        }
        if (!found)
            return bad(err, len, "hello: unknown capability '%s'",
                       json_is_string(v) ? json_string_value(v) : "(not a string)");
    }
    return 0;
}

/* ---- Operations ---------------------------------------------------------------- */

static void exec_destroy(struct driver *d);
static int exec_fate(struct driver *d, char *why, size_t len);

static int exec_start(const struct driver_start_args *a, struct driver **out, char *err, size_t len)
{
    *out = NULL;
    if (!a->command || !*a->command)
        return bad(err, len, "exec driver: no command");
    struct driver *d = calloc(1, sizeof *d);
    if (!d)
        return bad(err, len, "out of memory");
    d->args = *a;
    d->pid = -1;
    d->in_fd = d->out_fd = d->err_fd = -1;
    d->default_acquire_ms = 30000;
    pthread_mutex_init(&d->lock, NULL);
    pthread_mutex_init(&d->write_lock, NULL);
    pthread_cond_init(&d->cond, NULL);
    /* A driver that dies turns writes to its stdin into EPIPE, not a
     * SIGPIPE that would kill the case. (The pool is in the driver's
     * process, so this hides nothing of the pool's.) */
    signal(SIGPIPE, SIG_IGN);

    int in[2] = {-1, -1}, outp[2] = {-1, -1}, errp[2] = {-1, -1};
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) {
        bad(err, len, "exec driver: pipe: %s", strerror(errno));
        goto fail_pipes;
    }
    char *cmd = NULL;
    if (asprintf(&cmd, "exec %s", a->command) < 0) {
        bad(err, len, "out of memory");
        goto fail_pipes;
    }
    fflush(NULL);
    d->pid = fork();
    if (d->pid < 0) {
        bad(err, len, "exec driver: fork: %s", strerror(errno));
        free(cmd);
        goto fail_pipes;
    }
    if (d->pid == 0) {
        /* Stays in the case's process group; the default SIGPIPE again;
         * and dies with the case's main thread (which forks drivers) even
         * if nobody gets to kill it. */
        signal(SIGPIPE, SIG_DFL);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        dup2(in[0], 0);
        dup2(outp[1], 1);
        dup2(errp[1], 2);
        setenv("PGFAULT_DRIVER_PROTOCOL", "1", 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        dprintf(2, "exec driver: /bin/sh: %s\n", strerror(errno));
        _exit(127);
    }
    free(cmd);
    close(in[0]);
    close(outp[1]);
    close(errp[1]);
    d->in_fd = in[1];
    d->out_fd = outp[0];
    d->err_fd = errp[0];
    fcntl(d->in_fd, F_SETFL, fcntl(d->in_fd, F_GETFL) | O_NONBLOCK);
    if (pthread_create(&d->reader, NULL, reader_main, d) != 0) {
        bad(err, len, "exec driver: cannot start a thread");
        goto fail;
    }
    d->have_reader = 1;
    if (pthread_create(&d->err_reader, NULL, err_reader_main, d) != 0) {
        bad(err, len, "exec driver: cannot start a thread");
        goto fail;
    }
    d->have_err_reader = 1;

    json_t *h = op("hello");
    json_object_set_new(h, "protocol", json_integer(DRIVER_PROTOCOL_VERSION));
    char e[700];
    json_t *r = request(d, h, DEFAULT_DEADLINE_MS, e, sizeof e);
    if (!r) {
        /* An error reply already names the request ("hello: ..."). */
        bad(err, len, "driver '%s': %s%s", a->command, strncmp(e, "hello: ", 7) ? "hello: " : "",
            e);
        int fate = exec_fate(d, NULL, 0);
        exec_destroy(d);
        return fate == 1 ? DRIVER_CRASHED : fate == 2 ? DRIVER_HUNG : -1;
    }
    int rc = parse_hello(d, r, e, sizeof e);
    json_decref(r);
    if (rc < 0) {
        bad(err, len, "driver '%s': %s", a->command, e);
        goto fail;
    }
    *out = d;
    return 0;
fail_pipes:
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0)
            close(in[i]);
        if (outp[i] >= 0)
            close(outp[i]);
        if (errp[i] >= 0)
            close(errp[i]);
    }
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->write_lock);
    pthread_mutex_destroy(&d->lock);
    free(d);
    return -1;
fail:
    exec_destroy(d);
    return -1;
}

static const struct driver_info *exec_info(struct driver *d)
{
    return &d->info;
}

static int exec_open(struct driver *d, const struct driver_open_args *a, char *err, size_t len)
{
    json_t *o = op("open");
    json_object_set_new(o, "host", json_string(a->host));
    json_object_set_new(o, "port", json_integer(a->port));
    json_object_set_new(o, "user", json_string(a->user));
    json_object_set_new(o, "dbname", json_string(a->dbname));
    json_object_set_new(o, "password", json_string(a->password ? a->password : ""));
    json_t *set = json_object();
    for (size_t i = 0; i < a->nsettings; i++) {
        const struct scn_setting *s = &a->settings[i];
        json_object_set_new(set, s->key,
                            s->number >= 0 ? json_integer(s->number) : json_string(s->value));
        if (strcmp(s->key, "acquire_timeout") == 0 && s->number >= 0)
            d->default_acquire_ms = (int)s->number;
    }
    json_object_set_new(o, "settings", set);
    json_t *dset = json_object();
    for (size_t i = 0; i < a->ndriver_settings; i++) {
        const char *eq = strchr(a->driver_settings[i], '=');
        if (!eq)
            continue;
        char k[64];
        snprintf(k, sizeof k, "%.*s", (int)(eq - a->driver_settings[i]), a->driver_settings[i]);
        json_object_set_new(dset, k, json_string(eq + 1));
    }
    json_object_set_new(o, "driver_settings", dset);
    json_t *r = request(d, o, DEFAULT_DEADLINE_MS + d->default_acquire_ms, err, len);
    if (!r)
        return -1;
    const char *na = json_string_value(json_object_get(r, "na"));
    int rc = 0;
    if (na) {
        bad(err, len, "%s", na);
        rc = DRIVER_NA;
    }
    json_decref(r);
    return rc;
}

static enum driver_outcome outcome_from(const char *s)
{
    static const struct {
        const char *word;
        enum driver_outcome o;
    } m[] = {{"ok", DRIVER_OK},           {"timeout", DRIVER_TIMEOUT}, {"auth", DRIVER_AUTH},
             {"connect", DRIVER_CONNECT}, {"config", DRIVER_CONFIG},   {"closed", DRIVER_CLOSED}};
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++)
        if (strcmp(s, m[i].word) == 0)
            return m[i].o;
    return DRIVER_OTHER;
}

/*
 * The pool's own time from a reply's elapsed_us, in milliseconds. The
 * runner's bounds judge it, so it must be there and must be plausible: a
 * missing one, or one longer than the whole round trip (milliseconds or
 * nanoseconds sent as microseconds), is a protocol violation that makes
 * the driver crashed. Returns 0, or -1 with the fate set.
 */
static int elapsed_of(struct driver *d, json_t *r, const char *opname, double roundtrip_ms,
                      double *out)
{
    json_t *e = json_object_get(r, "elapsed_us");
    double ms = json_is_integer(e) ? (double)json_integer_value(e) / 1000.0
                : json_is_real(e)  ? json_real_value(e) / 1000.0
                                   : -1;
    const char *why = ms < 0 ? "has no elapsed_us (microseconds around the pool call)"
                      : ms > roundtrip_ms + 1.0 ? "has an elapsed_us longer than its round trip "
                                                  "(not microseconds?)"
                                                : NULL;
    if (!why) {
        *out = ms;
        return 0;
    }
    pthread_mutex_lock(&d->lock);
    set_fate(d, 1, "its reply to '%s' %s: %.3f ms reported, %.3f ms round trip", opname, why, ms,
             roundtrip_ms);
    pthread_mutex_unlock(&d->lock);
    return -1;
}

static enum driver_outcome exec_acquire(struct driver *d, int timeout_ms, struct driver_conn **out,
                                        double *elapsed_ms, char *err, size_t len)
{
    *out = NULL;
    json_t *o = op("acquire");
    json_object_set_new(o, "timeout_ms", timeout_ms >= 0 ? json_integer(timeout_ms) : json_null());
    double t = now_ms();
    char e[700];
    json_t *r = request(d, o, (timeout_ms >= 0 ? timeout_ms : d->default_acquire_ms) + GRACE_MS, e,
                        sizeof e);
    *elapsed_ms = now_ms() - t;
    if (!r) {
        bad(err, len, "%s", e);
        return exec_fate(d, NULL, 0) ? DRIVER_BROKEN : DRIVER_OTHER;
    }
    if (elapsed_of(d, r, "acquire", *elapsed_ms, elapsed_ms) < 0) {
        json_decref(r);
        exec_fate(d, err, len);
        return DRIVER_BROKEN;
    }
    enum driver_outcome oc = outcome_from(str(r, "outcome"));
    bad(err, len, "%s", str(r, "message"));
    if (oc == DRIVER_OK) {
        json_t *c = json_object_get(r, "conn");
        struct driver_conn *h = calloc(1, sizeof *h);
        if (!h || !(json_is_string(c) || json_is_integer(c)) ||
            (json_is_string(c) && strlen(json_string_value(c)) >= sizeof h->handle)) {
            free(h);
            json_decref(r);
            /* The pool handed out a connection nobody can name: that is
             * the driver breaking the protocol, not the pool failing. */
            pthread_mutex_lock(&d->lock);
            set_fate(d, 1,
                     "its reply to 'acquire' is ok without a usable \"conn\" handle (a "
                     "string under %zu bytes)",
                     sizeof h->handle);
            pthread_mutex_unlock(&d->lock);
            exec_fate(d, err, len);
            return DRIVER_BROKEN;
        }
        if (json_is_string(c))
            snprintf(h->handle, sizeof h->handle, "%s", json_string_value(c));
        else
            snprintf(h->handle, sizeof h->handle, "%lld", (long long)json_integer_value(c));
        pthread_mutex_lock(&d->lock);
        h->next = d->conns;
        d->conns = h;
        pthread_mutex_unlock(&d->lock);
        *out = h;
    }
    json_decref(r);
    return oc;
}

/* Sends o and turns its reply's "outcome": "error" into -1 with the
 * pool's message: for operations whose failure is the pool's answer. */
static int outcome_call(struct driver *d, json_t *o, int deadline_ms, char *err, size_t len)
{
    json_t *r = request(d, o, deadline_ms, err, len);
    if (!r)
        return -1;
    int rc = 0;
    if (err && len)
        err[0] = '\0'; /* an ok reply leaves no earlier message behind */
    if (strcmp(str(r, "outcome"), "error") == 0)
        rc = bad(err, len, "%s", str(r, "message"));
    json_decref(r);
    return rc;
}

static int give_back(struct driver *d, const char *name, struct driver_conn *c, char *err,
                     size_t len)
{
    json_t *o = op(name);
    json_object_set_new(o, "conn", json_string(c->handle));
    return outcome_call(d, o, DEFAULT_DEADLINE_MS, err, len);
}

static int exec_release(struct driver *d, struct driver_conn *c, char *err, size_t len)
{
    return give_back(d, "release", c, err, len);
}

static int exec_discard(struct driver *d, struct driver_conn *c, char *err, size_t len)
{
    return give_back(d, "discard", c, err, len);
}

static void fill_result(struct driver *d, json_t *r, const char *opname, double roundtrip_ms,
                        struct driver_result *res)
{
    const char *oc = str(r, "outcome");
    res->outcome = strcmp(oc, "ok") == 0        ? DRIVER_Q_OK
                   : strcmp(oc, "timeout") == 0 ? DRIVER_Q_TIMEOUT
                                                : DRIVER_Q_ERROR;
    snprintf(res->sqlstate, sizeof res->sqlstate, "%s", str(r, "sqlstate"));
    snprintf(res->message, sizeof res->message, "%s", str(r, "message"));
    if (elapsed_of(d, r, opname, roundtrip_ms, &res->elapsed_ms) < 0) {
        res->outcome = DRIVER_Q_BROKEN;
        exec_fate(d, res->message, sizeof res->message);
    }
}

static int exec_query(struct driver *d, struct driver_conn *c, const char *sql, int timeout_ms,
                      struct driver_result *res)
{
    memset(res, 0, sizeof *res);
    json_t *o = op("query");
    json_object_set_new(o, "conn", json_string(c->handle));
    json_object_set_new(o, "sql", json_string(sql));
    json_object_set_new(o, "timeout_ms", json_integer(timeout_ms));
    double t = now_ms();
    json_t *r = request(d, o, timeout_ms + GRACE_MS, res->message, sizeof res->message);
    res->elapsed_ms = now_ms() - t;
    if (!r) {
        res->outcome = DRIVER_Q_BROKEN;
        return exec_fate(d, NULL, 0) ? -1 : 0;
    }
    fill_result(d, r, "query", res->elapsed_ms, res);
    json_decref(r);
    return res->outcome == DRIVER_Q_BROKEN ? -1 : 0;
}

static int exec_conn_info(struct driver *d, struct driver_conn *c, struct driver_conn_info *out,
                          char *err, size_t len)
{
    *out = (struct driver_conn_info){-1, -1, DRIVER_TX_NONE, 0};
    json_t *o = op("conn_info");
    json_object_set_new(o, "conn", json_string(c->handle));
    json_t *r = request(d, o, DEFAULT_DEADLINE_MS, err, len);
    if (!r)
        return -1;
    json_t *v;
    if (json_is_integer(v = json_object_get(r, "backend_pid")))
        out->backend_pid = (long)json_integer_value(v);
    if (json_is_integer(v = json_object_get(r, "client_port")))
        out->client_port = (int)json_integer_value(v);
    static const char *const tx[] = {"idle", "active", "intrans", "inerror", "unknown"};
    const char *t = json_string_value(json_object_get(r, "txstatus"));
    for (int i = 0; t && i < 5; i++)
        if (strcmp(t, tx[i]) == 0)
            out->txstatus = (enum driver_txstatus)i;
    json_decref(r);
    return 0;
}

static int exec_health(struct driver *d, int timeout_ms, struct driver_result *res)
{
    memset(res, 0, sizeof *res);
    json_t *o = op("health");
    json_object_set_new(o, "timeout_ms", json_integer(timeout_ms));
    double t = now_ms();
    json_t *r = request(d, o, timeout_ms + GRACE_MS, res->message, sizeof res->message);
    if (!r) {
        res->outcome = DRIVER_Q_BROKEN;
        return exec_fate(d, NULL, 0) ? -1 : 0;
    }
    fill_result(d, r, "health", now_ms() - t, res);
    json_decref(r);
    return res->outcome == DRIVER_Q_BROKEN ? -1 : 0;
}

static int exec_metric(struct driver *d, const char *name, long long *value)
{
    json_t *o = op("metric");
    json_object_set_new(o, "name", json_string(name));
    json_t *r = request(d, o, DEFAULT_DEADLINE_MS, NULL, 0);
    if (!r)
        return -1;
    json_t *v = json_object_get(r, "value");
    int rc = json_is_integer(v) ? 0 : -1;
    if (rc == 0)
        *value = (long long)json_integer_value(v);
    json_decref(r);
    return rc;
}

static int simple(struct driver *d, json_t *o, int deadline_ms, char *err, size_t len)
{
    json_t *r = request(d, o, deadline_ms, err, len);
    if (!r)
        return -1;
    json_decref(r);
    return 0;
}

static int exec_maintain(struct driver *d, char *err, size_t len)
{
    return simple(d, op("maintain"), DEFAULT_DEADLINE_MS, err, len);
}

static int exec_password(struct driver *d, const char *pw, char *err, size_t len)
{
    json_t *o = op("password");
    json_object_set_new(o, "password", json_string(pw));
    return simple(d, o, DEFAULT_DEADLINE_MS, err, len);
}

static int exec_invariants(struct driver *d, char *err, size_t len)
{
    json_t *r = request(d, op("invariants"), DEFAULT_DEADLINE_MS, err, len);
    if (!r)
        return -1;
    const char *v = json_string_value(json_object_get(r, "violation"));
    int rc = v ? bad(err, len, "%s", v) : 0;
    json_decref(r);
    return rc;
}

static int exec_close(struct driver *d, char *err, size_t len)
{
    /* Closing may wait for connections in use to come back. */
    return outcome_call(d, op("close"), DEFAULT_DEADLINE_MS + d->default_acquire_ms, err, len);
}

static void exec_destroy(struct driver *d)
{
    if (!d)
        return;
    /* The contract (driver.h) says no operation is in flight; should one
     * be, it is woken with a fate rather than left to its deadline. */
    pthread_mutex_lock(&d->lock);
    set_fate(d, 1, "the driver was stopped");
    d->stopping = 1;
    pthread_mutex_unlock(&d->lock);
    pthread_mutex_lock(&d->write_lock);
    if (d->in_fd >= 0) {
        close(d->in_fd); /* end of stdin: the driver exits */
        d->in_fd = -1;
    }
    pthread_mutex_unlock(&d->write_lock);
    if (d->pid > 0 && !reap(d, EXIT_WAIT_MS)) {
        kill(d->pid, SIGKILL);
        (void)reap(d, EXIT_WAIT_MS);
    }
    if (d->have_reader)
        pthread_join(d->reader, NULL);
    if (d->have_err_reader)
        pthread_join(d->err_reader, NULL);
    if (d->out_fd >= 0)
        close(d->out_fd);
    if (d->err_fd >= 0)
        close(d->err_fd);
    while (d->conns) {
        struct driver_conn *n = d->conns->next;
        free(d->conns);
        d->conns = n;
    }
    pthread_cond_destroy(&d->cond);
    pthread_mutex_destroy(&d->write_lock);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

static int exec_fate(struct driver *d, char *why, size_t len)
{
    pthread_mutex_lock(&d->lock);
    int f = d->fate;
    if (f && why && len)
        snprintf(why, len, "%.*s", (int)(len - 1 < sizeof d->why ? len - 1 : sizeof d->why),
                 d->why);
    pthread_mutex_unlock(&d->lock);
    return f;
}

int exec_driver_raw(struct driver *d, const char *op_json, int deadline_ms, char *reply,
                    size_t replylen, char *err, size_t errlen)
{
    json_error_t je;
    json_t *o = json_loads(op_json, 0, &je);
    if (!o)
        return bad(err, errlen, "internal: bad JSON %s", op_json);
    json_t *r = request(d, o, deadline_ms, err, errlen);
    if (r) {
        char *t = json_dumps(r, JSON_COMPACT);
        snprintf(reply, replylen, "%s", t ? t : "");
        free(t);
        json_decref(r);
        return 0;
    }
    return exec_fate(d, NULL, 0) ? -1 : 1;
}

const struct driver_ops exec_driver = {
    .name = "exec",
    .start = exec_start,
    .info = exec_info,
    .open = exec_open,
    .acquire = exec_acquire,
    .release = exec_release,
    .discard = exec_discard,
    .query = exec_query,
    .conn_info = exec_conn_info,
    .health = exec_health,
    .metric = exec_metric,
    .maintain = exec_maintain,
    .password = exec_password,
    .check_invariants = exec_invariants,
    .close = exec_close,
    .destroy = exec_destroy,
    .fate = exec_fate,
};
