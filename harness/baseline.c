/*
 * baseline: the expected-failures file of a pool, parsed with exact
 * positions for its mistakes, and applied to a run's verdicts.
 */
#include "baseline.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct entry {
    char scenario[128];
    char backend[16];
    char driver[64];
    char settings[200];
    unsigned verdicts; /* 1 << enum runner_status */
    char reason[400];
    int line;
};

struct baseline {
    char path[512];
    struct entry *e;
    size_t n;
};

__attribute__((format(printf, 5, 6))) static int at(char *err, size_t len, const char *path,
                                                    int line, const char *fmt, ...)
{
    char m[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m, sizeof m, fmt, ap);
    va_end(ap);
    snprintf(err, len, "%s:%d:%s", path, line, m);
    return -1;
}

/* The next blank-separated field of *p, copied into out; its column in
 * *col. Returns 0, or -1 if the line has ended. */
static int field(const char **p, const char *line, char *out, size_t len, int *col)
{
    const char *s = *p;
    while (*s == ' ' || *s == '\t')
        s++;
    if (!*s)
        return -1;
    *col = (int)(s - line) + 1;
    size_t n = strcspn(s, " \t");
    snprintf(out, len, "%.*s", (int)n, s);
    *p = s + n;
    return 0;
}

static int parse_verdicts(const char *s, unsigned *out)
{
    *out = 0;
    char buf[128];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *tok = strtok(buf, "|"); tok; tok = strtok(NULL, "|")) {
        int found = 0;
        for (int k = RUNNER_PASS; k <= RUNNER_ERROR; k++) {
            if (strcmp(tok, runner_status_name((enum runner_status)k)) == 0) {
                *out |= 1u << k;
                found = 1;
            }
        }
        if (!found)
            return -1;
    }
    /* PASS only beside a failure: a pool that races (fails some runs,
     * passes others) is entered as FAIL|PASS with the race as its reason;
     * PASS alone would be no expected failure at all. */
    return *out && *out != 1u << RUNNER_PASS ? 0 : -1;
}

int baseline_load(const char *path, struct baseline **out, char *err, size_t len)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, len, "%s: %s", path, strerror(errno));
        return -1;
    }
    struct baseline *b = calloc(1, sizeof *b);
    if (!b) {
        fclose(f);
        snprintf(err, len, "out of memory");
        return -1;
    }
    snprintf(b->path, sizeof b->path, "%s", path);
    char line[2048];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\r\n")] = '\0';
        const char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p || *p == '#')
            continue;
        struct entry e = {.line = lineno};
        char v[128];
        int col = 1;
        p = line;
        if (field(&p, line, e.scenario, sizeof e.scenario, &col) < 0 || !strchr(e.scenario, '/')) {
            rc = at(err, len, path, lineno, "%d: expected a scenario FAMILY/NAME first", col);
            break;
        }
        if (field(&p, line, e.backend, sizeof e.backend, &col) < 0 ||
            (strcmp(e.backend, "fake") != 0 && strcmp(e.backend, "proxy") != 0)) {
            rc = at(err, len, path, lineno, "%d: expected a backend (fake or proxy), got '%s'", col,
                    e.backend);
            break;
        }
        if (field(&p, line, e.driver, sizeof e.driver, &col) < 0) {
            rc = at(err, len, path, lineno, "%d: expected the driver's name", col);
            break;
        }
        if (field(&p, line, e.settings, sizeof e.settings, &col) < 0) {
            rc = at(err, len, path, lineno,
                    "%d: expected the driver settings (key=value,... or - for none)", col);
            break;
        }
        if (field(&p, line, v, sizeof v, &col) < 0 || parse_verdicts(v, &e.verdicts) < 0) {
            rc = at(err, len, path, lineno,
                    "%d: expected verdicts like FAIL or FAIL|HANG (FAIL, CRASH, HANG, ERROR; PASS "
                    "only beside one of them, for a pool that races), "
                    "got '%s'",
                    col, v);
            break;
        }
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p) {
            rc = at(err, len, path, lineno, "%d: every entry needs a reason after its verdicts",
                    (int)(p - line) + 1);
            break;
        }
        size_t rl = strlen(p);
        while (rl && (p[rl - 1] == ' ' || p[rl - 1] == '\t' || p[rl - 1] == '\r'))
            rl--;
        if (rl >= sizeof e.reason) {
            /* Reports show it whole or not at all: never cut silently. */
            rc = at(err, len, path, lineno, "%d: the reason is %zu characters; at most %zu fit",
                    (int)(p - line) + 1, rl, sizeof e.reason - 1);
            break;
        }
        snprintf(e.reason, sizeof e.reason, "%.*s", (int)rl, p);
        for (size_t i = 0; i < b->n; i++) {
            if (strcmp(b->e[i].scenario, e.scenario) == 0 &&
                strcmp(b->e[i].backend, e.backend) == 0 && strcmp(b->e[i].driver, e.driver) == 0 &&
                strcmp(b->e[i].settings, e.settings) == 0) {
                rc = at(err, len, path, lineno, "1: the same case as line %d", b->e[i].line);
                break;
            }
        }
        if (rc)
            break;
        struct entry *ne = realloc(b->e, (b->n + 1) * sizeof *ne);
        if (!ne) {
            rc = -1;
            snprintf(err, len, "out of memory");
            break;
        }
        b->e = ne;
        b->e[b->n++] = e;
    }
    fclose(f);
    if (rc) {
        baseline_free(b);
        return -1;
    }
    *out = b;
    return 0;
}

void baseline_free(struct baseline *b)
{
    if (!b)
        return;
    free(b->e);
    free(b);
}

static void verdict_list(unsigned v, char *out, size_t len)
{
    out[0] = '\0';
    for (int k = RUNNER_FAIL; k <= RUNNER_ERROR; k++) {
        if (!(v & (1u << k)))
            continue;
        size_t l = strlen(out);
        snprintf(out + l, len - l, "%s%s", l ? "|" : "", runner_status_name((enum runner_status)k));
    }
}

size_t baseline_apply(const struct baseline *b, const char *driver, const char *settings,
                      struct runner_case *cases, size_t n)
{
    size_t red = 0;
    for (size_t i = 0; i < n; i++) {
        struct runner_case *c = &cases[i];
        const struct entry *e = NULL;
        for (size_t k = 0; b && k < b->n && !e; k++)
            if (strcmp(b->e[k].scenario, c->name) == 0 &&
                strcmp(b->e[k].backend, scn_backend_name(c->backend)) == 0 &&
                strcmp(b->e[k].driver, driver) == 0 && strcmp(b->e[k].settings, settings) == 0)
                e = &b->e[k];
        if (e) {
            snprintf(c->expect_reason, sizeof c->expect_reason, "%.300s:%d: %.400s", b->path,
                     e->line, e->reason);
            char want[64];
            verdict_list(e->verdicts, want, sizeof want);
            if (c->status != RUNNER_PASS && c->status != RUNNER_NA &&
                (e->verdicts & (1u << c->status))) {
                c->expected = 1;
            } else if (c->status == RUNNER_PASS && (e->verdicts & (1u << RUNNER_PASS))) {
                /* A race that went the pool's way this time: a plain pass. */
            } else {
                c->unexpected = 1;
                char was[sizeof c->message];
                snprintf(was, sizeof was, "%s", c->message);
                snprintf(c->message, sizeof c->message,
                         "%s, but the baseline expects %s (%.300s:%d)%s%.600s",
                         c->status == RUNNER_PASS ? "passed"
                         : c->status == RUNNER_NA ? "not applicable"
                                                  : runner_status_name(c->status),
                         want, b->path, e->line, was[0] ? ": " : "", was);
            }
        }
        red += runner_case_gate_failed(c);
    }
    return red;
}
