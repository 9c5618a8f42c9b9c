/*
 * report: JUnit XML, TAP and Markdown summaries of a run.
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

/* N/A cases (the driver cannot express the scenario) are neither passes
 * nor failures: JUnit <skipped>, TAP # SKIP. */
static size_t count_failed(const struct runner_case *cases, size_t n)
{
    size_t f = 0;
    for (size_t i = 0; i < n; i++)
        f += runner_case_gate_failed(&cases[i]);
    return f;
}

static size_t count_skipped(const struct runner_case *cases, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += (cases[i].status == RUNNER_NA && !cases[i].unexpected) || cases[i].expected;
    return k;
}

/* A CSS class for a status ("N/A" is not a valid class name). */
static const char *status_class(enum runner_status s)
{
    return s == RUNNER_NA ? "NA" : runner_status_name(s);
}

int report_junit(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                 char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    size_t failed = count_failed(cases, n), skipped = count_skipped(cases, n);
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    fprintf(f, "<testsuites name=\"pgfault\" tests=\"%zu\" failures=\"%zu\" time=\"%.3f\">\n", n,
            failed, total_ms / 1000.0);
    fprintf(f,
            "  <testsuite name=\"pgfault\" tests=\"%zu\" failures=\"%zu\" errors=\"0\" "
            "skipped=\"%zu\" time=\"%.3f\">\n",
            n, failed, skipped, total_ms / 1000.0);
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
        if (c->status == RUNNER_PASS && !c->unexpected) {
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
        if (c->expected || (c->status == RUNNER_NA && !c->unexpected)) {
            char why_text[2400];
            if (c->expected)
                snprintf(why_text, sizeof why_text, "expected %s (%.999s): %.1199s",
                         runner_status_name(c->status), c->expect_reason, head);
            else
                snprintf(why_text, sizeof why_text, "%s", c->message);
            char *why = report_xml_escape(why_text);
            fprintf(f, ">\n      <skipped message=\"%s\"/>\n    </testcase>\n", why ? why : "");
            free(why);
            free(msg);
            continue;
        }
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

void report_tap_case(FILE *out, const struct runner_case *c, size_t number)
{
    int ok = c->status == RUNNER_PASS && !c->unexpected;
    if (c->expected) {
        /* TAP's word for a known failure. */
        fprintf(out, "not ok %zu - %s [%s] # TODO expected %s: ", number, c->name,
                backend_word(c->backend), runner_status_name(c->status));
        for (const char *m = c->expect_reason; *m; m++)
            fputc(*m == '\n' || *m == '#' ? ' ' : *m, out);
        fputc('\n', out);
        return;
    }
    if (c->status == RUNNER_NA && !c->unexpected) {
        /* A SKIP directive's reason ends at the line's end. */
        fprintf(out, "ok %zu - %s [%s] # SKIP ", number, c->name, backend_word(c->backend));
        for (const char *m = c->message; *m; m++)
            fputc(*m == '\n' || *m == '#' ? ' ' : *m, out);
        fputc('\n', out);
        return;
    }
    fprintf(out, "%s %zu - %s [%s]\n", ok ? "ok" : "not ok", number, c->name,
            backend_word(c->backend));
    if (ok)
        return;
    fprintf(out, "  ---\n  message: ");
    yaml_string(out, c->message);
    fprintf(out, "\n  severity: %s\n  file: ", runner_status_name(c->status));
    yaml_string(out, c->path);
    fprintf(out, "\n  line: %d\n  duration_ms: %.1f\n  ...\n", c->line, c->duration_ms);
}

void report_tap(FILE *out, const struct runner_case *cases, size_t n, const size_t *order,
                int version)
{
    fprintf(out, "TAP version %d\n1..%zu\n", version, n);
    for (size_t i = 0; i < n; i++)
        report_tap_case(out, &cases[order ? order[i] : i], i + 1);
}

void report_md_cell(FILE *out, const char *s, size_t max)
{
    size_t n = 0;
    for (; *s && n < max; s++, n++) {
        if (*s == '|')
            fputs("\\|", out);
        else if (*s == '\n')
            fputc(' ', out);
        else
            fputc(*s, out);
    }
    if (*s)
        fputs("...", out);
}

int report_summary_md(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                      char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    size_t failed = count_failed(cases, n), skipped = count_skipped(cases, n);
    fprintf(f,
            "# pgfault run\n\n**%s**: %zu passed, %zu failed, %zu not applicable, %zu total in "
            "%.1fs.\n\n",
            failed ? "FAILED" : "PASSED", n - failed - skipped, failed, skipped, n,
            total_ms / 1000.0);
    fprintf(f, "| result | scenario | backend | time | detail |\n|---|---|---|---:|---|\n");
    /* Failures first, so the reader sees what matters without scrolling. */
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < n; i++) {
            const struct runner_case *c = &cases[i];
            if ((c->status == RUNNER_PASS && !c->unexpected) != pass)
                continue;
            fprintf(f, "| %s | `%s` | %s | %.2fs | ", runner_status_name(c->status), c->name,
                    backend_word(c->backend), c->duration_ms / 1000.0);
            if (!pass) {
                if (c->line > 0)
                    fprintf(f, "line %d: ", c->line);
                report_md_cell(f, c->message, (size_t)-1);
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

/* ---- HTML with SVG timelines ----------------------------------------------- */

struct tl_item {
    double start, end;
    char kind[32];
    char label[300];
    int row;
};

/* Parses a timeline text into items (caller frees). */
static struct tl_item *tl_parse(const char *text, size_t *n_out, double *max_ms)
{
    *n_out = 0;
    *max_ms = 1;
    if (!text)
        return NULL;
    size_t cap = 0, n = 0;
    struct tl_item *items = NULL;
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char line[400];
        snprintf(line, sizeof line, "%.*s", (int)(len < sizeof line ? len : sizeof line - 1), p);
        p += len + (nl ? 1 : 0);
        struct tl_item it = {0};
        char *f1 = strtok(line, "\t"), *f2 = strtok(NULL, "\t"), *f3 = strtok(NULL, "\t"),
             *f4 = strtok(NULL, "");
        if (!f1 || !f2 || !f3)
            continue;
        it.start = atof(f1);
        it.end = atof(f2);
        if (it.start < 0)
            it.start = 0;
        if (it.end < it.start)
            it.end = it.start;
        snprintf(it.kind, sizeof it.kind, "%s", f3);
        snprintf(it.label, sizeof it.label, "%s", f4 ? f4 : "");
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            struct tl_item *ni = realloc(items, cap * sizeof *ni);
            if (!ni)
                break;
            items = ni;
        }
        items[n++] = it;
        if (it.end > *max_ms)
            *max_ms = it.end;
    }
    *n_out = n;
    return items;
}

enum { LANE_ACQUIRE, LANE_QUERY, LANE_FAULT, LANE_POOL, LANE__COUNT };

static int tl_lane(const char *kind)
{
    if (strcmp(kind, "acquire") == 0)
        return LANE_ACQUIRE;
    if (strcmp(kind, "query") == 0 || strcmp(kind, "release") == 0 || strcmp(kind, "discard") == 0)
        return LANE_QUERY;
    if (strcmp(kind, "fault") == 0 || strcmp(kind, "heal") == 0 || strcmp(kind, "close") == 0 ||
        strcmp(kind, "fail") == 0)
        return LANE_FAULT;
    return LANE_POOL;
}

static const char *tl_color(const struct tl_item *it)
{
    const char *k = it->kind, *l = it->label;
    if (strcmp(k, "acquire") == 0)
        return strstr(l, ": ok ") ? "#2e8b57" : strstr(l, ": timeout") ? "#d2691e" : "#c0392b";
    if (strcmp(k, "query") == 0)
        return strstr(l, " ok") ? "#2c6fbb" : "#c0392b";
    if (strcmp(k, "fault") == 0 || strcmp(k, "fail") == 0)
        return "#c0392b";
    if (strcmp(k, "heal") == 0)
        return "#2e8b57";
    if (strcmp(k, "connected") == 0 || strcmp(k, "served") == 0)
        return "#2e8b57";
    if (strcmp(k, "ejected") == 0)
        return "#e67e22";
    if (strstr(k, "fail") || strstr(k, "auth"))
        return "#c0392b";
    if (strstr(k, "timeout") || strstr(k, "timed"))
        return "#8e44ad";
    return "#7f8c8d";
}

/* Writes one case's timeline as an inline SVG. */
static void tl_svg(FILE *f, const char *timeline)
{
    size_t n;
    double max_ms;
    struct tl_item *items = tl_parse(timeline, &n, &max_ms);
    if (!n) {
        fprintf(f, "<p class=\"none\">no timeline recorded</p>\n");
        free(items);
        return;
    }
    /* Overlapping intervals of a lane get their own rows (greedy). */
    double row_end[LANE__COUNT][8];
    int rows[LANE__COUNT] = {1, 1, 1, 1};
    for (int l = 0; l < LANE__COUNT; l++)
        for (int r = 0; r < 8; r++)
            row_end[l][r] = -1;
    for (size_t i = 0; i < n; i++) {
        int l = tl_lane(items[i].kind);
        int r = 0;
        while (r < 7 && row_end[l][r] >= 0 && row_end[l][r] > items[i].start)
            r++;
        items[i].row = r;
        double w = items[i].end > items[i].start ? items[i].end : items[i].start + max_ms / 200;
        row_end[l][r] = w;
        if (r + 1 > rows[l])
            rows[l] = r + 1;
    }
    const int left = 90, width = 860, rowh = 12, pad = 8;
    int lane_y[LANE__COUNT], y = 6;
    for (int l = 0; l < LANE__COUNT; l++) {
        lane_y[l] = y;
        y += rows[l] * rowh + pad;
    }
    int axis_y = y + 4, height = axis_y + 18;
    static const char *const lane_names[] = {"acquire", "query/release", "fault", "pool events"};
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" role=\"img\">\n",
            left + width + 20, height, left + width + 20, height);
    for (int l = 0; l < LANE__COUNT; l++) {
        fprintf(f,
                "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\"/>"
                "<text x=\"4\" y=\"%d\" class=\"lane\">%s</text>\n",
                left, lane_y[l] - 2, width, rows[l] * rowh + 4, l % 2 ? "#f4f6f8" : "#fafbfc",
                lane_y[l] + 9, lane_names[l]);
    }
    /* Axis with about eight ticks at round values. */
    double step = 1;
    for (double base = 1; max_ms / step > 8; base *= 10) {
        static const double mult[] = {1, 2, 5};
        for (int k = 0; k < 3 && max_ms / (step = base * mult[k]) > 8; k++)
            ;
    }
    fprintf(f, "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"#999\"/>\n", left, axis_y,
            left + width, axis_y);
    for (double t = 0; t <= max_ms + 0.001; t += step) {
        double x = left + t / max_ms * width;
        fprintf(f,
                "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#999\"/>"
                "<text x=\"%.1f\" y=\"%d\" class=\"tick\">%s%.0f%s</text>\n",
                x, axis_y, x, axis_y + 4, x, axis_y + 15, "", t >= 1000 ? t / 1000 : t,
                t >= 1000 ? "s" : "ms");
    }
    for (size_t i = 0; i < n; i++) {
        const struct tl_item *it = &items[i];
        int l = tl_lane(it->kind);
        double x0 = left + it->start / max_ms * width;
        double x1 = left + it->end / max_ms * width;
        int ry = lane_y[l] + it->row * rowh;
        char *title = report_xml_escape(it->label);
        const char *color = tl_color(it);
        if (strcmp(it->kind, "fail") == 0) {
            fprintf(f,
                    "<line x1=\"%.1f\" y1=\"2\" x2=\"%.1f\" y2=\"%d\" stroke=\"%s\" "
                    "stroke-width=\"2\" stroke-dasharray=\"4 2\"><title>FAIL at %.1fms: %s"
                    "</title></line>\n",
                    x0, x0, axis_y, color, it->start, title ? title : "");
        } else if (x1 - x0 >= 2) {
            fprintf(f,
                    "<rect x=\"%.1f\" y=\"%d\" width=\"%.1f\" height=\"%d\" rx=\"2\" "
                    "fill=\"%s\" fill-opacity=\"0.85\"><title>%.1f-%.1fms %s: %s</title></rect>\n",
                    x0, ry, x1 - x0, rowh - 2, color, it->start, it->end, it->kind,
                    title ? title : "");
        } else {
            fprintf(f,
                    "<circle cx=\"%.1f\" cy=\"%d\" r=\"4\" fill=\"%s\"><title>%.1fms %s: %s"
                    "</title></circle>\n",
                    x0, ry + rowh / 2 - 1, color, it->start, it->kind, title ? title : "");
        }
        free(title);
    }
    fprintf(f, "</svg>\n");
    free(items);
}

int report_html(const char *path, const struct runner_case *cases, size_t n, double total_ms,
                char *err, size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    size_t failed = count_failed(cases, n), skipped = count_skipped(cases, n);
    fprintf(f,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            "<title>pgfault: %zu passed, %zu failed</title>\n<style>\n"
            "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}\n"
            "h1{font-size:20px} .sum{font-size:16px;margin-bottom:12px}\n"
            ".PASS{color:#2e8b57;font-weight:bold} .FAIL,.CRASH,.HANG,.ERROR{color:#c0392b;"
            "font-weight:bold} .NA{color:#777;font-weight:bold}\n"
            "table{border-collapse:collapse;width:100%%} td,th{text-align:left;padding:4px 8px;"
            "border-bottom:1px solid #e5e5e5;vertical-align:top}\n"
            "tr.tl td{border-bottom:2px solid #ccc;padding-bottom:10px}\n"
            ".msg{color:#c0392b;font-family:monospace;white-space:pre-wrap}\n"
            "svg text.lane{font-size:10px;fill:#555} svg text.tick{font-size:9px;fill:#777;"
            "text-anchor:middle}\n"
            ".legend span{display:inline-block;margin-right:14px} .sw{display:inline-block;"
            "width:10px;height:10px;margin-right:4px;vertical-align:middle}\n"
            "</style></head><body>\n",
            n - failed - skipped, failed);
    fprintf(f,
            "<h1>pgfault resilience run</h1>\n<p class=\"sum\"><span class=\"%s\">%s</span>: "
            "%zu passed, %zu failed, %zu not applicable, %zu cases in %.1fs.</p>\n",
            failed ? "FAIL" : "PASS", failed ? "FAILED" : "PASSED", n - failed - skipped, failed,
            skipped, n, total_ms / 1000.0);
    fprintf(f, "<p class=\"legend\">"
               "<span><i class=\"sw\" style=\"background:#2e8b57\"></i>acquire ok / connected / "
               "heal</span>"
               "<span><i class=\"sw\" style=\"background:#d2691e\"></i>acquire timeout</span>"
               "<span><i class=\"sw\" style=\"background:#c0392b\"></i>fault, error, failure</span>"
               "<span><i class=\"sw\" style=\"background:#2c6fbb\"></i>query ok</span>"
               "<span><i class=\"sw\" style=\"background:#e67e22\"></i>ejected</span>"
               "<span><i class=\"sw\" style=\"background:#8e44ad\"></i>pool timeout</span>"
               "<span><i class=\"sw\" style=\"background:#7f8c8d\"></i>other pool event</span>"
               " (hover for details)</p>\n");
    fprintf(f, "<table>\n<tr><th>result</th><th>scenario</th><th>backend</th><th>time</th>"
               "<th>trace</th></tr>\n");
    for (int pass = 0; pass < 2; pass++) {
        for (size_t i = 0; i < n; i++) {
            const struct runner_case *c = &cases[i];
            if ((c->status == RUNNER_PASS && !c->unexpected) != pass)
                continue;
            char *nm = report_xml_escape(c->name), *tf = report_xml_escape(c->trace_file);
            char *desc = report_xml_escape(c->description);
            fprintf(f,
                    "<tr><td class=\"%s\">%s</td><td><b>%s</b><br><small>%s</small></td>"
                    "<td>%s</td><td>%.2fs</td><td><a href=\"%s\">trace</a></td></tr>\n",
                    status_class(c->status), runner_status_name(c->status), nm ? nm : "",
                    desc ? desc : "", backend_word(c->backend), c->duration_ms / 1000.0,
                    tf ? tf : "");
            free(nm);
            free(tf);
            free(desc);
            fprintf(f, "<tr class=\"tl\"><td></td><td colspan=\"4\">\n");
            if (c->status != RUNNER_PASS) {
                char head[1200];
                snprintf(head, sizeof head, "%s%d%s%s", c->line ? "line " : "", c->line,
                         c->line ? ": " : "", c->message);
                char *m = report_xml_escape(c->line ? head : c->message);
                fprintf(f, "<div class=\"msg\">%s</div>\n", m ? m : "");
                free(m);
            }
            tl_svg(f, c->timeline);
            fprintf(f, "</td></tr>\n");
        }
    }
    fprintf(f, "</table>\n</body></html>\n");
    if (fclose(f) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

static void tsv_field(FILE *f, const char *s, int last)
{
    for (; *s; s++)
        fputc(*s == '\t' || *s == '\n' || *s == '\r' ? ' ' : *s, f);
    fputc(last ? '\n' : '\t', f);
}

int report_cases_tsv(const char *path, const struct runner_case *cases, size_t n,
                     const char *driver, const char *settings, const char *pool, char *err,
                     size_t errlen)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    fprintf(f, "scenario\tbackend\tdriver\tsettings\tpool\tstatus\texpected\tunexpected\tline\t"
               "message\ttrace\tbaseline\n");
    for (size_t i = 0; i < n; i++) {
        const struct runner_case *c = &cases[i];
        char num[32];
        tsv_field(f, c->name, 0);
        tsv_field(f, backend_word(c->backend), 0);
        tsv_field(f, driver, 0);
        tsv_field(f, settings, 0);
        tsv_field(f, pool, 0);
        tsv_field(f, runner_status_name(c->status), 0);
        tsv_field(f, c->expected ? "1" : "0", 0);
        tsv_field(f, c->unexpected ? "1" : "0", 0);
        snprintf(num, sizeof num, "%d", c->line);
        tsv_field(f, num, 0);
        tsv_field(f, c->message, 0);
        tsv_field(f, c->trace_file, 0);
        tsv_field(f, c->expect_reason, 1);
    }
    if (fclose(f) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}
