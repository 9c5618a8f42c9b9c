/*
 * Unit tests of the scenario parser: a valid scenario parses into the
 * steps it says, and every kind of mistake gets "file:line:col: message"
 * pointing at the offending word, with a hint where one helps.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "scenario.h"

static const char valid[] =
    "# A NAT silently drops idle connections overnight.\n"
    "# The pool must notice before handing one out.\n"
    "scenario   idle-drop/nat-silent-drop\n"
    "backends   fake proxy\n"
    "pool       max=4 min_idle=2 acquire_timeout=300ms init_sql=\"SET x = 1\"\n"
    "\n"
    "eventually pool.idle == 2 within 1s\n"
    "fault      drop idle silently          # proxy: RST; fake: EOF\n"
    "acquire    c1 within 300ms\n"
    "query      c1 \"SELECT 1\"\n"
    "release    c1\n"
    "expect     pool.ejected >= 2\n"
    "acquire    c2 timeout=50ms expect timeout not before 50ms within 150ms background\n"
    "wait       c2 within 1s\n"
    "fault      call PQexec 57P01 nth=3\n"
    "fault      connect auth count=all\n"
    "workers    w 4 for 200ms hold 5ms timeout=100ms\n"
    "expect     w.timeout == 0\n"
    "queue      q 3 hold 1ms timeout=2s\n"
    "wait       q within 1s\n"
    "expect     q.in_order == 1\n";

static struct scn *parse_ok(const char *path, const char *text)
{
    struct scn *s = NULL;
    char err[512] = "";
    int rc = scn_parse_string(path, text, &s, err, sizeof err);
    if (rc != 0)
        fail_msg("unexpected parse error: %s", err);
    assert_non_null(s);
    return s;
}

/* Parses text that must fail and checks the message starts with prefix
 * and contains needle. */
static void parse_bad(const char *text, const char *prefix, const char *needle)
{
    struct scn *s = NULL;
    char err[512] = "";
    int rc = scn_parse_string("scenarios/t/x.scn", text, &s, err, sizeof err);
    assert_int_equal(rc, -1);
    assert_null(s);
    if (strncmp(err, prefix, strlen(prefix)) != 0 || !strstr(err, needle))
        fail_msg("error '%s' lacks prefix '%s' or text '%s'", err, prefix, needle);
}

static void test_valid_scenario_parses(void **state)
{
    struct scn *s = parse_ok("scenarios/idle-drop/nat-silent-drop.scn", valid);
    assert_string_equal(s->name, "idle-drop/nat-silent-drop");
    assert_true(strstr(s->description, "NAT silently drops") != NULL);
    assert_int_equal(s->backends, SCN_BACKEND_ALL);
    assert_int_equal(s->npool, 4);
    assert_string_equal(s->pool[3].key, "init_sql");
    assert_string_equal(s->pool[3].value, "SET x = 1");
    assert_int_equal(s->nsteps, 15);
    assert_int_equal(s->steps[12].kind, SCN_STEP_QUEUE);
    assert_int_equal(s->steps[12].count, 3);
    assert_int_equal(s->steps[12].timeout_ms, 2000);
    assert_int_equal(s->steps[13].kind, SCN_STEP_WAIT);

    assert_int_equal(s->steps[0].kind, SCN_STEP_EVENTUALLY);
    assert_string_equal(s->steps[0].cond.metric, "pool.idle");
    assert_int_equal(s->steps[0].cond.op, SCN_OP_EQ);
    assert_int_equal(s->steps[0].cond.value, 2);
    assert_int_equal(s->steps[0].duration_ms, 1000);

    assert_int_equal(s->steps[1].kind, SCN_STEP_FAULT);
    assert_int_equal(s->steps[1].fault.kind, SCN_FAULT_DROP);
    assert_int_equal(s->steps[1].fault.target, SCN_TARGET_IDLE);
    assert_string_equal(s->steps[1].text, "fault      drop idle silently");
    assert_int_equal(s->steps[1].line, 8);

    assert_int_equal(s->steps[2].kind, SCN_STEP_ACQUIRE);
    assert_string_equal(s->steps[2].name, "c1");
    assert_int_equal(s->steps[2].within_ms, 300);
    assert_int_equal(s->steps[2].expect, SCN_OUT_OK);
    assert_int_equal(s->steps[2].timeout_ms, -1);

    assert_string_equal(s->steps[3].sql, "SELECT 1");

    const struct scn_step *bg = &s->steps[6];
    assert_int_equal(bg->timeout_ms, 50);
    assert_int_equal(bg->expect, SCN_OUT_TIMEOUT);
    assert_int_equal(bg->not_before_ms, 50);
    assert_int_equal(bg->within_ms, 150);
    assert_true(bg->background);

    assert_string_equal(s->steps[8].fault.function, "PQexec");
    assert_string_equal(s->steps[8].fault.word, "57P01");
    assert_int_equal(s->steps[8].fault.nth, 3);
    assert_int_equal(s->steps[8].fault.count, 1);
    assert_string_equal(s->steps[9].fault.word, "auth");
    assert_int_equal(s->steps[9].fault.count, -1);

    assert_int_equal(s->steps[10].count, 4);
    assert_int_equal(s->steps[10].duration_ms, 200);
    assert_int_equal(s->steps[10].hold_ms, 5);
    assert_int_equal(s->steps[10].timeout_ms, 100);
    scn_free(s);
}

static void test_unknown_fault_has_hint_and_position(void **state)
{
    parse_bad("acquire c1\nfault dorp idle\n",
              "scenarios/t/x.scn:2:7: ", "unknown fault 'dorp' (did you mean 'drop'?)");
}

static void test_unknown_statement_has_hint(void **state)
{
    parse_bad("aquire c1\n", "scenarios/t/x.scn:1:1: ", "did you mean 'acquire'?");
}

static void test_duration_needs_unit(void **state)
{
    parse_bad("acquire c1 within 300\n", "scenarios/t/x.scn:1:19: ", "needs a unit");
    parse_bad("hold 3 sec\n", "scenarios/t/x.scn:1:1: ", "usage: hold");
    parse_bad("hold 3h\n", "scenarios/t/x.scn:1:6: ", "unknown unit 'h'");
}

static void test_name_must_be_acquired_first(void **state)
{
    parse_bad("acquire conn1\nrelease con1\n", "scenarios/t/x.scn:2:9: ",
              "no connection named 'con1' was acquired before this line (did you mean 'conn1'?)");
}

static void test_backend_mismatch_names_both(void **state)
{
    parse_bad(
        "backends fake proxy\nacquire c1\nfault inject 57P01 idle\n",
        "scenarios/t/x.scn:3:7: ", "needs the proxy backend, but this scenario also runs on fake");
    parse_bad("expect proxy.accepted == 1\n", "scenarios/t/x.scn:1:8: ",
              "needs the proxy backend, but this scenario also runs on fake");
    struct scn *s = parse_ok("scenarios/t/x.scn", "backends proxy\nfault inject 57P01 idle\n");
    assert_int_equal(s->backends, SCN_BACKEND_PROXY);
    scn_free(s);
}

static void test_header_after_steps_is_an_error(void **state)
{
    parse_bad("acquire c1\npool max=2\n", "scenarios/t/x.scn:2:1: ", "belongs in the header");
}

static void test_scenario_name_must_match_path(void **state)
{
    parse_bad("scenario t/y\nacquire c1\n",
              "scenarios/t/x.scn:1:10: ", "does not match its file 't/x'");
}

static void test_strings_and_comments(void **state)
{
    struct scn *s =
        parse_ok("scenarios/t/x.scn",
                 "acquire c1\nquery c1 \"SELECT '#', \\\"q\\\"\" expect error 42601 # c\n");
    assert_string_equal(s->steps[1].sql, "SELECT '#', \"q\"");
    assert_int_equal(s->steps[1].expect, SCN_OUT_ERROR);
    assert_string_equal(s->steps[1].sqlstate, "42601");
    scn_free(s);
    parse_bad("acquire c1\nquery c1 \"SELECT 1\n",
              "scenarios/t/x.scn:2:10: ", "unterminated string");
}

static void test_background_must_be_waited(void **state)
{
    parse_bad("acquire c1 background\n", "scenarios/t/x.scn: ", "never waited for");
    parse_bad("acquire c1\nwait c1\n", "scenarios/t/x.scn:2:6: ", "not acquired in the background");
    parse_bad("queue q 2\n", "scenarios/t/x.scn: ", "queue 'q' is never waited for");
    parse_bad("queue q 2\nwait q\nrelease q\n",
              "scenarios/t/x.scn:3:9: ", "no connection named 'q'");
}

static void test_bad_values(void **state)
{
    parse_bad("acquire c1 expect tiemout\n",
              "scenarios/t/x.scn:1:19: ", "unknown outcome 'tiemout' (did you mean 'timeout'?");
    parse_bad("expect pool.idle =< 2\n", "scenarios/t/x.scn:1:18: ", "expected a comparison");
    parse_bad("expect pool.idle == two\n", "scenarios/t/x.scn:1:21: ", "expected a whole number");
    parse_bad("expect pol.idle == 2\n", "scenarios/t/x.scn:1:8: ", "did you mean 'pool'?");
    parse_bad("eventually pool.idle == 2\n", "scenarios/t/x.scn:1:1: ", "needs a deadline");
    parse_bad("fault connect hnag\n", "scenarios/t/x.scn:1:15: ", "did you mean 'hang'?");
    parse_bad("pool max\n", "scenarios/t/x.scn:1:6: ", "expected key=value");
    parse_bad("acquire c1 within 1s not before 2s\n", "scenarios/t/x.scn:1:1: ", "later than");
    parse_bad("backends fake real\n", "scenarios/t/x.scn:1:15: ", "unknown backend 'real'");
    parse_bad("", "scenarios/t/x.scn: ", "no steps");
}

static void test_missing_file(void **state)
{
    struct scn *s = NULL;
    char err[256];
    assert_int_equal(scn_parse_file("/nonexistent/x.scn", &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/x.scn: No such file"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_scenario_parses),
        cmocka_unit_test(test_unknown_fault_has_hint_and_position),
        cmocka_unit_test(test_unknown_statement_has_hint),
        cmocka_unit_test(test_duration_needs_unit),
        cmocka_unit_test(test_name_must_be_acquired_first),
        cmocka_unit_test(test_backend_mismatch_names_both),
        cmocka_unit_test(test_header_after_steps_is_an_error),
        cmocka_unit_test(test_scenario_name_must_match_path),
        cmocka_unit_test(test_strings_and_comments),
        cmocka_unit_test(test_background_must_be_waited),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_missing_file),
    };
    if (getenv("T"))
        cmocka_set_test_filter(getenv("T"));
    return cmocka_run_group_tests_name("scenario", tests, NULL, NULL);
}
