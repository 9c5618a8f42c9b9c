/*
 * fproxy: the fault proxy (see proxy.h for the contract and the command
 * grammar).
 *
 * One thread runs an edge-triggered epoll loop over the listening socket,
 * every client and server socket, an eventfd for commands from other
 * threads, a timerfd for delayed data, and the control socket. Each proxied
 * connection has two directions (up: client to server, down: server to
 * client), each with a bounded linear buffer. Reading a side stops while
 * the buffer it fills is full, which is how back-pressure reaches the
 * sender's kernel buffers.
 *
 * Every direction also runs a small PostgreSQL message splitter. It exists
 * for three reasons: to know each connection's phase (startup, auth, ready,
 * query), to cut a stream exactly at a message boundary when an
 * ErrorResponse is injected, and to see query text for on-query rules. Small
 * messages are only forwarded once complete, so a cut never has to split
 * one; messages larger than half a buffer stream through as they come. When
 * a side ends in the middle of a message, what arrived of it goes through
 * and the end follows (see release_partial).
 *
 * Faults are either actions on connections (reset, close, inject) or
 * settings (blackhole, latency, ...). Settings for connections that do not
 * exist yet are kept as rules that are applied in accept order, which makes
 * `nth N` and `new` the same mechanism as `all`.
 */
#include "proxy.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fnmatch.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_MS 1000000LL
#define NS_PER_US 1000LL
#define NONE UINT64_MAX

/* Room past the buffer limit for an injected ErrorResponse, so injecting
 * never has to wait for buffer space. */
#define INJECT_SLACK 1024
#define QUERY_CAPTURE 4096
#define MAX_STARTUP_LEN 10000
#define MAX_ONQUERY 16
#define CTL_LINE_MAX 4096
/* A control client's answer buffer larger than this is freed once sent. */
#define CTL_KEEP 65536

/* Startup-packet codes (protocol 3.0). */
#define CODE_SSL 80877103u
#define CODE_GSSENC 80877104u
#define CODE_CANCEL 80877102u

enum { UP = 0, DOWN = 1 };
enum { CLI = 0, SRV = 1 };
enum { DIR_UP = 1, DIR_DOWN = 2, DIR_BOTH = 3 };

enum ev_kind { EV_LISTEN, EV_WAKE, EV_TIMER, EV_CTL_LISTEN, EV_CTL, EV_SOCK };

struct ev {
    enum ev_kind kind;
};

/* ---- Small helpers --------------------------------------------------------- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* A growing string for answers, which for `conns` can be long. */
struct sbuf {
    char *s;
    size_t len, cap;
    bool oom;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if (b->s && (size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = b->cap ? b->cap : 256;
        while (cap - b->len <= (size_t)n)
            cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) {
            b->oom = true;
            return;
        }
        b->s = s;
        b->cap = cap;
    }
}

static void sb_reset(struct sbuf *b)
{
    b->len = 0;
    if (b->s)
        b->s[0] = '\0';
}

static uint32_t be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* splitmix64, used to derive per-connection seeds and to draw jitter. */
static uint64_t mix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* ---- Data structures --------------------------------------------------------- */

struct inj {
    char sqlstate[6];
    char message[256]; /* "" = the default text for sqlstate */
};

/* Settings of one direction of one connection. */
struct shape {
    int latency_ms, jitter_ms;
    long long bandwidth; /* bytes per second, 0 = unlimited */
    int slice;           /* bytes per write, 0 = off */
    int slice_delay_us;
    bool blackhole;
};

enum pgp_mode {
    PGP_STARTUP, /* untyped startup packets: int32 len, int32 code */
    PGP_NORMAL,  /* typed messages: byte type, int32 len */
    PGP_SSLRESP, /* the server's one-byte answer to SSLRequest/GSSENCRequest */
    PGP_WAIT,    /* (down) nothing expected from the server yet */
    PGP_RAW,     /* not tracked: every byte is a boundary */
    PGP_OFF,     /* the stream has been cut: nothing more is parsed */
};

struct pgp {
    enum pgp_mode mode;
    unsigned char hdr[8];
    unsigned hlen;
    uint32_t need;  /* body bytes still to come */
    uint64_t start; /* stream offset of the current message */
    bool big;       /* streamed, not held until complete */
    unsigned char *cap;
    size_t caplen, capmax;
};

struct mark {
    uint64_t off; /* stream offset this mark ends at */
    int64_t at;   /* when the bytes before off may be written */
};

struct dir {
    char *buf;
    size_t head, tail;    /* data is buf[head..tail) */
    uint64_t rx, tx;      /* stream offsets of tail and head */
    uint64_t boundary;    /* bytes before this may be forwarded (message splitter) */
    uint64_t cut;         /* nothing at or after this is forwarded (NONE: no cut) */
    bool close_after_cut; /* close the connection once tx reaches cut */
    bool src_eof, src_err, dst_dead, dst_shut;
    int64_t shut_at;    /* slow-close: when to pass the EOF on */
    int64_t not_before; /* slicer / bandwidth pacing */
    struct mark *marks;
    size_t mhead, mcount, mcap;
    uint64_t released; /* with marks pending: bytes before this are released */
    int64_t last_release;
    uint64_t rng;
    long long delay_total_ms;
    long long limit_left; /* -1 = no limit */
    struct shape sh;
    struct pgp pp;
};

struct fproxy;
struct conn;

struct endpoint {
    struct ev ev;
    struct conn *c;
    int fd;
    bool can_read, can_write;
    bool rdhup; /* the peer's FIN has been seen: read on until EOF */
};

struct conn {
    struct fproxy *p;
    uint64_t id;
    struct endpoint ep[2];
    struct dir d[2];
    enum fproxy_phase phase;
    bool connecting, connected, hold_connect, upstream_failed;
    int64_t last_active;
    int pending_rfq;
    bool busy_ext, authed;
    char txn;
    char user[64], database[64];
    char client_host[64];
    int client_port;
    bool startup_inject;
    struct inj startup_inj;
    bool auth_fail;
    char auth_user[64];
    bool inject_waiting;
    struct inj waiting_inj;
    int slow_close_ms;
    int64_t fin_at; /* limit-data close, delayed by slow-close */
    int64_t wake;
    bool timed, dead;
    struct conn *prev, *next;   /* open connections, oldest first */
    struct conn *tprev, *tnext; /* connections with a timer */
    struct conn *dnext;         /* dead, freed after the event batch */
};

enum ckind {
    C_RESET,
    C_CLOSE,
    C_BLACKHOLE,
    C_LATENCY,
    C_BANDWIDTH,
    C_SLICER,
    C_LIMIT,
    C_SLOWCLOSE,
    C_INJECT,
    C_AUTHFAIL,
    C_REFUSE,
    C_ACCEPT_CLOSE,
    C_HANG,
    C_RETARGET,
    C_ONQUERY,
    C_ONQUERY_CLEAR,
    C_HEAL,
    C_STATS,
    C_CONNS,
    C_HELP,
};

enum tkind { T_ALL, T_IDLE, T_CONN, T_NTH, T_NEW };

struct cmd {
    enum ckind kind;
    enum tkind target;
    long long tval; /* idle ms, conn id, nth */
    int dirs;       /* DIR_* */
    int rst_sides;  /* reset: bit 1 client, bit 2 server */
    long long a, b; /* latency/jitter, bandwidth, slice/delay, limit, slow-close ms */
    bool on;
    bool retarget_reset;
    struct inj inj;
    char user[64];
    char pattern[256];
    enum ckind qaction; /* on-query: C_RESET, C_CLOSE, C_BLACKHOLE, C_INJECT */
    char host[256];
    int port;
};

/* A command waiting for connections that do not exist yet. */
struct rule {
    struct cmd cmd;
    uint64_t nth; /* 0: every new connection (until heal); else that id, once */
    struct rule *next;
};

struct qrule {
    char pattern[256];
    bool glob;
    enum ckind action;
    struct inj inj;
};

struct ctl {
    struct ev ev;
    struct fproxy *p;
    int fd;
    char rbuf[4096]; /* read, not yet parsed: rbuf[rpos..rlen) */
    size_t rpos, rlen;
    char in[CTL_LINE_MAX];
    size_t inlen;
    bool discarding; /* an over-long line is being skipped */
    struct sbuf out;
    size_t outoff;
    bool eof;
    struct ctl *next;
};

enum req_kind { REQ_LINE, REQ_STATS, REQ_CONNS };

struct req {
    enum req_kind kind;
    const char *line;
    struct sbuf reply;
    int rc;
    struct fproxy_stats *stats;
    struct fproxy_conn_info *conns;
    int max;
    bool done;
};

struct fproxy {
    /* Set at open, read-only afterwards. */
    char listen_host[64];
    int port;
    char *control_path;
    bool ctl_bound; /* the socket file at control_path is ours, ... */
    dev_t ctl_dev;  /* ... the one with this device and inode */
    ino_t ctl_ino;
    size_t bufsize;
    uint64_t seed;
    int epfd, wakefd, timerfd;
    struct ev wake_ev, timer_ev, listen_ev, ctl_listen_ev;
    pthread_t thread;
    bool thread_started;

    /* Command handoff. */
    pthread_mutex_t call_mu; /* one caller at a time */
    pthread_mutex_t mu;      /* guards req, stop, stopped */
    pthread_cond_t cv;
    struct req *req;
    bool stop, stopped;
    struct fproxy_stats last_stats;

    /* Loop-thread state. */
    int listenfd, ctlfd;
    struct sockaddr_storage up_addr;
    socklen_t up_len;
    char up_name[300];
    bool accept_close, hang;
    struct conn *conns_head, *conns_tail;
    struct conn *timed;
    struct conn *dead;
    struct rule *rules;
    struct qrule qrules[MAX_ONQUERY];
    int nqrules;
    struct ctl *ctls;
    int64_t armed_at;
    struct fproxy_stats st;
};

/* ---- Forward declarations ---------------------------------------------------- */

static void pump(struct conn *c);
static void conn_end(struct conn *c, bool rst_client, bool rst_server);
static void inject_at(struct conn *c, uint64_t at, const struct inj *inj);
static void inject_now(struct conn *c, const struct inj *inj);
static void start_upstream(struct conn *c);

/* ---- ErrorResponse construction ---------------------------------------------- */

/* PostgreSQL 15's texts for the SQLSTATEs the proxy knows how to fake. */
static void default_message(const struct conn *c, const char *sqlstate, char *out, size_t len)
{
    const char *user = c->auth_user[0] ? c->auth_user : c->user;
    if (strcmp(sqlstate, "57P01") == 0)
        snprintf(out, len, "terminating connection due to administrator command");
    else if (strcmp(sqlstate, "57P02") == 0)
        snprintf(out, len, "terminating connection because of crash of another server process");
    else if (strcmp(sqlstate, "57P03") == 0)
        snprintf(out, len, "the database system is starting up");
    else if (strcmp(sqlstate, "53300") == 0)
        snprintf(out, len, "sorry, too many clients already");
    else if (strcmp(sqlstate, "28P01") == 0)
        snprintf(out, len, "password authentication failed for user \"%s\"", user);
    else if (strcmp(sqlstate, "28000") == 0)
        snprintf(out, len,
                 "no pg_hba.conf entry for host \"%s\", user \"%s\", database \"%s\", "
                 "no encryption",
                 c->client_host, c->user, c->database);
    else if (strcmp(sqlstate, "3D000") == 0)
        snprintf(out, len, "database \"%s\" does not exist", c->database);
    else if (strcmp(sqlstate, "25P03") == 0)
        snprintf(out, len, "terminating connection due to idle-in-transaction timeout");
    else if (strcmp(sqlstate, "08P01") == 0)
        snprintf(out, len, "invalid frontend message type");
    else
        snprintf(out, len, "injected by pgfault proxy");
}

static bool known_sqlstate(const char *s)
{
    static const char *const known[] = {"57P01", "57P02", "57P03", "53300", "28P01",
                                        "28000", "3D000", "25P03", "08P01"};
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (strcmp(s, known[i]) == 0)
            return true;
    return false;
}

/* Writes a FATAL ErrorResponse with the fields S, V, C, M as a server
 * does; returns its length. */
static size_t build_error(const struct conn *c, const struct inj *inj, unsigned char *out,
                          size_t max)
{
    char msg[300];
    if (inj->message[0])
        snprintf(msg, sizeof msg, "%s", inj->message);
    else
        default_message(c, inj->sqlstate, msg, sizeof msg);
    size_t n = 5;
    const char *fields[][2] = {{"S", "FATAL"}, {"V", "FATAL"}, {"C", inj->sqlstate}, {"M", msg}};
    for (size_t i = 0; i < 4; i++) {
        size_t vl = strlen(fields[i][1]);
        if (n + 2 + vl + 1 > max)
            break;
        out[n++] = (unsigned char)fields[i][0][0];
        memcpy(out + n, fields[i][1], vl + 1);
        n += vl + 1;
    }
    out[n++] = 0;
    out[0] = 'E';
    uint32_t l = (uint32_t)(n - 1);
    out[1] = (unsigned char)(l >> 24);
    out[2] = (unsigned char)(l >> 16);
    out[3] = (unsigned char)(l >> 8);
    out[4] = (unsigned char)l;
    return n;
}

/* ---- Timers ------------------------------------------------------------------ */

static void timed_add(struct conn *c)
{
    if (c->timed)
        return;
    struct fproxy *p = c->p;
    c->timed = true;
    c->tprev = NULL;
    c->tnext = p->timed;
    if (p->timed)
        p->timed->tprev = c;
    p->timed = c;
}

static void timed_remove(struct conn *c)
{
    if (!c->timed)
        return;
    struct fproxy *p = c->p;
    if (c->tprev)
        c->tprev->tnext = c->tnext;
    else
        p->timed = c->tnext;
    if (c->tnext)
        c->tnext->tprev = c->tprev;
    c->timed = false;
    c->tprev = c->tnext = NULL;
}

static void arm_timer(struct fproxy *p, int64_t at)
{
    if (at == p->armed_at)
        return;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (at > 0) {
        its.it_value.tv_sec = at / 1000000000LL;
        its.it_value.tv_nsec = at % 1000000000LL;
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
            its.it_value.tv_nsec = 1;
    }
    timerfd_settime(p->timerfd, TFD_TIMER_ABSTIME, &its, NULL);
    p->armed_at = at;
}

/* Pumps every connection whose timer is due and arms the timerfd for the
 * earliest remaining one. */
static void run_timers(struct fproxy *p)
{
    int64_t now = now_ns();
    struct conn *c = p->timed, *next;
    for (; c; c = next) {
        next = c->tnext;
        if (c->wake == 0)
            timed_remove(c);
        else if (c->wake <= now)
            pump(c);
    }
    /* Pumping may have added connections anywhere in the list, so the
     * minimum is taken afterwards. */
    int64_t min = 0;
    for (c = p->timed; c; c = next) {
        next = c->tnext;
        if (c->wake == 0)
            timed_remove(c);
        else if (min == 0 || c->wake < min)
            min = c->wake;
    }
    arm_timer(p, min);
}

/* ---- Sockets ----------------------------------------------------------------- */

static int ep_add(struct fproxy *p, int fd, uint32_t events, struct ev *ev)
{
    struct epoll_event e;
    memset(&e, 0, sizeof e);
    e.events = events;
    e.data.ptr = ev;
    return epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &e);
}

/* Closes one side: with rst, SO_LINGER {1, 0} makes close() send a RST; else
 * unread input is drained first, because closing a socket with unread data
 * sends a RST on Linux where a FIN was meant. */
static void close_side(struct endpoint *e, bool rst)
{
    if (e->fd < 0)
        return;
    if (rst) {
        struct linger l = {1, 0};
        setsockopt(e->fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    } else {
        char tmp[4096];
        for (int i = 0; i < 64; i++)
            if (recv(e->fd, tmp, sizeof tmp, MSG_DONTWAIT) <= 0)
                break;
    }
    /* Deregistered before the close: if a forked process (a psql the
     * harness runs, a driver between fork and exec) still holds the
     * socket, close() alone would leave it in the epoll set, and its
     * events would name a connection already freed. */
    if (e->c)
        (void)epoll_ctl(e->c->p->epfd, EPOLL_CTL_DEL, e->fd, NULL);
    close(e->fd);
    e->fd = -1;
    e->can_read = e->can_write = false;
}

static int open_listener(struct fproxy *p, char *err, size_t errlen)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)p->port);
    if (inet_pton(AF_INET, p->listen_host, &sa.sin_addr) != 1) {
        seterr(err, errlen, "listen address '%s': not a numeric IPv4 address", p->listen_host);
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        seterr(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        seterr(err, errlen, "bind %s:%d: %s", p->listen_host, p->port, strerror(errno));
        goto fail;
    }
    if (listen(fd, 4096) < 0) {
        seterr(err, errlen, "listen: %s", strerror(errno));
        goto fail;
    }
    if (p->port == 0) {
        socklen_t l = sizeof sa;
        if (getsockname(fd, (struct sockaddr *)&sa, &l) < 0) {
            seterr(err, errlen, "getsockname: %s", strerror(errno));
            goto fail;
        }
        p->port = ntohs(sa.sin_port);
    }
    if (ep_add(p, fd, EPOLLIN | EPOLLET, &p->listen_ev) < 0) {
        seterr(err, errlen, "epoll_ctl: %s", strerror(errno));
        goto fail;
    }
    p->listenfd = fd;
    p->st.listening = 1;
    return 0;
fail:
    close(fd);
    return -1;
}

static int resolve(const char *host, int port, struct sockaddr_storage *out, socklen_t *outlen,
                   char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0 || !res) {
        seterr(err, errlen, "resolve %s: %s", host, rc ? gai_strerror(rc) : "no address");
        return -1;
    }
    memcpy(out, res->ai_addr, res->ai_addrlen);
    *outlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* ---- Connections: creation and teardown ------------------------------------- */

static void dir_init(struct fproxy *p, struct conn *c, int d)
{
    struct dir *x = &c->d[d];
    x->cut = NONE;
    x->limit_left = -1;
    uint64_t s = p->seed ? p->seed : 0x5eedULL;
    s ^= c->id * 0x100000001b3ULL + (uint64_t)d * 0x9e3779b9ULL;
    x->rng = mix64(&s);
    x->pp.mode = d == UP ? PGP_STARTUP : PGP_WAIT;
}

static void conn_kill(struct conn *c)
{
    struct fproxy *p = c->p;
    if (c->dead)
        return;
    c->dead = true;
    timed_remove(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        p->conns_head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        p->conns_tail = c->prev;
    c->dnext = p->dead;
    p->dead = c;
    p->st.active--;
    /* The one place every connection ends, once (c->dead guards it). */
    if (c->phase == FPROXY_PHASE_STARTUP || c->phase == FPROXY_PHASE_AUTH)
        p->st.ended_before_ready++;
}

static void conn_free(struct conn *c)
{
    for (int d = 0; d < 2; d++) {
        free(c->d[d].buf);
        free(c->d[d].marks);
        free(c->d[d].pp.cap);
    }
    free(c);
}

/* Ends a connection at once: a RST on the sides asked for, a FIN (after
 * draining) on the others. */
static void conn_end(struct conn *c, bool rst_client, bool rst_server)
{
    if (c->dead)
        return;
    close_side(&c->ep[CLI], rst_client);
    close_side(&c->ep[SRV], rst_server);
    conn_kill(c);
}

/* ---- Rules for connections that do not exist yet ----------------------------- */

static void apply_conn(struct conn *c, const struct cmd *m);

static void apply_rules(struct fproxy *p, struct conn *c)
{
    struct rule **pr = &p->rules;
    while (*pr && !c->dead) {
        struct rule *r = *pr;
        if (r->nth == 0 || r->nth == c->id) {
            apply_conn(c, &r->cmd);
            if (r->nth != 0) {
                *pr = r->next;
                free(r);
                continue;
            }
        }
        pr = &r->next;
    }
}

static void accept_one(struct fproxy *p, int fd, const struct sockaddr_in *peer)
{
    p->st.accepted++;
    uint64_t id = p->st.accepted;
    if (p->accept_close) {
        p->st.refused++;
        p->st.ended_before_ready++;
        struct endpoint e = {.fd = fd};
        close_side(&e, false);
        /* A pending `nth` rule for this id can never fire now. */
        struct rule **pr = &p->rules;
        while (*pr) {
            if ((*pr)->nth == id) {
                struct rule *r = *pr;
                *pr = r->next;
                free(r);
            } else {
                pr = &(*pr)->next;
            }
        }
        return;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        p->st.ended_before_ready++;
        return;
    }
    c->p = p;
    c->id = id;
    c->phase = FPROXY_PHASE_STARTUP;
    c->last_active = now_ns();
    c->txn = 'I';
    inet_ntop(AF_INET, &peer->sin_addr, c->client_host, sizeof c->client_host);
    c->client_port = ntohs(peer->sin_port);
    for (int s = 0; s < 2; s++) {
        c->ep[s].ev.kind = EV_SOCK;
        c->ep[s].c = c;
        c->ep[s].fd = -1;
    }
    for (int d = 0; d < 2; d++)
        dir_init(p, c, d);
    /* Query text is matched on its first QUERY_CAPTURE bytes; the server
     * side needs only the first bytes of 'R' and 'Z' messages. */
    c->d[UP].pp.cap = malloc(QUERY_CAPTURE);
    c->d[UP].pp.capmax = c->d[UP].pp.cap ? QUERY_CAPTURE : 0;
    c->d[DOWN].pp.cap = malloc(16);
    c->d[DOWN].pp.capmax = c->d[DOWN].pp.cap ? 16 : 0;
    c->ep[CLI].fd = fd;
    c->ep[CLI].can_read = c->ep[CLI].can_write = true;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (ep_add(p, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, &c->ep[CLI].ev) < 0) {
        close(fd);
        conn_free(c);
        p->st.ended_before_ready++;
        return;
    }
    c->prev = p->conns_tail;
    if (p->conns_tail)
        p->conns_tail->next = c;
    else
        p->conns_head = c;
    p->conns_tail = c;
    p->st.active++;

    c->hold_connect = p->hang;
    apply_rules(p, c);
    if (c->dead)
        return;
    /* A connection born into a full partition never reaches the server. */
    if (c->d[UP].sh.blackhole && c->d[DOWN].sh.blackhole)
        c->hold_connect = true;
    if (!c->hold_connect)
        start_upstream(c);
    if (!c->dead)
        pump(c);
}

static void start_upstream(struct conn *c)
{
    struct fproxy *p = c->p;
    if (c->connecting || c->connected || c->dead || c->upstream_failed)
        return;
    p->st.upstream_connects++;
    int fd = socket(p->up_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&p->up_addr, p->up_len) < 0 && errno != EINPROGRESS) {
        close(fd);
        goto fail;
    }
    c->ep[SRV].fd = fd;
    /* Neither read nor written until the connect completes: a recv on a
     * socket whose connect failed returns the error and clears SO_ERROR,
     * and the failure would then look like a server that went away rather
     * than a failed connect (sock_event decides, from SO_ERROR). */
    c->ep[SRV].can_read = false;
    c->ep[SRV].can_write = false;
    c->connecting = true;
    if (ep_add(p, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, &c->ep[SRV].ev) < 0) {
        close(fd);
        c->ep[SRV].fd = -1;
        c->connecting = false;
        goto fail;
    }
    return;
fail:
    /* The client sees the connection closed, as behind a proxy whose server
     * is down. */
    p->st.upstream_failures++;
    c->upstream_failed = true;
    conn_end(c, false, false);
}

/* ---- The message splitter ----------------------------------------------------- */

static void set_raw(struct conn *c, enum fproxy_phase ph)
{
    for (int d = 0; d < 2; d++) {
        if (c->d[d].pp.mode != PGP_OFF) {
            c->d[d].pp.mode = PGP_RAW;
            c->d[d].boundary = c->d[d].rx;
        }
    }
    c->phase = ph;
}

static bool query_matches(const struct qrule *q, const char *text)
{
    if (q->glob)
        return fnmatch(q->pattern, text, 0) == 0;
    return strstr(text, q->pattern) != NULL;
}

static void on_query_text(struct conn *c, const char *text, uint64_t start)
{
    struct fproxy *p = c->p;
    for (int i = 0; i < p->nqrules; i++) {
        const struct qrule *q = &p->qrules[i];
        if (!query_matches(q, text))
            continue;
        p->st.query_matches++;
        struct dir *up = &c->d[UP];
        switch (q->action) {
        case C_RESET:
            p->st.resets++;
            conn_end(c, true, true);
            return;
        case C_CLOSE:
            p->st.closes++;
            conn_end(c, false, false);
            return;
        case C_BLACKHOLE:
            c->d[UP].sh.blackhole = c->d[DOWN].sh.blackhole = true;
            return;
        default:
            up->cut = start > up->tx ? start : up->tx;
            up->pp.mode = PGP_OFF;
            inject_now(c, &q->inj);
            return;
        }
    }
}

static void up_message(struct conn *c, struct pgp *pp, uint64_t start)
{
    struct dir *up = &c->d[UP];
    struct dir *down = &c->d[DOWN];
    if (pp->mode == PGP_STARTUP) {
        uint32_t code = be32(pp->hdr + 4);
        if (code == CODE_SSL || code == CODE_GSSENC) {
            down->pp.mode = PGP_SSLRESP;
            return;
        }
        if (code == CODE_CANCEL) {
            set_raw(c, FPROXY_PHASE_RAW);
            return;
        }
        /* A StartupMessage: key\0value\0 pairs. */
        size_t i = 0;
        while (i < pp->caplen) {
            const char *k = (const char *)pp->cap + i;
            size_t kl = strnlen(k, pp->caplen - i);
            if (kl == 0 || i + kl + 1 >= pp->caplen)
                break;
            const char *v = k + kl + 1;
            size_t vl = strnlen(v, pp->caplen - i - kl - 1);
            if (strcmp(k, "user") == 0)
                snprintf(c->user, sizeof c->user, "%.*s", (int)vl, v);
            else if (strcmp(k, "database") == 0)
                snprintf(c->database, sizeof c->database, "%.*s", (int)vl, v);
            i += kl + 1 + vl + 1;
        }
        if (!c->database[0])
            snprintf(c->database, sizeof c->database, "%s", c->user);
        pp->mode = PGP_NORMAL;
        down->pp.mode = PGP_NORMAL;
        c->phase = FPROXY_PHASE_AUTH;
        if (c->startup_inject) {
            /* Answer the StartupMessage ourselves: it never reaches the server. */
            up->cut = start > up->tx ? start : up->tx;
            pp->mode = PGP_OFF;
            inject_now(c, &c->startup_inj);
        }
        return;
    }
    char type = (char)pp->hdr[0];
    bool past_auth = c->phase == FPROXY_PHASE_READY || c->phase == FPROXY_PHASE_QUERY;
    switch (type) {
    case 'Q':
    case 'P':
        if (past_auth)
            c->phase = FPROXY_PHASE_QUERY;
        if (type == 'Q')
            c->pending_rfq++;
        else
            c->busy_ext = true;
        if (c->p->nqrules > 0 && pp->caplen > 0) {
            char text[QUERY_CAPTURE + 1];
            size_t off = 0;
            if (type == 'P')
                off = strnlen((const char *)pp->cap, pp->caplen) + 1;
            size_t n = off < pp->caplen ? pp->caplen - off : 0;
            memcpy(text, pp->cap + off, n);
            text[n] = '\0';
            on_query_text(c, text, start);
        }
        break;
    case 'S':
        c->pending_rfq++;
        c->busy_ext = false;
        break;
    case 'F':
        c->pending_rfq++;
        if (past_auth)
            c->phase = FPROXY_PHASE_QUERY;
        break;
    case 'B':
    case 'E':
    case 'D':
    case 'C':
    case 'H':
        if (past_auth) {
            c->busy_ext = true;
            c->phase = FPROXY_PHASE_QUERY;
        }
        break;
    default:
        break;
    }
}

static void down_message(struct conn *c, struct pgp *pp, uint64_t start)
{
    char type = (char)pp->hdr[0];
    if (type == 'R' && pp->caplen >= 4) {
        uint32_t code = be32(pp->cap);
        if ((code == 0 || code == 12) && c->auth_fail && !c->authed) {
            struct inj inj;
            memset(&inj, 0, sizeof inj);
            snprintf(inj.sqlstate, sizeof inj.sqlstate, "28P01");
            inject_at(c, start, &inj);
            return;
        }
        if (code == 0)
            c->authed = true;
    } else if (type == 'Z') {
        c->txn = pp->caplen >= 1 ? (char)pp->cap[0] : 'I';
        if (c->phase == FPROXY_PHASE_AUTH || c->phase == FPROXY_PHASE_STARTUP) {
            c->pending_rfq = 0;
            c->phase = FPROXY_PHASE_READY;
        } else {
            if (c->pending_rfq > 0)
                c->pending_rfq--;
            c->phase = c->pending_rfq > 0 || c->busy_ext ? FPROXY_PHASE_QUERY : FPROXY_PHASE_READY;
        }
    }
}

static void ssl_answer(struct conn *c, unsigned char b)
{
    if (b == 'N') {
        /* The client goes on in plain text with a StartupMessage. */
        c->d[DOWN].pp.mode = PGP_WAIT;
        return;
    }
    set_raw(c, b == 'S' || b == 'G' ? FPROXY_PHASE_TLS : FPROXY_PHASE_RAW);
}

/* Splits newly received bytes [base, base+n) of direction d into messages.
 * Sets the direction's boundary and calls the message handlers, which may
 * cut the stream, inject, or end the connection. */
static void pgp_feed(struct conn *c, int d, const unsigned char *data, size_t n, uint64_t base)
{
    struct dir *x = &c->d[d];
    struct pgp *pp = &x->pp;
    size_t hold = c->p->bufsize / 2;
    size_t i = 0;
    while (i < n && !c->dead) {
        switch (pp->mode) {
        case PGP_OFF:
            return;
        case PGP_RAW:
            x->boundary = base + n;
            return;
        case PGP_WAIT:
            /* The server spoke first: this is not PostgreSQL. */
            set_raw(c, FPROXY_PHASE_RAW);
            continue;
        case PGP_SSLRESP: {
            unsigned char b = data[i++];
            x->boundary = base + i;
            ssl_answer(c, b);
            continue;
        }
        case PGP_STARTUP:
        case PGP_NORMAL:
            break;
        }
        unsigned hsz = pp->mode == PGP_STARTUP ? 8 : 5;
        if (pp->hlen < hsz) {
            if (pp->hlen == 0)
                pp->start = base + i;
            size_t take = hsz - pp->hlen < n - i ? hsz - pp->hlen : n - i;
            memcpy(pp->hdr + pp->hlen, data + i, take);
            pp->hlen += (unsigned)take;
            i += take;
            /* A startup packet is at most MAX_STARTUP_LEN (0x2710) long, so
             * its first two bytes tell plain TCP traffic apart at once;
             * waiting for 8 bytes would hold a short raw message forever. */
            if (pp->mode == PGP_STARTUP &&
                (pp->hdr[0] != 0 || (pp->hlen > 1 && pp->hdr[1] > (MAX_STARTUP_LEN >> 8)))) {
                set_raw(c, FPROXY_PHASE_RAW);
                return;
            }
            if (pp->hlen < hsz)
                break;
            uint32_t len;
            if (pp->mode == PGP_STARTUP) {
                len = be32(pp->hdr);
                uint32_t code = be32(pp->hdr + 4);
                bool known = code == CODE_SSL || code == CODE_GSSENC || code == CODE_CANCEL ||
                             (code >> 16) == 3;
                if (len < 8 || len > MAX_STARTUP_LEN || !known) {
                    set_raw(c, FPROXY_PHASE_RAW);
                    return;
                }
                pp->need = len - 8;
            } else {
                len = be32(pp->hdr + 1);
                if (len < 4 || len > 0x40000000u) {
                    set_raw(c, FPROXY_PHASE_RAW);
                    return;
                }
                pp->need = len - 4;
            }
            pp->big = (size_t)len + 1 > hold;
            pp->caplen = 0;
        }
        size_t take = pp->need < n - i ? pp->need : n - i;
        if (pp->caplen < pp->capmax) {
            size_t cp = take < pp->capmax - pp->caplen ? take : pp->capmax - pp->caplen;
            memcpy(pp->cap + pp->caplen, data + i, cp);
            pp->caplen += cp;
        }
        pp->need -= (uint32_t)take;
        i += take;
        if (pp->big)
            x->boundary = base + i;
        if (pp->need == 0) {
            pp->hlen = 0;
            x->boundary = base + i;
            uint64_t start = pp->start;
            if (d == UP)
                up_message(c, pp, start);
            else
                down_message(c, pp, start);
            if (c->inject_waiting && d == DOWN && !c->dead) {
                c->inject_waiting = false;
                inject_at(c, x->boundary, &c->waiting_inj);
            }
        }
    }
}

/* ---- Injection ---------------------------------------------------------------- */

/* Cuts the down stream at offset at (a message boundary not yet written),
 * appends a FATAL ErrorResponse, closes the server side, and closes the
 * client side once the error has been written. */
static void inject_at(struct conn *c, uint64_t at, const struct inj *inj)
{
    struct dir *x = &c->d[DOWN];
    struct dir *up = &c->d[UP];
    if (at < x->tx)
        at = x->tx;
    if (at < x->rx) {
        x->tail = x->head + (size_t)(at - x->tx);
        x->rx = at;
        for (size_t k = 0; k < x->mcount; k++) {
            struct mark *m = &x->marks[(x->mhead + k) % x->mcap];
            if (m->off > at)
                m->off = at;
        }
    }
    if (x->tail == x->head)
        x->head = x->tail = 0;
    unsigned char msg[INJECT_SLACK];
    size_t n = build_error(c, inj, msg, sizeof msg);
    if (x->tail + n > c->p->bufsize + INJECT_SLACK) {
        memmove(x->buf, x->buf + x->head, x->tail - x->head);
        x->tail -= x->head;
        x->head = 0;
    }
    memcpy(x->buf + x->tail, msg, n);
    x->tail += n;
    if (x->mcount > 0) {
        /* Keep the error behind the data it follows. */
        struct mark *last = &x->marks[(x->mhead + x->mcount - 1) % x->mcap];
        last->off = x->rx + n;
    }
    x->rx += n;
    x->boundary = x->rx;
    x->cut = x->rx;
    x->close_after_cut = true;
    x->pp.mode = PGP_OFF;
    x->src_eof = true;
    /* Nothing more goes to the server, and it goes away like a backend
     * that exited after its FATAL. */
    up->cut = up->cut < up->tx ? up->cut : up->tx;
    up->pp.mode = PGP_OFF;
    up->dst_dead = true;
    close_side(&c->ep[SRV], false);
    c->connecting = false;
    c->hold_connect = true;
    c->p->st.injected++;
}

/* Injects at the next message boundary of the down stream: now if no
 * partly forwarded message is in flight, else when it completes. */
static void inject_now(struct conn *c, const struct inj *inj)
{
    struct dir *x = &c->d[DOWN];
    if (x->pp.mode == PGP_NORMAL && x->pp.hlen > 0 && x->pp.big && x->pp.start < x->tx) {
        c->inject_waiting = true;
        c->waiting_inj = *inj;
        return;
    }
    uint64_t at = x->boundary;
    inject_at(c, at, inj);
}

/* ---- Forwarding ----------------------------------------------------------------- */

static void push_mark(struct conn *c, struct dir *x, uint64_t old_rx, int64_t now)
{
    if (x->sh.latency_ms <= 0 && x->sh.jitter_ms <= 0 && x->mcount == 0)
        return;
    int64_t delay = (int64_t)x->sh.latency_ms * NS_PER_MS;
    if (x->sh.jitter_ms > 0) {
        uint64_t span = 2 * (uint64_t)x->sh.jitter_ms + 1;
        int64_t j = (int64_t)(mix64(&x->rng) % span) - x->sh.jitter_ms;
        delay += j * NS_PER_MS;
    }
    if (delay < 0)
        delay = 0;
    x->delay_total_ms += delay / NS_PER_MS;
    int64_t at = now + delay;
    /* TCP keeps order: a chunk is never released before the one ahead. */
    if (at < x->last_release)
        at = x->last_release;
    x->last_release = at;
    if (x->mcount == 0)
        x->released = old_rx;
    if (x->mcount > 0) {
        struct mark *last = &x->marks[(x->mhead + x->mcount - 1) % x->mcap];
        if (last->at == at) {
            last->off = x->rx;
            return;
        }
    }
    if (x->mcount == x->mcap) {
        size_t ncap = x->mcap ? x->mcap * 2 : 16;
        struct mark *nm = malloc(ncap * sizeof *nm);
        if (!nm)
            return; /* the bytes go out undelayed; better than losing them */
        for (size_t k = 0; k < x->mcount; k++)
            nm[k] = x->marks[(x->mhead + k) % x->mcap];
        free(x->marks);
        x->marks = nm;
        x->mcap = ncap;
        x->mhead = 0;
    }
    x->marks[(x->mhead + x->mcount) % x->mcap] = (struct mark){x->rx, at};
    x->mcount++;
}

/* How many bytes of direction x may be written now. */
static size_t writable(struct dir *x, int64_t now)
{
    if (x->sh.blackhole || x->dst_dead)
        return 0;
    uint64_t lim = x->rx;
    if (x->boundary < lim)
        lim = x->boundary;
    if (x->cut < lim)
        lim = x->cut;
    while (x->mcount > 0 && x->marks[x->mhead].at <= now) {
        x->released = x->marks[x->mhead].off;
        x->mhead = (x->mhead + 1) % x->mcap;
        x->mcount--;
    }
    if (x->mcount > 0 && x->released < lim)
        lim = x->released;
    if (lim <= x->tx)
        return 0;
    if (now < x->not_before)
        return 0;
    uint64_t n = lim - x->tx;
    if (x->sh.slice > 0 && n > (uint64_t)x->sh.slice)
        n = (uint64_t)x->sh.slice;
    if (x->sh.bandwidth > 0) {
        uint64_t q = (uint64_t)(x->sh.bandwidth / 100);
        if (q < 1)
            q = 1;
        if (n > q)
            n = q;
    }
    if (x->limit_left >= 0 && n > (uint64_t)x->limit_left)
        n = (uint64_t)x->limit_left;
    return (size_t)n;
}

static void dir_clear_delays(struct dir *x)
{
    x->mcount = 0;
    x->mhead = 0;
    x->not_before = 0;
    x->last_release = 0;
}

/* The source of x has ended (EOF or error). A message the splitter holds
 * incomplete can never complete now, and holding it would also hold the end
 * of stream behind it for good: the connection would never close and the
 * server session never end. So what arrived of it goes through, as it
 * would without the proxy, and the peer sees the truncated message and
 * then the end, as from the sender itself. */
static void release_partial(struct dir *x)
{
    if (x->pp.mode == PGP_OFF)
        return;
    x->boundary = x->rx;
    x->pp.hlen = 0;
    x->pp.need = 0;
    x->pp.big = false;
}

static bool dir_flushed(const struct dir *x)
{
    uint64_t end = x->cut < x->rx ? x->cut : x->rx;
    return x->tx >= end;
}

/* Moves data of one direction: reads its source while there is room,
 * writes its destination while allowed. Returns false if the connection
 * ended. */
static bool pump_dir(struct conn *c, int d, int64_t now)
{
    struct fproxy *p = c->p;
    struct dir *x = &c->d[d];
    struct endpoint *src = &c->ep[d == UP ? CLI : SRV];
    struct endpoint *dst = &c->ep[d == UP ? SRV : CLI];
    bool dst_ready = d == UP ? c->connected : true;
    bool src_ready = d == DOWN ? c->connected : true;
    for (;;) {
        bool progress = false;
        while (src_ready && src->fd >= 0 && src->can_read && !x->src_eof && !x->src_err) {
            if (x->tail == x->head)
                x->head = x->tail = 0;
            if (x->head > 0 && p->bufsize - x->tail < p->bufsize / 4) {
                memmove(x->buf, x->buf + x->head, x->tail - x->head);
                x->tail -= x->head;
                x->head = 0;
            }
            if (x->tail >= p->bufsize)
                break;
            if (!x->buf) {
                x->buf = malloc(p->bufsize + INJECT_SLACK);
                if (!x->buf)
                    break;
            }
            size_t room = p->bufsize - x->tail;
            ssize_t r = recv(src->fd, x->buf + x->tail, room, 0);
            if (r > 0) {
                /* A short read emptied the socket: with edge-triggered epoll
                 * the next byte raises a new event, so the recv that would
                 * only say EAGAIN is skipped (a third of the syscalls of a
                 * small round trip). A FIN seen in the same event is the
                 * exception: it would raise no new event. */
                if ((size_t)r < room && !src->rdhup)
                    src->can_read = false;
                uint64_t old = x->rx;
                x->tail += (size_t)r;
                x->rx += (uint64_t)r;
                c->last_active = now;
                push_mark(c, x, old, now);
                if (x->pp.mode == PGP_OFF)
                    x->boundary = x->rx; /* discarded by the cut anyway */
                else
                    pgp_feed(c, d, (unsigned char *)x->buf + x->tail - r, (size_t)r, old);
                if (c->dead)
                    return false;
                if (x->dst_dead) {
                    /* Nobody to give them to: drop, so the sender is not stuck. */
                    x->head = x->tail = 0;
                    x->tx = x->rx;
                }
                progress = true;
            } else if (r == 0) {
                x->src_eof = true;
                release_partial(x);
            } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                src->can_read = false;
            } else if (errno != EINTR) {
                x->src_err = true;
                release_partial(x);
            }
        }
        size_t n = writable(x, now);
        while (n > 0 && dst->fd >= 0 && dst->can_write && dst_ready) {
            ssize_t w = send(dst->fd, x->buf + x->head, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0) {
                x->head += (size_t)w;
                x->tx += (uint64_t)w;
                if (x->head == x->tail)
                    x->head = x->tail = 0;
                if (d == UP)
                    p->st.bytes_up += (unsigned long long)w;
                else
                    p->st.bytes_down += (unsigned long long)w;
                c->last_active = now;
                if (x->sh.slice > 0)
                    x->not_before = now + (int64_t)x->sh.slice_delay_us * NS_PER_US;
                if (x->sh.bandwidth > 0) {
                    int64_t t = now + (int64_t)w * 1000000000LL / x->sh.bandwidth;
                    if (t > x->not_before)
                        x->not_before = t;
                }
                if (x->limit_left > 0) {
                    x->limit_left -= w;
                    if (x->limit_left == 0 && c->fin_at == 0)
                        c->fin_at = now + (int64_t)c->slow_close_ms * NS_PER_MS;
                }
                progress = true;
                n = writable(x, now);
            } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                dst->can_write = false;
            } else if (w < 0 && errno == EINTR) {
                continue;
            } else {
                /* The destination is gone. Whatever else it sent before
                 * going still flows the other way; this direction is over. */
                x->dst_dead = true;
                x->head = x->tail = 0;
                x->tx = x->rx;
                break;
            }
        }
        if (!progress)
            break;
    }

    if (d == UP && !c->connected && (x->src_eof || x->src_err)) {
        /* The client gave up before the server was reached (hang-connect, a
         * slow connect): nothing to pass on. */
        conn_end(c, false, false);
        return false;
    }
    /* Ends of stream, passed on in order once the data before them is out. */
    if (x->close_after_cut && x->tx >= x->cut && !x->sh.blackhole) {
        conn_end(c, false, false);
        return false;
    }
    if (x->src_err && !x->sh.blackhole && (dir_flushed(x) || x->dst_dead)) {
        conn_end(c, d == UP ? false : true, d == UP ? true : false);
        return false;
    }
    if (x->src_eof && !x->dst_shut && !x->sh.blackhole && (dir_flushed(x) || x->dst_dead)) {
        if (c->slow_close_ms > 0 && x->shut_at == 0)
            x->shut_at = now + (int64_t)c->slow_close_ms * NS_PER_MS;
        if (c->slow_close_ms <= 0 || now >= x->shut_at) {
            if (dst->fd >= 0 && !x->dst_dead)
                shutdown(dst->fd, SHUT_WR);
            x->dst_shut = true;
        }
    }
    return true;
}

static void pump(struct conn *c)
{
    if (c->dead)
        return;
    int64_t now = now_ns();
    for (int d = 0; d < 2; d++)
        if (!pump_dir(c, d, now))
            return;
    if (c->fin_at > 0 && now >= c->fin_at) {
        c->p->st.closes++;
        conn_end(c, false, false);
        return;
    }
    bool up_done = c->d[UP].dst_shut || c->d[UP].dst_dead;
    bool down_done = c->d[DOWN].dst_shut || c->d[DOWN].dst_dead;
    if (up_done && down_done) {
        conn_end(c, false, false);
        return;
    }
    /* The next moment something can happen without an event: a latency
     * mark or a pacing delay expiring, a slow close. */
    int64_t wake = 0;
    for (int d = 0; d < 2; d++) {
        struct dir *x = &c->d[d];
        if (!x->sh.blackhole && !x->dst_dead && x->tx < x->rx) {
            if (x->mcount > 0 && x->released <= x->tx) {
                int64_t t = x->marks[x->mhead].at;
                if (wake == 0 || t < wake)
                    wake = t;
            }
            if (x->not_before > now && (wake == 0 || x->not_before < wake))
                wake = x->not_before;
        }
        if (x->shut_at > 0 && !x->dst_shut && (wake == 0 || x->shut_at < wake))
            wake = x->shut_at;
    }
    if (c->fin_at > 0 && (wake == 0 || c->fin_at < wake))
        wake = c->fin_at;
    c->wake = wake;
    if (wake)
        timed_add(c);
}

static void sock_event(struct endpoint *e, uint32_t events)
{
    struct conn *c = e->c;
    if (c->dead || e->fd < 0)
        return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        e->can_read = true;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        e->rdhup = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        e->can_write = true;
    if (e == &c->ep[SRV] && c->connecting && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        /* The connect completed, one way or the other. Nothing has read
         * the socket yet (see start_upstream), so SO_ERROR still holds the
         * reason of a failure; this is the one place that counts it. */
        int soerr = 0;
        socklen_t l = sizeof soerr;
        if (getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &soerr, &l) < 0)
            soerr = errno;
        c->connecting = false;
        if (soerr != 0) {
            c->p->st.upstream_failures++;
            c->upstream_failed = true;
            conn_end(c, false, false);
            return;
        }
        c->connected = true;
        e->can_read = true; /* a read that finds nothing costs one EAGAIN */
    }
    if (e == &c->ep[SRV] && !c->connected)
        e->can_read = e->can_write = false;
    pump(c);
}

/* ---- Command parsing ----------------------------------------------------------- */

#define MAX_TOK 24

struct toks {
    char buf[CTL_LINE_MAX + 1];
    char *t[MAX_TOK];
    int n;
};

/* Splits a line into words; "..." groups words, \" and \\ escape. */
static int tokenize(const char *line, struct toks *tk, char *err, size_t errlen)
{
    tk->n = 0;
    size_t o = 0;
    const char *s = line;
    for (;;) {
        while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
            s++;
        if (!*s)
            return 0;
        if (tk->n == MAX_TOK) {
            seterr(err, errlen, "too many words (at most %d)", MAX_TOK);
            return -1;
        }
        tk->t[tk->n++] = tk->buf + o;
        if (*s == '"') {
            s++;
            while (*s && *s != '"') {
                if (*s == '\\' && (s[1] == '"' || s[1] == '\\'))
                    s++;
                if (o >= CTL_LINE_MAX)
                    goto toolong;
                tk->buf[o++] = *s++;
            }
            if (*s != '"') {
                seterr(err, errlen, "unterminated quote");
                return -1;
            }
            s++;
        } else {
            while (*s && *s != ' ' && *s != '\t' && *s != '\r' && *s != '\n') {
                if (o >= CTL_LINE_MAX)
                    goto toolong;
                tk->buf[o++] = *s++;
            }
        }
        if (o >= CTL_LINE_MAX)
            goto toolong;
        tk->buf[o++] = '\0';
    }
toolong:
    seterr(err, errlen, "line too long");
    return -1;
}

static int edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 40 || lb > 40)
        return 99;
    int d[41][41];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int cost = a[i - 1] != b[j - 1];
            int v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v)
                v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < v)
                v = d[i - 1][j - 1] + cost;
            d[i][j] = v;
        }
    return d[la][lb];
}

/* Appends " (did you mean 'x'?)" when a word is close to one of words. */
static void did_you_mean(const char *w, const char *const *words, char *out, size_t len)
{
    const char *best = NULL;
    int bd = 99;
    for (size_t i = 0; words[i]; i++) {
        int dd = edit_distance(w, words[i]);
        if (dd < bd) {
            bd = dd;
            best = words[i];
        }
    }
    size_t wl = strlen(w);
    if (best && (bd <= 2 || (size_t)bd <= wl / 3) && bd < (int)wl)
        snprintf(out, len, " (did you mean '%s'?)", best);
    else
        out[0] = '\0';
}

static const char *const COMMANDS[] = {
    "reset",     "close",  "blackhole",  "refuse",     "accept-close", "hang-connect", "latency",
    "bandwidth", "slicer", "limit-data", "slow-close", "retarget",     "inject",       "on-query",
    "heal",      "stats",  "conns",      "help",       NULL,
};

static int parse_num(const char *s, long long min, long long max, long long *out)
{
    if (!s || !*s)
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static bool is_sqlstate(const char *s)
{
    if (strlen(s) != 5)
        return false;
    for (int i = 0; i < 5; i++)
        if (!isdigit((unsigned char)s[i]) && !isupper((unsigned char)s[i]))
            return false;
    return true;
}

/* Flags of which trailing words a command accepts. */
enum {
    OPT_TARGET = 1,
    OPT_DIR = 2,
    OPT_SIDE = 4,
    OPT_NEWNTH = 8, /* only new | nth N as target */
    OPT_JITTER = 16,
    OPT_DELAY = 32,
};

/* Parses the optional trailing words: a target, a direction or side, and
 * `jitter MS` / `delay US`. */
static int parse_tail(struct toks *tk, int i, int opts, struct cmd *m, char *err, size_t errlen)
{
    bool have_target = false, have_dir = false;
    for (; i < tk->n; i++) {
        const char *w = tk->t[i];
        const char *v = i + 1 < tk->n ? tk->t[i + 1] : NULL;
        if ((opts & (OPT_TARGET | OPT_NEWNTH)) && !have_target &&
            (strcmp(w, "all") == 0 || strcmp(w, "idle") == 0 || strcmp(w, "conn") == 0 ||
             strcmp(w, "nth") == 0 || strcmp(w, "new") == 0)) {
            have_target = true;
            if ((opts & OPT_NEWNTH) && strcmp(w, "new") != 0 && strcmp(w, "nth") != 0) {
                seterr(err, errlen, "'%s': this command takes only the targets new and nth N", w);
                return -1;
            }
            if (strcmp(w, "all") == 0) {
                m->target = T_ALL;
            } else if (strcmp(w, "new") == 0) {
                m->target = T_NEW;
            } else if (strcmp(w, "idle") == 0) {
                m->target = T_IDLE;
                m->tval = 0;
                if (v && strcmp(v, ">=") == 0) {
                    i++;
                    v = i + 1 < tk->n ? tk->t[i + 1] : NULL;
                } else if (v && strncmp(v, ">=", 2) == 0) {
                    v += 2;
                }
                if (v && isdigit((unsigned char)v[0])) {
                    if (parse_num(v, 0, 86400000LL, &m->tval) < 0) {
                        seterr(err, errlen, "idle: '%s' is not a number of milliseconds", v);
                        return -1;
                    }
                    i++;
                }
            } else {
                m->target = strcmp(w, "conn") == 0 ? T_CONN : T_NTH;
                if (parse_num(v, 1, INT64_MAX, &m->tval) < 0) {
                    seterr(err, errlen, "%s: expected a connection number >= 1, got '%s'", w,
                           v ? v : "nothing");
                    return -1;
                }
                i++;
            }
            continue;
        }
        if ((opts & OPT_DIR) && !have_dir &&
            (strcmp(w, "up") == 0 || strcmp(w, "down") == 0 || strcmp(w, "both") == 0)) {
            have_dir = true;
            m->dirs = w[0] == 'u' ? DIR_UP : w[0] == 'd' ? DIR_DOWN : DIR_BOTH;
            continue;
        }
        if ((opts & OPT_SIDE) && !have_dir &&
            (strcmp(w, "client") == 0 || strcmp(w, "server") == 0 || strcmp(w, "both") == 0)) {
            have_dir = true;
            m->rst_sides = w[0] == 'c' ? 1 : w[0] == 's' ? 2 : 3;
            continue;
        }
        if ((opts & OPT_JITTER) && strcmp(w, "jitter") == 0) {
            if (parse_num(v, 0, 3600000LL, &m->b) < 0) {
                seterr(err, errlen, "jitter: expected milliseconds, got '%s'", v ? v : "nothing");
                return -1;
            }
            i++;
            continue;
        }
        if ((opts & OPT_DELAY) && strcmp(w, "delay") == 0) {
            if (parse_num(v, 0, 60000000LL, &m->b) < 0) {
                seterr(err, errlen, "delay: expected microseconds, got '%s'", v ? v : "nothing");
                return -1;
            }
            i++;
            continue;
        }
        char exp[160] = "";
        if (opts & OPT_TARGET)
            strcat(exp, "all, idle [MS], conn ID, nth N, new");
        if (opts & OPT_NEWNTH)
            strcat(exp, "new, nth N");
        if (opts & OPT_DIR)
            strcat(exp, ", up, down, both");
        if (opts & OPT_SIDE)
            strcat(exp, ", client, server, both");
        if (opts & OPT_JITTER)
            strcat(exp, ", jitter MS");
        if (opts & OPT_DELAY)
            strcat(exp, ", delay US");
        if (opts)
            seterr(err, errlen, "unexpected '%s' (expected %s)", w, exp);
        else
            seterr(err, errlen, "unexpected '%s'", w);
        return -1;
    }
    return 0;
}

static int parse_onoff(struct toks *tk, struct cmd *m, char *err, size_t errlen)
{
    if (tk->n != 2 || (strcmp(tk->t[1], "on") != 0 && strcmp(tk->t[1], "off") != 0)) {
        seterr(err, errlen, "%s: expected on or off", tk->t[0]);
        return -1;
    }
    m->on = strcmp(tk->t[1], "on") == 0;
    return 0;
}

/* inject fatal|startup-error SQLSTATE ["MESSAGE"] [TARGET]. The message is
 * the word after the SQLSTATE unless that is a target word. */
static int parse_inj(struct toks *tk, int i, struct cmd *m, char *err, size_t errlen)
{
    if (i >= tk->n || !is_sqlstate(tk->t[i])) {
        seterr(err, errlen, "inject %s: expected a SQLSTATE (5 characters, e.g. 57P01), got '%s'",
               tk->t[1], i < tk->n ? tk->t[i] : "nothing");
        return -1;
    }
    snprintf(m->inj.sqlstate, sizeof m->inj.sqlstate, "%s", tk->t[i]);
    i++;
    const char *w = i < tk->n ? tk->t[i] : NULL;
    if (w && strcmp(w, "all") != 0 && strcmp(w, "idle") != 0 && strcmp(w, "conn") != 0 &&
        strcmp(w, "nth") != 0 && strcmp(w, "new") != 0) {
        snprintf(m->inj.message, sizeof m->inj.message, "%s", w);
        i++;
    }
    return i;
}

static int parse_command(const char *line, struct cmd *m, char *err, size_t errlen)
{
    struct toks *tk = malloc(sizeof *tk);
    if (!tk) {
        seterr(err, errlen, "out of memory");
        return -1;
    }
    int rc = -1;
    memset(m, 0, sizeof *m);
    m->target = T_ALL;
    m->dirs = DIR_BOTH;
    m->rst_sides = 3;
    if (tokenize(line, tk, err, errlen) < 0)
        goto out;
    if (tk->n == 0) {
        seterr(err, errlen, "empty command (try 'help')");
        goto out;
    }
    const char *w = tk->t[0];
    const char *a1 = tk->n > 1 ? tk->t[1] : NULL;
    int i;
    if (strcmp(w, "reset") == 0) {
        m->kind = C_RESET;
        rc = parse_tail(tk, 1, OPT_TARGET | OPT_SIDE, m, err, errlen);
    } else if (strcmp(w, "close") == 0) {
        m->kind = C_CLOSE;
        rc = parse_tail(tk, 1, OPT_TARGET, m, err, errlen);
    } else if (strcmp(w, "blackhole") == 0) {
        m->kind = C_BLACKHOLE;
        rc = parse_tail(tk, 1, OPT_TARGET | OPT_DIR, m, err, errlen);
    } else if (strcmp(w, "refuse") == 0 || strcmp(w, "accept-close") == 0 ||
               strcmp(w, "hang-connect") == 0) {
        m->kind = w[0] == 'r' ? C_REFUSE : w[0] == 'a' ? C_ACCEPT_CLOSE : C_HANG;
        rc = parse_onoff(tk, m, err, errlen);
    } else if (strcmp(w, "latency") == 0 || strcmp(w, "bandwidth") == 0 ||
               strcmp(w, "slicer") == 0 || strcmp(w, "limit-data") == 0 ||
               strcmp(w, "slow-close") == 0) {
        int opts = OPT_TARGET | OPT_DIR;
        long long max = 3600000LL;
        const char *unit = "milliseconds";
        if (strcmp(w, "latency") == 0) {
            m->kind = C_LATENCY;
            opts |= OPT_JITTER;
        } else if (strcmp(w, "bandwidth") == 0) {
            m->kind = C_BANDWIDTH;
            max = 1LL << 40;
            unit = "bytes per second";
        } else if (strcmp(w, "slicer") == 0) {
            m->kind = C_SLICER;
            opts |= OPT_DELAY;
            max = 1 << 20;
            unit = "bytes";
            m->b = 1000;
        } else if (strcmp(w, "limit-data") == 0) {
            m->kind = C_LIMIT;
            max = 1LL << 50;
            unit = "bytes";
        } else {
            m->kind = C_SLOWCLOSE;
            opts = OPT_TARGET;
        }
        if (parse_num(a1, 0, max, &m->a) < 0) {
            seterr(err, errlen, "%s: expected %s (0..%lld), got '%s'", w, unit, max,
                   a1 ? a1 : "nothing");
            goto out;
        }
        rc = parse_tail(tk, 2, opts, m, err, errlen);
    } else if (strcmp(w, "retarget") == 0) {
        m->kind = C_RETARGET;
        const char *colon = a1 ? strrchr(a1, ':') : NULL;
        long long port;
        if (!colon || colon == a1 || (size_t)(colon - a1) >= sizeof m->host ||
            parse_num(colon + 1, 1, 65535, &port) < 0) {
            seterr(err, errlen, "retarget: expected HOST:PORT, got '%s'", a1 ? a1 : "nothing");
            goto out;
        }
        snprintf(m->host, sizeof m->host, "%.*s", (int)(colon - a1), a1);
        m->port = (int)port;
        if (tk->n == 3 && strcmp(tk->t[2], "reset") == 0) {
            m->retarget_reset = true;
        } else if (tk->n > 2) {
            seterr(err, errlen, "retarget: unexpected '%s' (expected reset)", tk->t[2]);
            goto out;
        }
        rc = 0;
    } else if (strcmp(w, "inject") == 0) {
        static const char *const kinds[] = {"fatal", "auth-fail", "startup-error", NULL};
        if (a1 && strcmp(a1, "fatal") == 0) {
            m->kind = C_INJECT;
            if ((i = parse_inj(tk, 2, m, err, errlen)) < 0)
                goto out;
            rc = parse_tail(tk, i, OPT_TARGET, m, err, errlen);
        } else if (a1 && strcmp(a1, "startup-error") == 0) {
            m->kind = C_INJECT;
            m->target = T_NEW;
            if ((i = parse_inj(tk, 2, m, err, errlen)) < 0)
                goto out;
            rc = parse_tail(tk, i, OPT_NEWNTH, m, err, errlen);
        } else if (a1 && strcmp(a1, "auth-fail") == 0) {
            m->kind = C_AUTHFAIL;
            m->target = T_NEW;
            i = 2;
            if (i < tk->n && strcmp(tk->t[i], "new") != 0 && strcmp(tk->t[i], "nth") != 0) {
                snprintf(m->user, sizeof m->user, "%s", tk->t[i]);
                i++;
            }
            rc = parse_tail(tk, i, OPT_NEWNTH, m, err, errlen);
        } else {
            char hint[64] = "";
            if (a1)
                did_you_mean(a1, kinds, hint, sizeof hint);
            seterr(err, errlen, "inject: expected fatal, auth-fail or startup-error, got '%s'%s",
                   a1 ? a1 : "nothing", hint);
        }
    } else if (strcmp(w, "on-query") == 0) {
        if (tk->n == 2 && strcmp(a1, "clear") == 0) {
            m->kind = C_ONQUERY_CLEAR;
            rc = 0;
            goto out;
        }
        m->kind = C_ONQUERY;
        if (!a1 || !*a1 || tk->n < 3) {
            seterr(err, errlen,
                   "on-query: expected \"PATTERN\" reset|close|blackhole|error SQLSTATE");
            goto out;
        }
        if (strlen(a1) >= sizeof m->pattern) {
            seterr(err, errlen, "on-query: pattern longer than %zu bytes", sizeof m->pattern - 1);
            goto out;
        }
        snprintf(m->pattern, sizeof m->pattern, "%s", a1);
        const char *act = tk->t[2];
        if (strcmp(act, "reset") == 0 || strcmp(act, "close") == 0 ||
            strcmp(act, "blackhole") == 0) {
            m->qaction = act[0] == 'r' ? C_RESET : act[0] == 'c' ? C_CLOSE : C_BLACKHOLE;
            rc = parse_tail(tk, 3, 0, m, err, errlen);
        } else if (strcmp(act, "error") == 0) {
            m->qaction = C_INJECT;
            if ((i = parse_inj(tk, 3, m, err, errlen)) < 0)
                goto out;
            rc = parse_tail(tk, i, 0, m, err, errlen);
        } else {
            seterr(err, errlen, "on-query: unknown action '%s' (reset, close, blackhole, error)",
                   act);
        }
    } else if (strcmp(w, "heal") == 0 || strcmp(w, "stats") == 0 || strcmp(w, "conns") == 0 ||
               strcmp(w, "help") == 0) {
        m->kind = w[0] == 'h'   ? (w[1] == 'e' && w[2] == 'a' ? C_HEAL : C_HELP)
                  : w[0] == 's' ? C_STATS
                                : C_CONNS;
        rc = parse_tail(tk, 1, 0, m, err, errlen);
    } else {
        char hint[64];
        did_you_mean(w, COMMANDS, hint, sizeof hint);
        seterr(err, errlen, "unknown command '%s'%s", w, hint);
    }
out:
    free(tk);
    return rc;
}

/* ---- Command execution (loop thread) -------------------------------------------- */

static bool conn_idle(const struct conn *c, long long min_ms, int64_t now)
{
    if (now - c->last_active < min_ms * NS_PER_MS)
        return false;
    for (int d = 0; d < 2; d++)
        if (c->d[d].tx < c->d[d].rx)
            return false;
    switch (c->phase) {
    case FPROXY_PHASE_READY:
        return c->txn == 'I';
    case FPROXY_PHASE_RAW:
    case FPROXY_PHASE_TLS:
        return true;
    default:
        return false;
    }
}

static void set_shape(struct conn *c, const struct cmd *m, int d)
{
    struct dir *x = &c->d[d];
    switch (m->kind) {
    case C_BLACKHOLE:
        x->sh.blackhole = true;
        break;
    case C_LATENCY:
        x->sh.latency_ms = (int)m->a;
        x->sh.jitter_ms = (int)m->b;
        break;
    case C_BANDWIDTH:
        x->sh.bandwidth = m->a;
        if (m->a == 0)
            x->not_before = 0;
        break;
    case C_SLICER:
        x->sh.slice = (int)m->a;
        x->sh.slice_delay_us = (int)m->b;
        if (m->a == 0)
            x->not_before = 0;
        break;
    case C_LIMIT:
        x->limit_left = m->a > 0 ? m->a : -1;
        break;
    default:
        break;
    }
}

/* Applies a connection command to one connection. */
static void apply_conn(struct conn *c, const struct cmd *m)
{
    struct fproxy *p = c->p;
    switch (m->kind) {
    case C_RESET:
        p->st.resets++;
        conn_end(c, m->rst_sides & 1, m->rst_sides & 2);
        return;
    case C_CLOSE:
        p->st.closes++;
        conn_end(c, false, false);
        return;
    case C_INJECT:
        if (c->phase == FPROXY_PHASE_STARTUP && c->d[UP].pp.mode == PGP_STARTUP) {
            c->startup_inject = true;
            c->startup_inj = m->inj;
        } else if (c->phase != FPROXY_PHASE_TLS) {
            inject_now(c, &m->inj);
        }
        return;
    case C_AUTHFAIL:
        c->auth_fail = true;
        snprintf(c->auth_user, sizeof c->auth_user, "%s", m->user);
        return;
    case C_SLOWCLOSE:
        c->slow_close_ms = (int)m->a;
        return;
    default:
        for (int d = 0; d < 2; d++)
            if (m->dirs & (1 << d))
                set_shape(c, m, d);
        return;
    }
}

static bool is_setting(enum ckind k)
{
    return k == C_BLACKHOLE || k == C_LATENCY || k == C_BANDWIDTH || k == C_SLICER ||
           k == C_LIMIT || k == C_SLOWCLOSE;
}

static int add_rule(struct fproxy *p, const struct cmd *m, uint64_t nth)
{
    if (nth == 0 && is_setting(m->kind)) {
        /* A newer setting of the same kind replaces the older one. */
        struct rule **pr = &p->rules;
        while (*pr) {
            struct rule *r = *pr;
            if (r->nth == 0 && r->cmd.kind == m->kind && r->cmd.dirs == m->dirs) {
                *pr = r->next;
                free(r);
            } else {
                pr = &r->next;
            }
        }
    }
    struct rule *r = calloc(1, sizeof *r);
    if (!r)
        return -1;
    r->cmd = *m;
    r->nth = nth;
    struct rule **pr = &p->rules;
    while (*pr)
        pr = &(*pr)->next;
    *pr = r;
    return 0;
}

static const char *kind_word(enum ckind k)
{
    switch (k) {
    case C_RESET:
        return "reset";
    case C_CLOSE:
        return "close";
    case C_BLACKHOLE:
        return "blackhole";
    case C_LATENCY:
        return "latency";
    case C_BANDWIDTH:
        return "bandwidth";
    case C_SLICER:
        return "slicer";
    case C_LIMIT:
        return "limit-data";
    case C_SLOWCLOSE:
        return "slow-close";
    case C_INJECT:
        return "inject";
    case C_AUTHFAIL:
        return "inject auth-fail";
    default:
        return "?";
    }
}

/* Runs a connection command against its target. */
static int exec_conn_cmd(struct fproxy *p, const struct cmd *m, struct sbuf *out)
{
    int64_t now = now_ns();
    int n = 0;
    bool future = false;
    char what[64];
    if (m->kind == C_INJECT)
        snprintf(what, sizeof what, "inject %s", m->inj.sqlstate);
    else
        snprintf(what, sizeof what, "%s", kind_word(m->kind));
    if (m->kind == C_INJECT && !m->inj.message[0] && !known_sqlstate(m->inj.sqlstate)) {
        sb_printf(out, "error: inject: no default message for SQLSTATE %s; give one in quotes",
                  m->inj.sqlstate);
        return -1;
    }
    switch (m->target) {
    case T_CONN:
    case T_NTH: {
        struct conn *c;
        for (c = p->conns_head; c; c = c->next)
            if (c->id == (uint64_t)m->tval)
                break;
        if (c) {
            apply_conn(c, m);
            if (!c->dead)
                pump(c);
            n = 1;
        } else if (m->target == T_CONN || (uint64_t)m->tval <= p->st.accepted) {
            sb_printf(out, "error: %s: no open connection %lld", what, m->tval);
            return -1;
        } else {
            if (add_rule(p, m, (uint64_t)m->tval) < 0)
                goto oom;
            sb_printf(out, "ok %s armed for connection %lld", what, m->tval);
            return 0;
        }
        break;
    }
    case T_ALL:
    case T_IDLE: {
        struct conn *c = p->conns_head, *next;
        /* Connections accepted while applying (none: this runs on the loop
         * thread) cannot appear, so the walk sees exactly the open ones. */
        for (; c; c = next) {
            next = c->next;
            if (m->target == T_IDLE && !conn_idle(c, m->tval, now))
                continue;
            if (m->kind == C_INJECT && c->phase == FPROXY_PHASE_TLS)
                continue;
            apply_conn(c, m);
            if (!c->dead)
                pump(c);
            n++;
        }
        if (m->target == T_ALL && is_setting(m->kind)) {
            if (add_rule(p, m, 0) < 0)
                goto oom;
            future = true;
        }
        break;
    }
    case T_NEW:
        if (add_rule(p, m, 0) < 0)
            goto oom;
        sb_printf(out, "ok %s armed for new connections", what);
        return 0;
    }
    sb_printf(out, "ok %s %d connection%s%s", what, n, n == 1 ? "" : "s",
              future ? " and new ones" : "");
    return 0;
oom:
    sb_printf(out, "error: out of memory");
    return -1;
}

static void heal(struct fproxy *p, struct sbuf *out)
{
    char e[200] = "";
    p->accept_close = false;
    p->hang = false;
    p->nqrules = 0;
    while (p->rules) {
        struct rule *r = p->rules;
        p->rules = r->next;
        free(r);
    }
    if (p->listenfd < 0 && open_listener(p, e, sizeof e) < 0) {
        /* Reported below; the rest of the heal still happens. */
    }
    int n = 0;
    struct conn *c = p->conns_head, *next;
    for (; c; c = next) {
        next = c->next;
        for (int d = 0; d < 2; d++) {
            struct dir *x = &c->d[d];
            memset(&x->sh, 0, sizeof x->sh);
            dir_clear_delays(x);
            x->limit_left = -1;
            if (x->shut_at > 0)
                x->shut_at = 1;
        }
        c->slow_close_ms = 0;
        c->auth_fail = false;
        c->startup_inject = false;
        if (c->fin_at > 0)
            c->fin_at = 0;
        if (c->hold_connect && !c->connected && !c->connecting && c->d[UP].pp.mode != PGP_OFF) {
            c->hold_connect = false;
            start_upstream(c);
        }
        if (!c->dead)
            pump(c);
        n++;
    }
    if (e[0])
        sb_printf(out, "error: heal: every fault ended but the listener could not re-open: %s", e);
    else
        sb_printf(out, "ok healed (%d connection%s)", n, n == 1 ? "" : "s");
}

static void conn_info(const struct conn *c, int64_t now, struct fproxy_conn_info *ci)
{
    memset(ci, 0, sizeof *ci);
    ci->id = c->id;
    ci->phase = c->phase;
    ci->idle_ms = (now - c->last_active) / NS_PER_MS;
    ci->bytes_up = c->d[UP].tx;
    ci->bytes_down = c->d[DOWN].tx;
    ci->upstream_connected = c->connected;
    ci->blackholed = c->d[UP].sh.blackhole || c->d[DOWN].sh.blackhole;
    ci->server_closed = c->d[DOWN].dst_shut;
    ci->delay_ms_total[0] = c->d[UP].delay_total_ms;
    ci->delay_ms_total[1] = c->d[DOWN].delay_total_ms;
    ci->client_port = c->client_port;
    ci->buffered[0] = c->d[UP].tail - c->d[UP].head;
    ci->buffered[1] = c->d[DOWN].tail - c->d[DOWN].head;
    snprintf(ci->user, sizeof ci->user, "%s", c->user);
}

static void ctl_stats(struct fproxy *p);

static void stats_line(struct fproxy *p, struct sbuf *out)
{
    ctl_stats(p);
    const struct fproxy_stats *s = &p->st;
    sb_printf(out,
              "ok accepted=%llu refused=%llu upstream_connects=%llu upstream_failures=%llu "
              "ended_before_ready=%llu active=%llu bytes_up=%llu bytes_down=%llu resets=%llu "
              "closes=%llu injected=%llu query_matches=%llu control_buffered=%llu "
              "control_buffered_max=%llu listening=%d",
              s->accepted, s->refused, s->upstream_connects, s->upstream_failures,
              s->ended_before_ready, s->active, s->bytes_up, s->bytes_down, s->resets, s->closes,
              s->injected, s->query_matches, s->control_buffered, s->control_buffered_max,
              s->listening);
}

static void conns_line(struct fproxy *p, struct sbuf *out)
{
    int64_t now = now_ns();
    sb_printf(out, "ok %llu conns", p->st.active);
    const char *sep = ": ";
    for (struct conn *c = p->conns_head; c; c = c->next) {
        struct fproxy_conn_info ci;
        conn_info(c, now, &ci);
        sb_printf(out, "%sid=%llu phase=%s idle_ms=%lld up=%llu down=%llu%s%s%s", sep, ci.id,
                  fproxy_phase_name(ci.phase), ci.idle_ms, ci.bytes_up, ci.bytes_down,
                  ci.user[0] ? " user=" : "", ci.user,
                  ci.blackholed                      ? " blackhole"
                  : c->hold_connect && !c->connected ? " hung"
                  : !c->connected                    ? " connecting"
                                                     : "");
        sep = "; ";
    }
}

/* Drains the accept queue before the listener closes, so the connections
 * that completed their handshake are served rather than reset. */
static void accept_all(struct fproxy *p);

static int exec_line(struct fproxy *p, const char *line, struct sbuf *out)
{
    struct cmd m;
    char e[400];
    if (parse_command(line, &m, e, sizeof e) < 0) {
        sb_printf(out, "error: %s", e);
        return -1;
    }
    switch (m.kind) {
    case C_STATS:
        stats_line(p, out);
        return 0;
    case C_CONNS:
        conns_line(p, out);
        return 0;
    case C_HELP:
        sb_printf(out, "ok commands: reset close blackhole refuse accept-close hang-connect "
                       "latency bandwidth slicer limit-data slow-close retarget inject on-query "
                       "heal stats conns help; targets: all idle [MS] conn ID nth N new; "
                       "see proxy.h or the README");
        return 0;
    case C_HEAL:
        heal(p, out);
        return strncmp(out->s ? out->s : "", "ok", 2) == 0 ? 0 : -1;
    case C_REFUSE:
        if (m.on && p->listenfd >= 0) {
            accept_all(p);
            close(p->listenfd);
            p->listenfd = -1;
            p->st.listening = 0;
        } else if (!m.on && p->listenfd < 0 && open_listener(p, e, sizeof e) < 0) {
            sb_printf(out, "error: refuse off: %s", e);
            return -1;
        }
        sb_printf(out, "ok refuse %s", m.on ? "on" : "off");
        return 0;
    case C_ACCEPT_CLOSE:
        p->accept_close = m.on;
        sb_printf(out, "ok accept-close %s", m.on ? "on" : "off");
        return 0;
    case C_HANG:
        p->hang = m.on;
        if (!m.on)
            for (struct conn *c = p->conns_head, *next; c; c = next) {
                next = c->next;
                if (c->hold_connect && !c->connected && !c->connecting &&
                    c->d[UP].pp.mode != PGP_OFF &&
                    !(c->d[UP].sh.blackhole && c->d[DOWN].sh.blackhole)) {
                    c->hold_connect = false;
                    start_upstream(c);
                    if (!c->dead)
                        pump(c);
                }
            }
        sb_printf(out, "ok hang-connect %s", m.on ? "on" : "off");
        return 0;
    case C_RETARGET: {
        struct sockaddr_storage ss;
        socklen_t sl;
        if (resolve(m.host, m.port, &ss, &sl, e, sizeof e) < 0) {
            sb_printf(out, "error: retarget: %s", e);
            return -1;
        }
        p->up_addr = ss;
        p->up_len = sl;
        snprintf(p->up_name, sizeof p->up_name, "%s:%d", m.host, m.port);
        int n = 0;
        if (m.retarget_reset)
            for (struct conn *c = p->conns_head, *next; c; c = next) {
                next = c->next;
                p->st.resets++;
                conn_end(c, true, true);
                n++;
            }
        if (m.retarget_reset)
            sb_printf(out, "ok retarget %s (reset %d connection%s)", p->up_name, n,
                      n == 1 ? "" : "s");
        else
            sb_printf(out, "ok retarget %s", p->up_name);
        return 0;
    }
    case C_ONQUERY: {
        if (p->nqrules == MAX_ONQUERY) {
            sb_printf(out, "error: on-query: at most %d rules (on-query clear)", MAX_ONQUERY);
            return -1;
        }
        if (m.qaction == C_INJECT && !m.inj.message[0] && !known_sqlstate(m.inj.sqlstate)) {
            sb_printf(out, "error: on-query: no default message for SQLSTATE %s; give one",
                      m.inj.sqlstate);
            return -1;
        }
        struct qrule *q = &p->qrules[p->nqrules++];
        snprintf(q->pattern, sizeof q->pattern, "%s", m.pattern);
        q->glob = strpbrk(m.pattern, "*?[") != NULL;
        q->action = m.qaction;
        q->inj = m.inj;
        sb_printf(out, "ok on-query rule %d (%s)", p->nqrules, q->glob ? "glob" : "substring");
        return 0;
    }
    case C_ONQUERY_CLEAR:
        p->nqrules = 0;
        sb_printf(out, "ok on-query rules cleared");
        return 0;
    default:
        return exec_conn_cmd(p, &m, out);
    }
}

/* ---- Accepting ---------------------------------------------------------------------- */

static void accept_all(struct fproxy *p)
{
    while (p->listenfd >= 0) {
        struct sockaddr_in peer;
        socklen_t l = sizeof peer;
        int fd = accept4(p->listenfd, (struct sockaddr *)&peer, &l, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            /* EAGAIN, or EMFILE and friends: with edge-triggered epoll the
             * rest waits for the next connection; nothing better to do. */
            return;
        }
        accept_one(p, fd, &peer);
    }
}

/* ---- Control socket -------------------------------------------------------------- */

static void ctl_free(struct fproxy *p, struct ctl *k)
{
    struct ctl **pk = &p->ctls;
    while (*pk && *pk != k)
        pk = &(*pk)->next;
    if (*pk)
        *pk = k->next;
    close(k->fd);
    free(k->out.s);
    free(k);
}

/* Bytes of answers held for k, not yet taken by the client. */
static size_t ctl_pending(const struct ctl *k)
{
    return k->out.len - k->outoff;
}

static void ctl_note_pending(struct fproxy *p, const struct ctl *k)
{
    if (ctl_pending(k) > p->st.control_buffered_max)
        p->st.control_buffered_max = ctl_pending(k);
}

/* Brings the counters that are sums over the control clients up to date. */
static void ctl_stats(struct fproxy *p)
{
    p->st.control_buffered = 0;
    for (struct ctl *k = p->ctls; k; k = k->next)
        p->st.control_buffered += ctl_pending(k);
}

/* Sends what is held for k. Returns false if k is gone: the client went
 * away, or it closed its side and has every answer. */
static bool ctl_flush(struct fproxy *p, struct ctl *k)
{
    while (k->outoff < k->out.len) {
        ssize_t w =
            send(k->fd, k->out.s + k->outoff, k->out.len - k->outoff, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            k->outoff += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            ctl_free(p, k);
            return false;
        }
    }
    if (k->outoff < k->out.len) {
        /* What was sent is dropped from the front, so the buffer stays
         * the size of what is held rather than of all answers ever. */
        if (k->outoff > 0) {
            memmove(k->out.s, k->out.s + k->outoff, k->out.len - k->outoff + 1);
            k->out.len -= k->outoff;
            k->outoff = 0;
        }
        return true;
    }
    k->outoff = 0;
    sb_reset(&k->out);
    if (k->out.cap > CTL_KEEP) {
        /* A burst of answers is over: its buffer goes back. */
        free(k->out.s);
        memset(&k->out, 0, sizeof k->out);
    }
    if (k->eof && k->rpos == k->rlen) {
        ctl_free(p, k);
        return false;
    }
    return true;
}

static void ctl_line(struct fproxy *p, struct ctl *k, char *line)
{
    size_t l = strlen(line);
    while (l > 0 && (line[l - 1] == '\r' || line[l - 1] == ' '))
        line[--l] = '\0';
    const char *s = line;
    while (*s == ' ' || *s == '\t')
        s++;
    if (!*s || *s == '#')
        return; /* blank lines and comments get no answer */
    struct sbuf r = {0};
    exec_line(p, s, &r);
    if (r.oom || !r.s)
        sb_printf(&k->out, "error: out of memory\n");
    else
        sb_printf(&k->out, "%s\n", r.s);
    free(r.s);
    ctl_note_pending(p, k);
}

/* One byte of a client's input: lines are executed as they complete. */
static void ctl_byte(struct fproxy *p, struct ctl *k, char ch)
{
    if (ch == '\n') {
        if (k->discarding) {
            sb_printf(&k->out, "error: line too long (at most %d bytes)\n", CTL_LINE_MAX - 1);
            ctl_note_pending(p, k);
            k->discarding = false;
        } else {
            k->in[k->inlen] = '\0';
            ctl_line(p, k, k->in);
        }
        k->inlen = 0;
    } else if (!k->discarding) {
        if (k->inlen + 1 >= sizeof k->in)
            k->discarding = true;
        else
            k->in[k->inlen++] = ch;
    }
}

/*
 * Serves a control client: runs the commands it sent and sends the
 * answers. While FPROXY_CONTROL_BUFFER bytes or more of answers wait for
 * it, its input is neither parsed nor read (back-pressure: its commands
 * wait in rbuf and in the kernel), so a client that does not read cannot
 * grow the proxy; sending resumes it on the next EPOLLOUT.
 */
static void ctl_event(struct fproxy *p, struct ctl *k)
{
    for (;;) {
        while (k->rpos < k->rlen && ctl_pending(k) < FPROXY_CONTROL_BUFFER)
            ctl_byte(p, k, k->rbuf[k->rpos++]);
        size_t before = ctl_pending(k);
        if (!ctl_flush(p, k))
            return;
        if (ctl_pending(k) >= FPROXY_CONTROL_BUFFER) {
            if (ctl_pending(k) < before)
                continue; /* the client took some: room for more answers */
            return;       /* until the client reads */
        }
        if (k->rpos < k->rlen)
            continue;
        if (k->eof)
            return; /* answers still going out; freed once sent */
        ssize_t r = recv(k->fd, k->rbuf, sizeof k->rbuf, MSG_DONTWAIT);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (r <= 0) {
            k->eof = true;
            continue;
        }
        k->rpos = 0;
        k->rlen = (size_t)r;
    }
}

static void ctl_accept(struct fproxy *p)
{
    for (;;) {
        int fd = accept4(p->ctlfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        struct ctl *k = calloc(1, sizeof *k);
        if (!k) {
            close(fd);
            continue;
        }
        k->ev.kind = EV_CTL;
        k->p = p;
        k->fd = fd;
        if (ep_add(p, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, &k->ev) < 0) {
            close(fd);
            free(k);
            continue;
        }
        k->next = p->ctls;
        p->ctls = k;
        ctl_event(p, k);
    }
}

/* Removes the control socket file, but only if the path still names the
 * socket this proxy bound: another proxy may have replaced it since (after
 * this one was thought dead), and its socket is not ours to remove. */
static void remove_control(struct fproxy *p)
{
    struct stat st;
    if (!p->ctl_bound)
        return;
    p->ctl_bound = false;
    if (lstat(p->control_path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == p->ctl_dev &&
        st.st_ino == p->ctl_ino)
        unlink(p->control_path);
}

/* Whether something accepts connections on the Unix socket at sa: 1 yes,
 * 0 no (a stale file, left by a proxy that died), -1 cannot tell (errno). */
static int control_live(const struct sockaddr_un *sa)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int rc = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
    int e = errno;
    close(fd);
    if (rc == 0 || e == EAGAIN || e == EINPROGRESS)
        return 1; /* EAGAIN: listening, its backlog full */
    if (e == ECONNREFUSED || e == ENOENT)
        return 0;
    errno = e;
    return -1;
}

/*
 * Binds the control socket. Anyone who can connect to it can steer the
 * proxy (retarget, inject), so it is created mode 0600 whatever the umask:
 * the mode is set on the socket before bind, which on Linux is the mode the
 * file is created with (less the umask), and checked (and fixed) before
 * listen, so nobody can connect while it is wider. The umask itself is not
 * touched: it is process-wide, and other threads may be creating files. A
 * socket another proxy listens on is refused rather than taken over; one
 * nobody listens on is stale and is replaced.
 */
static int open_control(struct fproxy *p, char *err, size_t errlen)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(p->control_path) >= sizeof sa.sun_path) {
        seterr(err, errlen, "control socket path too long: %s", p->control_path);
        return -1;
    }
    strcpy(sa.sun_path, p->control_path);
    struct stat st;
    if (lstat(p->control_path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            seterr(err, errlen, "control socket %s: exists and is not a socket", p->control_path);
            return -1;
        }
        int live = control_live(&sa);
        if (live == 1) {
            seterr(err, errlen,
                   "control socket %s: another proxy is listening there (stop it, or choose "
                   "another path)",
                   p->control_path);
            return -1;
        }
        if (live < 0) {
            seterr(err, errlen, "control socket %s: exists, and connecting to it failed: %s",
                   p->control_path, strerror(errno));
            return -1;
        }
        unlink(p->control_path);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        seterr(err, errlen, "socket(AF_UNIX): %s", strerror(errno));
        return -1;
    }
    (void)fchmod(fd, 0600);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        seterr(err, errlen, "control socket %s: %s", p->control_path, strerror(errno));
        goto fail;
    }
    if (lstat(p->control_path, &st) < 0 || !S_ISSOCK(st.st_mode)) {
        seterr(err, errlen, "control socket %s: gone right after bind", p->control_path);
        goto fail;
    }
    p->ctl_bound = true;
    p->ctl_dev = st.st_dev;
    p->ctl_ino = st.st_ino;
    if ((st.st_mode & 0777) != 0600 && chmod(p->control_path, 0600) < 0) {
        seterr(err, errlen, "control socket %s: chmod 0600: %s", p->control_path, strerror(errno));
        goto fail;
    }
    if (listen(fd, 64) < 0) {
        seterr(err, errlen, "control socket %s: listen: %s", p->control_path, strerror(errno));
        goto fail;
    }
    if (ep_add(p, fd, EPOLLIN | EPOLLET, &p->ctl_listen_ev) < 0) {
        seterr(err, errlen, "epoll_ctl: %s", strerror(errno));
        goto fail;
    }
    p->ctlfd = fd;
    return 0;
fail:
    close(fd);
    remove_control(p);
    return -1;
}

/* ---- The loop ------------------------------------------------------------------------- */

static void serve_request(struct fproxy *p, struct req *r)
{
    switch (r->kind) {
    case REQ_LINE:
        r->rc = exec_line(p, r->line, &r->reply);
        break;
    case REQ_STATS:
        ctl_stats(p);
        *r->stats = p->st;
        r->rc = 0;
        break;
    case REQ_CONNS: {
        int64_t now = now_ns();
        int n = 0;
        for (struct conn *c = p->conns_head; c; c = c->next, n++)
            if (n < r->max)
                conn_info(c, now, &r->conns[n]);
        r->rc = n;
        break;
    }
    }
}

static void *loop(void *arg)
{
    struct fproxy *p = arg;
    struct epoll_event evs[256];
    for (;;) {
        run_timers(p);
        int n = epoll_wait(p->epfd, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        bool stop = false;
        for (int i = 0; i < n; i++) {
            struct ev *ev = evs[i].data.ptr;
            switch (ev->kind) {
            case EV_SOCK:
                sock_event((struct endpoint *)ev, evs[i].events);
                break;
            case EV_LISTEN:
                accept_all(p);
                break;
            case EV_TIMER: {
                uint64_t x;
                if (read(p->timerfd, &x, sizeof x) < 0) {
                    /* Spurious wake-up: nothing to consume. */
                }
                p->armed_at = -1; /* it fired: re-arm on the next pass */
                break;
            }
            case EV_CTL_LISTEN:
                ctl_accept(p);
                break;
            case EV_CTL: {
                /* A control client freed by an earlier event of this batch
                 * cannot appear: each has one registration and one event. */
                ctl_event(p, (struct ctl *)ev);
                break;
            }
            case EV_WAKE: {
                uint64_t x;
                if (read(p->wakefd, &x, sizeof x) < 0) {
                    /* Spurious: the request check below decides. */
                }
                pthread_mutex_lock(&p->mu);
                struct req *r = p->req;
                stop = p->stop;
                pthread_mutex_unlock(&p->mu);
                if (r && !stop) {
                    serve_request(p, r);
                    pthread_mutex_lock(&p->mu);
                    p->req = NULL;
                    r->done = true;
                    pthread_cond_broadcast(&p->cv);
                    pthread_mutex_unlock(&p->mu);
                }
                break;
            }
            }
        }
        while (p->dead) {
            struct conn *c = p->dead;
            p->dead = c->dnext;
            conn_free(c);
        }
        if (stop)
            break;
    }
    return NULL;
}

/* ---- Public API ------------------------------------------------------------------------ */

void fproxy_config_init(struct fproxy_config *c)
{
    memset(c, 0, sizeof *c);
    c->listen_host = "127.0.0.1";
    c->buffer_size = 65536;
}

const char *fproxy_phase_name(enum fproxy_phase ph)
{
    switch (ph) {
    case FPROXY_PHASE_STARTUP:
        return "startup";
    case FPROXY_PHASE_AUTH:
        return "auth";
    case FPROXY_PHASE_READY:
        return "ready";
    case FPROXY_PHASE_QUERY:
        return "query";
    case FPROXY_PHASE_TLS:
        return "tls";
    case FPROXY_PHASE_RAW:
        return "raw";
    }
    return "?";
}

static void release_all(struct fproxy *p)
{
    while (p->conns_head)
        conn_end(p->conns_head, false, false);
    while (p->dead) {
        struct conn *c = p->dead;
        p->dead = c->dnext;
        conn_free(c);
    }
    while (p->ctls)
        ctl_free(p, p->ctls);
    p->st.control_buffered = 0;
    while (p->rules) {
        struct rule *r = p->rules;
        p->rules = r->next;
        free(r);
    }
    if (p->listenfd >= 0)
        close(p->listenfd);
    p->listenfd = -1;
    p->st.listening = 0;
    if (p->ctlfd >= 0)
        close(p->ctlfd);
    p->ctlfd = -1;
    remove_control(p);
    if (p->epfd >= 0)
        close(p->epfd);
    if (p->wakefd >= 0)
        close(p->wakefd);
    if (p->timerfd >= 0)
        close(p->timerfd);
    p->epfd = p->wakefd = p->timerfd = -1;
}

int fproxy_open(const struct fproxy_config *cfg, struct fproxy **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!cfg->upstream_host || !cfg->upstream_host[0] || cfg->upstream_port <= 0 ||
        cfg->upstream_port > 65535) {
        seterr(err, errlen, "fproxy: upstream host and port (1..65535) are required");
        return -1;
    }
    if (cfg->listen_port < 0 || cfg->listen_port > 65535) {
        seterr(err, errlen, "fproxy: listen port %d out of range", cfg->listen_port);
        return -1;
    }
    struct fproxy *p = calloc(1, sizeof *p);
    if (!p) {
        seterr(err, errlen, "fproxy: out of memory");
        return -1;
    }
    p->epfd = p->wakefd = p->timerfd = p->listenfd = p->ctlfd = -1;
    pthread_mutex_init(&p->call_mu, NULL);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    snprintf(p->listen_host, sizeof p->listen_host, "%s",
             cfg->listen_host ? cfg->listen_host : "127.0.0.1");
    p->port = cfg->listen_port;
    p->bufsize = cfg->buffer_size >= 1024 ? cfg->buffer_size : 65536;
    p->seed = cfg->seed;
    p->wake_ev.kind = EV_WAKE;
    p->timer_ev.kind = EV_TIMER;
    p->listen_ev.kind = EV_LISTEN;
    p->ctl_listen_ev.kind = EV_CTL_LISTEN;
    if (cfg->control_path && !(p->control_path = strdup(cfg->control_path))) {
        seterr(err, errlen, "fproxy: out of memory");
        goto fail;
    }
    if (resolve(cfg->upstream_host, cfg->upstream_port, &p->up_addr, &p->up_len, err, errlen) < 0)
        goto fail;
    snprintf(p->up_name, sizeof p->up_name, "%s:%d", cfg->upstream_host, cfg->upstream_port);
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    p->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (p->epfd < 0 || p->wakefd < 0 || p->timerfd < 0) {
        seterr(err, errlen, "fproxy: epoll/eventfd/timerfd: %s", strerror(errno));
        goto fail;
    }
    if (ep_add(p, p->wakefd, EPOLLIN, &p->wake_ev) < 0 ||
        ep_add(p, p->timerfd, EPOLLIN, &p->timer_ev) < 0) {
        seterr(err, errlen, "fproxy: epoll_ctl: %s", strerror(errno));
        goto fail;
    }
    if (open_listener(p, err, errlen) < 0)
        goto fail;
    if (p->control_path && open_control(p, err, errlen) < 0)
        goto fail;
    int rc = pthread_create(&p->thread, NULL, loop, p);
    if (rc != 0) {
        seterr(err, errlen, "fproxy: pthread_create: %s", strerror(rc));
        goto fail;
    }
    p->thread_started = true;
    *out = p;
    return 0;
fail:
    release_all(p);
    pthread_mutex_destroy(&p->call_mu);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->control_path);
    free(p);
    return -1;
}

int fproxy_port(const struct fproxy *p)
{
    return p->port;
}

/* Hands a request to the loop thread and waits for it to be served. */
static int call(struct fproxy *p, struct req *r)
{
    pthread_mutex_lock(&p->call_mu);
    pthread_mutex_lock(&p->mu);
    if (p->stopped || p->stop) {
        pthread_mutex_unlock(&p->mu);
        pthread_mutex_unlock(&p->call_mu);
        return -1;
    }
    p->req = r;
    uint64_t one = 1;
    if (write(p->wakefd, &one, sizeof one) < 0) {
        /* The counter cannot overflow with one request at a time. */
    }
    while (!r->done)
        pthread_cond_wait(&p->cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->call_mu);
    return 0;
}

int fproxy_command(struct fproxy *p, const char *line, char *reply, size_t replylen)
{
    struct req r;
    memset(&r, 0, sizeof r);
    r.kind = REQ_LINE;
    r.line = line ? line : "";
    int rc;
    if (call(p, &r) < 0) {
        seterr(reply, replylen, "error: the proxy is stopped");
        rc = -1;
    } else if (r.reply.oom || !r.reply.s) {
        seterr(reply, replylen, "error: out of memory");
        rc = -1;
    } else {
        seterr(reply, replylen, "%s", r.reply.s);
        rc = r.rc < 0 ? -1 : 0;
    }
    free(r.reply.s);
    return rc;
}

int fproxy_get_stats(struct fproxy *p, struct fproxy_stats *out)
{
    struct req r;
    memset(&r, 0, sizeof r);
    r.kind = REQ_STATS;
    r.stats = out;
    if (call(p, &r) < 0) {
        *out = p->last_stats;
        return -1;
    }
    return 0;
}

int fproxy_conns(struct fproxy *p, struct fproxy_conn_info *out, int max)
{
    struct req r;
    memset(&r, 0, sizeof r);
    r.kind = REQ_CONNS;
    r.conns = out;
    r.max = max < 0 ? 0 : max;
    if (call(p, &r) < 0)
        return -1;
    return r.rc;
}

void fproxy_stop(struct fproxy *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->call_mu);
    pthread_mutex_lock(&p->mu);
    if (p->stopped) {
        pthread_mutex_unlock(&p->mu);
        pthread_mutex_unlock(&p->call_mu);
        return;
    }
    p->stop = true;
    uint64_t one = 1;
    if (write(p->wakefd, &one, sizeof one) < 0) {
        /* See call(). */
    }
    pthread_mutex_unlock(&p->mu);
    if (p->thread_started)
        pthread_join(p->thread, NULL);
    /* The loop thread is gone: its state is ours now. */
    release_all(p);
    p->last_stats = p->st;
    pthread_mutex_lock(&p->mu);
    p->stopped = true;
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->call_mu);
}

void fproxy_close(struct fproxy *p)
{
    if (!p)
        return;
    fproxy_stop(p);
    pthread_mutex_destroy(&p->call_mu);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->control_path);
    free(p);
}
