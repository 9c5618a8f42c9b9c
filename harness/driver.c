/*
 * driver: the table of drivers the runner can use, and the small helpers
 * every driver user needs (names, key and metric look-ups). A shipped
 * foreign driver is one line here: its short name and the command that
 * starts it from the drivers directory.
 */
#include "driver.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "drivers/exec.h"
#include "drivers/pqpool_driver.h"

#ifndef PGFAULT_DRIVERS_DIR
#define PGFAULT_DRIVERS_DIR "harness/drivers"
#endif

/* Shipped foreign drivers: short name -> interpreter and program, the
 * program relative to the drivers directory (PGFAULT_DRIVERS_DIR in the
 * environment, else the source tree pgfault was built from). Debian's
 * python3 is named in full: its modules (psycopg2) are not on another. */
static const struct {
    const char *name;
    const char *interpreter;
    const char *program;
} shipped[] = {
    {"example", "/usr/bin/python3", "example/driver.py"},
    {"node-pg", "node", "node-pg/driver.js"},
    {"sqlalchemy", "/usr/bin/python3", "sqlalchemy/driver.py"},
    {"psycopg-pool", "/usr/bin/python3", "psycopg-pool/driver.py"},
};

static const char *const names[] = {"pqpool",       "example",      "node-pg", "sqlalchemy",
                                    "psycopg-pool", "exec:COMMAND", NULL};

const struct driver_ops *driver_find(const char *name, const char **command)
{
    static char buf[1024];
    *command = NULL;
    if (strcmp(name, "pqpool") == 0)
        return &pqpool_driver;
    if (strncmp(name, "exec:", 5) == 0) {
        if (!name[5])
            return NULL;
        *command = name + 5;
        return &exec_driver;
    }
    for (size_t i = 0; i < sizeof shipped / sizeof shipped[0]; i++) {
        if (strcmp(name, shipped[i].name) != 0)
            continue;
        const char *dir = getenv("PGFAULT_DRIVERS_DIR");
        snprintf(buf, sizeof buf, "%s '%s/%s'", shipped[i].interpreter,
                 dir && *dir ? dir : PGFAULT_DRIVERS_DIR, shipped[i].program);
        *command = buf;
        return &exec_driver;
    }
    return NULL;
}

const char *const *driver_names(void)
{
    return names;
}

const char *driver_outcome_name(enum driver_outcome o)
{
    if (o == DRIVER_OTHER)
        return "other error";
    if (o == DRIVER_BROKEN)
        return "driver failure";
    return scn_outcome_name((enum scn_outcome)o);
}

const char *driver_key_status_name(enum driver_key_status s)
{
    return s == DRIVER_KEY_MAPPED ? "mapped" : s == DRIVER_KEY_IGNORED ? "ignored" : "unsupported";
}

const char *driver_cap_name(enum driver_cap c)
{
    static const char *const n[DRIVER_NCAPS] = {"maintain",    "health",      "txstatus",
                                                "backend_pid", "client_port", "password",
                                                "invariants",  "fakepq",      "acquire_timeout"};
    for (int i = 0; i < DRIVER_NCAPS; i++)
        if (c == (enum driver_cap)(1u << i))
            return n[i];
    return "?";
}

int driver_key_status(const struct driver_info *info, const char *key, const char **detail)
{
    for (int i = 0; i < info->nkeys; i++) {
        if (strcmp(info->keys[i].key, key) == 0) {
            if (detail)
                *detail = info->keys[i].detail;
            return (int)info->keys[i].status;
        }
    }
    if (detail)
        *detail = "the driver does not say";
    return -1;
}

int driver_has_metric(const struct driver_info *info, const char *name)
{
    for (int i = 0; i < info->nmetrics; i++) {
        const char *m = info->metrics[i];
        size_t l = strlen(m);
        if (strcmp(m, name) == 0)
            return 1;
        if (l >= 2 && strcmp(m + l - 2, ".*") == 0 && strncmp(m, name, l - 1) == 0 && name[l - 1])
            return 1;
    }
    return 0;
}

int driver_resolve_settings(const struct driver_info *info, const char *const *given, size_t ngiven,
                            char out[][80], char *err, size_t errlen)
{
    for (size_t g = 0; g < ngiven; g++) {
        const char *eq = strchr(given[g], '=');
        int found = 0;
        for (int i = 0; eq && i < info->ndsettings; i++) {
            if (strlen(info->dsettings[i].key) != (size_t)(eq - given[g]) ||
                strncmp(info->dsettings[i].key, given[g], (size_t)(eq - given[g])) != 0)
                continue;
            found = 1;
            int ok = 0;
            char vals[300] = "";
            for (int v = 0; v < info->dsettings[i].nvalues; v++) {
                ok |= strcmp(info->dsettings[i].values[v], eq + 1) == 0;
                size_t l = strlen(vals);
                snprintf(vals + l, sizeof vals - l, "%s%s", v ? ", " : "",
                         info->dsettings[i].values[v]);
            }
            if (!ok) {
                snprintf(err, errlen, "driver setting %s: '%s' is not one of %s", given[g], eq + 1,
                         vals);
                return -1;
            }
        }
        if (!found) {
            char keys[300] = "";
            for (int i = 0; i < info->ndsettings; i++) {
                size_t l = strlen(keys);
                snprintf(keys + l, sizeof keys - l, "%s%s", i ? ", " : "", info->dsettings[i].key);
            }
            snprintf(err, errlen, "driver setting '%s': %s (the %s driver has %s)", given[g],
                     eq ? "unknown key" : "expected KEY=VALUE", info->driver,
                     keys[0] ? keys : "no settings");
            return -1;
        }
    }
    int n = 0;
    for (int i = 0; i < info->ndsettings; i++) {
        const char *value = info->dsettings[i].def;
        size_t kl = strlen(info->dsettings[i].key);
        for (size_t g = 0; g < ngiven; g++)
            if (strncmp(given[g], info->dsettings[i].key, kl) == 0 && given[g][kl] == '=')
                value = given[g] + kl + 1;
        snprintf(out[n++], 80, "%s=%s", info->dsettings[i].key, value);
    }
    return n;
}
