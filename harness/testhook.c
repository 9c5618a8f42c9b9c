/*
 * testhook: see testhook.h.
 */
#include "testhook.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int paused;

void testhook_pause(const char *phase, volatile sig_atomic_t *stop)
{
    const char *spec = getenv("PGFAULT_TEST_PAUSE");
    if (!spec || paused)
        return;
    const char *colon = strchr(spec, ':');
    size_t len = strlen(phase);
    if (!colon || (size_t)(colon - spec) != len || strncmp(spec, phase, len) != 0)
        return;
    paused = 1;
    const char *path = colon + 1;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
        char pid[32];
        int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
        if (write(fd, pid, (size_t)n) != n || close(fd) < 0 || rename(tmp, path) < 0)
            unlink(tmp);
    }
    /* Signals are blocked between the test of *stop and the wait, so one
     * that arrives in between is not lost: sigsuspend takes it. */
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);
    while (!stop || !*stop)
        sigsuspend(&old);
    sigprocmask(SIG_SETMASK, &old, NULL);
}

void testhook_leak(void)
{
    if (!getenv("PGFAULT_TEST_LEAK"))
        return;
    /* Stored nowhere, so no pointer to it survives this call. */
    volatile char *p = malloc(48);
    if (p)
        p[0] = 1;
}
