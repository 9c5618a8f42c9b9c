/*
 * Tests of the driver protocol end to end: driver-check passes the shipped
 * example driver and pqpool, and diagnoses each deliberately broken driver
 * (tests/drivers/broken.py) by name; the runner turns a driver process that
 * exits, writes garbage or never answers into CRASH or HANG with what
 * happened, and a scenario the driver cannot express into N/A; and no
 * driver process is left behind.
 *
 * Paths are relative to the source tree: make check runs tests from there.
 */
#include <dirent.h>
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

#include "driver_check.h"
#include "runner.h"
#include "testutil.h"

#define BROKEN "exec:/usr/bin/python3 tests/drivers/broken.py "

static char dir[] = "/tmp/pgfault-test-drivers-XXXXXX";

/* Runs driver-check on name; returns its exit code, output in *out. */
static int check_driver(const char *name, char **out)
{
    size_t len = 0;
    FILE *f = open_memstream(out, &len);
    assert_non_null(f);
    int rc = driver_check_run(name, f);
    fclose(f);
    fprintf(stderr, "%s", *out); /* the check lines, for whoever reads the test log */
    return rc;
}

/* Whether any process's command line contains needle. */
static int process_running(const char *needle)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int found = 0;
    while (d && (e = readdir(d)) != NULL && !found) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        char path[300], buf[1024];
        snprintf(path, sizeof path, "/proc/%s/cmdline", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        for (size_t i = 0; i < n; i++)
            if (buf[i] == '\0')
                buf[i] = ' ';
        buf[n] = '\0';
        found = strstr(buf, needle) != NULL;
    }
    if (d)
        closedir(d);
    return found;
}

static void test_example_conforms(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver("example", &out), 0);
    assert_non_null(strstr(out, "driver-check: "));
    assert_null(strstr(out, "FAIL"));
    assert_non_null(strstr(out, "acquires in flight at once"));
    assert_non_null(strstr(out, "password: new connections use the pushed password"));
    free(out);
    assert_false(process_running("example/driver.py"));
}

static void test_pqpool_conforms(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver("pqpool", &out), 0);
    assert_null(strstr(out, "FAIL"));
    free(out);
}

static void test_silent_driver_is_hung(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver(BROKEN "silent", &out), 1);
    assert_non_null(strstr(out, "no answer to 'hello' (id 1) within 10.0 s"));
    free(out);
    assert_false(process_running("broken.py silent"));
}

static void test_garbage_driver_is_crashed(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver(BROKEN "garbage", &out), 1);
    assert_non_null(strstr(out, "the driver CRASHED: wrote a line that is not a JSON object"));
    free(out);
}

static void test_exiting_driver_is_crashed(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver(BROKEN "exits", &out), 1);
    assert_non_null(strstr(out, "the driver CRASHED: exited with status 3"));
    free(out);
}

static void test_serial_driver_is_named(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver(BROKEN "serial", &out), 1);
    assert_non_null(strstr(out, "the driver serves requests one at a time"));
    free(out);
}

static void test_wrong_clock_units_are_named(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver(BROKEN "nanos", &out), 1);
    assert_non_null(
        strstr(out, "the driver CRASHED: its reply to 'acquire' has an elapsed_us longer than its "
                    "round trip (not microseconds?)"));
    free(out);
}

static void test_unknown_driver_is_a_usage_error(void **state)
{
    char *out = NULL;
    assert_int_equal(check_driver("no-such-driver", &out), 2);
    assert_non_null(strstr(out, "unknown driver 'no-such-driver'"));
    free(out);
}

/* ---- The runner with exec drivers ------------------------------------------ */

static void write_scenario(const char *rel, const char *text)
{
    assert_int_equal(testutil_write(dir, rel, text), 0);
}

static char *junit(void)
{
    return testutil_slurp(dir, "reports/junit.xml");
}

static int run_with(const char *driver, const char *rel, unsigned backends)
{
    return testutil_run(dir, rel, driver, backends, 60000);
}

static const char *const simple = "pool max=2 min_idle=0 acquire_timeout=1s connect_timeout=1s\n"
                                  "acquire c1\n"
                                  "query c1 \"SELECT 1\"\n"
                                  "release c1\n"
                                  "expect pool.in_use == 0\n";

static void test_example_runs_a_scenario(void **state)
{
    write_scenario("s/t/simple.scn", simple);
    assert_int_equal(run_with("example", "s/t/simple.scn", SCN_BACKEND_PROXY), 0);
    char *j = junit();
    assert_non_null(j);
    assert_non_null(strstr(j, "tests=\"1\" failures=\"0\""));
}

static void test_exiting_driver_makes_the_case_crash(void **state)
{
    write_scenario("s/t/simple.scn", simple);
    assert_int_equal(run_with(BROKEN "exits", "s/t/simple.scn", SCN_BACKEND_PROXY), 1);
    char *j = junit();
    assert_non_null(j);
    assert_non_null(strstr(j, "CRASH: line 2: driver crashed: exited with status 3"));
    assert_false(process_running("broken.py exits"));
}

static void test_garbage_driver_makes_the_case_crash(void **state)
{
    write_scenario("s/t/simple.scn", simple);
    assert_int_equal(run_with(BROKEN "garbage", "s/t/simple.scn", SCN_BACKEND_PROXY), 1);
    char *j = junit();
    assert_non_null(j);
    assert_non_null(strstr(j, "CRASH"));
    assert_non_null(strstr(j, "not a JSON object"));
}

static void test_silent_driver_is_a_usage_error(void **state)
{
    /* The runner says hello once before any case: a driver that cannot is
     * named at once, not reported N times. */
    write_scenario("s/t/simple.scn", simple);
    assert_int_equal(run_with(BROKEN "silent", "s/t/simple.scn", SCN_BACKEND_PROXY), 2);
    assert_false(process_running("broken.py silent"));
}

static void test_stalling_driver_makes_the_case_hang(void **state)
{
    write_scenario("s/t/simple.scn", simple);
    assert_int_equal(run_with(BROKEN "stalls", "s/t/simple.scn", SCN_BACKEND_PROXY), 1);
    char *j = junit();
    assert_non_null(j);
    /* The acquire's own deadline (the pool's 1 s) plus 5 s of grace. */
    assert_non_null(strstr(j, "HANG: line 2: driver hung: no answer to &apos;acquire&apos;"));
    assert_non_null(strstr(j, "within 6.0 s"));
    assert_false(process_running("broken.py stalls"));
}

static void test_what_a_driver_lacks_is_na(void **state)
{
    /* The fake backend (fakepq inside the runner) and a fakepq-only fault. */
    write_scenario("s/t/fakeonly.scn", "pool max=1 acquire_timeout=1s\n"
                                       "fault connect refused\n"
                                       "acquire c1 expect connect\n");
    assert_int_equal(run_with("example", "s/t/fakeonly.scn", SCN_BACKEND_ALL), 0);
    char *j = junit();
    assert_non_null(j);
    assert_non_null(strstr(j, "skipped=\"2\""));
    assert_non_null(strstr(j, "the fake backend simulates libpq inside pgfault"));
    assert_non_null(strstr(j, "fault connect is injected inside fakepq"));
    /* A key the driver declares unsupported. */
    write_scenario("s/t/key.scn", "pool max=1 max_lifetime=1s\nacquire c1\nrelease c1\n");
    assert_int_equal(run_with("example", "s/t/key.scn", SCN_BACKEND_PROXY), 0);
    j = junit();
    assert_non_null(strstr(j, "<skipped message=\"pool max_lifetime: example cannot honour it"));
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example_conforms),
        cmocka_unit_test(test_pqpool_conforms),
        cmocka_unit_test(test_silent_driver_is_hung),
        cmocka_unit_test(test_garbage_driver_is_crashed),
        cmocka_unit_test(test_exiting_driver_is_crashed),
        cmocka_unit_test(test_serial_driver_is_named),
        cmocka_unit_test(test_wrong_clock_units_are_named),
        cmocka_unit_test(test_unknown_driver_is_a_usage_error),
        cmocka_unit_test(test_example_runs_a_scenario),
        cmocka_unit_test(test_exiting_driver_makes_the_case_crash),
        cmocka_unit_test(test_garbage_driver_makes_the_case_crash),
        cmocka_unit_test(test_silent_driver_is_a_usage_error),
        cmocka_unit_test(test_stalling_driver_makes_the_case_hang),
        cmocka_unit_test(test_what_a_driver_lacks_is_na),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("driver_check", tests, setup, teardown);
}
