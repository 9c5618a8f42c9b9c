/*
 * fproxy: a TCP fault proxy that understands the PostgreSQL protocol.
 *
 * The proxy sits between clients (a pool, psql) and a PostgreSQL server and
 * breaks connections the ways production networks and servers do: resets
 * and closes (idle connections included, at once), partitions, a real
 * "connection refused", connects that never complete, latency, bandwidth
 * limits, and PostgreSQL errors (FATAL 57P01, 28P01, 53300, ...) injected
 * at message boundaries. It runs one event-loop thread (epoll, non-blocking
 * sockets, no thread per connection) with bounded per-direction buffers:
 * when one side's buffer is full the proxy stops reading the other side.
 *
 * Faults are given as command lines, the same words the scenario language
 * and the control socket use. One line is one command; the answer is one
 * line starting with "ok" or "error: <why>". Every command takes effect on
 * the loop thread as soon as fproxy_command() returns.
 *
 * Grammar (words in CAPITALS are values; [..] optional; a|b alternatives):
 *
 *   TARGET  := all | idle [MS] | conn ID | nth N | new
 *              all      every open connection (default);
 *              idle MS  open connections with nothing in flight for at least
 *                       MS milliseconds (default 0); for PostgreSQL
 *                       connections also only between queries (phase ready);
 *              conn ID  the open connection with that id (ids are 1, 2, ...
 *                       in accept order, as in `conns`);
 *              nth N    the Nth accepted connection: now if it is open,
 *                       else when it is accepted;
 *              new      every connection accepted from now until `heal`.
 *   DIR     := up | down | both      up = client to server (default both)
 *   SIDE    := client | server | both   which socket gets the RST
 *
 *   Actions (with `all` they hit the connections open now):
 *   reset [TARGET] [SIDE]        abort with RST (SO_LINGER 0) on SIDE
 *                                (default both); the other side gets a FIN
 *   close [TARGET]               close both sides with a FIN
 *   inject fatal SQLSTATE ["MESSAGE"] [TARGET]
 *                                send ErrorResponse (FATAL, SQLSTATE,
 *                                MESSAGE) to the client at the next message
 *                                boundary, then close; MESSAGE defaults to
 *                                PostgreSQL's text for known codes (57P01,
 *                                57P02, 57P03, 53300, 28P01, 28000, 3D000,
 *                                25P03, 08P01). With `new`/`nth` the error
 *                                answers the client's StartupMessage.
 *   inject auth-fail [USER] [new|nth N]
 *                                when the server accepts the client's
 *                                password (AuthenticationSASLFinal or
 *                                AuthenticationOk), send FATAL 28P01
 *                                `password authentication failed for user
 *                                "USER"` instead, then close (default: new,
 *                                USER from the StartupMessage)
 *   inject startup-error SQLSTATE ["MESSAGE"] [new|nth N]
 *                                answer the client's StartupMessage with
 *                                that FATAL instead of forwarding it
 *                                (default: new)
 *
 *   Settings (with `all` they apply to open and new connections until
 *   `heal`; `new` only to new ones):
 *   blackhole [TARGET] [DIR]     stop forwarding (data is held, sockets stay
 *                                open) until heal: a partition
 *   latency MS [jitter MS] [TARGET] [DIR]
 *                                delay every chunk by MS +- jitter (per
 *                                direction, so a round trip gains 2*MS)
 *   bandwidth BYTES_PER_S [TARGET] [DIR]    0 = unlimited
 *   slicer BYTES [delay US] [TARGET] [DIR]  write at most BYTES per write,
 *                                US microseconds apart (default 1000);
 *                                0 = off
 *   limit-data BYTES [TARGET] [DIR]  forward BYTES more, then close both
 *                                sides (FIN); 0 = off
 *   slow-close MS [TARGET]       when a peer closes, pass the close on MS
 *                                later; 0 = off
 *
 *   Proxy-wide:
 *   refuse on|off                close the listening socket, so new
 *                                connections get ECONNREFUSED; off re-opens
 *                                it on the same port
 *   accept-close on|off          accept new connections and close them at
 *                                once (FIN), before any upstream connect
 *   hang-connect on|off          accept new connections but never connect
 *                                upstream (off/heal: they connect then)
 *   retarget HOST:PORT [reset]   new connections go to HOST:PORT; with reset
 *                                the open ones are reset (failover)
 *   on-query "PATTERN" reset|close|blackhole|error SQLSTATE ["MESSAGE"]
 *                                when a client sends a Query or Parse whose
 *                                text matches PATTERN (a glob if it has * ?
 *                                or [, else a substring; the first 4 KiB of
 *                                the text are matched), act on that
 *                                connection; the query is not forwarded
 *                                (blackhole: held). Up to 16 rules.
 *   on-query clear               remove the rules
 *   heal                         end every fault and setting above except
 *                                retarget: partitions resume forwarding,
 *                                hung connects connect, the listener
 *                                re-opens
 *   stats                        ok accepted=N refused=N ... (the counters of
 *                                struct fproxy_stats, one key=value each)
 *   conns                        ok N conns: one "id=.. phase=.. idle_ms=..
 *                                up=.. down=.." group per connection, "; "
 *                                separated, on one line
 *   help                         the command words
 *
 * Values with spaces are double-quoted ("a \"b\""). A command the proxy
 * cannot parse or apply answers "error: ..." and changes nothing.
 *
 * Control socket: each client's commands are answered in order. Answers
 * the client has not read yet are held for it up to FPROXY_CONTROL_BUFFER
 * bytes; past that the proxy reads no more commands from that client until
 * it has read enough of them (back-pressure: nothing is dropped, and a
 * client that pipelines faster than it reads is slowed, not cut off). One
 * answer may take the held bytes past the bound by its own length. Other
 * clients and the proxied connections are served meanwhile. What was held
 * for a client is freed when it goes.
 *
 * Randomness: latency jitter is the only random choice. It comes from a
 * xorshift generator seeded from (seed, connection id, direction), so the
 * same seed gives the same delays on the same connection; seed 0 uses a
 * fixed default seed (never the clock).
 *
 * SSL: SSLRequest and GSSENCRequest are passed to the server and its
 * one-byte answer back. If the server accepts TLS the proxy can no longer
 * read the protocol (phase "tls"): byte-level faults still work, protocol
 * faults (inject, on-query, phases) do not. Clients should use
 * sslmode=disable or servers ssl=off.
 *
 * Threads: fproxy_command, fproxy_get_stats and fproxy_conns may be called
 * from any thread (they are served by the loop thread), but not
 * concurrently with fproxy_close.
 */
#ifndef PGFAULT_PROXY_H
#define PGFAULT_PROXY_H

#include <stddef.h>
#include <stdint.h>

#define FPROXY_MUSTCHECK __attribute__((warn_unused_result))

/* Bytes of unread answers the control socket holds for one client before
 * it stops reading that client's commands (see "Control socket" above). */
#define FPROXY_CONTROL_BUFFER (1024 * 1024)

struct fproxy;

struct fproxy_config {
    const char *listen_host;   /* numeric address; default "127.0.0.1" */
    int listen_port;           /* 0 (default): a free port, see fproxy_port() */
    const char *upstream_host; /* host name or address of the server */
    int upstream_port;
    unsigned long seed;       /* jitter seed; 0: a fixed default */
    const char *control_path; /* Unix socket for control lines, mode 0600; NULL: none */
    size_t buffer_size;       /* bytes per direction per connection; default 65536 */
};

/* Fills c with the defaults above (upstream unset). */
void fproxy_config_init(struct fproxy_config *c);

/*
 * Binds the listening socket (and the control socket if configured),
 * resolves the upstream, and starts the loop thread. The config strings are
 * copied. The control socket is created mode 0600 whatever the umask. If
 * its path names a socket another proxy (any process) listens on, opening
 * fails ("control socket PATH: another proxy is listening there ..."); a
 * socket file nobody listens on (left by a proxy that died) is replaced;
 * any other file is an error. On failure nothing is left open and err says
 * "what: why". Returns 0, or -1.
 */
int fproxy_open(const struct fproxy_config *c, struct fproxy **out, char *err,
                size_t errlen) FPROXY_MUSTCHECK;

/* The port the proxy listens on (also while refusing). */
int fproxy_port(const struct fproxy *p);

/*
 * Executes one command line (grammar above) on the loop thread and writes
 * the one-line answer ("ok ..." or "error: ...", no newline, truncated to
 * replylen) to reply. Returns 0 when the answer is "ok ...", -1 when it is
 * "error: ..." (also after the proxy was stopped).
 */
int fproxy_command(struct fproxy *p, const char *line, char *reply, size_t replylen);

struct fproxy_stats {
    unsigned long long accepted;           /* connections accepted (ids handed out) */
    unsigned long long refused;            /* accepted and closed by accept-close */
    unsigned long long upstream_connects;  /* upstream connect attempts */
    unsigned long long upstream_failures;  /* of those, failed: refused, unreachable, reset or
                                            * timed out before the connect completed; each once.
                                            * An attempt abandoned first (the client left, a
                                            * fault ended the connection) is not a failure */
    unsigned long long ended_before_ready; /* accepted connections that ended in phase startup
                                            * or auth, i.e. before the server's first
                                            * ReadyForQuery: failed logins, startup errors,
                                            * refused upstreams, clients that gave up, and
                                            * those closed by accept-close (also in refused).
                                            * Not tls/raw ones (CancelRequest, encrypted),
                                            * whose phase the proxy cannot follow */
    unsigned long long active;             /* connections open now */
    unsigned long long bytes_up;           /* client to server, forwarded */
    unsigned long long bytes_down;         /* server to client, forwarded (injected included) */
    unsigned long long resets;             /* connections reset by a fault */
    unsigned long long closes;             /* connections closed by a fault */
    unsigned long long injected;           /* ErrorResponses injected */
    unsigned long long query_matches;      /* on-query matches */
    int listening;                         /* 0 while refusing */

    /* The control socket: bytes of answers it holds now for its clients to
     * read (all together), and the most it ever held for one client, which
     * FPROXY_CONTROL_BUFFER bounds (plus one answer). */
    unsigned long long control_buffered;
    unsigned long long control_buffered_max;
};

/* Copies a consistent snapshot of the counters. Returns 0, or -1 if the
 * proxy was stopped (then out holds the last counters). */
int fproxy_get_stats(struct fproxy *p, struct fproxy_stats *out);

enum fproxy_phase {
    FPROXY_PHASE_STARTUP, /* before the client's StartupMessage (SSL negotiation included) */
    FPROXY_PHASE_AUTH,    /* StartupMessage sent, first ReadyForQuery not yet seen */
    FPROXY_PHASE_READY,   /* between queries */
    FPROXY_PHASE_QUERY,   /* a query sent, its ReadyForQuery not yet seen */
    FPROXY_PHASE_TLS,     /* the server accepted SSL/GSS encryption: opaque */
    FPROXY_PHASE_RAW,     /* not PostgreSQL traffic (or a CancelRequest) */
};

/* "startup", "auth", "ready", "query", "tls", "raw". */
const char *fproxy_phase_name(enum fproxy_phase ph);

struct fproxy_conn_info {
    unsigned long long id;
    enum fproxy_phase phase;
    long long idle_ms; /* since the last byte either way */
    unsigned long long bytes_up, bytes_down;
    int upstream_connected;         /* 0 while connecting or hung */
    int blackholed;                 /* a direction is partitioned */
    int server_closed;              /* the server closed its side and the proxy has passed
                                     * that on to the client (FIN forwarded) */
    long long delay_ms_total[2];    /* latency+jitter applied so far, up and down */
    unsigned long long buffered[2]; /* bytes held in the proxy, up and down */
    int client_port;                /* the client's source port: maps a PGconn (getsockname
                                     * on PQsocket) to its proxy connection */
    char user[64];                  /* from the StartupMessage, "" if none */
};

/* Copies up to max open connections (oldest first) to out and returns how
 * many are open (may exceed max), or -1 if the proxy was stopped. */
int fproxy_conns(struct fproxy *p, struct fproxy_conn_info *out, int max);

/* Stops the loop thread and closes every socket, and removes the control
 * socket file if the path still names the socket this proxy bound (never
 * one that replaced it). Idempotent; afterwards commands answer an error. */
void fproxy_stop(struct fproxy *p);

/* fproxy_stop, then frees p. NULL is a no-op. */
void fproxy_close(struct fproxy *p);

#endif
