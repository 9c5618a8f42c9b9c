/*
 * runner: finds scenarios, runs each scenario x backend in a forked child
 * under a watchdog, and hands the verdicts to the reporters.
 *
 * Isolation by fork is the point: a pool that crashes or deadlocks takes
 * down one child, and the parent reports which step it was on. The parent
 * never opens a pool or a server itself; children own theirs, and the
 * throwaway servers' reaper processes clean up after a child that was
 * killed.
 */
#include "runner.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "driver.h"
#include "pgserver.h"
#include "baseline.h"
#include "report.h"
#include "rundir.h"
#include "steps.h"
#include "testhook.h"

struct plan {
    struct scn **scns;
    size_t nscns;
    char **files;
    size_t nfiles;
};

struct job {
    pid_t pid;
    size_t index; /* into cases */
    double started_ms;
    double budget_ms; /* its watchdog */
    const struct scn *scn;
};

/* Present only in a --coverage build: children leave with _exit (they must
 * not run the parent's atexit handlers), which skips gcov's own flush. */
extern void __gcov_dump(void) __attribute__((weak));

/* Present only in a sanitizer build with LeakSanitizer. */
extern int __lsan_do_recoverable_leak_check(void) __attribute__((weak));

/* LeakSanitizer over the case process, which leaves with _exit and so is
 * never checked at exit. Its report is appended to the trace; the first
 * SUMMARY line goes to summary. Returns 1 if it found leaks. */
static int case_leak_check(const char *trace_path, const char *scratch, char *summary, size_t len)
{
    if (!__lsan_do_recoverable_leak_check)
        return 0;
    testhook_leak();
    fflush(stderr);
    int saved = dup(2);
    int fd = open(scratch, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (saved < 0 || fd < 0) {
        if (saved >= 0)
            close(saved);
        if (fd >= 0)
            close(fd);
        return 0;
    }
    dup2(fd, 2);
    int leaked = __lsan_do_recoverable_leak_check();
    dup2(saved, 2);
    close(saved);
    close(fd);
    if (leaked) {
        FILE *in = fopen(scratch, "r"), *out = fopen(trace_path, "a");
        char line[1024];
        snprintf(summary, len, "LeakSanitizer found leaks in the case process");
        if (out)
            fprintf(out, "\n== LeakSanitizer, over the case process ==\n");
        while (in && fgets(line, sizeof line, in)) {
            if (out)
                fputs(line, out);
            if (strncmp(line, "SUMMARY:", 8) == 0) {
                line[strcspn(line, "\n")] = '\0';
                snprintf(summary, len, "LeakSanitizer: %.300s", line + 9);
            }
        }
        if (in)
            fclose(in);
        if (out)
            fclose(out);
    }
    unlink(scratch);
    return leaked != 0;
}

static void child_exit(int code)
{
    if (__gcov_dump)
        __gcov_dump();
    _exit(code);
}

/* The children in flight, for the signal handler; the signal that stops
 * the run. */
static volatile sig_atomic_t stop_requested;
static pid_t live_pids[64];

static int add_file(struct plan *p, const char *path)
{
    char **f = realloc(p->files, (p->nfiles + 1) * sizeof *f);
    if (!f)
        return -1;
    p->files = f;
    p->files[p->nfiles] = strdup(path);
    if (!p->files[p->nfiles])
        return -1;
    p->nfiles++;
    return 0;
}

/* Adds every *.scn below dir, depth first. */
static int walk(struct plan *p, const char *dir)
{
    struct dirent **ents = NULL;
    int n = scandir(dir, &ents, NULL, alphasort);
    if (n < 0) {
        fprintf(stderr, "pgfault: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = ents[i]->d_name;
        char path[1024];
        struct stat st;
        if (nm[0] == '.' || rc < 0)
            goto next;
        snprintf(path, sizeof path, "%s/%s", dir, nm);
        if (stat(path, &st) < 0)
            goto next;
        if (S_ISDIR(st.st_mode))
            rc = walk(p, path);
        else if (strlen(nm) > 4 && strcmp(nm + strlen(nm) - 4, ".scn") == 0)
            rc = add_file(p, path);
    next:
        free(ents[i]);
    }
    free(ents);
    return rc;
}

static void plan_free(struct plan *p)
{
    for (size_t i = 0; i < p->nscns; i++)
        scn_free(p->scns[i]);
    for (size_t i = 0; i < p->nfiles; i++)
        free(p->files[i]);
    free(p->scns);
    free(p->files);
}

/* Finds and parses every scenario; on any error prints all of them and
 * returns -1, because a gate must not pass with a scenario it could not
 * read. */
static int load(const struct runner_options *o, struct plan *p)
{
    static const char *const default_path[] = {"scenarios"};
    const char *const *paths = o->npaths ? o->paths : default_path;
    size_t npaths = o->npaths ? o->npaths : 1;
    for (size_t i = 0; i < npaths; i++) {
        struct stat st;
        if (stat(paths[i], &st) < 0) {
            fprintf(stderr, "pgfault: %s: %s\n", paths[i], strerror(errno));
            return -1;
        }
        if (S_ISDIR(st.st_mode) ? walk(p, paths[i]) < 0 : add_file(p, paths[i]) < 0)
            return -1;
    }
    if (p->nfiles == 0) {
        fprintf(stderr, "pgfault: no scenario files (*.scn) found\n");
        return -1;
    }
    p->scns = calloc(p->nfiles, sizeof *p->scns);
    if (!p->scns)
        return -1;
    int bad = 0;
    for (size_t i = 0; i < p->nfiles; i++) {
        char err[1024];
        struct scn *s = NULL;
        if (scn_parse_file(p->files[i], &s, err, sizeof err) < 0) {
            fprintf(stderr, "%s\n", err);
            bad++;
            continue;
        }
        p->scns[p->nscns++] = s;
    }
    return bad ? -1 : 0;
}

int runner_list(const struct runner_options *o)
{
    struct plan p = {0};
    int rc = load(o, &p) < 0 ? 2 : 0;
    for (size_t i = 0; rc == 0 && i < p.nscns; i++) {
        const struct scn *s = p.scns[i];
        if (o->filter && fnmatch(o->filter, s->name, 0) != 0)
            continue;
        char be[32] = "";
        if (s->backends & SCN_BACKEND_FAKE)
            strcat(be, "fake");
        if (s->backends & SCN_BACKEND_PROXY)
            strcat(be, be[0] ? ",proxy" : "proxy");
        printf("%-40s %-11s %.100s\n", s->name, be, s->description);
    }
    plan_free(&p);
    return rc;
}

/* ---- Children ---------------------------------------------------------------- */

/* A case's watchdog, from its own bounds: the longest each step may take
 * (its `within`, its timeout, its duration, the query deadline), plus
 * setting up a server and the driver, plus the wind-down checks -- capped
 * by --timeout. A pool that hangs by design is then reported in about the
 * time the scenario allows it, not after a flat minute. */
static double case_budget_ms(const struct scn *s, const struct runner_options *o)
{
    double pool_acquire = 30000; /* the longest a pool's default may be */
    for (size_t i = 0; i < s->npool; i++)
        if (strcmp(s->pool[i].key, "acquire_timeout") == 0 && s->pool[i].number >= 0)
            pool_acquire = (double)s->pool[i].number;
    double b = 15000 /* server and driver start */ + 15000 /* close, drain, leak checks */;
    for (size_t i = 0; i < s->nsteps; i++) {
        const struct scn_step *st = &s->steps[i];
        double acq = st->timeout_ms >= 0 ? st->timeout_ms : pool_acquire;
        switch (st->kind) {
        case SCN_STEP_ACQUIRE:
            b += st->within_ms >= 0 && st->within_ms < acq ? st->within_ms : acq;
            break;
        case SCN_STEP_QUERY:
            b += st->within_ms >= 0 ? st->within_ms : 10000;
            break;
        case SCN_STEP_HOLD:
        case SCN_STEP_EVENTUALLY:
            b += st->duration_ms;
            break;
        case SCN_STEP_WORKERS:
            b += st->duration_ms + st->hold_ms + acq;
            break;
        case SCN_STEP_QUEUE:
            b += 2000.0 * st->count + acq + (double)st->hold_ms * st->count;
            break;
        case SCN_STEP_WAIT:
            b += st->within_ms >= 0 ? st->within_ms : acq;
            break;
        case SCN_STEP_FAULT:
            b += 10000; /* a server restart, and the close reaching the pool */
            break;
        default:
            b += 1000;
            break;
        }
    }
    b += 5000; /* margin for a loaded machine */
    return b < o->case_timeout_ms ? b : o->case_timeout_ms;
}

static void on_signal(int sig)
{
    if (!stop_requested)
        stop_requested = sig;
    for (size_t i = 0; i < sizeof live_pids / sizeof live_pids[0]; i++)
        if (live_pids[i] > 0) {
            /* The case's whole process group: its driver process too. */
            kill(-live_pids[i], SIGKILL);
            kill(live_pids[i], SIGKILL);
        }
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (cap - len < 1024) {
            char *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                buf = NULL;
            }
            buf = nb;
        }
    }
    fclose(f);
    if (buf)
        buf[len] = '\0';
    return buf;
}

/* A FILE that writes to the trace file and to stdout, for -v with one job:
 * the developer watches the steps as they happen. */
struct tee {
    FILE *a, *b;
};

static ssize_t tee_write(void *cookie, const char *buf, size_t size)
{
    struct tee *t = cookie;
    fwrite(buf, 1, size, t->a);
    fwrite(buf, 1, size, t->b);
    fflush(t->b);
    return (ssize_t)size;
}

static int tee_close(void *cookie)
{
    struct tee *t = cookie;
    return fclose(t->a);
}

/* The run's driver, as its probe found it: owned by runner_run, read by
 * every case child. */
struct run_driver {
    const struct driver_ops *ops;
    const char *command; /* exec drivers, else NULL */
    /* Its settings, resolved once (defaults filled in), "key=value". */
    char ds[DRIVER_MAX_DSETTINGS][80];
    const char *dsp[DRIVER_MAX_DSETTINGS];
    size_t nds;
    /* Who it said it is, and its settings as one word ("k=v,k=v" or "-"):
     * how a baseline and the results name this run's cases. */
    char name[64], settings_word[DRIVER_MAX_DSETTINGS * 81], pool[200];
};

/* Starts the driver once before any case: a driver that cannot say hello,
 * or a --driver-setting it does not have, is a usage error now rather than
 * a failure in every case. */
static int probe_driver(const struct runner_options *o, struct run_driver *rd)
{
    const struct driver_ops *drv = rd->ops;
    struct driver *d = NULL;
    char err[800];
    struct driver_start_args sa = {rd->command, NULL, NULL, NULL};
    if (drv->start(&sa, &d, err, sizeof err) < 0) {
        fprintf(stderr, "pgfault: driver %s: %s\n", o->driver ? o->driver : "pqpool", err);
        return -1;
    }
    const struct driver_info *in = drv->info(d);
    snprintf(rd->name, sizeof rd->name, "%s", in->driver);
    snprintf(rd->pool, sizeof rd->pool, "%s %s", in->pool, in->version);
    int n = driver_resolve_settings(in, o->driver_settings, o->ndriver_settings, rd->ds, err,
                                    sizeof err);
    drv->destroy(d);
    if (n < 0) {
        fprintf(stderr, "pgfault: --driver-setting: %s\n", err);
        return -1;
    }
    snprintf(rd->settings_word, sizeof rd->settings_word, "%s", n ? "" : "-");
    for (int i = 0; i < n; i++) {
        rd->dsp[i] = rd->ds[i];
        size_t l = strlen(rd->settings_word);
        snprintf(rd->settings_word + l, sizeof rd->settings_word - l, "%s%s", i ? "," : "",
                 rd->ds[i]);
    }
    rd->nds = (size_t)n;
    return 0;
}

static void child_main(const struct runner_options *o, const struct run_driver *rd,
                       const struct scn *s, enum scn_backend be, const char *trace_path,
                       const char *timeline_path, const char *result_path, int live,
                       pid_t runner_pid)
{
    /* Its own process group, so the runner kills a driver process (and
     * whatever that starts) together with the case. Throwaway servers
     * leave the group (setsid) and are stopped through pgserver. */
    setpgid(0, 0);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    /* A runner killed outright (SIGKILL) cannot kill its cases: each dies
     * with it instead, and its servers' reapers and the driver's own
     * parent-death signal take the rest. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != runner_pid)
        child_exit(3);
    /* A pool must survive writes to dead sockets on its own (libpq uses
     * MSG_NOSIGNAL); the runner does not mask SIGPIPE for it. */
    FILE *tf = fopen(trace_path, "we");
    if (!tf)
        child_exit(3);
    FILE *trace = tf;
    struct tee t = {tf, stdout};
    if (live) {
        cookie_io_functions_t io = {NULL, tee_write, NULL, tee_close};
        FILE *tee = fopencookie(&t, "w", io);
        if (tee)
            trace = tee;
    }
    setvbuf(trace, NULL, _IOLBF, 0);
    FILE *tl = fopen(timeline_path, "we");
    struct steps_options so = {
        .scn = s,
        .backend = be,
        .driver = rd->ops,
        .driver_name = o->driver ? o->driver : "pqpool",
        .driver_command = rd->command,
        .driver_settings = rd->dsp,
        .ndriver_settings = rd->nds,
        .server_conninfo = o->server_conninfo,
        .seed = o->seed,
        .trace = trace,
        .timeline = tl,
    };
    struct steps_result r;
    int rc = steps_run(&so, &r);
    fclose(trace);
    if (tl)
        fclose(tl);
    /* In a sanitizer build, memory the pool or the harness leaked in this
     * case fails it. */
    char scratch[300], leaks[400];
    snprintf(scratch, sizeof scratch, "%s.lsan", result_path);
    if (case_leak_check(trace_path, scratch, leaks, sizeof leaks)) {
        if (rc == 0 && (r.verdict == STEPS_PASS || r.verdict == STEPS_NA)) {
            r.verdict = STEPS_FAIL;
            r.line = 0;
            snprintf(r.message, sizeof r.message, "%s (the report is in the trace)", leaks);
        } else {
            size_t ml = strlen(r.message);
            snprintf(r.message + ml, sizeof r.message - ml, "; and %s", leaks);
        }
    }
    FILE *rf = fopen(result_path, "we");
    if (!rf)
        child_exit(3);
    fprintf(rf, "%s\n%d\n%s\n", rc < 0 ? "ERROR" : steps_verdict_name(r.verdict), r.line,
            r.message);
    fclose(rf);
    child_exit(0);
}

/* The last step the trace shows ("line N ..."), for hang reports. */
static void last_step(const char *trace, char *out, size_t len)
{
    out[0] = '\0';
    if (!trace)
        return;
    const char *p = trace, *best = NULL;
    while ((p = strstr(p, "  line ")) != NULL) {
        best = p + 2;
        p += 7;
    }
    if (best) {
        const char *e = strchr(best, '\n');
        snprintf(out, len, "%.*s", (int)(e ? e - best : (long)strlen(best)), best);
    }
}

static void collect(double budget_ms, struct runner_case *c, int wstatus, int hung,
                    const char *trace_path, const char *timeline_path, const char *result_path)
{
    c->trace = read_file(trace_path);
    c->timeline = read_file(timeline_path);
    char *res = hung ? NULL : read_file(result_path);
    if (res) {
        char *l1 = strtok(res, "\n"), *l2 = strtok(NULL, "\n"), *l3 = strtok(NULL, "");
        c->status = RUNNER_ERROR;
        for (int k = RUNNER_PASS; k <= RUNNER_NA; k++)
            if (l1 && k != RUNNER_ERROR &&
                strcmp(l1, runner_status_name((enum runner_status)k)) == 0)
                c->status = (enum runner_status)k;
        c->line = l2 ? atoi(l2) : 0;
        snprintf(c->message, sizeof c->message, "%s", l3 ? l3 : "");
        size_t ml = strlen(c->message);
        while (ml && c->message[ml - 1] == '\n')
            c->message[--ml] = '\0';
        free(res);
        return;
    }
    char step[300];
    last_step(c->trace, step, sizeof step);
    if (hung) {
        c->status = RUNNER_HANG;
        snprintf(c->message, sizeof c->message, "no verdict after %.1fs (watchdog); last step: %s",
                 budget_ms / 1000.0, step[0] ? step : "(setup)");
    } else if (WIFSIGNALED(wstatus)) {
        c->status = RUNNER_CRASH;
        snprintf(c->message, sizeof c->message, "killed by signal %d (%s); last step: %s",
                 WTERMSIG(wstatus), strsignal(WTERMSIG(wstatus)), step[0] ? step : "(setup)");
    } else {
        c->status = RUNNER_ERROR;
        snprintf(c->message, sizeof c->message, "exited with status %d without a verdict",
                 WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1);
    }
}

static void print_live(const struct runner_options *o, const struct runner_case *c)
{
    if (o->tap)
        return;
    printf("%-5s %-44s %-5s %7.2fs%s\n", runner_status_name(c->status), c->name,
           scn_backend_name(c->backend), c->duration_ms / 1000.0,
           c->expected     ? "  (expected)"
           : c->unexpected ? "  (UNEXPECTED)"
                           : "");
    if (c->status != RUNNER_PASS || c->unexpected) {
        if (c->line > 0)
            printf("      %s:%d: %s\n", c->path, c->line, c->message);
        else
            printf("      %s: %s\n", c->path, c->message);
    }
    if (c->expected)
        printf("      expected: %s\n", c->expect_reason);
    if ((o->verbose && o->jobs > 1) || (runner_case_gate_failed(c) && !o->verbose)) {
        /* Failures always come with their trace (the pool's events are in
         * it); with -v and one job it was already shown live. */
        if (c->trace)
            printf("%s", c->trace);
        printf("\n");
    }
    fflush(stdout);
}

static int mkdir_p(const char *path)
{
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(buf, 0755) < 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    return mkdir(buf, 0755) < 0 && errno != EEXIST ? -1 : 0;
}

static void save_trace(const struct runner_options *o, struct runner_case *c)
{
    char dir[700], name[160];
    snprintf(dir, sizeof dir, "%s/traces", o->reports_dir);
    snprintf(name, sizeof name, "%s", c->name);
    for (char *p = name; *p; p++)
        if (*p == '/')
            *p = '-';
    snprintf(c->trace_file, sizeof c->trace_file, "traces/%s.%s.txt", name,
             scn_backend_name(c->backend));
    char path[1400];
    snprintf(path, sizeof path, "%s/%s", o->reports_dir, c->trace_file);
    if (mkdir_p(dir) < 0)
        return;
    FILE *f = fopen(path, "w");
    if (!f)
        return;
    fprintf(f, "%s [%s]: %s\n", c->name, scn_backend_name(c->backend),
            runner_status_name(c->status));
    if (c->status != RUNNER_PASS)
        fprintf(f, "%s:%d: %s\n", c->path, c->line, c->message);
    fprintf(f, "\n%s", c->trace ? c->trace : "");
    fclose(f);
}

static double now_ms(void)
{
    return steps_now_ms();
}

/* Removes the files a previous run wrote into the reports dir (only those
 * names: the dir may be shared). */
static void remove_old_reports(const struct runner_options *o)
{
    static const char *const names[] = {"junit.xml", "summary.md", "index.html", "cases.tsv",
                                        "results.tap"};
    char path[1200];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", o->reports_dir, names[i]);
        unlink(path);
    }
    if (o->junit_path)
        unlink(o->junit_path);
    snprintf(path, sizeof path, "%s/traces", o->reports_dir);
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        size_t l = strlen(e->d_name);
        if (l > 4 && strcmp(e->d_name + l - 4, ".txt") == 0) {
            char f[1500];
            snprintf(f, sizeof f, "%s/%s", path, e->d_name);
            unlink(f);
        }
    }
    if (d)
        closedir(d);
}

int runner_run(const struct runner_options *o)
{
    struct plan p = {0};
    struct runner_case *cases = NULL;
    struct job *jobs = NULL;
    size_t ncases = 0, *order = NULL;
    int exit_code = 2;
    struct rundir run_dir = {"", -1};
    const char *tmpdir = run_dir.path;
    struct baseline *bl = NULL;
    struct run_driver *rd = NULL;
    const char *dname = o->driver ? o->driver : "pqpool", *command = NULL;
    /* Signals are caught from the start: one that arrives while the
     * template is prepared or a case's server is copied must still find
     * everything cleaned up (a command pgserver runs is stopped through
     * the interrupt flag). */
    stop_requested = 0;
    memset((void *)live_pids, 0, sizeof live_pids);
    struct sigaction sa = {0}, old_int, old_term, old_hup;
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGHUP, &sa, &old_hup);
    pgserver_set_interrupt(&stop_requested);
    /* A report must describe the run that wrote it: the previous run's go
     * first, so a run that is interrupted, or cannot start, does not leave
     * them next to its own traces. */
    remove_old_reports(o);
    const struct driver_ops *drv = driver_find(dname, &command);
    if (!drv) {
        fprintf(stderr, "pgfault: unknown driver '%s'\n", dname);
        goto out;
    }
    if (o->expect_failures) {
        char e[800];
        if (baseline_load(o->expect_failures, &bl, e, sizeof e) < 0) {
            fprintf(stderr, "pgfault: --expect-failures: %s\n", e);
            goto out;
        }
    }
    rd = calloc(1, sizeof *rd);
    if (!rd)
        goto out;
    rd->ops = drv;
    rd->command = command;
    if (load(o, &p) < 0 || probe_driver(o, rd) < 0 || stop_requested)
        goto out;

    /* Expand scenarios into cases, then filter and shard. */
    size_t total = 0;
    cases = calloc(p.nscns * 2 + 1, sizeof *cases);
    if (!cases)
        goto out;
    for (size_t i = 0; i < p.nscns; i++) {
        const struct scn *s = p.scns[i];
        if (o->filter && fnmatch(o->filter, s->name, 0) != 0)
            continue;
        for (int b = 0; b < 2; b++) {
            enum scn_backend be = b == 0 ? SCN_BACKEND_FAKE : SCN_BACKEND_PROXY;
            if (!(s->backends & be) || !(o->backends & be))
                continue;
            size_t idx = total++;
            if (o->shard_n > 0 && (int)(idx % (size_t)o->shard_n) != o->shard_k - 1)
                continue;
            struct runner_case *c = &cases[ncases++];
            snprintf(c->name, sizeof c->name, "%s", s->name);
            snprintf(c->path, sizeof c->path, "%s", s->path);
            snprintf(c->description, sizeof c->description, "%s", s->description);
            c->backend = be;
            c->status = RUNNER_ERROR;
        }
    }
    if (ncases == 0) {
        fprintf(stderr, "pgfault: no scenario matches the selection (filter '%s', %zu found)\n",
                o->filter ? o->filter : "*", p.nscns);
        goto out;
    }
    /* The scenario of each case, looked up once. */
    const struct scn **case_scn = calloc(ncases, sizeof *case_scn);
    order = calloc(ncases, sizeof *order); /* cases in the order they finished */
    if (!case_scn || !order) {
        free(case_scn);
        goto out;
    }
    for (size_t i = 0; i < ncases; i++)
        for (size_t k = 0; k < p.nscns; k++)
            if (strcmp(p.scns[k]->path, cases[i].path) == 0)
                case_scn[i] = p.scns[k];

    /* Everything temporary (the template, the cases' servers and files)
     * lives in the run dir; making it also removes what killed runs
     * left. */
    char rerr[1024];
    if (rundir_create(&run_dir, rerr, sizeof rerr) < 0) {
        fprintf(stderr, "pgfault: %s\n", rerr);
        free(case_scn);
        goto out;
    }
    if (mkdir_p(o->reports_dir) < 0) {
        fprintf(stderr, "pgfault: cannot create %s: %s\n", o->reports_dir, strerror(errno));
        free(case_scn);
        goto out;
    }
    /* Proxy cases each start a throwaway server: build the template data
     * dir once here, so the forked children copy it instead of each
     * running initdb. */
    for (size_t i = 0; i < ncases && !stop_requested; i++) {
        if (cases[i].backend != SCN_BACKEND_PROXY || o->server_conninfo)
            continue;
        char err[1024];
        if (pgserver_prepare(err, sizeof err) < 0 && !stop_requested) {
            fprintf(stderr, "pgfault: preparing throwaway servers: %s\n", err);
            free(case_scn);
            goto out;
        }
        break;
    }

    int njobs = o->jobs < 1 ? 1 : o->jobs > 64 ? 64 : o->jobs;
    if (ncases > 0 && (size_t)njobs > ncases)
        njobs = (int)ncases; /* so the summary says how many really ran at once */
    jobs = calloc((size_t)njobs, sizeof *jobs);
    if (!jobs) {
        free(case_scn);
        goto out;
    }
    if (o->tap)
        printf("TAP version %d\n1..%zu\n", o->tap_version ? o->tap_version : 13, ncases);
    double t_start = now_ms();
    size_t next = 0, done = 0;
    int live = o->verbose && njobs == 1 && !o->tap;
    fflush(stdout);
    while (done < ncases && !stop_requested) {
        /* Start cases while there are free job slots. */
        for (int j = 0; j < njobs && next < ncases; j++) {
            if (jobs[j].pid)
                continue;
            char tp[256], lp[256], rp[256];
            snprintf(tp, sizeof tp, "%s/%zu.trace", tmpdir, next);
            snprintf(lp, sizeof lp, "%s/%zu.timeline", tmpdir, next);
            snprintf(rp, sizeof rp, "%s/%zu.result", tmpdir, next);
            if (live)
                printf("==> %s [%s]\n", cases[next].name, scn_backend_name(cases[next].backend));
            fflush(stdout);
            fflush(stderr);
            pid_t self = getpid(); /* before the fork: a child's getppid() may be 1 already */
            pid_t pid = fork();
            if (pid < 0) {
                fprintf(stderr, "pgfault: fork: %s\n", strerror(errno));
                stop_requested = SIGTERM;
                break;
            }
            if (pid == 0)
                child_main(o, rd, case_scn[next], cases[next].backend, tp, lp, rp, live, self);
            setpgid(pid, pid); /* also here: no window where a kill misses the group */
            jobs[j] = (struct job){pid, next, now_ms(), case_budget_ms(case_scn[next], o),
                                   case_scn[next]};
            live_pids[j] = pid;
            next++;
        }
        /* Reap finished children; kill the ones past their watchdog. */
        int any = 0;
        for (int j = 0; j < njobs; j++) {
            if (!jobs[j].pid)
                continue;
            int ws = 0, hung = 0;
            pid_t r = waitpid(jobs[j].pid, &ws, WNOHANG);
            if (r == 0 && now_ms() - jobs[j].started_ms > jobs[j].budget_ms) {
                kill(-jobs[j].pid, SIGKILL);
                kill(jobs[j].pid, SIGKILL);
                waitpid(jobs[j].pid, &ws, 0);
                hung = 1;
                r = jobs[j].pid;
            }
            if (r != jobs[j].pid)
                continue;
            any = 1;
            struct runner_case *c = &cases[jobs[j].index];
            c->duration_ms = now_ms() - jobs[j].started_ms;
            char tp[256], lp[256], rp[256];
            snprintf(tp, sizeof tp, "%s/%zu.trace", tmpdir, jobs[j].index);
            snprintf(lp, sizeof lp, "%s/%zu.timeline", tmpdir, jobs[j].index);
            snprintf(rp, sizeof rp, "%s/%zu.result", tmpdir, jobs[j].index);
            collect(jobs[j].budget_ms, c, ws, hung, tp, lp, rp);
            if (bl)
                (void)baseline_apply(bl, rd->name, rd->settings_word, c, 1);
            kill(-jobs[j].pid, SIGKILL); /* whatever the case left in its group */
            unlink(tp);
            unlink(lp);
            unlink(rp);
            save_trace(o, c);
            print_live(o, c);
            if (o->tap) {
                report_tap_case(stdout, c, done + 1);
                fflush(stdout);
            }
            jobs[j].pid = 0;
            live_pids[j] = 0;
            order[done++] = jobs[j].index;
        }
        if (!any) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    free(case_scn);
    double total_ms = now_ms() - t_start;

    if (stop_requested) {
        for (int j = 0; j < njobs; j++) {
            if (jobs[j].pid) {
                kill(-jobs[j].pid, SIGKILL);
                kill(jobs[j].pid, SIGKILL);
                waitpid(jobs[j].pid, NULL, 0);
            }
        }
        fprintf(stderr, "pgfault: interrupted by signal %d; %zu of %zu cases ran\n",
                (int)stop_requested, done, ncases);
        exit_code = 128 + (int)stop_requested;
        goto out;
    }

    size_t failed = 0, skipped = 0, expected = 0;
    for (size_t i = 0; i < ncases; i++) {
        skipped += cases[i].status == RUNNER_NA && !cases[i].unexpected;
        expected += cases[i].expected;
        failed += runner_case_gate_failed(&cases[i]);
    }
    char junit[1024], summary[1024], err[1200];
    if (o->junit_path)
        snprintf(junit, sizeof junit, "%s", o->junit_path);
    else
        snprintf(junit, sizeof junit, "%s/junit.xml", o->reports_dir);
    snprintf(summary, sizeof summary, "%s/summary.md", o->reports_dir);
    exit_code = failed ? 1 : 0;
    char html[1024];
    snprintf(html, sizeof html, "%s/index.html", o->reports_dir);
    char tsv[1024];
    snprintf(tsv, sizeof tsv, "%s/cases.tsv", o->reports_dir);
    if (report_junit(junit, cases, ncases, total_ms, err, sizeof err) < 0 ||
        report_cases_tsv(tsv, cases, ncases, rd->name, rd->settings_word, rd->pool, err,
                         sizeof err) < 0 ||
        report_summary_md(summary, cases, ncases, total_ms, err, sizeof err) < 0 ||
        report_html(html, cases, ncases, total_ms, err, sizeof err) < 0) {
        fprintf(stderr, "pgfault: writing reports: %s\n", err);
        exit_code = 2;
    }
    if (o->tap) {
        char tap[1024];
        snprintf(tap, sizeof tap, "%s/results.tap", o->reports_dir);
        FILE *tf = fopen(tap, "w");
        if (tf) {
            report_tap(tf, cases, ncases, order, o->tap_version ? o->tap_version : 13);
            fclose(tf);
        }
        printf("# %zu passed, %zu failed, %zu skipped in %.1fs\n",
               ncases - failed - skipped - expected, failed, skipped + expected, total_ms / 1000.0);
    } else {
        printf("\n");
        if (failed) {
            printf("Failed:\n");
            for (size_t i = 0; i < ncases; i++)
                if (runner_case_gate_failed(&cases[i]))
                    printf("  %-5s %s [%s]: %s\n", runner_status_name(cases[i].status),
                           cases[i].name, scn_backend_name(cases[i].backend), cases[i].message);
        }
        printf("Reports: %s, %s, %s, %s/traces/\n", junit, summary, html, o->reports_dir);
        if (skipped)
            printf("N/A (not run: the driver cannot express them): %zu case(s); see the reports\n",
                   skipped);
        if (expected)
            printf("Expected failures (%s): %zu, as the baseline says\n", o->expect_failures,
                   expected);
        /* Expected failures count as skipped: known, and not the gate's. */
        printf("run: %zu passed, %zu failed, %zu skipped\n", ncases - failed - skipped - expected,
               failed, skipped + expected);
        printf("pgfault: %s in %.1fs (%zu cases, %d job%s)\n", failed ? "FAILED" : "all passed",
               total_ms / 1000.0, ncases, njobs, njobs > 1 ? "s" : "");
    }
out:
    /* The template, the servers of killed cases and the case files go with
     * the run dir; its lock is dropped last. */
    pgserver_release_template();
    rundir_remove(&run_dir);
    pgserver_set_interrupt(NULL);
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    sigaction(SIGHUP, &old_hup, NULL);
    if (stop_requested && exit_code != 128 + (int)stop_requested) {
        fprintf(stderr, "pgfault: interrupted by signal %d\n", (int)stop_requested);
        exit_code = 128 + (int)stop_requested;
    }
    free(order);
    for (size_t i = 0; i < ncases; i++) {
        free(cases[i].trace);
        free(cases[i].timeline);
    }
    free(cases);
    free(jobs);
    plan_free(&p);
    baseline_free(bl);
    free(rd);
    return exit_code;
}
