/*
 * pgserver: throwaway PostgreSQL clusters for tests and scenarios.
 *
 * initdb costs a second or two, so it runs once per process into a
 * template data dir, and each cluster is a copy of it. Every cluster (and
 * the template) has a reaper: a small forked process that holds the read
 * end of a pipe whose write end only the owner has. When the owner goes
 * away -- pgserver_destroy, exit, a crash, SIGKILL -- the reaper sees EOF,
 * shuts the postmaster down immediately and removes the temp dir. The
 * reaper ignores SIGINT and SIGTERM and runs in its own session, so a ^C
 * to the harness's process group does not stop it before it has cleaned
 * up.
 *
 * Commands (initdb, pg_ctl, psql) run as children with a deadline; as root
 * they run as the `postgres` system user, since PostgreSQL refuses root.
 */
#include "pgserver.h"
#include "testhook.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CMD_TIMEOUT_MS 60000
#define OUT_MAX 65536
#define SUPERUSER "postgres"
/* Timestamp, [pid], SQLSTATE: see count_auth_failures(). */
#define LOG_LINE_PREFIX "%m [%p] %e "

struct reaper {
    pid_t pid;
    int wfd; /* write end: closing it (or dying) starts the cleanup */
};

#define DIR_MAX 1024 /* temp dir paths: short, so that derived paths always fit */

struct pgserver {
    char dir[DIR_MAX];
    char data[PATH_MAX];
    char log[PATH_MAX];
    char user[64], password[128], dbname[64];
    int port;
    int max_connections;
    int started; /* started by us and not stopped since */
    struct reaper reaper;
    char host[256]; /* attached: the server's host */
    char *attached; /* attached: the conninfo given (owned), else NULL */
    /* pgserver_auth_failures: rejections counted so far, and how far (and
     * in which file) the log has been read. */
    long long auth_failures;
    off_t log_off;
    dev_t log_dev;
    ino_t log_ino;
};

/* The per-process template: made once, shared by every cluster. */
static pthread_mutex_t template_mu = PTHREAD_MUTEX_INITIALIZER;
static char template_dir[DIR_MAX];
static char template_user[64], template_password[128], template_dbname[64];
static struct reaper template_reaper;
static char bindir[PATH_MAX];
/* Where temp dirs are made (pgserver_set_base_dir), else $TMPDIR or /tmp. */
static char base_dir[128];
/* pgserver_set_interrupt's flag. */
static volatile sig_atomic_t *interrupt_flag;

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t len, const char *fmt, ...)
{
    if (err && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- Running commands ------------------------------------------------------ */

/* Whether commands must drop to the postgres user, and its ids. */
static int drop_ids(uid_t *uid, gid_t *gid)
{
    if (geteuid() != 0)
        return 0;
    struct passwd *pw = getpwnam("postgres");
    if (!pw)
        return -1;
    *uid = pw->pw_uid;
    *gid = pw->pw_gid;
    return 1;
}

/*
 * Runs argv with stdin from in (may be NULL), collects stdout+stderr into
 * out (may be NULL), and waits at most timeout_ms. password (may be NULL)
 * reaches the command as PGPASSWORD, never on its command line, where any
 * local user could read it. phase (may be NULL) names the step for
 * testhook_pause. Returns the exit status (0 = success), or -1 if it could
 * not run, timed out or was interrupted (err says which).
 *
 * The command dies with its caller: it has a parent-death signal, set after
 * the switch to the postgres user (which clears it), so a caller killed
 * mid-initdb or mid-copy leaves nothing writing into a temp dir that its
 * reaper is removing.
 */
static int run(char *const argv[], const char *in, char *out, size_t outlen, int timeout_ms,
               const char *phase, const char *password, char *err, size_t errlen)
{
    int inp[2] = {-1, -1}, outp[2] = {-1, -1};
    uid_t uid = 0;
    gid_t gid = 0;
    int drop = drop_ids(&uid, &gid);
    if (drop < 0)
        return fail(err, errlen, "running as root, but there is no 'postgres' user to run %s as",
                    argv[0]);
    if (pipe2(inp, O_CLOEXEC) < 0 || pipe2(outp, O_CLOEXEC) < 0) {
        int e = errno;
        for (int i = 0; i < 2; i++) {
            if (inp[i] >= 0)
                close(inp[i]);
            if (outp[i] >= 0)
                close(outp[i]);
        }
        return fail(err, errlen, "pipe: %s", strerror(e));
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(inp[0]), close(inp[1]), close(outp[0]), close(outp[1]);
        return fail(err, errlen, "fork: %s", strerror(e));
    }
    if (pid == 0) {
        dup2(inp[0], 0);
        dup2(outp[1], 1);
        dup2(outp[1], 2);
        signal(SIGPIPE, SIG_DFL);
        if (drop > 0 && (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(uid) < 0))
            _exit(126);
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
            _exit(125); /* the caller is already gone */
        /* English messages, and no PG* settings of the caller leaking in. */
        setenv("LC_ALL", "C", 1);
        extern char **environ;
        for (char **e = environ; *e;) {
            if (strncmp(*e, "PG", 2) == 0) {
                char name[128];
                snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
                unsetenv(name);
            } else {
                e++;
            }
        }
        if (password)
            setenv("PGPASSWORD", password, 1);
        /* The raw system call, not execv(): a --coverage build wraps the
         * exec functions to write its counters first, which fails once
         * this child is the postgres user and would put gcov's complaint
         * into the captured output. */
        syscall(SYS_execve, argv[0], argv, environ);
        _exit(127);
    }
    close(inp[0]);
    close(outp[1]);
    if (phase)
        testhook_pause(phase, interrupt_flag);
    if (in) {
        size_t left = strlen(in);
        const char *p = in;
        while (left > 0) {
            ssize_t w = write(inp[1], p, left);
            if (w <= 0)
                break;
            p += w;
            left -= (size_t)w;
        }
    }
    close(inp[1]);
    size_t used = 0;
    char sink[4096];
    int64_t deadline = now_ms() + timeout_ms;
    int timed_out = 0, interrupted = 0;
    for (;;) {
        int64_t left = deadline - now_ms();
        if (interrupt_flag && *interrupt_flag) {
            interrupted = 1;
            break;
        }
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        /* A signal for the flag may reach another thread: look again at
         * least every 100 ms. */
        struct pollfd pfd = {outp[0], POLLIN, 0};
        int r = poll(&pfd, 1, left < 100 ? (int)left : 100);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            continue;
        char *dst = out && used + 1 < outlen ? out + used : sink;
        size_t room = out && used + 1 < outlen ? outlen - used - 1 : sizeof sink;
        ssize_t n = read(outp[0], dst, room);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (dst != sink)
            used += (size_t)n;
    }
    close(outp[0]);
    if (out && outlen)
        out[used] = '\0';
    int status = 0;
    if (timed_out || interrupted)
        kill(pid, SIGKILL);
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (interrupted)
        return fail(err, errlen, "%s: interrupted by a signal", argv[0]);
    if (timed_out)
        return fail(err, errlen, "%s did not finish within %ds", argv[0], timeout_ms / 1000);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
        return fail(err, errlen, "cannot run %s", argv[0]);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 126)
        return fail(err, errlen, "cannot switch to the postgres user to run %s", argv[0]);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 125)
        return fail(err, errlen, "cannot run %s: its caller is gone", argv[0]);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* The last line(s) of a command's output, for error messages. */
static const char *tail(const char *out, int lines)
{
    const char *end = out + strlen(out);
    while (end > out && (end[-1] == '\n' || end[-1] == ' '))
        end--;
    const char *p = end;
    while (p > out && lines > 0) {
        p--;
        if (*p == '\n')
            lines--;
    }
    return p == out ? out : p + 1;
}

static int find_bindir(char *err, size_t errlen)
{
    if (bindir[0])
        return 0;
    char out[DIR_MAX] = "";
    FILE *f = popen("pg_config --bindir 2>/dev/null", "r");
    if (f) {
        if (fgets(out, sizeof out, f))
            out[strcspn(out, "\n")] = '\0';
        pclose(f);
    }
    char probe[PATH_MAX + 16];
    snprintf(probe, sizeof probe, "%s/initdb", out);
    if (out[0] && access(probe, X_OK) == 0) {
        snprintf(bindir, sizeof bindir, "%s", out);
        return 0;
    }
    /* Debian keeps each major version under /usr/lib/postgresql/N/bin;
     * take the newest one that has initdb. */
    DIR *d = opendir("/usr/lib/postgresql");
    int best = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        int v = atoi(e->d_name);
        snprintf(probe, sizeof probe, "/usr/lib/postgresql/%s/bin/initdb", e->d_name);
        if (v > best && access(probe, X_OK) == 0) {
            best = v;
            snprintf(bindir, sizeof bindir, "/usr/lib/postgresql/%d/bin", v);
        }
    }
    if (d)
        closedir(d);
    if (!best)
        return fail(err, errlen,
                    "no PostgreSQL server binaries found (pg_config --bindir, "
                    "/usr/lib/postgresql/*/bin); run `make deps` to install postgresql-15");
    return 0;
}

static void bin(char *buf, size_t len, const char *name)
{
    snprintf(buf, len, "%s/%s", bindir, name);
}

/* ---- Directories ------------------------------------------------------------- */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    return flag == FTW_DP ? rmdir(path) : unlink(path);
}

static void rm_rf(const char *dir)
{
    if (dir[0])
        nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* rm_rf until dir is gone, for at most 10 s: a command killed a moment ago
 * (the parent-death signal of run()) may still create an entry behind one
 * pass. Returns 0 once gone. */
static int rm_rf_wait(const char *dir)
{
    struct stat st;
    int64_t end = now_ms() + 10000;
    for (;;) {
        rm_rf(dir);
        if (lstat(dir, &st) < 0 && errno == ENOENT)
            return 0;
        if (now_ms() > end)
            return -1;
        poll(NULL, 0, 20);
    }
}

static int make_dir(char *path, size_t len, const char *kind, char *err, size_t errlen)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(path, len, "%s/pgfault-%s-XXXXXX",
             base_dir[0]   ? base_dir
             : tmp && *tmp ? tmp
                           : "/tmp",
             kind);
    if (!mkdtemp(path))
        return fail(err, errlen, "mkdtemp %s: %s", path, strerror(errno));
    uid_t uid;
    gid_t gid;
    if (drop_ids(&uid, &gid) > 0 && chown(path, uid, gid) < 0) {
        int e = errno;
        rmdir(path);
        return fail(err, errlen, "chown %s to postgres: %s", path, strerror(e));
    }
    return 0;
}

/* The postmaster's pid from postmaster.pid, or 0. The pid is believed only
 * if that process runs in data (a postmaster's working dir is its data
 * dir): a stale file's pid may have been reused, and the postgres user can
 * write the file, so it must never make us signal another process. */
static pid_t postmaster_pid(const char *data)
{
    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/postmaster.pid", data);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    long pid = 0;
    if (fscanf(f, "%ld", &pid) != 1)
        pid = 0;
    fclose(f);
    if (pid <= 0 || kill((pid_t)pid, 0) != 0)
        return 0;
    char cwd_link[64], cwd[PATH_MAX], want[PATH_MAX];
    snprintf(cwd_link, sizeof cwd_link, "/proc/%ld/cwd", pid);
    ssize_t n = readlink(cwd_link, cwd, sizeof cwd - 1);
    if (n < 0 || !realpath(data, want))
        return 0;
    cwd[n] = '\0';
    return strcmp(cwd, want) == 0 ? (pid_t)pid : 0;
}

/* ---- Reapers ------------------------------------------------------------------- */

/* Stops a postmaster the hard way (what pg_ctl -m immediate does) and waits
 * for it to go. */
static void kill_postmaster(const char *data)
{
    pid_t pid = postmaster_pid(data);
    if (!pid)
        return;
    kill(pid, SIGQUIT);
    for (int i = 0; i < 1000 && kill(pid, 0) == 0; i++) {
        if (i == 500)
            kill(pid, SIGKILL);
        usleep(10000);
    }
}

static int start_reaper(struct reaper *r, const char *dir, char *err, size_t errlen)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return fail(err, errlen, "pipe: %s", strerror(errno));
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        return fail(err, errlen, "fork: %s", strerror(e));
    }
    if (pid == 0) {
        /* The reaper: outlive the owner, then clean up after it. */
        setsid();
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        signal(SIGPIPE, SIG_IGN);
        int keep = p[0];
        int maxfd = (int)sysconf(_SC_OPEN_MAX);
        for (int fd = 0; fd < (maxfd > 0 && maxfd < 65536 ? maxfd : 1024); fd++)
            if (fd != keep)
                close(fd);
        char c;
        ssize_t n;
        while ((n = read(keep, &c, 1)) < 0 && errno == EINTR)
            ;
        if (n == 1)
            _exit(0); /* the owner cleaned up itself */
        char data[PATH_MAX + 8];
        snprintf(data, sizeof data, "%s/data", dir);
        kill_postmaster(data);
        rm_rf_wait(dir);
        _exit(0);
    }
    close(p[0]);
    r->pid = pid;
    r->wfd = p[1];
    return 0;
}

/* The owner cleaned up: tell the reaper to just exit, and reap it. */
static void stop_reaper(struct reaper *r)
{
    if (r->wfd < 0 || r->pid <= 0)
        return;
    ssize_t w = write(r->wfd, "x", 1);
    (void)w;
    close(r->wfd);
    r->wfd = -1;
    while (waitpid(r->pid, NULL, 0) < 0 && errno == EINTR)
        ;
    r->pid = 0;
}

/* ---- Template ---------------------------------------------------------------------- */

static void quote_ident(char *buf, size_t len, const char *s)
{
    size_t o = 0;
    if (o + 1 < len)
        buf[o++] = '"';
    for (; *s && o + 3 < len; s++) {
        if (*s == '"')
            buf[o++] = '"';
        buf[o++] = *s;
    }
    if (o + 1 < len)
        buf[o++] = '"';
    buf[o] = '\0';
}

static void quote_literal(char *buf, size_t len, const char *s)
{
    size_t o = 0;
    if (o + 1 < len)
        buf[o++] = '\'';
    for (; *s && o + 3 < len; s++) {
        if (*s == '\'')
            buf[o++] = '\'';
        buf[o++] = *s;
    }
    if (o + 1 < len)
        buf[o++] = '\'';
    buf[o] = '\0';
}

/* Makes the template (initdb, settings, the role and its database in
 * single-user mode) unless this process has one. Caller holds template_mu. */
static int make_template_locked(const struct pgserver_options *o, char *err, size_t errlen)
{
    if (template_dir[0])
        return 0;
    char dir[DIR_MAX], data[DIR_MAX + 8], out[OUT_MAX], e[512];
    char initdb[PATH_MAX + 16], postgres[PATH_MAX + 16];
    if (find_bindir(err, errlen) < 0 || make_dir(dir, sizeof dir, "template", err, errlen) < 0)
        return -1;
    if (start_reaper(&template_reaper, dir, err, errlen) < 0) {
        rm_rf(dir);
        return -1;
    }
    snprintf(data, sizeof data, "%s/data", dir);
    bin(initdb, sizeof initdb, "initdb");
    bin(postgres, sizeof postgres, "postgres");
    char *const initdb_argv[] = {initdb,
                                 "-D",
                                 data,
                                 "-U",
                                 SUPERUSER,
                                 "-A",
                                 "trust",
                                 "--auth-host=scram-sha-256",
                                 "-E",
                                 "UTF8",
                                 "--locale=C",
                                 "--no-sync",
                                 "--no-instructions",
                                 NULL};
    testhook_pause("template", interrupt_flag);
    int rc = run(initdb_argv, NULL, out, sizeof out, CMD_TIMEOUT_MS, "initdb", NULL, e, sizeof e);
    if (rc != 0) {
        fail(err, errlen, "initdb: %s", rc < 0 ? e : tail(out, 3));
        goto fail;
    }
    /* Durability is irrelevant for a throwaway server; speed is not. */
    char conf[PATH_MAX + 32];
    snprintf(conf, sizeof conf, "%s/postgresql.conf", data);
    FILE *f = fopen(conf, "a");
    if (!f) {
        fail(err, errlen, "%s: %s", conf, strerror(errno));
        goto fail;
    }
    fprintf(f, "\n# pgfault throwaway server\nfsync = off\nsynchronous_commit = off\n"
               "full_page_writes = off\nlisten_addresses = '127.0.0.1'\n"
               "password_encryption = 'scram-sha-256'\nshared_buffers = 16MB\n"
               "max_wal_senders = 0\nwal_level = minimal\nlog_min_messages = warning\n"
               "logging_collector = off\nssl = off\n");
    /* The log is read back by pgserver_auth_failures: every line carries
     * its SQLSTATE (%e), and verbose puts it once more right after the
     * severity of a message's first line only, which tells that line from
     * its DETAIL and LOCATION lines. lc_messages C keeps the severity word
     * "FATAL" whatever the environment's locale. */
    fprintf(f, "log_line_prefix = '%s'\nlog_error_verbosity = verbose\nlc_messages = 'C'\n",
            LOG_LINE_PREFIX);
    fclose(f);
    char role[200], pw[300], db[200], sql[1024];
    quote_ident(role, sizeof role, o->user);
    quote_literal(pw, sizeof pw, o->password);
    quote_ident(db, sizeof db, o->dbname);
    snprintf(sql, sizeof sql, "CREATE ROLE %s LOGIN PASSWORD %s\nCREATE DATABASE %s OWNER %s\n",
             role, pw, db, role);
    char *const single_argv[] = {postgres, "--single",  "-D",       data,
                                 "-c",     "fsync=off", "postgres", NULL};
    rc = run(single_argv, sql, out, sizeof out, CMD_TIMEOUT_MS, "role", NULL, e, sizeof e);
    if (rc != 0 || strstr(out, "ERROR:")) {
        fail(err, errlen, "creating role %s: %s", o->user, rc < 0 ? e : tail(out, 3));
        goto fail;
    }
    snprintf(template_dir, sizeof template_dir, "%s", dir);
    snprintf(template_user, sizeof template_user, "%s", o->user);
    snprintf(template_password, sizeof template_password, "%s", o->password);
    snprintf(template_dbname, sizeof template_dbname, "%s", o->dbname);
    return 0;
fail:
    rm_rf_wait(dir);
    stop_reaper(&template_reaper);
    return -1;
}

/* ---- The log -------------------------------------------------------------------------- */

/* Whether one log line is the first line of a connection rejected at
 * authentication. With LOG_LINE_PREFIX and verbose errors such a line is
 *   2024-05-01 10:00:00.123 UTC [4242] 28P01 FATAL:  28P01: password ...
 * Its DETAIL and LOCATION lines carry the same prefix but no SQLSTATE
 * after their label, so each rejection is one line. */
static int is_auth_failure_line(const char *line)
{
    const char *p = strstr(line, " [");
    if (!p)
        return 0;
    p += 2;
    if (*p < '0' || *p > '9')
        return 0;
    while (*p >= '0' && *p <= '9')
        p++;
    if (p[0] != ']' || p[1] != ' ')
        return 0;
    p += 2;
    char state[6];
    if (strlen(p) < 6 || p[5] != ' ')
        return 0;
    memcpy(state, p, 5);
    state[5] = '\0';
    if (strcmp(state, "28P01") != 0 && strcmp(state, "28000") != 0)
        return 0;
    p += 6;
    char want[32];
    snprintf(want, sizeof want, "FATAL:  %s: ", state);
    return strncmp(p, want, strlen(want)) == 0;
}

/* Reads the log from where the last call stopped (from the start if the
 * file was replaced or truncated) and adds the rejections found. Only
 * complete lines are read: a line being written is read next time. */
static int count_auth_failures(struct pgserver *s, char *err, size_t errlen)
{
    int fd = open(s->log, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT && s->log_off == 0)
            return 0; /* never started: nothing logged yet */
        return fail(err, errlen, "%s: %s", s->log, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return fail(err, errlen, "%s: %s", s->log, strerror(e));
    }
    if (st.st_dev != s->log_dev || st.st_ino != s->log_ino || st.st_size < s->log_off) {
        s->log_dev = st.st_dev;
        s->log_ino = st.st_ino;
        s->log_off = 0;
    }
    /* A line's first bytes are enough to classify it. */
    char head[160];
    size_t hlen = 0;
    off_t pos = s->log_off, done = s->log_off;
    long long found = 0;
    char buf[65536];
    for (;;) {
        ssize_t n = pread(fd, buf, sizeof buf, pos);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            return fail(err, errlen, "%s: %s", s->log, strerror(e));
        }
        if (n == 0)
            break;
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n') {
                head[hlen] = '\0';
                found += is_auth_failure_line(head);
                hlen = 0;
                done = pos + i + 1;
            } else if (hlen + 1 < sizeof head) {
                head[hlen++] = buf[i];
            }
        }
        pos += n;
    }
    close(fd);
    s->auth_failures += found;
    s->log_off = done;
    return 0;
}

/* ---- Public API ---------------------------------------------------------------------- */

/* This process's role password: random, made once, inherited by forked
 * children (so a runner's cases share its template). A fixed one would let
 * any local user log in to a running throwaway server. */
static char process_password[33];
static pthread_once_t password_once = PTHREAD_ONCE_INIT;

static void make_password(void)
{
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz"
                                   "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    unsigned char raw[sizeof process_password - 1];
    size_t got = 0;
    while (got < sizeof raw) {
        ssize_t n = getrandom(raw + got, sizeof raw - got, 0);
        if (n < 0 && errno != EINTR)
            abort(); /* no kernel randomness: nothing sane to fall back on */
        if (n > 0)
            got += (size_t)n;
    }
    /* 62 letters: 248 of 256 byte values map evenly; the 8 above are rare
     * enough (and the password long enough) that the bias is immaterial. */
    for (size_t i = 0; i < sizeof raw; i++)
        process_password[i] = alphabet[raw[i] % (sizeof alphabet - 1)];
    process_password[sizeof raw] = '\0';
}

void pgserver_options_init(struct pgserver_options *o)
{
    memset(o, 0, sizeof *o);
    pthread_once(&password_once, make_password);
    o->user = "pgfault";
    o->password = process_password;
    o->dbname = "pgfault";
    o->max_connections = 100;
}

int pgserver_prepare(char *err, size_t errlen)
{
    struct pgserver_options o;
    pgserver_options_init(&o);
    pthread_mutex_lock(&template_mu);
    int rc = make_template_locked(&o, err, errlen);
    pthread_mutex_unlock(&template_mu);
    return rc;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &alen) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

int pgserver_create(const struct pgserver_options *o, struct pgserver **out, char *err,
                    size_t errlen)
{
    *out = NULL;
    struct pgserver *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errlen, "out of memory");
    s->reaper.wfd = -1;
    struct pgserver_options def;
    pgserver_options_init(&def);
    if (!o)
        o = &def;
    snprintf(s->user, sizeof s->user, "%s", o->user ? o->user : def.user);
    snprintf(s->password, sizeof s->password, "%s", o->password ? o->password : def.password);
    snprintf(s->dbname, sizeof s->dbname, "%s", o->dbname ? o->dbname : def.dbname);
    s->max_connections = o->max_connections > 0 ? o->max_connections : def.max_connections;
    s->port = o->port;
    struct pgserver_options eff = {s->user, s->password, s->dbname, s->max_connections, 0};

    pthread_mutex_lock(&template_mu);
    int rc = make_template_locked(&eff, err, errlen);
    pthread_mutex_unlock(&template_mu);
    if (rc < 0) {
        free(s);
        return -1;
    }
    if (make_dir(s->dir, sizeof s->dir, "server", err, errlen) < 0) {
        free(s);
        return -1;
    }
    if (start_reaper(&s->reaper, s->dir, err, errlen) < 0) {
        rm_rf(s->dir);
        free(s);
        return -1;
    }
    snprintf(s->data, sizeof s->data, "%s/data", s->dir);
    snprintf(s->log, sizeof s->log, "%s/server.log", s->dir);
    /* cp -a keeps the 0700 mode PostgreSQL wants; run() runs it as the
     * postgres user when we are root, so the copy is owned by postgres. */
    char src[PATH_MAX + 8];
    snprintf(src, sizeof src, "%s/data", template_dir);
    char *const cp_argv[] = {"/bin/cp", "-a", src, s->data, NULL};
    char out_text[1024], e[512];
    int rc2 =
        run(cp_argv, NULL, out_text, sizeof out_text, CMD_TIMEOUT_MS, "copy", NULL, e, sizeof e);
    if (rc2 != 0) {
        fail(err, errlen, "copying the template data dir to %s: %s", s->data,
             rc2 < 0 ? e : tail(out_text, 2));
        pgserver_destroy(s);
        return -1;
    }
    *out = s;
    return 0;
}

static int sql_as_superuser(struct pgserver *s, const char *db, const char *sql, char *out,
                            size_t outlen, char *err, size_t errlen)
{
    char psql[PATH_MAX + 16], port[16], text[OUT_MAX], e[512];
    bin(psql, sizeof psql, "psql");
    snprintf(port, sizeof port, "%d", s->port);
    char *const argv[] = {psql,       "-X",   "-q",        "-A", "-t", "-v",      "ON_ERROR_STOP=1",
                          "-h",       s->dir, "-p",        port, "-U", SUPERUSER, "-d",
                          (char *)db, "-c",   (char *)sql, NULL};
    char *const attached_argv[] = {
        psql, "-X",        "-q", "-A",        "-t", "-v", "ON_ERROR_STOP=1",
        "-d", s->attached, "-c", (char *)sql, NULL};
    int rc = run(s->attached ? attached_argv : argv, NULL, text, sizeof text, CMD_TIMEOUT_MS, NULL,
                 s->attached ? s->password : NULL, e, sizeof e);
    if (rc != 0)
        return fail(err, errlen, "psql: %s", rc < 0 ? e : tail(text, 3));
    size_t l = strlen(text);
    while (l && (text[l - 1] == '\n' || text[l - 1] == ' '))
        text[--l] = '\0';
    if (out && outlen)
        snprintf(out, outlen, "%s", text);
    return 0;
}

/* Brings a cluster's role, password and database in line with its
 * options when the template was made with other ones. */
static int fix_identity(struct pgserver *s, char *err, size_t errlen)
{
    if (strcmp(s->user, template_user) == 0 && strcmp(s->password, template_password) == 0 &&
        strcmp(s->dbname, template_dbname) == 0)
        return 0;
    char role[200], pw[300], db[200], sql[1200], have[64];
    quote_ident(role, sizeof role, s->user);
    quote_literal(pw, sizeof pw, s->password);
    quote_ident(db, sizeof db, s->dbname);
    char lit[200];
    quote_literal(lit, sizeof lit, s->user);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_roles WHERE rolname = %s", lit);
    if (sql_as_superuser(s, "postgres", sql, have, sizeof have, err, errlen) < 0)
        return -1;
    snprintf(sql, sizeof sql, "%s ROLE %s LOGIN PASSWORD %s", atoi(have) ? "ALTER" : "CREATE", role,
             pw);
    if (sql_as_superuser(s, "postgres", sql, NULL, 0, err, errlen) < 0)
        return -1;
    quote_literal(lit, sizeof lit, s->dbname);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_database WHERE datname = %s", lit);
    if (sql_as_superuser(s, "postgres", sql, have, sizeof have, err, errlen) < 0)
        return -1;
    if (!atoi(have)) {
        snprintf(sql, sizeof sql, "CREATE DATABASE %s OWNER %s", db, role);
        if (sql_as_superuser(s, "postgres", sql, NULL, 0, err, errlen) < 0)
            return -1;
    }
    return 0;
}

#define NOT_ATTACHED(s, what)                                                                      \
    do {                                                                                           \
        if ((s)->attached)                                                                         \
            return fail(err, errlen,                                                               \
                        "%s needs a throwaway server; this one was given with "                    \
                        "--server and is never changed",                                           \
                        what);                                                                     \
    } while (0)

int pgserver_start(struct pgserver *s, char *err, size_t errlen)
{
    NOT_ATTACHED(s, "starting the server");
    char pg_ctl[PATH_MAX + 16], opts[PATH_MAX + 256], out[OUT_MAX], e[512];
    bin(pg_ctl, sizeof pg_ctl, "pg_ctl");
    /* pg_ctl appends to the log, so restarts keep it; should a start ever
     * replace it, what the last run logged has been counted first. A
     * failure here shows again in pgserver_auth_failures. */
    if (count_auth_failures(s, e, sizeof e) < 0) {
        /* Reported by the next pgserver_auth_failures. */
    }
    /* The first start picks a free port (unless the caller chose one);
     * later starts keep it, so clients and proxies keep pointing at it. A
     * picked port can be taken between the probe and the postmaster's
     * bind; then another is tried. */
    int fixed_port = s->port > 0;
    for (int attempt = 0; attempt < (fixed_port ? 1 : 5); attempt++) {
        if (!fixed_port)
            s->port = free_port();
        if (s->port <= 0)
            return fail(err, errlen, "no free loopback port");
        snprintf(opts, sizeof opts,
                 "-p %d -k %s -c max_connections=%d -c superuser_reserved_connections=1", s->port,
                 s->dir, s->max_connections);
        char *const argv[] = {pg_ctl, "-D", s->data, "-l", s->log,  "-w",
                              "-t",   "60", "-o",    opts, "start", NULL};
        int rc = run(argv, NULL, out, sizeof out, CMD_TIMEOUT_MS + 5000, NULL, NULL, e, sizeof e);
        if (rc == 0) {
            s->started = 1;
            if (fix_identity(s, err, errlen) < 0)
                return -1;
            return 0;
        }
        /* The end of the log: this attempt's words (restarts append). */
        char logtext[4096] = "";
        FILE *f = fopen(s->log, "r");
        if (f) {
            if (fseek(f, -(long)(sizeof logtext - 1), SEEK_END) < 0)
                rewind(f);
            size_t n = fread(logtext, 1, sizeof logtext - 1, f);
            logtext[n] = '\0';
            fclose(f);
        }
        if (!fixed_port && strstr(logtext, "could not bind") && attempt < 4) {
            kill_postmaster(s->data);
            continue;
        }
        return fail(err, errlen, "pg_ctl start (port %d): %s; server.log: %s", s->port,
                    rc < 0 ? e : tail(out, 2), tail(logtext, 6));
    }
    return fail(err, errlen, "pg_ctl start: no port could be bound");
}

int pgserver_stop(struct pgserver *s, enum pgserver_stop_mode mode, char *err, size_t errlen)
{
    NOT_ATTACHED(s, "stopping the server");
    char pg_ctl[PATH_MAX + 16], out[OUT_MAX], e[512];
    bin(pg_ctl, sizeof pg_ctl, "pg_ctl");
    const char *m = mode == PGSERVER_STOP_SMART  ? "smart"
                    : mode == PGSERVER_STOP_FAST ? "fast"
                                                 : "immediate";
    char *const argv[] = {pg_ctl, "-D", s->data, "-m", (char *)m, "-w", "-t", "60", "stop", NULL};
    int rc = run(argv, NULL, out, sizeof out, CMD_TIMEOUT_MS + 5000, NULL, NULL, e, sizeof e);
    s->started = 0;
    if (rc != 0)
        return fail(err, errlen, "pg_ctl stop -m %s: %s", m, rc < 0 ? e : tail(out, 2));
    return 0;
}

int pgserver_restart(struct pgserver *s, enum pgserver_stop_mode mode, char *err, size_t errlen)
{
    if (pgserver_stop(s, mode, err, errlen) < 0)
        return -1;
    return pgserver_start(s, err, errlen);
}

int pgserver_running(const struct pgserver *s)
{
    return s->attached ? 1 : postmaster_pid(s->data) != 0;
}

int pgserver_port(const struct pgserver *s)
{
    return s->port;
}

const char *pgserver_host(const struct pgserver *s)
{
    return s->attached ? s->host : "127.0.0.1";
}

const char *pgserver_user(const struct pgserver *s)
{
    return s->user;
}

const char *pgserver_password(const struct pgserver *s)
{
    return s->password;
}

const char *pgserver_dbname(const struct pgserver *s)
{
    return s->dbname;
}

const char *pgserver_dir(const struct pgserver *s)
{
    return s->dir;
}

int pgserver_conninfo(const struct pgserver *s, char *buf, size_t len, const char *extra)
{
    int n =
        snprintf(buf, len, "host=%s port=%d user=%s password=%s dbname=%s%s%s", pgserver_host(s),
                 s->port, s->user, s->password, s->dbname, extra ? " " : "", extra ? extra : "");
    return n < 0 || (size_t)n >= len ? -1 : 0;
}

int pgserver_sql(struct pgserver *s, const char *sql, char *out, size_t outlen, char *err,
                 size_t errlen)
{
    return sql_as_superuser(s, s->dbname, sql, out, outlen, err, errlen);
}

/* The WHERE clause selecting the role's client backends. */
static void backends_where(const struct pgserver *s, enum pgserver_which which, const char *appname,
                           char *buf, size_t len)
{
    char user[200], app[320] = "";
    quote_literal(user, sizeof user, s->user);
    if (which == PGSERVER_BACKENDS_APPNAME && appname) {
        char lit[280];
        quote_literal(lit, sizeof lit, appname);
        snprintf(app, sizeof app, " AND application_name = %s", lit);
    }
    snprintf(buf, len,
             "usename = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid()%s%s",
             user, which == PGSERVER_BACKENDS_IDLE ? " AND state = 'idle'" : "", app);
    /* An attached server's psql session is the role itself: it must not
     * count (pid <> pg_backend_pid() already excludes it). */
}

int pgserver_terminate(struct pgserver *s, enum pgserver_which which, const char *appname,
                       char *err, size_t errlen)
{
    char where[800], sql[1024], out[64];
    backends_where(s, which, appname, where, sizeof where);
    snprintf(sql, sizeof sql,
             /* With a timeout, pg_terminate_backend waits until the backend
              * has exited (PostgreSQL 14+): its FATAL is on the wire when
              * this returns, so the fault has taken effect. */
             "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) "
             "FROM pg_stat_activity WHERE %s",
             where);
    if (sql_as_superuser(s, "postgres", sql, out, sizeof out, err, errlen) < 0)
        return -1;
    return atoi(out);
}

int pgserver_count_backends(struct pgserver *s, const char *appname, char *err, size_t errlen)
{
    char where[800], sql[1024], out[64];
    backends_where(s, appname ? PGSERVER_BACKENDS_APPNAME : PGSERVER_BACKENDS_ALL, appname, where,
                   sizeof where);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM pg_stat_activity WHERE %s", where);
    if (sql_as_superuser(s, "postgres", sql, out, sizeof out, err, errlen) < 0)
        return -1;
    return atoi(out);
}

int pgserver_auth_failures(struct pgserver *s, long long *out, char *err, size_t errlen)
{
    if (s->attached)
        return fail(err, errlen,
                    "authentication failures are counted from the server's log, which only a "
                    "throwaway server has; this one was given with --server");
    if (count_auth_failures(s, err, errlen) < 0)
        return -1;
    *out = s->auth_failures;
    return 0;
}

int pgserver_set_password(struct pgserver *s, const char *password, char *err, size_t errlen)
{
    NOT_ATTACHED(s, "changing the role's password");
    char role[200], pw[300], sql[600];
    quote_ident(role, sizeof role, s->user);
    quote_literal(pw, sizeof pw, password);
    snprintf(sql, sizeof sql, "ALTER ROLE %s PASSWORD %s", role, pw);
    if (sql_as_superuser(s, "postgres", sql, NULL, 0, err, errlen) < 0)
        return -1;
    snprintf(s->password, sizeof s->password, "%s", password);
    return 0;
}

int pgserver_set_max_connections(struct pgserver *s, int n, char *err, size_t errlen)
{
    NOT_ATTACHED(s, "changing max_connections");
    if (n < 2 || n > 10000)
        return fail(err, errlen,
                    "max_connections %d: must be 2..10000 (one slot is reserved for "
                    "the superuser)",
                    n);
    s->max_connections = n;
    return 0;
}

int pgserver_attach(const char *conninfo, struct pgserver **out, char *err, size_t errlen)
{
    *out = NULL;
    struct pgserver *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errlen, "out of memory");
    s->reaper.wfd = -1;
    /* s->attached is the conninfo psql gets on its command line: every
     * keyword but the password, which goes through the environment. */
    if (find_bindir(err, errlen) < 0 || !(s->attached = calloc(1, strlen(conninfo) + 1))) {
        free(s);
        return -1;
    }
    /* keyword=value pairs separated by blanks; values without quotes. */
    char copy[2048];
    snprintf(copy, sizeof copy, "%s", conninfo);
    char *save = NULL;
    for (char *kv = strtok_r(copy, " \t", &save); kv; kv = strtok_r(NULL, " \t", &save)) {
        char *eq = strchr(kv, '=');
        if (!eq) {
            fail(err, errlen, "--server: '%s' is not keyword=value", kv);
            goto fail;
        }
        *eq++ = '\0';
        if (strcmp(kv, "host") == 0)
            snprintf(s->host, sizeof s->host, "%s", eq);
        else if (strcmp(kv, "port") == 0)
            s->port = atoi(eq);
        else if (strcmp(kv, "user") == 0)
            snprintf(s->user, sizeof s->user, "%s", eq);
        else if (strcmp(kv, "password") == 0)
            snprintf(s->password, sizeof s->password, "%s", eq);
        else if (strcmp(kv, "dbname") == 0)
            snprintf(s->dbname, sizeof s->dbname, "%s", eq);
        if (strcmp(kv, "password") != 0)
            sprintf(s->attached + strlen(s->attached), "%s%s=%s", s->attached[0] ? " " : "", kv,
                    eq);
    }
    if (!s->host[0] || s->port <= 0 || !s->user[0] || !s->dbname[0]) {
        fail(err, errlen,
             "--server needs host, port, user and dbname (and password), e.g. "
             "'host=127.0.0.1 port=5432 user=app password=secret dbname=app'");
        goto fail;
    }
    char out_text[64];
    if (sql_as_superuser(s, s->dbname, "SELECT 1", out_text, sizeof out_text, err, errlen) < 0)
        goto fail;
    *out = s;
    return 0;
fail:
    free(s->attached);
    free(s);
    return -1;
}

void pgserver_destroy(struct pgserver *s)
{
    if (!s)
        return;
    if (s->attached) {
        free(s->attached);
        free(s);
        return;
    }
    if (s->data[0]) {
        if (postmaster_pid(s->data)) {
            char e[256];
            if (pgserver_stop(s, PGSERVER_STOP_IMMEDIATE, e, sizeof e) < 0)
                kill_postmaster(s->data);
        }
    }
    rm_rf(s->dir);
    stop_reaper(&s->reaper);
    free(s);
}

int pgserver_set_base_dir(const char *dir, char *err, size_t errlen)
{
    /* Room for "/pgfault-server-XXXXXX/.s.PGSQL.NNNNN" (37 bytes) and the
     * NUL: a Unix socket path must fit in sun_path (108 bytes). */
    if (strlen(dir) > 70)
        return fail(err, errlen, "temp dir path too long for a server's socket: %s", dir);
    snprintf(base_dir, sizeof base_dir, "%s", dir);
    return 0;
}

void pgserver_set_interrupt(volatile sig_atomic_t *flag)
{
    interrupt_flag = flag;
}

int pgserver_reap_dir(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "pgfault-", 8) != 0)
            continue;
        char data[PATH_MAX];
        snprintf(data, sizeof data, "%s/%s/data", dir, e->d_name);
        kill_postmaster(data);
    }
    if (d)
        closedir(d);
    return rm_rf_wait(dir);
}

void pgserver_release_template(void)
{
    pthread_mutex_lock(&template_mu);
    if (template_dir[0]) {
        rm_rf_wait(template_dir);
        stop_reaper(&template_reaper);
        template_dir[0] = '\0';
    }
    pthread_mutex_unlock(&template_mu);
}
