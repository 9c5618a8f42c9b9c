/*
 * Unit tests of the reporters: escaping, and that JUnit, TAP and the
 * Markdown summary say what happened (counts, failure messages, order).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "report.h"

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static void fill(struct runner_case *c)
{
    memset(c, 0, 2 * sizeof *c);
    snprintf(c[0].name, sizeof c[0].name, "auth/wrong-password");
    snprintf(c[0].path, sizeof c[0].path, "scenarios/auth/wrong-password.scn");
    c[0].backend = SCN_BACKEND_FAKE;
    c[0].status = RUNNER_PASS;
    c[0].duration_ms = 12.5;
    snprintf(c[1].name, sizeof c[1].name, "idle-drop/x");
    snprintf(c[1].path, sizeof c[1].path, "scenarios/idle-drop/x.scn");
    c[1].backend = SCN_BACKEND_PROXY;
    c[1].status = RUNNER_FAIL;
    c[1].line = 7;
    c[1].duration_ms = 300;
    snprintf(c[1].message, sizeof c[1].message, "expect pool.idle == 2: pool.idle = 1 <&\">");
    c[1].trace = "+ 0.001s line 7 | bad \x01 byte\n";
}

/* A case the driver cannot express: skipped everywhere, never a failure. */
static void test_na_is_skipped(void **state)
{
    struct runner_case c[2];
    fill(c);
    c[1].status = RUNNER_NA;
    c[1].line = 0;
    snprintf(c[1].message, sizeof c[1].message, "pool max_lifetime: x cannot honour it (#why)");
    char path[] = "/tmp/pgfault-test-na-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char err[256];
    assert_int_equal(report_junit(path, c, 2, 1, err, sizeof err), 0);
    char *x = slurp(path);
    assert_non_null(strstr(x, "tests=\"2\" failures=\"0\" errors=\"0\" skipped=\"1\""));
    assert_non_null(strstr(x, "<skipped message=\"pool max_lifetime: x cannot honour it"));
    assert_null(strstr(x, "<failure"));
    FILE *f = fopen(path, "w");
    report_tap(f, c, 2, NULL, 13);
    fclose(f);
    /* Debian's own TAP consumer (prove, Test::Harness 3.44) must call a
     * green run green: it refuses a "TAP version 14" line. */
    char cmd[300];
    snprintf(cmd, sizeof cmd, "prove -e cat %s >/dev/null 2>&1", path);
    assert_int_equal(system(cmd), 0);
    x = slurp(path);
    assert_non_null(strstr(
        x, "ok 2 - idle-drop/x [proxy] # SKIP pool max_lifetime: x cannot honour it ( why)\n"));
    assert_int_equal(report_summary_md(path, c, 2, 1, err, sizeof err), 0);
    x = slurp(path);
    assert_non_null(strstr(x, "**PASSED**: 1 passed, 0 failed, 1 not applicable, 2 total"));
    assert_non_null(strstr(x, "| N/A |"));
    unlink(path);
}

static void test_xml_escape(void **state)
{
    char *e = report_xml_escape("a<b>&\"c'\x01\td");
    assert_string_equal(e, "a&lt;b&gt;&amp;&quot;c&apos;\td");
    free(e);
}

static void test_junit_lists_every_case(void **state)
{
    struct runner_case c[2];
    fill(c);
    char path[] = "/tmp/pgfault-test-junit-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char err[256];
    assert_int_equal(report_junit(path, c, 2, 312.5, err, sizeof err), 0);
    char *x = slurp(path);
    unlink(path);
    assert_non_null(strstr(x, "tests=\"2\" failures=\"1\""));
    assert_non_null(strstr(x, "<testcase classname=\"auth\" name=\"wrong-password [fake]\""));
    assert_non_null(strstr(x, "name=\"x [proxy]\""));
    assert_non_null(
        strstr(x, "FAIL: line 7: expect pool.idle == 2: pool.idle = 1 &lt;&amp;&quot;&gt;"));
    assert_null(strstr(x, "\x01"));
    assert_int_equal(report_junit("/nonexistent/dir/j.xml", c, 2, 1, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/dir/j.xml: "));
}

static void test_tap_and_summary(void **state)
{
    struct runner_case c[2];
    fill(c);
    char path[] = "/tmp/pgfault-test-tap-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    report_tap(f, c, 2, NULL, 13);
    fclose(f);
    char *t = slurp(path);
    assert_non_null(strstr(t, "TAP version 13\n1..2\nok 1 - auth/wrong-password [fake]\n"
                              "not ok 2 - idle-drop/x [proxy]\n  ---\n"));
    /* In the order the cases finished, numbered as the live stream did. */
    size_t order[] = {1, 0};
    f = fopen(path, "w");
    report_tap(f, c, 2, order, 14);
    fclose(f);
    char *t2 = slurp(path);
    assert_non_null(strstr(t2, "TAP version 14\n1..2\nnot ok 1 - idle-drop/x [proxy]\n"));
    assert_non_null(strstr(t2, "ok 2 - auth/wrong-password [fake]\n"));
    assert_non_null(strstr(t, "  line: 7\n"));
    char err[256];
    assert_int_equal(report_summary_md(path, c, 2, 1000, err, sizeof err), 0);
    char *m = slurp(path);
    unlink(path);
    assert_non_null(strstr(m, "**FAILED**: 1 passed, 1 failed, 0 not applicable, 2 total"));
    /* failures first */
    char *fail_row = strstr(m, "| FAIL |"), *pass_row = strstr(m, "| PASS |");
    assert_non_null(fail_row);
    assert_non_null(pass_row);
    assert_true(fail_row < pass_row);
}

static void test_html_has_timelines_failures_first(void **state)
{
    struct runner_case c[2];
    fill(c);
    c[0].timeline = "0.000\t12.000\tacquire\tc1: ok after 12.0ms\n"
                    "12.500\t12.500\tfault\tfault kill idle\n"
                    "13.000\t13.000\tejected\tejected conn 1: dead\n";
    c[1].timeline = NULL;
    snprintf(c[0].trace_file, sizeof c[0].trace_file, "traces/auth-wrong-password.fake.txt");
    char path[] = "/tmp/pgfault-test-html-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char err[256];
    assert_int_equal(report_html(path, c, 2, 1000, err, sizeof err), 0);
    char *h = slurp(path);
    unlink(path);
    assert_non_null(strstr(h, "<svg"));
    assert_non_null(strstr(h, "c1: ok after 12.0ms</title></rect>"));
    assert_non_null(strstr(h, "ejected: ejected conn 1: dead</title></circle>"));
    assert_non_null(strstr(h, "href=\"traces/auth-wrong-password.fake.txt\""));
    assert_non_null(strstr(h, "no timeline recorded"));
    assert_null(strstr(h, "<script"));
    char *fail_row = strstr(h, "class=\"FAIL\">FAIL"), *pass_row = strstr(h, "class=\"PASS\">PASS");
    assert_non_null(fail_row);
    assert_non_null(pass_row);
    assert_true(fail_row < pass_row);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_xml_escape),
        cmocka_unit_test(test_na_is_skipped),
        cmocka_unit_test(test_junit_lists_every_case),
        cmocka_unit_test(test_tap_and_summary),
        cmocka_unit_test(test_html_has_timelines_failures_first),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("report", tests, NULL, NULL);
}
