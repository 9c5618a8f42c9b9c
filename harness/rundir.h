/*
 * rundir: the directory a run keeps everything temporary in, and the
 * cleanup of runs that died without removing theirs.
 *
 * A run dir is $TMPDIR/pgfault-run-XXXXXX (/tmp without TMPDIR), mode
 * 0711 so the postgres user can reach the throwaway servers made inside
 * it. The run holds an exclusive flock on it for as long as any of its
 * processes lives (forked children inherit the lock; exec'd programs do
 * not), so a run is dead exactly when its dir can be locked -- whatever
 * pids have been reused since.
 *
 * A run dir is made as pgfault-mkrun-XXXXXX, locked, and only then renamed
 * to its run name, so no reaper can take a dir still being made for a dead
 * run's.
 *
 * rundir_create first reaps the dirs of dead runs of the same user: stops
 * the servers inside them (through their postmaster.pid, believed only for
 * a process running in that data dir) and removes them; a pgfault-mkrun-
 * dir older than a minute was left by a run killed while making it.
 */
#ifndef PGFAULT_RUNDIR_H
#define PGFAULT_RUNDIR_H

#include <stddef.h>

struct rundir {
    char path[128];
    int fd; /* holds the lock; -1 when none */
};

/* Reaps dead runs' dirs (saying on stderr what it removed), then creates
 * and locks a new run dir. Returns 0, or -1 with err. */
int rundir_create(struct rundir *r, char *err, size_t errlen);

/* Stops the servers in the run dir, removes it (waiting, bounded, until it
 * is gone) and drops the lock. No-op when r holds none. */
void rundir_remove(struct rundir *r);

/* Reaps the dirs of dead runs under base (NULL: $TMPDIR or /tmp). Returns
 * how many it removed. */
int rundir_reap_dead(const char *base);

#endif
