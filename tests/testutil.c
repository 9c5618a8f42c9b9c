/*
 * testutil: file helpers for the end-to-end tests (see testutil.h).
 */
#include "testutil.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "runner.h"

int testutil_write(const char *dir, const char *rel, const char *text)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    /* mkdir -p of the file's directory */
    for (char *p = path + strlen(dir) + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(path, 0755);
            *p = '/';
        }
    }
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fputs(text, f);
    return fclose(f) == 0 ? 0 : -1;
}

char *testutil_slurp(const char *dir, const char *rel)
{
    static char buf[262144];
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

int testutil_run(const char *dir, const char *rel, const char *driver, unsigned backends,
                 int timeout_ms)
{
    char path[1024], reports[1024];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    snprintf(reports, sizeof reports, "%s/reports", dir);
    const char *paths[] = {path};
    struct runner_options o = {0};
    o.paths = paths;
    o.npaths = 1;
    o.backends = backends;
    o.jobs = 1;
    o.reports_dir = reports;
    o.driver = driver;
    o.case_timeout_ms = timeout_ms;
    fflush(stdout);
    return runner_run(&o);
}
