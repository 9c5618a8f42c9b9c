/*
 * The pqpool driver: adapts pqpool's API (pool/pqpool.h) to the runner's
 * driver interface (driver.h).
 */
#ifndef PGFAULT_DRIVERS_PQPOOL_DRIVER_H
#define PGFAULT_DRIVERS_PQPOOL_DRIVER_H

#include "driver.h"

extern const struct driver_ops pqpool_driver;

#endif
