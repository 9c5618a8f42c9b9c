/*
 * testhook: test-only pauses at named phases, so a test can signal pgfault
 * at a precise moment (preparing the template, copying a case's server,
 * mid-case...) instead of guessing wall times.
 *
 * Inert unless PGFAULT_TEST_PAUSE is set to "PHASE:PATH". When a process
 * reaches PHASE, it writes its pid to PATH (atomically: a reader never sees
 * a partial file) and then waits: until *stop becomes non-zero (a signal
 * handler sets it), or, with stop NULL, until it is killed. Each process
 * pauses at most once, so a phase reached again later runs on.
 *
 * The phases, and where each is reached, are listed in tests/signal-check.sh.
 */
#ifndef PGFAULT_TESTHOOK_H
#define PGFAULT_TESTHOOK_H

#include <signal.h>

void testhook_pause(const char *phase, volatile sig_atomic_t *stop);

/* With PGFAULT_TEST_LEAK set, leaks a small block: proves that a leak
 * check which should see it does. */
void testhook_leak(void);

#endif
