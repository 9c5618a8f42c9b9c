/*
 * proxy_cli: `pgfault proxy --listen ADDR:PORT --upstream HOST:PORT
 * --control PATH [--seed N]`. Starts the proxy library's event loop and
 * control socket, then waits for SIGINT or SIGTERM and shuts down cleanly
 * (the control socket file is removed).
 */
#include "proxy_cli.h"

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "proxy.h"

static void usage(FILE *out)
{
    fprintf(out,
            "usage: pgfault proxy --listen ADDR:PORT --upstream HOST:PORT --control PATH "
            "[--seed N]\n"
            "\n"
            "A TCP fault proxy in front of a PostgreSQL server. Connect clients to ADDR:PORT;\n"
            "send commands one per line to the Unix socket PATH, e.g.\n"
            "    echo 'reset idle' | socat - UNIX-CONNECT:PATH\n"
            "Answers are 'ok ...' or 'error: ...'; 'help' lists the commands (README has them\n"
            "all). Stops on SIGINT or SIGTERM.\n"
            "\n"
            "  --listen ADDR:PORT     where clients connect (PORT 0: a free port, printed)\n"
            "  --upstream HOST:PORT   the server\n"
            "  --control PATH         control socket (created mode 0600, refused if another\n"
            "                         proxy listens there; removed on exit)\n"
            "  --seed N               seed for latency jitter (default 0: a fixed seed)\n");
}

/* Splits "host:port" into host (in buf) and port; returns -1 if malformed. */
static int split_hostport(const char *s, char *host, size_t hostlen, int *port)
{
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s || (size_t)(colon - s) >= hostlen)
        return -1;
    char *end;
    errno = 0;
    long p = strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end || errno || p < 0 || p > 65535)
        return -1;
    snprintf(host, hostlen, "%.*s", (int)(colon - s), s);
    *port = (int)p;
    return 0;
}

int proxy_cli_main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"listen", required_argument, NULL, 'l'},  {"upstream", required_argument, NULL, 'u'},
        {"control", required_argument, NULL, 'c'}, {"seed", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    struct fproxy_config cfg;
    fproxy_config_init(&cfg);
    char lhost[256] = "", uhost[256] = "";
    int have_listen = 0, have_upstream = 0;
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'l':
            if (split_hostport(optarg, lhost, sizeof lhost, &cfg.listen_port) < 0) {
                fprintf(stderr, "pgfault proxy: --listen: expected ADDR:PORT, got '%s'\n", optarg);
                return 2;
            }
            cfg.listen_host = lhost;
            have_listen = 1;
            break;
        case 'u':
            if (split_hostport(optarg, uhost, sizeof uhost, &cfg.upstream_port) < 0 ||
                cfg.upstream_port == 0) {
                fprintf(stderr, "pgfault proxy: --upstream: expected HOST:PORT, got '%s'\n",
                        optarg);
                return 2;
            }
            cfg.upstream_host = uhost;
            have_upstream = 1;
            break;
        case 'c':
            cfg.control_path = optarg;
            break;
        case 's': {
            char *end;
            errno = 0;
            cfg.seed = strtoul(optarg, &end, 10);
            if (end == optarg || *end || errno) {
                fprintf(stderr, "pgfault proxy: --seed: expected a whole number, got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        default:
            fprintf(stderr, "pgfault proxy: unknown option or missing value: '%s'\n",
                    argv[optind - 1]);
            fprintf(stderr, "try 'pgfault proxy --help'\n");
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "pgfault proxy: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!have_listen || !have_upstream || !cfg.control_path) {
        fprintf(stderr, "pgfault proxy: --listen, --upstream and --control are required\n");
        usage(stderr);
        return 2;
    }

    /* Block the stop signals before the loop thread starts, so only
     * sigwait below ever sees them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Each proxied connection holds two descriptors: raise the soft limit
     * to the hard one so thousands of clients fit. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct fproxy *p = NULL;
    char err[512];
    if (fproxy_open(&cfg, &p, err, sizeof err) < 0) {
        fprintf(stderr, "pgfault proxy: %s\n", err);
        return 1;
    }
    printf("pgfault proxy: listening on %s:%d, upstream %s:%d, control %s\n", lhost, fproxy_port(p),
           uhost, cfg.upstream_port, cfg.control_path);
    fflush(stdout);
    int sig = 0;
    sigwait(&stop, &sig);
    fproxy_close(p);
    fprintf(stderr, "pgfault proxy: stopped by signal %d\n", sig);
    return 0;
}
