/*
 * report: JUnit XML, TAP 14 and Markdown summaries of a run.
 *
 * The formats are written by hand rather than through a library: each is a
 * few lines of text, and the only subtle part, escaping, is kept in one
 * function with a unit test.
 */
#include "report.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

char *report_xml_escape(const char *text)
{
    size_t len = 0;
    for (const unsigned char *c = (const unsigned char *)text; *c; c++)
        len += *c == '&' ? 5 : (*c == '<' || *c == '>') ? 4 : (*c == '"' || *c == '\'') ? 6 : 1;
    char *out = malloc(len + 1), *w = out;
    if (!out)
        return NULL;
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        switch (*c) {
        case '&':
            w = stpcpy(w, "&amp;");
            break;
        case '<':
            w = stpcpy(w, "&lt;");
            break;
        case '>':
            w = stpcpy(w, "&gt;");
            break;
        case '"':
            w = stpcpy(w, "&quot;");
            break;
        case '\'':
            w = stpcpy(w, "&apos;");
            break;
        default:
            /* XML 1.0 allows tab, newline and carriage return only. */
            if (*c < 0x20 && *c != '\t' && *c != '\n' && *c != '\r')
                break;
            *w++ = (char)*c;
        }
    }
    *w = '\0';
    return out;
}

static const char *backend_word(enum scn_backend b)
{
    return scn_backend_name(b);
}

static size_t count_failed(const struct runner_case *cases, size_t n)
{
    size_t f = 0;
    for (size_t i = 0; i < n; i++)
        f += cases[i].status != RUNNER_PASS;
    return f;
}

int report_junit(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                 char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    size_t failed = count_failed(cases, n);
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(f, "<testsuites name=\"pgfault\" tests=\"%zu\" failures=\"%zu\" time=\"%.3f\">\n", n,
            failed, total_ms / 1000.0);
    fprintf(f, "  <testsuite name=\"pgfault\" tests=\"%zu\" failures=\"%zu\" errors=\"0\" "
               "skipped=\"0\" time=\"%.3f\">\n",
            n, failed, total_ms / 1000.0);
    for (size_t i = 0; i < n; i++) {
        const struct runner_case *c = &cases[i];
        char family[128];
        snprintf(family, sizeof family, "%s", c->name);
        char *slash = strchr(family, '/');
        const char *leaf = c->name;
        if (slash) {
            *slash = '\0';
            leaf = c->name + (slash - family) + 1;
        }
        char *cls = report_xml_escape(family), *nm = report_xml_escape(leaf);
        char *file = report_xml_escape(c->path);
        fprintf(f, "    <testcase classname=\"%s\" name=\"%s [%s]\" file=\"%s\" time=\"%.3f\"",
                cls ? cls : "", nm ? nm : "", backend_word(c->backend), file ? file : "",
                c->duration_ms / 1000.0);
        free(cls);
        free(nm);
        free(file);
        if (c->status == RUNNER_PASS) {
            fprintf(f, "/>\n");
            continue;
        }
        char head[1200];
        if (c->line > 0)
            snprintf(head, sizeof head, "%s: line %d: %s", runner_status_name(c->status), c->line,
                     c->message);
        else
            snprintf(head, sizeof head, "%s: %s", runner_status_name(c->status), c->message);
        char *msg = report_xml_escape(head);
        char *tr = report_xml_escape(c->trace ? c->trace : "");
        fprintf(f, ">\n      <failure message=\"%s\" type=\"%s\">%s</failure>\n    </testcase>\n",
                msg ? msg : "", runner_status_name(c->status), tr ? tr : "");
        free(msg);
        free(tr);
    }
    fprintf(f, "  </testsuite>\n</testsuites>\n");
    if (fclose(f) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Writes s as a YAML double-quoted scalar. */
static void yaml_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fprintf(out, "\\%c", *s);
        else if (*s == '\n')
            fputs("\\n", out);
        else if ((unsigned char)*s < 0x20)
            fprintf(out, "\\x%02x", (unsigned char)*s);
        else
            fputc(*s, out);
    }
    fputc('"', out);
}

void report_tap(FILE *out, const struct runner_case *cases, size_t n)
{
    fprintf(out, "TAP version 14\n1..%zu\n", n);
    for (size_t i = 0; i < n; i++) {
        const struct runner_case *c = &cases[i];
        int ok = c->status == RUNNER_PASS;
        fprintf(out, "%s %zu - %s [%s]\n", ok ? "ok" : "not ok", i + 1, c->name,
                backend_word(c->backend));
        if (ok)
            continue;
        fprintf(out, "  ---\n  message: ");
        yaml_string(out, c->message);
        fprintf(out, "\n  severity: %s\n  file: ", runner_status_name(c->status));
        yaml_string(out, c->path);
        fprintf(out, "\n  line: %d\n  duration_ms: %.1f\n  ...\n", c->line, c->duration_ms);
    }
}

/* Markdown table cells must not contain a bare '|' or a newline. */
static void md_cell(FILE *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '|')
            fputs("\\|", out);
        else if (*s == '\n')
            fputc(' ', out);
        else
            fputc(*s, out);
    }
}

int report_summary_md(const char *path, const struct runner_case *cases, size_t n,
                      double total_ms, char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    size_t failed = count_failed(cases, n);
    fprintf(f, "# pgfault run\n\n**%s**: %zu passed, %zu failed, %zu total in %.1fs.\n\n",
            failed ? "FAILED" : "PASSED", n - failed, failed, n, total_ms / 1000.0);
    fprintf(f, "| result | scenario | backend | time | detail |\n|---|---|---|---:|---|\n");
    /* Failures first, so the reader sees what matters without scrolling. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < n; i++) {
            const struct runner_case *c = &cases[i];
            if ((c->status == RUNNER_PASS) != pass)
                continue;
            fprintf(f, "| %s | `%s` | %s | %.2fs | ", runner_status_name(c->status), c->name,
                    backend_word(c->backend), c->duration_ms / 1000.0);
            if (!pass) {
                if (c->line > 0)
                    fprintf(f, "line %d: ", c->line);
                md_cell(f, c->message);
            }
            fprintf(f, " |\n");
        }
    }
    if (fclose(f) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}
