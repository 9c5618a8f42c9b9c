/*
 * driver_check: conformance checks for driver authors (pgfault
 * driver-check DRIVER).
 *
 * Starts the driver and a throwaway PostgreSQL server, then exercises every
 * operation of the driver protocol (docs/driver-protocol.md) the way the
 * runner does: hello and its tables, open, acquire and its clock units,
 * query ok and error, conn_info against the server's own view, metrics,
 * error replies for unknown operations and handles, tolerance of unknown
 * request fields, 16 acquires in flight at once, the password push,
 * release, discard and close. Each check prints one line, `ok` or `FAIL`
 * with exactly what is wrong; a driver that crashes or hangs is named as
 * such and the remaining checks are skipped.
 */
#ifndef PGFAULT_DRIVER_CHECK_H
#define PGFAULT_DRIVER_CHECK_H

#include <stdio.h>

/* Checks the driver named as for --driver ("example", "exec:CMD"),
 * writing one line per check to out. Returns the process exit code: 0 if
 * every check passed, 1 if any failed, 2 if the name is unknown or no
 * server could be started (message on out). */
int driver_check_run(const char *name, FILE *out);

#endif
