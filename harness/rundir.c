/*
 * rundir: see rundir.h.
 */
#include "rundir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pgserver.h"

#define PREFIX "pgfault-run-"
/* A run dir is made under this name and renamed to PREFIX only once it is
 * locked, so a reaper never mistakes a dir still being made for a dead
 * run's. */
#define MAKING "pgfault-mkrun-"
/* A MAKING dir this old (seconds) was left by a run killed while making
 * it. */
#define MAKING_STALE_S 60

static const char *default_base(void)
{
    const char *tmp = getenv("TMPDIR");
    return tmp && *tmp ? tmp : "/tmp";
}

int rundir_reap_dead(const char *base)
{
    if (!base)
        base = default_base();
    DIR *d = opendir(base);
    if (!d)
        return 0;
    int reaped = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int making = strncmp(e->d_name, MAKING, strlen(MAKING)) == 0;
        if (!making && strncmp(e->d_name, PREFIX, strlen(PREFIX)) != 0)
            continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", base, e->d_name);
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        struct stat st;
        if (fd < 0)
            continue;
        /* Only our own, and only when nobody holds the lock: a live run
         * (ours or a concurrent one) keeps it. */
        if (fstat(fd, &st) == 0 && st.st_uid == geteuid() &&
            (!making || time(NULL) - st.st_mtime > MAKING_STALE_S) &&
            flock(fd, LOCK_EX | LOCK_NB) == 0) {
            if (pgserver_reap_dir(path) == 0) {
                fprintf(stderr, "pgfault: removed %s, left by a run that was killed\n", path);
                reaped++;
            } else {
                fprintf(stderr, "pgfault: could not remove %s, left by a run that was killed\n",
                        path);
            }
        }
        close(fd);
    }
    closedir(d);
    return reaped;
}

int rundir_create(struct rundir *r, char *err, size_t errlen)
{
    r->fd = -1;
    r->path[0] = '\0';
    const char *base = default_base();
    rundir_reap_dead(base);
    char making[sizeof r->path];
    int n = snprintf(making, sizeof making, "%s/" MAKING "XXXXXX", base);
    if (n < 0 || (size_t)n >= sizeof r->path) {
        snprintf(err, errlen, "TMPDIR is too long for a run dir: %s", base);
        return -1;
    }
    if (!mkdtemp(making)) {
        snprintf(err, errlen, "mkdtemp %s: %s", making, strerror(errno));
        return -1;
    }
    /* mkdtemp made it 0700; the postgres user (as root) must traverse it
     * to its servers' dirs, but nobody needs to list it. Locked first,
     * then given its run name (the lock stays with the open dir). */
    snprintf(r->path, sizeof r->path, "%s/" PREFIX "%s", base, making + n - 6);
    r->fd = open(making, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (r->fd < 0 || chmod(making, 0711) < 0 || flock(r->fd, LOCK_EX | LOCK_NB) < 0 ||
        renameat2(AT_FDCWD, making, AT_FDCWD, r->path, RENAME_NOREPLACE) < 0) {
        snprintf(err, errlen, "run dir %s: %s", making, strerror(errno));
        if (r->fd >= 0)
            close(r->fd);
        r->fd = -1;
        rmdir(making);
        r->path[0] = '\0';
        return -1;
    }
    char e[300];
    if (pgserver_set_base_dir(r->path, e, sizeof e) < 0) {
        snprintf(err, errlen, "%s", e);
        rundir_remove(r);
        return -1;
    }
    return 0;
}

void rundir_remove(struct rundir *r)
{
    if (r->fd < 0)
        return;
    if (pgserver_reap_dir(r->path) < 0)
        fprintf(stderr, "pgfault: could not remove %s\n", r->path);
    close(r->fd);
    r->fd = -1;
}
