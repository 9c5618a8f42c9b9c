/*
 * driver: the table of pool drivers the runner can use. Adding a pool means
 * adding its file under harness/drivers/ and one line here.
 */
#include "driver.h"

#include <string.h>

#include "drivers/pqpool_driver.h"

static const struct driver_ops *const drivers[] = {
    &pqpool_driver,
};

static const char *const names[] = {"pqpool", NULL};

const struct driver_ops *driver_find(const char *name)
{
    for (size_t i = 0; i < sizeof drivers / sizeof drivers[0]; i++)
        if (strcmp(drivers[i]->name, name) == 0)
            return drivers[i];
    return NULL;
}

const char *const *driver_names(void)
{
    return names;
}
