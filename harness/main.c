/*
 * pgfault: the command line. Subcommands:
 *
 *   pgfault run   [PATH...] [options]   run scenarios (the CI gate)
 *   pgfault list  [PATH...] [--filter GLOB]
 *   pgfault proxy --listen ADDR:PORT --upstream HOST:PORT --control PATH [--seed N]
 *
 * Option errors name the option and the offending value and exit 2.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "driver.h"
#include "driver_check.h"
#include "scorecard.h"
#include "proxy_cli.h"
#include "runner.h"
#include "scenario.h"

#ifndef PGFAULT_VERSION
#define PGFAULT_VERSION "0.1.0"
#endif

static void usage_main(FILE *out)
{
    fprintf(out, "usage: pgfault COMMAND [options]\n"
                 "\n"
                 "Resilience tests for PostgreSQL connection pools.\n"
                 "\n"
                 "commands:\n"
                 "  run [PATH...]    run scenarios (default: scenarios/); exit 0 only if all pass\n"
                 "  list [PATH...]   list scenarios with their backends and descriptions\n"
                 "  proxy            run the TCP fault proxy in front of a server\n"
                 "  driver-check DRIVER  check a pool driver against the driver protocol\n"
                 "  scorecard        every shipped pool through the catalogue, on one page\n"
                 "\n"
                 "'pgfault COMMAND --help' describes a command's options.\n");
}

static void usage_run(FILE *out)
{
    fprintf(out,
            "usage: pgfault run [PATH...] [options]\n"
            "\n"
            "Runs every scenario file (*.scn) under PATH (default: scenarios/) on every\n"
            "backend it supports, each in its own child process with a watchdog.\n"
            "\n"
            "options:\n"
            "  -b, --backend fake|proxy|all  backends to run (default: all)\n"
            "  -f, --filter GLOB     only scenarios whose family/name matches, e.g. 'auth/*'\n"
            "  -j, --jobs N          cases run in parallel (default: one per CPU, at most 8;\n"
            "                        1 with -v or --server)\n"
            "      --shard K/N       run only the Kth of N equal slices (CI sharding)\n"
            "      --seed S          seed for randomized faults (default: 1)\n"
            "      --junit FILE      JUnit XML path (default: REPORTS/junit.xml)\n"
            "      --reports DIR     reports directory (default: reports)\n"
            "      --tap             TAP on stdout (and REPORTS/results.tap)\n"
            "      --tap-version 13|14  TAP version to write (default: 13, which prove reads)\n"
            "      --timeout SECONDS watchdog per case (default: 60)\n"
            "      --server CONNINFO use an existing server for the proxy backend\n"
            "                        (default: $PGFAULT_SERVER, else a throwaway one)\n"
            "      --driver NAME     pool driver: pqpool (default), example, or exec:'CMD ARGS'\n"
            "                        (a driver process speaking docs/driver-protocol.md)\n"
            "      --driver-setting KEY=VALUE  a setting of the driver itself, e.g.\n"
            "                        error_listener=off (repeatable; the driver lists them)\n"
            "      --expect-failures FILE  known failures (scenario backend driver settings\n"
            "                        verdicts reason); red only on a new failure or an\n"
            "                        expected one that passes\n"
            "  -v, --verbose         print each case's step-by-step trace\n"
            "  -h, --help            this text\n");
}

static void usage_list(FILE *out)
{
    fprintf(out, "usage: pgfault list [PATH...] [-f GLOB]\n\n"
                 "Lists scenarios: name, backends, and the incident each one models.\n");
}

/* Parses a whole positive number for option opt, or exits 2. */
static long parse_positive(const char *cmd, const char *opt, const char *v, long max)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (end == v || *end || errno || n < 1 || n > max) {
        fprintf(stderr, "pgfault %s: %s: expected a whole number from 1 to %ld, got '%s'\n", cmd,
                opt, max, v);
        exit(2);
    }
    return n;
}

/* Each proxy case gets its own throwaway server, so cases can overlap; most
 * of a case's time is spent waiting on the server, not on the CPU. A -v run
 * keeps one job so its trace streams live, and a shared --server keeps one
 * so cases never see each other's backends. */
static int default_jobs(const struct runner_options *o)
{
    if (o->verbose || o->server_conninfo)
        return 1;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 8 ? 8 : (int)n;
}

static int cmd_run_or_list(int argc, char **argv, int list)
{
    const char *cmd = list ? "list" : "run";
    struct runner_options o = {0};
    static const char *ds[16];
    size_t nds = 0;
    o.backends = SCN_BACKEND_ALL;
    o.jobs = 0; /* chosen after the options: see default_jobs() */
    o.seed = 1;
    o.reports_dir = "reports";
    o.driver = "pqpool";
    o.case_timeout_ms = 60000;
    o.server_conninfo = getenv("PGFAULT_SERVER");
    if (o.server_conninfo && !*o.server_conninfo)
        o.server_conninfo = NULL;

    static const struct option longopts[] = {
        {"backend", required_argument, NULL, 'b'},
        {"filter", required_argument, NULL, 'f'},
        {"jobs", required_argument, NULL, 'j'},
        {"shard", required_argument, NULL, 1},
        {"seed", required_argument, NULL, 2},
        {"junit", required_argument, NULL, 3},
        {"reports", required_argument, NULL, 4},
        {"tap", no_argument, NULL, 5},
        {"timeout", required_argument, NULL, 6},
        {"server", required_argument, NULL, 7},
        {"driver", required_argument, NULL, 8},
        {"verbose", no_argument, NULL, 'v'},
        {"driver-setting", required_argument, NULL, 9},
        {"expect-failures", required_argument, NULL, 10},
        {"tap-version", required_argument, NULL, 11},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "b:f:j:vh", longopts, NULL)) != -1) {
        switch (ch) {
        case 'b':
            if (strcmp(optarg, "fake") == 0)
                o.backends = SCN_BACKEND_FAKE;
            else if (strcmp(optarg, "proxy") == 0)
                o.backends = SCN_BACKEND_PROXY;
            else if (strcmp(optarg, "all") == 0)
                o.backends = SCN_BACKEND_ALL;
            else {
                fprintf(stderr, "pgfault %s: --backend: expected fake, proxy or all, got '%s'\n",
                        cmd, optarg);
                return 2;
            }
            break;
        case 'f':
            o.filter = optarg;
            break;
        case 'j':
            o.jobs = (int)parse_positive(cmd, "--jobs", optarg, 64);
            break;
        case 1: {
            int k, n, used = 0;
            if (sscanf(optarg, "%d/%d%n", &k, &n, &used) != 2 || optarg[used] || n < 1 || k < 1 ||
                k > n) {
                fprintf(stderr, "pgfault %s: --shard: expected K/N with 1 <= K <= N, got '%s'\n",
                        cmd, optarg);
                return 2;
            }
            o.shard_k = k;
            o.shard_n = n;
            break;
        }
        case 2: {
            char *end;
            errno = 0;
            o.seed = strtoul(optarg, &end, 10);
            if (end == optarg || *end || errno) {
                fprintf(stderr, "pgfault %s: --seed: expected a whole number, got '%s'\n", cmd,
                        optarg);
                return 2;
            }
            break;
        }
        case 3:
            o.junit_path = optarg;
            break;
        case 4:
            o.reports_dir = optarg;
            break;
        case 5:
            o.tap = 1;
            break;
        case 6:
            o.case_timeout_ms = (int)parse_positive(cmd, "--timeout", optarg, 3600) * 1000;
            break;
        case 7:
            o.server_conninfo = optarg;
            break;
        case 8:
            const char *command;
            if (!driver_find(optarg, &command)) {
                fprintf(stderr, "pgfault %s: --driver: unknown driver '%s' (known:", cmd, optarg);
                for (const char *const *d = driver_names(); *d; d++)
                    fprintf(stderr, " %s", *d);
                fprintf(stderr, ")\n");
                return 2;
            }
            o.driver = optarg;
            break;
        case 11:
            if (strcmp(optarg, "13") != 0 && strcmp(optarg, "14") != 0) {
                fprintf(stderr, "pgfault %s: --tap-version: '%s' is not 13 or 14\n", cmd, optarg);
                return 2;
            }
            o.tap_version = atoi(optarg);
            break;
        case 10:
            o.expect_failures = optarg;
            break;
        case 9:
            /* Checked against the driver's own list once it says hello. */
            if (nds == sizeof ds / sizeof ds[0]) {
                fprintf(stderr, "pgfault %s: at most %zu --driver-setting options\n", cmd,
                        sizeof ds / sizeof ds[0]);
                return 2;
            }
            ds[nds++] = optarg;
            o.driver_settings = ds;
            o.ndriver_settings = nds;
            break;
        case 'v':
            o.verbose = 1;
            break;
        case 'h':
            list ? usage_list(stdout) : usage_run(stdout);
            return 0;
        default:
            if (optopt)
                fprintf(stderr, "pgfault %s: option -%c %s\n", cmd, optopt,
                        strchr("bfj", optopt) ? "needs a value" : "is unknown");
            else
                fprintf(stderr, "pgfault %s: unknown option '%s' or missing value\n", cmd,
                        argv[optind - 1]);
            fprintf(stderr, "try 'pgfault %s --help'\n", cmd);
            return 2;
        }
    }
    if (o.jobs == 0)
        o.jobs = default_jobs(&o);
    o.paths = (const char *const *)(argv + optind);
    o.npaths = (size_t)(argc - optind);
    return list ? runner_list(&o) : runner_run(&o);
}

static int cmd_scorecard(int argc, char **argv)
{
    struct scorecard_options o = {"reports", NULL, NULL, 0, 60000};
    static const struct option longopts[] = {
        {"reports", required_argument, NULL, 1},
        {"pqpool-results", required_argument, NULL, 2},
        {"filter", required_argument, NULL, 'f'},
        {"jobs", required_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 3},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "f:j:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 1:
            o.reports_dir = optarg;
            break;
        case 2:
            o.pqpool_results = optarg;
            break;
        case 'f':
            o.filter = optarg;
            break;
        case 'j':
            o.jobs = (int)parse_positive("scorecard", "--jobs", optarg, 64);
            break;
        case 3:
            o.case_timeout_ms = (int)parse_positive("scorecard", "--timeout", optarg, 3600) * 1000;
            break;
        case 'h':
            printf(
                "usage: pgfault scorecard [--reports DIR] [--pqpool-results FILE] [--filter GLOB]\n"
                "                         [--jobs N] [--timeout SECONDS]\n\n"
                "Runs the catalogue with every shipped foreign driver (and each driver setting\n"
                "that matters) on the proxy backend, each against its baseline\n"
                "(harness/drivers/NAME/expected-failures.txt), next to pqpool's results\n"
                "(--pqpool-results: a cases.tsv of make run; else pqpool runs here), and\n"
                "writes DIR/scorecard.md and DIR/scorecard.html. Exit 0 when every pool\n"
                "matches its baseline, 1 on a new failure or an unexpected pass, 2 on errors.\n");
            return 0;
        default:
            fprintf(stderr, "pgfault scorecard: unknown option or missing value (try --help)\n");
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "pgfault scorecard: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!o.jobs) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.jobs = n < 1 ? 1 : n > 8 ? 8 : (int)n;
    }
    return scorecard_run(&o);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage_main(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "run") == 0)
        return cmd_run_or_list(argc - 1, argv + 1, 0);
    if (strcmp(cmd, "list") == 0)
        return cmd_run_or_list(argc - 1, argv + 1, 1);
    if (strcmp(cmd, "proxy") == 0)
        return proxy_cli_main(argc - 1, argv + 1);
    if (strcmp(cmd, "scorecard") == 0)
        return cmd_scorecard(argc - 1, argv + 1);
    if (strcmp(cmd, "driver-check") == 0) {
        if (argc == 3 && (strcmp(argv[2], "-h") == 0 || strcmp(argv[2], "--help") == 0)) {
            printf("usage: pgfault driver-check DRIVER\n\n"
                   "Starts DRIVER (a shipped driver's name, or exec:'COMMAND ARGS') and a\n"
                   "throwaway PostgreSQL server, and checks every operation of the driver\n"
                   "protocol (docs/driver-protocol.md), one line per check. Exit 0 if all\n"
                   "pass, 1 if any fails, 2 for a usage error.\n");
            return 0;
        }
        if (argc != 3) {
            fprintf(stderr, "usage: pgfault driver-check DRIVER (e.g. example, or "
                            "exec:'node my-driver.js')\n");
            return 2;
        }
        return driver_check_run(argv[2], stdout);
    }
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "help") == 0) {
        usage_main(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("pgfault %s\n", PGFAULT_VERSION);
        return 0;
    }
    fprintf(stderr,
            "pgfault: unknown command '%s' (run, list, proxy, driver-check, scorecard; see "
            "'pgfault --help')\n",
            cmd);
    return 2;
}
