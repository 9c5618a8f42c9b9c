/*
 * End-to-end tests of the runner on the fake backend: verdicts, exit
 * codes, reports, and the watchdog's account of a hang.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "runner.h"
#include "testutil.h"

static char dir[] = "/tmp/pgfault-test-runner-XXXXXX";

static void write_file(const char *rel, const char *text)
{
    assert_int_equal(testutil_write(dir, rel, text), 0);
}

static char *slurp(const char *rel)
{
    return testutil_slurp(dir, rel);
}

static int run(const char *rel, int timeout_ms)
{
    return testutil_run(dir, rel, "pqpool", SCN_BACKEND_FAKE, timeout_ms);
}

static int setup(void **state)
{
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_passing_scenario_exits_0_with_reports(void **state)
{
    write_file("s/ok/pass.scn", "# A healthy server.\n"
                                "pool max=2 min_idle=0 housekeeping=off\n"
                                "acquire c1 within 1s\n"
                                "query c1 \"SELECT 1\"\n"
                                "release c1\n"
                                "expect pool.idle == 1\n");
    assert_int_equal(run("s/ok/pass.scn", 30000), 0);
    char *j = slurp("reports/junit.xml");
    assert_non_null(j);
    assert_non_null(strstr(j, "tests=\"1\" failures=\"0\""));
    assert_non_null(strstr(j, "classname=\"ok\" name=\"pass [fake]\""));
    char *t = slurp("reports/traces/ok-pass.fake.txt");
    assert_non_null(t);
    assert_non_null(strstr(t, "line 3   acquire c1 within 1s"));
    assert_non_null(strstr(t, "no leaks"));
    assert_non_null(slurp("reports/index.html"));
    assert_non_null(slurp("reports/summary.md"));
}

static void test_failing_expectation_exits_1_and_names_the_line(void **state)
{
    write_file("s/bad/fail.scn", "pool max=2 min_idle=0 housekeeping=off\n"
                                 "acquire c1\n"
                                 "release c1\n"
                                 "expect pool.idle == 2\n");
    assert_int_equal(run("s/bad/fail.scn", 30000), 1);
    char *j = slurp("reports/junit.xml");
    assert_non_null(j);
    assert_non_null(strstr(j, "failures=\"1\""));
    assert_non_null(strstr(j, "FAIL: line 4: expect pool.idle == 2: pool.idle = 1"));
}

static void test_parse_error_exits_2(void **state)
{
    write_file("s/bad/typo.scn", "pool max=2\nacquire c1\nfault dorp idle\n");
    assert_int_equal(run("s/bad/typo.scn", 30000), 2);
    write_file("s/bad/setting.scn", "pool max=2 acquire_timout=1s\nacquire c1\n");
    assert_int_equal(run("s/bad/setting.scn", 30000), 2);
}

static void test_hang_is_reported_with_the_last_step(void **state)
{
    write_file("s/slow/hang.scn", "pool max=1 min_idle=0 housekeeping=off\n"
                                  "acquire c1\n"
                                  "hold 30s\n"
                                  "release c1\n");
    assert_int_equal(run("s/slow/hang.scn", 1000), 1);
    char *j = slurp("reports/junit.xml");
    assert_non_null(j);
    assert_non_null(strstr(j, "HANG"));
    assert_non_null(strstr(j, "last step: line 3   hold 30s"));
}

extern int __lsan_do_recoverable_leak_check(void) __attribute__((weak));

/* Case processes leave with _exit, which LeakSanitizer never sees: the
 * runner checks them itself, and a leak fails the case. */
static void test_leak_in_the_case_process_fails_it(void **state)
{
    if (!__lsan_do_recoverable_leak_check)
        skip(); /* only a sanitizer build can see leaks */
    write_file("s/ok/leak.scn", "pool max=1 min_idle=0 housekeeping=off\n"
                                "acquire c1\n"
                                "release c1\n");
    assert_int_equal(run("s/ok/leak.scn", 30000), 0);
    setenv("PGFAULT_TEST_LEAK", "1", 1);
    int rc = run("s/ok/leak.scn", 30000);
    unsetenv("PGFAULT_TEST_LEAK");
    assert_int_equal(rc, 1);
    char *j = slurp("reports/junit.xml");
    assert_non_null(j);
    assert_non_null(strstr(j, "LeakSanitizer: "));
    assert_non_null(strstr(j, "48 byte(s) leaked in 1 allocation(s)"));
    char *t = slurp("reports/traces/ok-leak.fake.txt");
    assert_non_null(t);
    assert_non_null(strstr(t, "== LeakSanitizer, over the case process =="));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_passing_scenario_exits_0_with_reports),
        cmocka_unit_test(test_failing_expectation_exits_1_and_names_the_line),
        cmocka_unit_test(test_parse_error_exits_2),
        cmocka_unit_test(test_hang_is_reported_with_the_last_step),
        cmocka_unit_test(test_leak_in_the_case_process_fails_it),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("runner", tests, setup, teardown);
}
