/*
 * Tests of the expected-failures baseline: its mistakes are named with
 * file:line:col, and a run is judged strictly -- an expected failure is
 * not the gate's, a new failure is, and so is an expected one that passed
 * or took a verdict the baseline does not list.
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

#include "baseline.h"

static char path[] = "/tmp/pgfault-test-baseline-XXXXXX";

static void write_baseline(const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int load_error(const char *text, char *err, size_t len)
{
    write_baseline(text);
    struct baseline *b = NULL;
    int rc = baseline_load(path, &b, err, len);
    baseline_free(b);
    return rc;
}

static void test_mistakes_are_located(void **state)
{
    char err[700], want[700];
    assert_int_equal(load_error("# fine\n\nauth/x proxy node-pg - FAIL\n", err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:3:28: every entry needs a reason", path);
    assert_non_null(strstr(err, want));
    assert_int_equal(load_error("auth/x proxy node-pg - FAIL|BOOM why\n", err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:1:24: expected verdicts like FAIL or FAIL|HANG", path);
    assert_non_null(strstr(err, want));
    assert_non_null(strstr(err, "got 'FAIL|BOOM'"));
    /* PASS only beside a failure (a pool that races). */
    assert_int_equal(load_error("auth/x proxy node-pg - PASS why\n", err, sizeof err), -1);
    assert_non_null(strstr(err, "got 'PASS'"));
    assert_int_equal(load_error("auth/x proxy node-pg - FAIL|PASS races\n", err, sizeof err), 0);
    assert_int_equal(load_error("auth/x proxi node-pg - FAIL why\n", err, sizeof err), -1);
    assert_non_null(strstr(err, ":1:8: expected a backend (fake or proxy), got 'proxi'"));
    assert_int_equal(load_error("nameonly proxy node-pg - FAIL why\n", err, sizeof err), -1);
    assert_non_null(strstr(err, ":1:1: expected a scenario FAMILY/NAME"));
    assert_int_equal(
        load_error("a/b proxy d - FAIL one\na/b proxy d - HANG two\n", err, sizeof err), -1);
    assert_non_null(strstr(err, ":2:1: the same case as line 1"));
    char longer[600] = "a/b proxy d - FAIL ";
    memset(longer + strlen(longer), 'x', 420);
    strcat(longer, "\n");
    assert_int_equal(load_error(longer, err, sizeof err), -1);
    assert_non_null(strstr(err, ":1:20: the reason is 420 characters; at most 399 fit"));
    assert_int_equal(load_error("", err, sizeof err), 0);
    struct baseline *b = NULL;
    assert_int_equal(baseline_load("/nonexistent/x.txt", &b, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/x.txt: "));
}

static struct runner_case mk(const char *name, enum runner_status st, const char *msg)
{
    struct runner_case c;
    memset(&c, 0, sizeof c);
    snprintf(c.name, sizeof c.name, "%s", name);
    c.backend = SCN_BACKEND_PROXY;
    c.status = st;
    snprintf(c.message, sizeof c.message, "%s", msg);
    return c;
}

static void test_strict_judgement(void **state)
{
    write_baseline("# scenario backend driver settings verdicts reason\n"
                   "a/crashes   proxy node-pg error_listener=off CRASH      no listener\n"
                   "a/varies    proxy node-pg error_listener=off FAIL|HANG  slow on a loaded box\n"
                   "a/fixed     proxy node-pg error_listener=off FAIL       was broken\n"
                   "a/changed   proxy node-pg error_listener=off FAIL       fails an expect\n"
                   "a/other     proxy node-pg error_listener=on  FAIL       only with a listener\n"
                   "a/races     proxy node-pg error_listener=off FAIL|PASS  the pool races\n");
    struct baseline *b = NULL;
    char err[600];
    assert_int_equal(baseline_load(path, &b, err, sizeof err), 0);
    struct runner_case c[9] = {
        mk("a/crashes", RUNNER_CRASH, "exited"),
        mk("a/varies", RUNNER_HANG, "no answer"),
        mk("a/fixed", RUNNER_PASS, ""),
        mk("a/changed", RUNNER_CRASH, "exited"),
        mk("a/other", RUNNER_FAIL, "x"),
        mk("a/new", RUNNER_FAIL, "a new failure"),
        mk("a/na", RUNNER_NA, "cannot express it"),
        mk("a/races", RUNNER_PASS, ""),
        mk("a/races", RUNNER_FAIL, "lost the race"),
    };
    size_t red = baseline_apply(b, "node-pg", "error_listener=off", c, 9);
    /* expected: crashes, varies; red: fixed (unexpected pass), changed
     * (other verdict), other (entry is for another setting: a new
     * failure here), new. N/A is never red. */
    assert_int_equal(red, 4);
    assert_true(c[0].expected && !runner_case_gate_failed(&c[0]));
    assert_non_null(strstr(c[0].expect_reason, ":2: no listener"));
    assert_true(c[1].expected);
    assert_true(c[2].unexpected && runner_case_gate_failed(&c[2]));
    assert_non_null(strstr(c[2].message, "passed, but the baseline expects FAIL"));
    assert_true(c[3].unexpected);
    assert_non_null(strstr(c[3].message, "CRASH, but the baseline expects FAIL"));
    assert_true(!c[4].expected && runner_case_gate_failed(&c[4]));
    assert_true(runner_case_gate_failed(&c[5]));
    assert_false(runner_case_gate_failed(&c[6]));
    /* A race either way: a plain pass, or an expected failure. */
    assert_true(!c[7].expected && !c[7].unexpected && !runner_case_gate_failed(&c[7]));
    assert_true(c[8].expected && !runner_case_gate_failed(&c[8]));
    baseline_free(b);
}

static int setup(void **state)
{
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    close(fd);
    return 0;
}

static int teardown(void **state)
{
    return unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mistakes_are_located),
        cmocka_unit_test(test_strict_judgement),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("baseline", tests, setup, teardown);
}
