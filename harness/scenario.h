/*
 * scenario: the parser of pgfault's scenario language (scn_*).
 *
 * A scenario file is line-oriented: one statement per line, `#` starts a
 * comment, words are separated by blanks, "double quotes" group a string.
 * The header says what the scenario is and how the pool is configured;
 * steps follow in order. The full grammar is in README.md ("Scenario
 * language"); in short:
 *
 *   scenario  idle-drop/server-kills-idle   (optional; must match the path)
 *   backends  fake proxy                    (default: both)
 *   pool      max=4 min_idle=2 acquire_timeout=300ms ...
 *   server    max_connections=20            (settings of the backend's server)
 *
 *   acquire   c1 [timeout=D] [expect OUTCOME] [within D] [not before D] [background]
 *   wait      c1                        (joins a background acquire, checks it)
 *   release   c1 [again]                discard c1
 *   query     c1 "SQL" [expect ok|error [SQLSTATE]] [within D]
 *   hold      D                         maintain
 *   workers   w N for D [hold D] [timeout=D]
 *   queue     q N [hold D] [timeout=D]  (N waiters queued in a known order)
 *   wait      q [within D]              (joins the queue's waiters)
 *   fault     KIND ARGS...              heal
 *   password  NEW                       (what the pool's password callback returns)
 *   close                               (pqpool_close)
 *   expect    METRIC OP VALUE
 *   eventually METRIC OP VALUE within D
 *
 * Durations are integers with a unit: us, ms, s. The parser checks
 * everything it can before anything runs: unknown words (with a "did you
 * mean" hint), malformed values, names used before they are acquired, and
 * steps the chosen backends cannot perform. Errors read
 * "FILE:LINE:COL: message".
 */
#ifndef PGFAULT_SCENARIO_H
#define PGFAULT_SCENARIO_H

#include <stddef.h>

#define SCN_MUSTCHECK __attribute__((warn_unused_result))

/* Backends, as a bit mask. */
enum scn_backend {
    SCN_BACKEND_FAKE = 1 << 0,  /* fakepq simulated: no server */
    SCN_BACKEND_PROXY = 1 << 1, /* fakepq passthrough -> fault proxy -> real server */
};
#define SCN_BACKEND_ALL (SCN_BACKEND_FAKE | SCN_BACKEND_PROXY)
#define SCN_NAME_MAX 64

/* What an acquire, wait or query is expected to end with. */
enum scn_outcome {
    SCN_OUT_OK,
    SCN_OUT_TIMEOUT, /* PQPOOL_ETIMEDOUT */
    SCN_OUT_AUTH,    /* PQPOOL_EAUTH */
    SCN_OUT_CONNECT, /* PQPOOL_ECONNECT */
    SCN_OUT_CONFIG,  /* PQPOOL_ECONFIG */
    SCN_OUT_CLOSED,  /* PQPOOL_ECLOSED */
    SCN_OUT_ERROR,   /* query: an error result (optionally with a SQLSTATE) */
    SCN_OUT__COUNT
};

/* Faults, of either layer. Each maps to fakepq calls on the fake backend
 * and to proxy/server actions on the proxy backend; scn_fault_backends()
 * says which backends can do which. */
enum scn_fault_kind {
    SCN_FAULT_KILL,            /* FATAL 57P01 to backends (target) */
    SCN_FAULT_DROP,            /* silent drop: EOF / RST, no message (target) */
    SCN_FAULT_PARTITION,       /* stop answering, keep sockets open (target) */
    SCN_FAULT_REFUSE,          /* new connections refused */
    SCN_FAULT_HANG_CONNECT,    /* new connections never complete */
    SCN_FAULT_SLOW_CONNECT,    /* new connections take duration */
    SCN_FAULT_LATENCY,         /* every round trip / query takes duration */
    SCN_FAULT_RESTART,         /* server restart (mode fast|immediate) */
    SCN_FAULT_STOP,            /* server down (mode fast|immediate) until `fault start` */
    SCN_FAULT_START,           /* server back up */
    SCN_FAULT_FAILOVER,        /* switch to the second server (proxy: retarget + reset) */
    SCN_FAULT_SERVER_PASSWORD, /* change the role's password on the server */
    SCN_FAULT_MAX_CONNECTIONS, /* server max_connections = number */
    SCN_FAULT_CONNECT,         /* fakepq connect fault: word (refused, auth, ...), nth, count */
    SCN_FAULT_CALL,            /* fakepq call fault: function, nth, count, fail or sqlstate */
    SCN_FAULT_INJECT,          /* proxy: inject FATAL sqlstate into target connections */
    SCN_FAULT__COUNT
};

enum scn_target {
    SCN_TARGET_ALL,
    SCN_TARGET_IDLE,
    SCN_TARGET_CONN, /* one named connection (name) */
};

struct scn_fault {
    enum scn_fault_kind kind;
    enum scn_target target;
    char name[SCN_NAME_MAX]; /* SCN_TARGET_CONN: the connection's name */
    int immediate;           /* restart/stop: 1 immediate, 0 fast */
    int duration_ms;         /* slow-connect, latency */
    int number;              /* max-connections */
    int nth, count;          /* connect/call: fakepq numbering (0 next, -1 all) */
    char word[32];           /* connect: the fault word; call: "fail" or a SQLSTATE */
    char function[32];       /* call: PQ function name */
    char sqlstate[6];        /* inject */
    char *text;              /* server password (owned) */
};

enum scn_op { SCN_OP_EQ, SCN_OP_NE, SCN_OP_LT, SCN_OP_LE, SCN_OP_GT, SCN_OP_GE };

/* A condition on a metric: "pool.idle == 2", "server.backends <= 4",
 * "libpq.connect_attempts == 1", "w.timeout == 0". The metric is a dotted
 * name resolved by the runner; the parser checks that the first part is a
 * known source or a declared name:
 *   pool.*    the pool's own statistics (via the driver)
 *   server.*  the server behind the pool (simulated or real)
 *   libpq.*   what the pool did through libpq, counted by fakepq (both backends)
 *   proxy.*   the fault proxy's counters (proxy backend only)
 *   NAME.*    a connection, worker group or queue declared earlier */
struct scn_cond {
    char metric[SCN_NAME_MAX];
    enum scn_op op;
    long long value; /* durations in ms */
};

enum scn_step_kind {
    SCN_STEP_ACQUIRE,
    SCN_STEP_WAIT,
    SCN_STEP_RELEASE,
    SCN_STEP_DISCARD,
    SCN_STEP_QUERY,
    SCN_STEP_HOLD,
    SCN_STEP_MAINTAIN,
    SCN_STEP_WORKERS,
    SCN_STEP_FAULT,
    SCN_STEP_HEAL,
    SCN_STEP_PASSWORD,
    SCN_STEP_CLOSE,
    SCN_STEP_EXPECT,
    SCN_STEP_EVENTUALLY,
    SCN_STEP_QUEUE,
    SCN_STEP__COUNT
};

struct scn_step {
    enum scn_step_kind kind;
    int line;                /* 1-based, in the file */
    char *text;              /* the statement as written, comment stripped (owned) */
    char name[SCN_NAME_MAX]; /* connection or worker-group name */
    int timeout_ms;          /* acquire/workers timeout=; -1: the pool's */
    enum scn_outcome expect; /* acquire, wait, query */
    char sqlstate[6];        /* query expect error SQLSTATE ("" any) */
    int within_ms;           /* -1: no bound */
    int not_before_ms;       /* -1: no bound */
    int background;          /* acquire ... background */
    int again;               /* release ... again (a deliberate double release) */
    char *sql;               /* query (owned) */
    int duration_ms;         /* hold D; workers for D; eventually within D */
    int count;               /* workers N, queue N */
    int hold_ms;             /* workers/queue hold D */
    struct scn_fault fault;
    struct scn_cond cond;
};

/* How a `pool` key's value is written and typed. */
enum scn_value_type {
    SCN_VAL_COUNT,            /* a whole number */
    SCN_VAL_DURATION,         /* a duration, kept in milliseconds */
    SCN_VAL_DURATION_OR_WORD, /* a duration, or the key's one word (never, off) */
    SCN_VAL_STRING,           /* any text */
};

/* One key of the scenario language's `pool` line. The language owns the
 * list; each driver says which keys its pool maps, ignores or cannot
 * support (a scenario using an unsupported key is N/A for that driver). */
struct scn_pool_key {
    const char *key;
    enum scn_value_type type;
    const char *word;    /* SCN_VAL_DURATION_OR_WORD: the accepted word */
    long long min, max;  /* SCN_VAL_COUNT: the accepted range */
    const char *meaning; /* one line, for --help and driver authors */
};

/* The pool keys the language knows, and how many (n may be NULL). */
const struct scn_pool_key *scn_pool_keys(size_t *n);

/* One setting as written: key=value. For `pool` settings the parser has
 * checked the key and typed the value: number is the count or the
 * duration in milliseconds, or -1 when the value is a word or a string.
 * line/col point at the key for error messages. */
struct scn_setting {
    char key[32];
    char *value; /* owned, as written */
    long long number;
    int line, col;
};

struct scn {
    char *path;        /* as given to scn_parse_file (owned) */
    char name[128];    /* family/name */
    char *description; /* the leading comment block, joined (owned, may be "") */
    unsigned backends; /* enum scn_backend mask */
    struct scn_setting *pool;
    size_t npool;
    struct scn_setting *server;
    size_t nserver;
    struct scn_step *steps;
    size_t nsteps;
};

/* Parses the file at path. On success *out owns a scenario (free with
 * scn_free) and 0 is returned. On failure returns -1, *out is NULL, and
 * err holds "path:line:col: message" (with a hint where one helps). */
int scn_parse_file(const char *path, struct scn **out, char *err, size_t errlen) SCN_MUSTCHECK;

/* Same, for text already in memory; path is used for messages and for
 * the default name (the last two components without .scn). */
int scn_parse_string(const char *path, const char *text, struct scn **out, char *err,
                     size_t errlen) SCN_MUSTCHECK;

/* Frees a scenario; NULL is a no-op. */
void scn_free(struct scn *s);

/* Which backends can perform a fault kind (enum scn_backend mask). */
unsigned scn_fault_backends(enum scn_fault_kind kind);

/* Names for messages and traces. */
const char *scn_backend_name(enum scn_backend b);
const char *scn_outcome_name(enum scn_outcome o);
const char *scn_step_name(enum scn_step_kind k);
const char *scn_fault_name(enum scn_fault_kind k);
const char *scn_op_name(enum scn_op op);

/* Evaluates "actual OP expected". */
int scn_compare(long long actual, enum scn_op op, long long expected);

#endif
