/*
 * proxy_cli: the `pgfault proxy` command -- the fault proxy as a
 * standalone process in front of any client, driven through its control
 * socket (see README, "The fault proxy by hand").
 */
#ifndef PGFAULT_PROXY_CLI_H
#define PGFAULT_PROXY_CLI_H

/* Runs `pgfault proxy ARGS` (argv[0] is "proxy") until SIGINT or SIGTERM.
 * Returns the process exit code: 0 after a signal, 2 for bad options, 1
 * if the proxy could not start. */
int proxy_cli_main(int argc, char **argv);

#endif
