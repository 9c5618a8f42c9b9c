/*
 * The exec driver: drives a pool that lives in a driver process of its own
 * language, over the driver protocol (docs/driver-protocol.md): JSON lines
 * on the process's stdin/stdout, requests with ids, replies in any order.
 *
 * start() spawns `/bin/sh -c 'exec COMMAND'` in the caller's process group
 * (the runner's case child leads one and is killed with it), and says
 * hello. A reader thread matches replies to requests and turns `event`
 * lines into the trace; another passes stderr on line by line. Every
 * request has a deadline; a driver that exits, dies, writes a line that is
 * not a protocol message, or misses a deadline is marked crashed or hung
 * (fate()), and every later request fails at once. destroy() closes the
 * driver's stdin, waits up to 2 s for it to exit, then kills it.
 */
#ifndef PGFAULT_DRIVERS_EXEC_H
#define PGFAULT_DRIVERS_EXEC_H

#include "driver.h"

extern const struct driver_ops exec_driver;

/* Sends one request given as JSON text (without the id: it is added) and
 * waits up to deadline_ms for its reply. For conformance checks. Returns
 * 0 for an "ok": true reply (its JSON text in reply), 1 for an "ok": false
 * reply (its error in err), -1 when the driver broke (err says how). */
int exec_driver_raw(struct driver *d, const char *op_json, int deadline_ms, char *reply,
                    size_t replylen, char *err, size_t errlen);

#endif
