/*
 * scenario: the parser of pgfault's scenario language.
 *
 * The language is line-oriented on purpose: a developer reads a scenario
 * top to bottom as a script, and every error can point at one line and
 * column. Parsing is strict and complete before anything runs, so a typo
 * costs a second, not a server start-up. See scenario.h for the shape of
 * the result and README.md for the grammar.
 */
#include "scenario.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 64
#define MAX_NAMES 128

struct token {
    char *s;    /* unquoted text (points into the line buffer copy) */
    int col;    /* 1-based column of its first character */
    int quoted; /* written in double quotes */
};

/* Parser state for one file. */
struct parser {
    const char *path;
    int line;
    char *err;
    size_t errlen;
    struct scn *scn;
    int seen_step;
    int backends_line; /* line of the `backends` statement, 0 if defaulted */
    /* Names declared so far, with what declared them. */
    char names[MAX_NAMES][SCN_NAME_MAX];
    int name_kind[MAX_NAMES]; /* 0 connection, 1 background connection, 2 workers */
    int nnames;
};

enum { NAME_CONN, NAME_BACKGROUND, NAME_WORKERS, NAME_QUEUE, NAME_QUEUE_DONE };

static const char *const step_words[SCN_STEP__COUNT] = {
    [SCN_STEP_ACQUIRE] = "acquire",   [SCN_STEP_WAIT] = "wait",
    [SCN_STEP_RELEASE] = "release",   [SCN_STEP_DISCARD] = "discard",
    [SCN_STEP_QUERY] = "query",       [SCN_STEP_HOLD] = "hold",
    [SCN_STEP_MAINTAIN] = "maintain", [SCN_STEP_WORKERS] = "workers",
    [SCN_STEP_FAULT] = "fault",       [SCN_STEP_HEAL] = "heal",
    [SCN_STEP_PASSWORD] = "password", [SCN_STEP_CLOSE] = "close",
    [SCN_STEP_EXPECT] = "expect",     [SCN_STEP_EVENTUALLY] = "eventually",
    [SCN_STEP_QUEUE] = "queue",
};

static const char *const fault_words[SCN_FAULT__COUNT] = {
    [SCN_FAULT_KILL] = "kill",
    [SCN_FAULT_DROP] = "drop",
    [SCN_FAULT_PARTITION] = "partition",
    [SCN_FAULT_REFUSE] = "refuse",
    [SCN_FAULT_HANG_CONNECT] = "hang-connect",
    [SCN_FAULT_SLOW_CONNECT] = "slow-connect",
    [SCN_FAULT_LATENCY] = "latency",
    [SCN_FAULT_RESTART] = "restart",
    [SCN_FAULT_STOP] = "stop",
    [SCN_FAULT_START] = "start",
    [SCN_FAULT_FAILOVER] = "failover",
    [SCN_FAULT_SERVER_PASSWORD] = "server-password",
    [SCN_FAULT_MAX_CONNECTIONS] = "max-connections",
    [SCN_FAULT_CONNECT] = "connect",
    [SCN_FAULT_CALL] = "call",
    [SCN_FAULT_INJECT] = "inject",
};

static const char *const outcome_words[SCN_OUT__COUNT] = {
    [SCN_OUT_OK] = "ok",           [SCN_OUT_TIMEOUT] = "timeout", [SCN_OUT_AUTH] = "auth",
    [SCN_OUT_CONNECT] = "connect", [SCN_OUT_CONFIG] = "config",   [SCN_OUT_CLOSED] = "closed",
    [SCN_OUT_ERROR] = "error",
};

static const char *const op_words[] = {"==", "!=", "<", "<=", ">", ">="};

/* The words `fault connect` takes, in the order of enum fakepq_connect_fault
 * (the runner maps them by index). */
static const char *const connect_fault_words[] = {
    "refused", "hang", "slow", "auth", "hba", "no-database", "too-many", "starting-up", NULL,
};

static const char *const header_words[] = {"scenario", "backends", "pool", "server", NULL};

const char *scn_backend_name(enum scn_backend b)
{
    return b == SCN_BACKEND_FAKE ? "fake" : b == SCN_BACKEND_PROXY ? "proxy" : "?";
}

const char *scn_outcome_name(enum scn_outcome o)
{
    return (unsigned)o < SCN_OUT__COUNT ? outcome_words[o] : "?";
}

const char *scn_step_name(enum scn_step_kind k)
{
    return (unsigned)k < SCN_STEP__COUNT ? step_words[k] : "?";
}

const char *scn_fault_name(enum scn_fault_kind k)
{
    return (unsigned)k < SCN_FAULT__COUNT ? fault_words[k] : "?";
}

const char *scn_op_name(enum scn_op op)
{
    return (unsigned)op < sizeof op_words / sizeof op_words[0] ? op_words[op] : "?";
}

int scn_compare(long long a, enum scn_op op, long long b)
{
    switch (op) {
    case SCN_OP_EQ:
        return a == b;
    case SCN_OP_NE:
        return a != b;
    case SCN_OP_LT:
        return a < b;
    case SCN_OP_LE:
        return a <= b;
    case SCN_OP_GT:
        return a > b;
    case SCN_OP_GE:
        return a >= b;
    }
    return 0;
}

unsigned scn_fault_backends(enum scn_fault_kind kind)
{
    /* Protocol injection needs the proxy in the path; everything else has
     * a meaning on both layers (see README, "Faults"). */
    if (kind == SCN_FAULT_INJECT)
        return SCN_BACKEND_PROXY;
    return SCN_BACKEND_ALL;
}

/* ---- Errors and hints ---------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static int fail_at(struct parser *p, int col, const char *fmt,
                                                         ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (col > 0)
        snprintf(p->err, p->errlen, "%s:%d:%d: %s", p->path, p->line, col, msg);
    else
        snprintf(p->err, p->errlen, "%s:%d: %s", p->path, p->line, msg);
    return -1;
}

/* Edit distance, for "did you mean" hints on short words. */
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
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int cost = a[i - 1] != b[j - 1];
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best)
                best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best)
                best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1; /* transposition: "dorp" -> "drop" */
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

/* The closest of n candidates (NULL entries skipped) within distance 2, or
 * NULL. */
static const char *closest(const char *word, const char *const *cands, size_t n)
{
    const char *best = NULL;
    int bestd = 3;
    for (size_t i = 0; i < n; i++) {
        if (!cands[i])
            continue;
        int dist = edit_distance(word, cands[i]);
        if (dist < bestd) {
            bestd = dist;
            best = cands[i];
        }
    }
    return best;
}

/* Formats " (did you mean 'x'?)" or "" into buf. */
static const char *hint(char *buf, size_t len, const char *word, const char *const *cands, size_t n)
{
    const char *c = closest(word, cands, n);
    if (c)
        snprintf(buf, len, " (did you mean '%s'?)", c);
    else
        buf[0] = '\0';
    return buf;
}

static int word_index(const char *word, const char *const *words, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (words[i] && strcmp(word, words[i]) == 0)
            return (int)i;
    return -1;
}

/* ---- Lexing -------------------------------------------------------------- */

/* Splits line (modified in place) into tokens; strips the comment. Returns
 * the number of tokens, or -1 with an error. */
static int tokenize(struct parser *p, char *line, struct token *tok, int max)
{
    int n = 0;
    char *r = line;
    while (*r) {
        while (*r == ' ' || *r == '\t' || *r == '\r')
            r++;
        if (!*r || *r == '#')
            break;
        if (n == max)
            return fail_at(p, (int)(r - line) + 1, "too many words on one line (at most %d)", max);
        tok[n].col = (int)(r - line) + 1;
        if (*r == '"') {
            char *w = ++r, *start = r;
            tok[n].quoted = 1;
            while (*r && *r != '"') {
                if (*r == '\\' && (r[1] == '"' || r[1] == '\\'))
                    r++;
                *w++ = *r++;
            }
            if (*r != '"')
                return fail_at(p, tok[n].col, "unterminated string (a \" is missing)");
            r++;
            /* w may be one short of r: terminate after the copy, which is
             * safe because the closing quote has been consumed. */
            *w = '\0';
            tok[n].s = start;
            if (*r && *r != ' ' && *r != '\t' && *r != '#' && *r != '\r')
                return fail_at(p, (int)(r - line) + 1, "expected a blank after the string");
        } else {
            /* A word may contain a quoted part, as in init_sql="SET x = 1";
             * the quotes are removed and the part may contain blanks. */
            char *w = r;
            tok[n].s = r;
            tok[n].quoted = 0;
            while (*r && *r != ' ' && *r != '\t' && *r != '\r' && *r != '#') {
                if (*r == '"') {
                    int qcol = (int)(r - line) + 1;
                    r++;
                    while (*r && *r != '"') {
                        if (*r == '\\' && (r[1] == '"' || r[1] == '\\'))
                            r++;
                        *w++ = *r++;
                    }
                    if (*r != '"')
                        return fail_at(p, qcol, "unterminated string (a \" is missing)");
                    r++;
                    continue;
                }
                *w++ = *r++;
            }
            if (w < r) {
                /* The word shrank by its quotes: end it where it now ends. */
                char c = *r;
                *w = '\0';
                if (c == '#') {
                    n++;
                    break;
                }
                if (c)
                    r++;
                n++;
                continue;
            }
            if (*r == '#') {
                /* A comment glued to a word ends it. */
                *r = '\0';
                n++;
                break;
            }
            if (*r)
                *r++ = '\0';
        }
        n++;
    }
    return n;
}

/* ---- Values -------------------------------------------------------------- */

/* Parses a duration "300ms", "1s", "1.5s", "250us" into milliseconds
 * (microseconds round up to a whole millisecond, never to zero unless 0). */
static int parse_duration(struct parser *p, const struct token *t, int *out_ms)
{
    char *end;
    errno = 0;
    double v = strtod(t->s, &end);
    if (end == t->s || errno || v < 0)
        return fail_at(p, t->col, "expected a duration like 300ms or 2s, got '%s'", t->s);
    double ms;
    if (strcmp(end, "ms") == 0)
        ms = v;
    else if (strcmp(end, "s") == 0)
        ms = v * 1000.0;
    else if (strcmp(end, "us") == 0)
        ms = v / 1000.0;
    else if (*end == '\0')
        return fail_at(p, t->col, "duration '%s' needs a unit: us, ms or s", t->s);
    else
        return fail_at(p, t->col, "unknown unit '%s' in '%s' (use us, ms or s)", end, t->s);
    if (ms > 24.0 * 3600 * 1000)
        return fail_at(p, t->col, "duration '%s' is longer than a day", t->s);
    int r = (int)ms;
    if (ms > r)
        r++;
    *out_ms = r;
    return 0;
}

static int parse_int(struct parser *p, const struct token *t, long long min, long long max,
                     long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(t->s, &end, 10);
    if (end == t->s || *end || errno)
        return fail_at(p, t->col, "expected a whole number, got '%s'", t->s);
    if (v < min || v > max)
        return fail_at(p, t->col, "%lld is out of range (%lld..%lld)", v, min, max);
    *out = v;
    return 0;
}

static int parse_name(struct parser *p, const struct token *t, char *out)
{
    const char *s = t->s;
    if (!isalpha((unsigned char)s[0]) && s[0] != '_')
        return fail_at(p, t->col, "'%s' is not a name (start with a letter)", s);
    for (const char *c = s; *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '_' && *c != '-')
            return fail_at(p, t->col + (int)(c - s),
                           "'%s' is not a name (letters, digits, _ and -)", s);
    if (strlen(s) >= SCN_NAME_MAX)
        return fail_at(p, t->col, "name '%s' is too long", s);
    strcpy(out, s);
    return 0;
}

static int find_name(const struct parser *p, const char *name)
{
    for (int i = 0; i < p->nnames; i++)
        if (strcmp(p->names[i], name) == 0)
            return i;
    return -1;
}

/* A name that must already be declared as a connection. */
static int use_conn(struct parser *p, const struct token *t, char *out)
{
    if (parse_name(p, t, out) < 0)
        return -1;
    int i = find_name(p, out);
    if (i < 0 || p->name_kind[i] >= NAME_WORKERS) {
        const char *cands[MAX_NAMES];
        for (int k = 0; k < p->nnames; k++)
            cands[k] = p->name_kind[k] >= NAME_WORKERS ? NULL : p->names[k];
        char h[96];
        return fail_at(p, t->col, "no connection named '%s' was acquired before this line%s", out,
                       hint(h, sizeof h, out, cands, (size_t)p->nnames));
    }
    return 0;
}

static int declare(struct parser *p, const struct token *t, const char *name, int kind)
{
    int i = find_name(p, name);
    if (i >= 0) {
        if (p->name_kind[i] != kind && (p->name_kind[i] >= NAME_WORKERS || kind >= NAME_WORKERS))
            return fail_at(p, t->col, "'%s' already names a %s", name,
                           p->name_kind[i] >= NAME_WORKERS ? "worker group or queue"
                                                           : "connection");
        p->name_kind[i] = kind; /* re-acquiring a name is fine */
        return 0;
    }
    if (p->nnames == MAX_NAMES)
        return fail_at(p, t->col, "too many names (at most %d)", MAX_NAMES);
    strcpy(p->names[p->nnames], name);
    p->name_kind[p->nnames++] = kind;
    return 0;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (!d) {
        fprintf(stderr, "pgfault: out of memory\n");
        abort();
    }
    return d;
}

/* ---- Header statements --------------------------------------------------- */

/* The name a scenario gets from its path: the last two components without
 * ".scn" ("scenarios/auth/wrong-password.scn" -> "auth/wrong-password"). */
static void name_from_path(const char *path, char *out, size_t len)
{
    const char *end = path + strlen(path);
    if (end - path > 4 && strcmp(end - 4, ".scn") == 0)
        end -= 4;
    const char *start = end;
    int slashes = 0;
    while (start > path) {
        if (start[-1] == '/' && ++slashes == 2)
            break;
        start--;
    }
    snprintf(out, len, "%.*s", (int)(end - start), start);
}

static int parse_settings(struct parser *p, struct token *tok, int n, struct scn_setting **arr,
                          size_t *count)
{
    for (int i = 1; i < n; i++) {
        char *eq = strchr(tok[i].s, '=');
        if (!eq || eq == tok[i].s)
            return fail_at(p, tok[i].col, "expected key=value, got '%s'", tok[i].s);
        if ((size_t)(eq - tok[i].s) >= sizeof((*arr)->key))
            return fail_at(p, tok[i].col, "setting name too long");
        const char *value = eq + 1;
        /* key="quoted value" arrives as two tokens: key= and the string. */
        if (!*value && i + 1 < n && tok[i + 1].quoted)
            value = tok[++i].s;
        else if (!*value)
            return fail_at(p, tok[i].col, "setting '%.*s' has no value", (int)(eq - tok[i].s),
                           tok[i].s);
        struct scn_setting *a = realloc(*arr, (*count + 1) * sizeof **arr);
        if (!a)
            return fail_at(p, tok[i].col, "out of memory");
        *arr = a;
        struct scn_setting *st = &a[(*count)++];
        memset(st, 0, sizeof *st);
        memcpy(st->key, tok[i].s, (size_t)(eq - tok[i].s));
        st->value = xstrdup(value);
        st->line = p->line;
        st->col = tok[i].col;
    }
    return 0;
}

static const struct scn_pool_key pool_keys[] = {
    {"max", SCN_VAL_COUNT, NULL, 1, 10000, "most connections open at once"},
    {"min_idle", SCN_VAL_COUNT, NULL, 0, 10000, "idle connections the pool keeps ready"},
    {"acquire_timeout", SCN_VAL_DURATION, NULL, 0, 0,
     "longest an acquire waits (for a free connection and for connecting)"},
    {"connect_timeout", SCN_VAL_DURATION, NULL, 0, 0, "longest one connection attempt takes"},
    {"idle_timeout", SCN_VAL_DURATION, NULL, 0, 0, "an idle connection older than this is closed"},
    {"max_lifetime", SCN_VAL_DURATION, NULL, 0, 0,
     "a connection older than this is closed when next idle"},
    {"validate_idle", SCN_VAL_DURATION_OR_WORD, "never", 0, 0,
     "check a connection idle longer than this before handing it out"},
    {"validation_timeout", SCN_VAL_DURATION, NULL, 0, 0, "deadline of that check"},
    {"auth_retry_after", SCN_VAL_DURATION, NULL, 0, 0,
     "after rejected credentials, refuse acquires this long without contacting the server"},
    {"backoff_initial", SCN_VAL_DURATION, NULL, 0, 0, "first reconnect backoff after a failure"},
    {"backoff_max", SCN_VAL_DURATION, NULL, 0, 0, "longest reconnect backoff"},
    {"release_timeout", SCN_VAL_DURATION, NULL, 0, 0,
     "longest a release may spend cleaning up (cancel, rollback)"},
    {"housekeeping", SCN_VAL_DURATION_OR_WORD, "off", 0, 0,
     "interval of the pool's own maintenance thread"},
    {"init_sql", SCN_VAL_STRING, NULL, 0, 0, "SQL run on every new connection"},
    {"application_name", SCN_VAL_STRING, NULL, 0, 0, "the connections' application_name"},
    {"dbname", SCN_VAL_STRING, NULL, 0, 0, "the database (instead of the backend's)"},
    {"password", SCN_VAL_STRING, NULL, 0, 0, "the password the pool starts with"},
};
#define NPOOL_KEYS (sizeof pool_keys / sizeof pool_keys[0])

const struct scn_pool_key *scn_pool_keys(size_t *n)
{
    if (n)
        *n = NPOOL_KEYS;
    return pool_keys;
}

/* Checks a `pool` setting against the language's keys and types it. */
static int check_pool_setting(struct parser *p, struct scn_setting *st)
{
    const char *names[NPOOL_KEYS];
    const struct scn_pool_key *k = NULL;
    for (size_t i = 0; i < NPOOL_KEYS; i++) {
        names[i] = pool_keys[i].key;
        if (strcmp(pool_keys[i].key, st->key) == 0)
            k = &pool_keys[i];
    }
    char h[96];
    if (!k)
        return fail_at(p, st->col, "unknown pool setting '%s'%s", st->key,
                       hint(h, sizeof h, st->key, names, NPOOL_KEYS));
    struct token t = {.s = st->value, .col = st->col + (int)strlen(st->key) + 1};
    st->number = -1;
    switch (k->type) {
    case SCN_VAL_COUNT:
        return parse_int(p, &t, k->min, k->max, &st->number);
    case SCN_VAL_DURATION_OR_WORD:
        if (strcmp(st->value, k->word) == 0)
            return 0;
        /* fall through */
    case SCN_VAL_DURATION: {
        int ms;
        /* A bare 0 needs no unit. */
        if (strcmp(st->value, "0") == 0)
            ms = 0;
        else if (parse_duration(p, &t, &ms) < 0)
            return k->word ? fail_at(p, t.col, "%s=%s: expected a duration like 300ms, or %s",
                                     st->key, st->value, k->word)
                           : -1;
        st->number = ms;
        return 0;
    }
    case SCN_VAL_STRING:
        return 0;
    }
    return 0;
}

static int parse_header(struct parser *p, int which, struct token *tok, int n)
{
    struct scn *s = p->scn;
    if (p->seen_step)
        return fail_at(p, tok[0].col, "'%s' belongs in the header, before the first step",
                       tok[0].s);
    switch (which) {
    case 0: { /* scenario NAME */
        if (n != 2)
            return fail_at(p, tok[0].col, "usage: scenario FAMILY/NAME");
        char expected[sizeof s->name];
        name_from_path(p->path, expected, sizeof expected);
        if (strchr(expected, '/') && strcmp(expected, tok[1].s) != 0)
            return fail_at(p, tok[1].col, "scenario name '%s' does not match its file '%s'",
                           tok[1].s, expected);
        snprintf(s->name, sizeof s->name, "%s", tok[1].s);
        return 0;
    }
    case 1: { /* backends fake proxy */
        if (n < 2)
            return fail_at(p, tok[0].col, "usage: backends fake|proxy...");
        static const char *const words[] = {"fake", "proxy"};
        unsigned mask = 0;
        for (int i = 1; i < n; i++) {
            int k = word_index(tok[i].s, words, 2);
            if (k < 0) {
                char h[64];
                return fail_at(p, tok[i].col, "unknown backend '%s'%s (backends: fake, proxy)",
                               tok[i].s, hint(h, sizeof h, tok[i].s, words, 2));
            }
            mask |= 1u << k;
        }
        s->backends = mask;
        p->backends_line = p->line;
        return 0;
    }
    case 2: {
        size_t first = s->npool; /* earlier pool lines were checked already */
        if (parse_settings(p, tok, n, &s->pool, &s->npool) < 0)
            return -1;
        for (size_t i = first; i < s->npool; i++)
            if (check_pool_setting(p, &s->pool[i]) < 0)
                return -1;
        return 0;
    }
    case 3:
        return parse_settings(p, tok, n, &s->server, &s->nserver);
    }
    return -1;
}

/* ---- Step pieces ----------------------------------------------------------- */

static int parse_outcome(struct parser *p, const struct token *t, enum scn_outcome *out)
{
    int k = word_index(t->s, outcome_words, SCN_OUT__COUNT);
    if (k < 0) {
        char h[64];
        return fail_at(p, t->col,
                       "unknown outcome '%s'%s (ok, timeout, auth, connect, config, closed, error)",
                       t->s, hint(h, sizeof h, t->s, outcome_words, SCN_OUT__COUNT));
    }
    *out = (enum scn_outcome)k;
    return 0;
}

static int is_sqlstate(const char *s)
{
    if (strlen(s) != 5)
        return 0;
    for (int i = 0; i < 5; i++)
        if (!isdigit((unsigned char)s[i]) && !isupper((unsigned char)s[i]))
            return 0;
    return 1;
}

/* Parses the timing/outcome options shared by acquire, wait and query,
 * starting at tok[i]. allowed: bit 0 timeout=, bit 1 expect, bit 2
 * within, bit 3 not before, bit 4 background. */
static int parse_options(struct parser *p, struct token *tok, int n, int i, unsigned allowed,
                         struct scn_step *st)
{
    static const char *const opts[] = {"timeout=", "expect", "within", "not", "background"};
    while (i < n) {
        const char *w = tok[i].s;
        if ((allowed & 1) && strncmp(w, "timeout=", 8) == 0) {
            struct token v = {(char *)w + 8, tok[i].col + 8, 0};
            if (parse_duration(p, &v, &st->timeout_ms) < 0)
                return -1;
            i++;
        } else if ((allowed & 2) && strcmp(w, "expect") == 0) {
            if (i + 1 >= n)
                return fail_at(p, tok[i].col, "'expect' needs an outcome");
            if (parse_outcome(p, &tok[i + 1], &st->expect) < 0)
                return -1;
            i += 2;
            if (st->expect == SCN_OUT_ERROR && st->kind != SCN_STEP_QUERY)
                return fail_at(p, tok[i - 1].col, "only a query can expect 'error'");
            if (st->kind == SCN_STEP_QUERY && st->expect != SCN_OUT_OK &&
                st->expect != SCN_OUT_ERROR)
                return fail_at(p, tok[i - 1].col, "a query expects 'ok' or 'error [SQLSTATE]'");
            if (st->expect == SCN_OUT_ERROR && i < n && is_sqlstate(tok[i].s))
                strcpy(st->sqlstate, tok[i++].s);
        } else if ((allowed & 4) && strcmp(w, "within") == 0) {
            if (i + 1 >= n)
                return fail_at(p, tok[i].col, "'within' needs a duration");
            if (parse_duration(p, &tok[i + 1], &st->within_ms) < 0)
                return -1;
            i += 2;
        } else if ((allowed & 8) && strcmp(w, "not") == 0) {
            if (i + 2 >= n || strcmp(tok[i + 1].s, "before") != 0)
                return fail_at(p, tok[i].col, "expected 'not before DURATION'");
            if (parse_duration(p, &tok[i + 2], &st->not_before_ms) < 0)
                return -1;
            i += 3;
        } else if ((allowed & 16) && strcmp(w, "background") == 0) {
            st->background = 1;
            i++;
        } else {
            const char *cands[5];
            for (int k = 0; k < 5; k++)
                cands[k] = (allowed >> k) & 1 ? opts[k] : NULL;
            char h[64];
            return fail_at(p, tok[i].col, "unexpected '%s'%s", w, hint(h, sizeof h, w, cands, 5));
        }
    }
    if (st->within_ms >= 0 && st->not_before_ms > st->within_ms)
        return fail_at(p, tok[0].col, "'not before' (%dms) is later than 'within' (%dms)",
                       st->not_before_ms, st->within_ms);
    return 0;
}

/* [all|idle|conn NAME] at tok[i]; returns the next index or -1. */
static int parse_target(struct parser *p, struct token *tok, int n, int i, struct scn_fault *f)
{
    f->target = SCN_TARGET_ALL;
    if (i >= n)
        return i;
    if (strcmp(tok[i].s, "all") == 0)
        return i + 1;
    if (strcmp(tok[i].s, "idle") == 0) {
        f->target = SCN_TARGET_IDLE;
        return i + 1;
    }
    if (strcmp(tok[i].s, "conn") == 0) {
        if (i + 1 >= n)
            return fail_at(p, tok[i].col, "'conn' needs a connection name");
        f->target = SCN_TARGET_CONN;
        if (use_conn(p, &tok[i + 1], f->name) < 0)
            return -1;
        return i + 2;
    }
    static const char *const words[] = {"all", "idle", "conn"};
    char h[64];
    return fail_at(p, tok[i].col, "unknown target '%s'%s (all, idle, conn NAME)", tok[i].s,
                   hint(h, sizeof h, tok[i].s, words, 3));
}

/* nth=N and count=K|all options of `fault connect` and `fault call`. */
static int parse_nth_count(struct parser *p, struct token *tok, int n, int i, struct scn_fault *f)
{
    f->nth = 0;
    f->count = -1;
    for (; i < n; i++) {
        long long v;
        if (strncmp(tok[i].s, "nth=", 4) == 0) {
            struct token t = {tok[i].s + 4, tok[i].col + 4, 0};
            if (parse_int(p, &t, 1, 1000000, &v) < 0)
                return -1;
            f->nth = (int)v;
            if (f->count == -1)
                f->count = 1;
        } else if (strncmp(tok[i].s, "count=", 6) == 0) {
            struct token t = {tok[i].s + 6, tok[i].col + 6, 0};
            if (strcmp(t.s, "all") == 0) {
                f->count = -1;
                continue;
            }
            if (parse_int(p, &t, 1, 1000000, &v) < 0)
                return -1;
            f->count = (int)v;
        } else {
            return fail_at(p, tok[i].col, "unexpected '%s' (nth=N, count=K|all)", tok[i].s);
        }
    }
    return i;
}

static int parse_fault(struct parser *p, struct token *tok, int n, struct scn_step *st)
{
    struct scn_fault *f = &st->fault;
    if (n < 2)
        return fail_at(p, tok[0].col, "'fault' needs a kind: kill, drop, partition, refuse, ...");
    int k = word_index(tok[1].s, fault_words, SCN_FAULT__COUNT);
    if (k < 0) {
        char h[64];
        return fail_at(p, tok[1].col, "unknown fault '%s'%s", tok[1].s,
                       hint(h, sizeof h, tok[1].s, fault_words, SCN_FAULT__COUNT));
    }
    f->kind = (enum scn_fault_kind)k;
    unsigned can = scn_fault_backends(f->kind);
    unsigned cannot = p->scn->backends & ~can;
    if (cannot) {
        char where[48] = "";
        if (p->backends_line)
            snprintf(where, sizeof where, " (backends, line %d)", p->backends_line);
        return fail_at(
            p, tok[1].col,
            "fault '%s' needs the %s backend, but this scenario also runs on %s%s; "
            "restrict it with 'backends %s'",
            tok[1].s,
            scn_backend_name(can == SCN_BACKEND_PROXY ? SCN_BACKEND_PROXY : SCN_BACKEND_FAKE),
            scn_backend_name(cannot & SCN_BACKEND_FAKE ? SCN_BACKEND_FAKE : SCN_BACKEND_PROXY),
            where,
            scn_backend_name(can == SCN_BACKEND_PROXY ? SCN_BACKEND_PROXY : SCN_BACKEND_FAKE));
    }
    int i = 2;
    long long v;
    switch (f->kind) {
    case SCN_FAULT_KILL:
    case SCN_FAULT_DROP:
    case SCN_FAULT_PARTITION:
        i = parse_target(p, tok, n, i, f);
        if (i < 0)
            return -1;
        if (f->kind == SCN_FAULT_DROP && i < n && strcmp(tok[i].s, "silently") == 0)
            i++; /* "drop idle silently" reads well; silence is what drop means */
        break;
    case SCN_FAULT_REFUSE:
    case SCN_FAULT_HANG_CONNECT:
    case SCN_FAULT_START:
    case SCN_FAULT_FAILOVER:
        break;
    case SCN_FAULT_SLOW_CONNECT:
    case SCN_FAULT_LATENCY:
        if (i >= n)
            return fail_at(p, tok[1].col, "'%s' needs a duration", tok[1].s);
        if (parse_duration(p, &tok[i++], &f->duration_ms) < 0)
            return -1;
        break;
    case SCN_FAULT_RESTART:
    case SCN_FAULT_STOP:
        if (i < n) {
            if (strcmp(tok[i].s, "immediate") == 0)
                f->immediate = 1;
            else if (strcmp(tok[i].s, "fast") != 0)
                return fail_at(p, tok[i].col, "expected 'fast' or 'immediate', got '%s'", tok[i].s);
            i++;
        }
        break;
    case SCN_FAULT_SERVER_PASSWORD:
        if (i >= n)
            return fail_at(p, tok[1].col, "'server-password' needs the new password");
        f->text = xstrdup(tok[i++].s);
        break;
    case SCN_FAULT_MAX_CONNECTIONS:
        if (i >= n)
            return fail_at(p, tok[1].col, "'max-connections' needs a number");
        if (parse_int(p, &tok[i++], 1, 10000, &v) < 0)
            return -1;
        f->number = (int)v;
        break;
    case SCN_FAULT_CONNECT: {
        if (i >= n)
            return fail_at(p, tok[1].col,
                           "'connect' needs a kind: refused, hang, slow, auth, "
                           "hba, no-database, too-many, starting-up");
        size_t nw = sizeof connect_fault_words / sizeof connect_fault_words[0] - 1;
        if (word_index(tok[i].s, connect_fault_words, nw) < 0) {
            char h[64];
            return fail_at(p, tok[i].col, "unknown connect fault '%s'%s", tok[i].s,
                           hint(h, sizeof h, tok[i].s, connect_fault_words, nw));
        }
        snprintf(f->word, sizeof f->word, "%s", tok[i++].s);
        if (strcmp(f->word, "slow") == 0) {
            if (i >= n)
                return fail_at(p, tok[i - 1].col, "'connect slow' needs a duration");
            if (parse_duration(p, &tok[i++], &f->duration_ms) < 0)
                return -1;
        }
        i = parse_nth_count(p, tok, n, i, f);
        if (i < 0)
            return -1;
        break;
    }
    case SCN_FAULT_CALL:
        if (i + 1 >= n)
            return fail_at(p, tok[1].col, "usage: fault call PQfunction fail|SQLSTATE [nth=N]");
        if (strncmp(tok[i].s, "PQ", 2) != 0 || strlen(tok[i].s) >= sizeof f->function)
            return fail_at(p, tok[i].col, "'%s' is not a libpq function name", tok[i].s);
        strcpy(f->function, tok[i++].s);
        if (strcmp(tok[i].s, "fail") != 0 && !is_sqlstate(tok[i].s))
            return fail_at(p, tok[i].col, "expected 'fail' or a SQLSTATE like 57P01, got '%s'",
                           tok[i].s);
        snprintf(f->word, sizeof f->word, "%s", tok[i++].s);
        i = parse_nth_count(p, tok, n, i, f);
        if (i < 0)
            return -1;
        break;
    case SCN_FAULT_INJECT:
        if (i >= n || !is_sqlstate(tok[i].s))
            return fail_at(p, i < n ? tok[i].col : tok[1].col,
                           "'inject' needs a SQLSTATE, e.g. inject 57P01 idle");
        strcpy(f->sqlstate, tok[i++].s);
        i = parse_target(p, tok, n, i, f);
        if (i < 0)
            return -1;
        break;
    case SCN_FAULT__COUNT:
        break;
    }
    if (i < n)
        return fail_at(p, tok[i].col, "unexpected '%s' after fault '%s'", tok[i].s, tok[1].s);
    return 0;
}

static int parse_cond(struct parser *p, struct token *tok, int n, int i, struct scn_cond *c)
{
    if (i + 3 > n)
        return fail_at(p, tok[0].col, "usage: %s METRIC OP VALUE (e.g. pool.idle == 2)", tok[0].s);
    const char *m = tok[i].s;
    const char *dot = strchr(m, '.');
    if (!dot || !dot[1] || strlen(m) >= sizeof c->metric)
        return fail_at(p, tok[i].col, "'%s' is not a metric (e.g. pool.idle, server.backends)", m);
    char src[SCN_NAME_MAX];
    snprintf(src, sizeof src, "%.*s", (int)(dot - m), m);
    static const char *const sources[] = {"pool", "server", "libpq", "proxy"};
    int k = word_index(src, sources, 4);
    if (k < 0 && find_name(p, src) < 0) {
        char h[64];
        return fail_at(p, tok[i].col,
                       "unknown metric source '%s'%s (pool, server, libpq, proxy, or a name "
                       "declared by acquire, workers or queue)",
                       src, hint(h, sizeof h, src, sources, 4));
    }
    if (k == 3 && p->scn->backends != SCN_BACKEND_PROXY)
        return fail_at(p, tok[i].col,
                       "'%s' needs the proxy backend, but this scenario also runs on fake "
                       "(use server.* or libpq.*, or restrict it with 'backends proxy')",
                       m);
    strcpy(c->metric, m);
    int op = word_index(tok[i + 1].s, op_words, 6);
    if (op < 0)
        return fail_at(p, tok[i + 1].col, "expected a comparison (== != < <= > >=), got '%s'",
                       tok[i + 1].s);
    c->op = (enum scn_op)op;
    const struct token *vt = &tok[i + 2];
    if (isdigit((unsigned char)vt->s[0]) && strpbrk(vt->s, "mus")) {
        int ms;
        if (parse_duration(p, vt, &ms) < 0)
            return -1;
        c->value = ms;
    } else if (parse_int(p, vt, -1000000000LL, 1000000000LL, &c->value) < 0) {
        return -1;
    }
    return i + 3;
}

static int parse_step(struct parser *p, int kind, struct token *tok, int n, struct scn_step *st)
{
    st->kind = (enum scn_step_kind)kind;
    st->timeout_ms = -1;
    st->within_ms = -1;
    st->not_before_ms = -1;
    st->expect = SCN_OUT_OK;
    int i;
    long long v;
    switch (st->kind) {
    case SCN_STEP_ACQUIRE:
        if (n < 2)
            return fail_at(p, tok[0].col, "'acquire' needs a connection name, e.g. acquire c1");
        if (parse_name(p, &tok[1], st->name) < 0)
            return -1;
        if (parse_options(p, tok, n, 2, 1 | 2 | 4 | 8 | 16, st) < 0)
            return -1;
        return declare(p, &tok[1], st->name, st->background ? NAME_BACKGROUND : NAME_CONN);
    case SCN_STEP_WAIT: {
        if (n < 2)
            return fail_at(p, tok[0].col, "'wait' needs the name of a background acquire or queue");
        if (parse_name(p, &tok[1], st->name) < 0)
            return -1;
        int w = find_name(p, st->name);
        if (w >= 0 && p->name_kind[w] == NAME_QUEUE) {
            p->name_kind[w] = NAME_QUEUE_DONE;
        } else {
            if (use_conn(p, &tok[1], st->name) < 0)
                return -1;
            w = find_name(p, st->name);
            if (p->name_kind[w] != NAME_BACKGROUND)
                return fail_at(p, tok[1].col, "'%s' was not acquired in the background", st->name);
            p->name_kind[w] = NAME_CONN;
        }
        return parse_options(p, tok, n, 2, 4, st);
    }
    case SCN_STEP_QUEUE:
        /* queue NAME N [hold D] [timeout=D] */
        if (n < 3)
            return fail_at(p, tok[0].col, "usage: queue NAME N [hold D] [timeout=D]");
        if (parse_name(p, &tok[1], st->name) < 0 || parse_int(p, &tok[2], 1, 256, &v) < 0)
            return -1;
        st->count = (int)v;
        for (i = 3; i < n; i++) {
            if (strcmp(tok[i].s, "hold") == 0 && i + 1 < n) {
                if (parse_duration(p, &tok[++i], &st->hold_ms) < 0)
                    return -1;
            } else if (strncmp(tok[i].s, "timeout=", 8) == 0) {
                struct token t = {tok[i].s + 8, tok[i].col + 8, 0};
                if (parse_duration(p, &t, &st->timeout_ms) < 0)
                    return -1;
            } else {
                return fail_at(p, tok[i].col, "unexpected '%s' (hold D, timeout=D)", tok[i].s);
            }
        }
        if (find_name(p, st->name) >= 0)
            return fail_at(p, tok[1].col, "'%s' is already used as a name", st->name);
        return declare(p, &tok[1], st->name, NAME_QUEUE);
    case SCN_STEP_RELEASE:
    case SCN_STEP_DISCARD:
        if (n < 2)
            return fail_at(p, tok[0].col, "'%s' needs a connection name", tok[0].s);
        if (use_conn(p, &tok[1], st->name) < 0)
            return -1;
        if (n == 3 && st->kind == SCN_STEP_RELEASE && strcmp(tok[2].s, "again") == 0)
            st->again = 1;
        else if (n > 2)
            return fail_at(p, tok[2].col, "unexpected '%s'%s", tok[2].s,
                           st->kind == SCN_STEP_RELEASE ? " (only 'again' may follow)" : "");
        return 0;
    case SCN_STEP_QUERY:
        if (n < 3 || !tok[2].quoted)
            return fail_at(p, n < 3 ? tok[0].col : tok[2].col,
                           "usage: query NAME \"SQL\" [expect ok|error [SQLSTATE]] [within D]");
        if (use_conn(p, &tok[1], st->name) < 0)
            return -1;
        st->sql = xstrdup(tok[2].s);
        return parse_options(p, tok, n, 3, 2 | 4, st);
    case SCN_STEP_HOLD:
        if (n != 2)
            return fail_at(p, tok[0].col, "usage: hold DURATION");
        return parse_duration(p, &tok[1], &st->duration_ms);
    case SCN_STEP_MAINTAIN:
    case SCN_STEP_HEAL:
    case SCN_STEP_CLOSE:
        if (n != 1)
            return fail_at(p, tok[1].col, "'%s' takes no arguments", tok[0].s);
        return 0;
    case SCN_STEP_WORKERS:
        /* workers NAME N for D [hold D] [timeout=D] */
        if (n < 5 || strcmp(tok[3].s, "for") != 0)
            return fail_at(p, tok[0].col,
                           "usage: workers NAME N for DURATION [hold D] [timeout=D]");
        if (parse_name(p, &tok[1], st->name) < 0 || parse_int(p, &tok[2], 1, 256, &v) < 0 ||
            parse_duration(p, &tok[4], &st->duration_ms) < 0)
            return -1;
        st->count = (int)v;
        for (i = 5; i < n; i++) {
            if (strcmp(tok[i].s, "hold") == 0 && i + 1 < n) {
                if (parse_duration(p, &tok[++i], &st->hold_ms) < 0)
                    return -1;
            } else if (strncmp(tok[i].s, "timeout=", 8) == 0) {
                struct token t = {tok[i].s + 8, tok[i].col + 8, 0};
                if (parse_duration(p, &t, &st->timeout_ms) < 0)
                    return -1;
            } else {
                return fail_at(p, tok[i].col, "unexpected '%s' (hold D, timeout=D)", tok[i].s);
            }
        }
        return declare(p, &tok[1], st->name, NAME_WORKERS);
    case SCN_STEP_FAULT:
        return parse_fault(p, tok, n, st);
    case SCN_STEP_PASSWORD:
        if (n != 2)
            return fail_at(p, tok[0].col, "usage: password NEW (what the pool's callback returns)");
        st->sql = xstrdup(tok[1].s);
        return 0;
    case SCN_STEP_EXPECT:
        i = parse_cond(p, tok, n, 1, &st->cond);
        if (i < 0)
            return -1;
        if (i < n)
            return fail_at(p, tok[i].col, "unexpected '%s' after the condition", tok[i].s);
        return 0;
    case SCN_STEP_EVENTUALLY:
        i = parse_cond(p, tok, n, 1, &st->cond);
        if (i < 0)
            return -1;
        if (i + 2 != n || strcmp(tok[i].s, "within") != 0)
            return fail_at(p, i < n ? tok[i].col : tok[0].col,
                           "'eventually' needs a deadline: eventually COND within DURATION");
        return parse_duration(p, &tok[i + 1], &st->duration_ms);
    case SCN_STEP__COUNT:
        break;
    }
    return -1;
}

/* ---- Files ----------------------------------------------------------------- */

static void step_free(struct scn_step *st)
{
    free(st->text);
    free(st->sql);
    free(st->fault.text);
}

void scn_free(struct scn *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->nsteps; i++)
        step_free(&s->steps[i]);
    for (size_t i = 0; i < s->npool; i++)
        free(s->pool[i].value);
    for (size_t i = 0; i < s->nserver; i++)
        free(s->server[i].value);
    free(s->steps);
    free(s->pool);
    free(s->server);
    free(s->description);
    free(s->path);
    free(s);
}

/* Appends a leading comment line to the description. */
static void add_description(struct scn *s, const char *line)
{
    while (*line == '#')
        line++;
    while (*line == ' ')
        line++;
    size_t old = s->description ? strlen(s->description) : 0;
    char *d = realloc(s->description, old + strlen(line) + 2);
    if (!d)
        return;
    if (old)
        d[old++] = ' ';
    strcpy(d + old, line);
    s->description = d;
}

int scn_parse_string(const char *path, const char *text, struct scn **out, char *err, size_t errlen)
{
    *out = NULL;
    struct scn *s = calloc(1, sizeof *s);
    struct parser *p = calloc(1, sizeof *p);
    char *copy = xstrdup(text);
    if (!s || !p) {
        snprintf(err, errlen, "%s: out of memory", path);
        goto fail;
    }
    s->path = xstrdup(path);
    s->backends = SCN_BACKEND_ALL;
    s->description = xstrdup("");
    name_from_path(path, s->name, sizeof s->name);
    p->path = path;
    p->err = err;
    p->errlen = errlen;
    p->scn = s;

    int in_leading_comment = 1;
    char *save = NULL;
    char *line = copy;
    for (p->line = 1; line; p->line++) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        save = nl ? nl + 1 : NULL;

        const char *lead = line + strspn(line, " \t");
        if (in_leading_comment && *lead == '#') {
            add_description(s, lead);
        } else if (*lead) {
            in_leading_comment = 0;
        }

        char stripped[1024];
        snprintf(stripped, sizeof stripped, "%s", line);
        struct token tok[MAX_TOKENS];
        char work[1024];
        if (strlen(line) >= sizeof work) {
            fail_at(p, 1, "line is longer than %zu characters", sizeof work - 1);
            goto fail;
        }
        strcpy(work, line);
        int n = tokenize(p, work, tok, MAX_TOKENS);
        if (n < 0)
            goto fail;
        if (n > 0) {
            int h = word_index(tok[0].s, header_words, 4);
            int k = word_index(tok[0].s, step_words, SCN_STEP__COUNT);
            if (h >= 0) {
                if (parse_header(p, h, tok, n) < 0)
                    goto fail;
            } else if (k >= 0) {
                struct scn_step *steps = realloc(s->steps, (s->nsteps + 1) * sizeof *steps);
                if (!steps) {
                    fail_at(p, 0, "out of memory");
                    goto fail;
                }
                s->steps = steps;
                struct scn_step *st = &steps[s->nsteps++];
                memset(st, 0, sizeof *st);
                st->line = p->line;
                p->seen_step = 1;
                if (parse_step(p, k, tok, n, st) < 0)
                    goto fail;
                /* The statement as written, for traces: comment and
                 * surrounding blanks stripped. */
                char *hash = NULL;
                int inq = 0;
                for (char *c = stripped; *c; c++) {
                    if (*c == '"')
                        inq = !inq;
                    if (*c == '#' && !inq) {
                        hash = c;
                        break;
                    }
                }
                if (hash)
                    *hash = '\0';
                size_t len = strlen(stripped);
                while (len && (stripped[len - 1] == ' ' || stripped[len - 1] == '\t' ||
                               stripped[len - 1] == '\r'))
                    stripped[--len] = '\0';
                st->text = xstrdup(stripped + strspn(stripped, " \t"));
            } else {
                const char *all[4 + SCN_STEP__COUNT];
                for (int j = 0; j < 4; j++)
                    all[j] = header_words[j];
                for (int j = 0; j < SCN_STEP__COUNT; j++)
                    all[4 + j] = step_words[j];
                char hbuf[64];
                fail_at(p, tok[0].col, "unknown statement '%s'%s", tok[0].s,
                        hint(hbuf, sizeof hbuf, tok[0].s, all, 4 + SCN_STEP__COUNT));
                goto fail;
            }
        }
        line = save;
    }
    if (s->nsteps == 0) {
        snprintf(err, errlen, "%s: no steps (a scenario needs at least one)", path);
        goto fail;
    }
    for (int i = 0; i < p->nnames; i++) {
        if (p->name_kind[i] == NAME_BACKGROUND || p->name_kind[i] == NAME_QUEUE) {
            snprintf(err, errlen, "%s: %s '%s' is never waited for (add 'wait %s')", path,
                     p->name_kind[i] == NAME_QUEUE ? "queue" : "background acquire", p->names[i],
                     p->names[i]);
            goto fail;
        }
    }
    free(copy);
    free(p);
    *out = s;
    return 0;
fail:
    free(copy);
    free(p);
    scn_free(s);
    return -1;
}

int scn_parse_file(const char *path, struct scn **out, char *err, size_t errlen)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + got + 1 > cap) {
            cap = (len + got + 1) * 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                snprintf(err, errlen, "%s: out of memory", path);
                return -1;
            }
            buf = nb;
        }
        memcpy(buf + len, chunk, got);
        len += got;
    }
    int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        free(buf);
        snprintf(err, errlen, "%s: read error", path);
        return -1;
    }
    if (!buf) {
        snprintf(err, errlen, "%s: empty file (a scenario needs at least one step)", path);
        return -1;
    }
    buf[len] = '\0';
    if (memchr(buf, '\0', len)) {
        free(buf);
        snprintf(err, errlen, "%s: not a text file (contains a NUL byte)", path);
        return -1;
    }
    int rc = scn_parse_string(path, buf, out, err, errlen);
    free(buf);
    return rc;
}
