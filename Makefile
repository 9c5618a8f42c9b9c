# pgfault: resilience test harness for PostgreSQL connection pools.
# Every entry point lives here; README.md documents them.
#
#   make                  libpqpool.a, libpqpool.so, pqpool.pc and the pgfault binary
#   make deps             install missing Debian packages (as root; else print the command)
#   make check [T=glob]   cmocka unit tests (T filters test names, e.g. T='*timeout*')
#   make run              the scenario catalogue on every backend (the CI gate)
#   make scenario S=...   one scenario with a step-by-step trace
#   make scorecard        every shipped pool through the catalogue, against its baseline
#   make test             what .ci/run calls: check, sanitizer checks, run, scorecard,
#                         the signal check
#   make check-signals    pgfault run signalled in every phase leaves nothing behind
#   make install PREFIX=  library, header, pqpool.pc, pgfault
#   make SANITIZE=address,undefined check   (or SANITIZE=thread)

.DEFAULT_GOAL := all
SHELL := /bin/bash
.DELETE_ON_ERROR:
.SECONDARY:

comma := ,
CC ?= gcc
PREFIX ?= /usr/local
SANITIZE ?=
VERSION := 0.1.0

# One build directory per configuration, so sanitizer and coverage builds
# never mix objects with the plain one.
BUILD_KIND := $(if $(SANITIZE),$(subst $(comma),-,$(SANITIZE)),default)$(if $(COVERAGE),-coverage)$(BUILD_TAG)
BUILD := build/$(BUILD_KIND)

# libpq flags come from pkg-config, falling back to pg_config. They are
# evaluated once, lazily, so that `make deps` can install libpq-dev first.
PQ_CFLAGS = $(eval PQ_CFLAGS := $(shell pkg-config --cflags libpq 2>/dev/null || echo -I$$(pg_config --includedir)))$(PQ_CFLAGS)
PQ_LIBS = $(eval PQ_LIBS := $(shell pkg-config --libs libpq 2>/dev/null || echo -L$$(pg_config --libdir) -lpq))$(PQ_LIBS)

WARNINGS := -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wmissing-prototypes \
	-Wstrict-prototypes -Wformat=2 -Wundef -Wold-style-definition -Werror
OPT ?= -O2 -g
ifneq ($(SANITIZE),)
OPT := -O1 -g -fno-omit-frame-pointer
SAN_FLAGS := -fsanitize=$(SANITIZE) $(if $(findstring undefined,$(SANITIZE)),-fno-sanitize-recover=all)
endif
ifneq ($(COVERAGE),)
OPT := -O0 -g --coverage
endif
# Shipped drivers are found in this tree unless PGFAULT_DRIVERS_DIR says
# otherwise at run time (make install copies them next to the binary).
DRIVERS_DIR ?= $(CURDIR)/harness/drivers
CPPFLAGS_ALL = -D_GNU_SOURCE -Ipool -Ifakes -Iharness -Itests $(PQ_CFLAGS) \
	-DPGFAULT_VERSION='"$(VERSION)"' -DPGFAULT_DRIVERS_DIR='"$(DRIVERS_DIR)"' 
CFLAGS_ALL = $(WARNINGS) $(OPT) $(SAN_FLAGS) -fPIC -pthread -MMD -MP $(CFLAGS)
LDFLAGS_ALL = $(SAN_FLAGS) $(if $(COVERAGE),--coverage) -pthread $(LDFLAGS)

POOL_SRCS := $(wildcard pool/*.c)
FAKE_SRCS := $(wildcard fakes/*.c)
HARNESS_SRCS := $(filter-out harness/main.c,$(wildcard harness/*.c harness/drivers/*.c))
TEST_SUPPORT_SRCS := $(filter-out tests/test_%.c,$(wildcard tests/*.c))
TEST_SRCS := $(wildcard tests/test_*.c)

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))
POOL_OBJS := $(call obj,$(POOL_SRCS))
FAKE_OBJS := $(call obj,$(FAKE_SRCS))
HARNESS_OBJS := $(call obj,$(HARNESS_SRCS))
TEST_SUPPORT_OBJS := $(call obj,$(TEST_SUPPORT_SRCS))
TEST_BINS := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRCS))

LIBPGFAULT_A := $(BUILD)/libpgfault-internal.a
LIBPQPOOL_A := $(BUILD)/libpqpool.a
LIBPQPOOL_SO := $(BUILD)/libpqpool.so
PGFAULT := $(BUILD)/pgfault

# Everything that is not pqpool's production library links against fakepq
# instead of libpq: the fake exports the PQ* symbols itself and reaches the
# real libpq only through dlopen in passthrough mode. Not linking -lpq is
# what makes a libpq call the fake lacks a link error rather than a silent
# call into the real library.
# jansson: the driver protocol's JSON (exec drivers).
HARNESS_LIBS := -ldl -lm -ljansson

.PHONY: all deps deps-check check check-report check-signals run scenario scorecard test test-sanitize coverage bench install format format-check clean

# Coverage thresholds for pool/ (make coverage fails below them).
COVERAGE_LINES_MIN := 95
COVERAGE_BRANCHES_MIN := 85

all: deps-check $(LIBPQPOOL_A) $(LIBPQPOOL_SO) $(if $(wildcard harness/main.c),$(PGFAULT))

deps:
	@tools/deps.sh install

# Every other target checks (and as root installs) dependencies first.
deps-check:
	@tools/deps.sh install

$(BUILD)/obj/%.o: %.c | deps-check
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS_ALL) $(CFLAGS_ALL) -c $< -o $@

$(LIBPQPOOL_A): $(POOL_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(LIBPQPOOL_SO): $(POOL_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared -Wl,-soname,libpqpool.so.0 $(LDFLAGS_ALL) -o $@ $^ $(PQ_LIBS)

# Binaries link against one archive of all modules, so each pulls in only
# the objects it uses (a parser test does not need a server or the pool).
$(LIBPGFAULT_A): $(HARNESS_OBJS) $(POOL_OBJS) $(FAKE_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(PGFAULT): $(call obj,harness/main.c) $(LIBPGFAULT_A)
	$(CC) $(LDFLAGS_ALL) -o $@ $^ $(HARNESS_LIBS)

$(BUILD)/tests/%: $(BUILD)/obj/tests/%.o $(TEST_SUPPORT_OBJS) $(LIBPGFAULT_A)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $^ -lcmocka $(HARNESS_LIBS)

# test_pqpool_oom links a copy of pqpool.o whose calls to the allocator,
# the pthread init/create functions and PQgetCancel go to seam_* functions
# in the test, so it can fail exactly pqpool's calls (and nobody else's).
SEAMED_SYMS := calloc strdup pthread_mutex_init pthread_condattr_init pthread_condattr_setclock \
	pthread_cond_init pthread_attr_init pthread_create PQgetCancel
$(BUILD)/obj/tests/pqpool_seamed.o: $(BUILD)/obj/pool/pqpool.o
	@mkdir -p $(dir $@)
	objcopy $(foreach s,$(SEAMED_SYMS),--redefine-sym $(s)=seam_$(s)) $< $@

$(BUILD)/tests/test_pqpool_oom: $(BUILD)/obj/tests/test_pqpool_oom.o $(BUILD)/obj/tests/pqpool_seamed.o $(LIBPGFAULT_A)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS_ALL) -o $@ $^ -lcmocka $(HARNESS_LIBS)

check: deps-check $(TEST_BINS)
	@T='$(T)' tools/run-tests.sh $(TEST_BINS)

# The unit tests and the catalogue again under AddressSanitizer+UBSan, as
# CI runs them. Each case process runs LeakSanitizer over itself before it
# leaves (it exits with _exit, which LSan never sees), so a leak fails the
# case. Reports go to build/address-undefined/reports, not reports/.
test-sanitize: deps-check
	$(MAKE) --no-print-directory SANITIZE=address,undefined check
	$(MAKE) --no-print-directory SANITIZE=address,undefined all
	build/address-undefined/pgfault run --reports build/address-undefined/reports

# `pgfault run` sent SIGINT, SIGTERM, SIGHUP and SIGKILL in each phase of a
# run must leave no process, temp dir or socket: reports/signal-check.md.
check-signals: deps-check all
	tests/signal-check.sh $(PGFAULT) reports/signal-check.md

run: deps-check all
	@if [ -x $(PGFAULT) ]; then $(PGFAULT) run; else echo "run: the scenario runner is not built yet"; fi

scenario: deps-check all
	@test -n "$(S)" || { echo "usage: make scenario S=family/name [BACKEND=fake|proxy]" >&2; exit 2; }
	$(PGFAULT) run scenarios/$(S).scn -v $(if $(BACKEND),--backend $(BACKEND))

# Every shipped foreign pool through the catalogue, each against its
# baseline, next to pqpool's results of `make run` (run first when missing):
# reports/scorecard.md and reports/scorecard.html.
scorecard: deps-check all
	$(PGFAULT) scorecard --pqpool-results reports/cases.tsv

# Opens reports/index.html in headless Chromium: fails on a blank page, a
# missing timeline or a script error.
check-report: deps-check
	tools/check-html.sh reports/index.html reports/index.png

test: deps-check
	$(MAKE) --no-print-directory check
	$(MAKE) --no-print-directory test-sanitize
	$(MAKE) --no-print-directory run
	$(MAKE) --no-print-directory scorecard
	$(MAKE) --no-print-directory check-report
	$(MAKE) --no-print-directory check-signals

coverage: deps-check
	$(MAKE) --no-print-directory COVERAGE=1 all $(patsubst build/default/%,build/default-coverage/%,$(TEST_BINS))
	tools/coverage.sh build/default-coverage $(COVERAGE_LINES_MIN) $(COVERAGE_BRANCHES_MIN)

install: all
	install -d $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/bin
	install -m 644 $(LIBPQPOOL_A) $(DESTDIR)$(PREFIX)/lib/
	install -m 755 $(LIBPQPOOL_SO) $(DESTDIR)$(PREFIX)/lib/libpqpool.so.0
	ln -sf libpqpool.so.0 $(DESTDIR)$(PREFIX)/lib/libpqpool.so
	install -m 644 pool/pqpool.h $(DESTDIR)$(PREFIX)/include/
	@# pqpool.pc is written here so that it names the PREFIX installed to.
	printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$${prefix}/lib' 'includedir=$${prefix}/include' '' \
	  'Name: pqpool' 'Description: resilient libpq connection pool' 'Version: $(VERSION)' \
	  'Requires.private: libpq' 'Libs: -L$${libdir} -lpqpool' 'Libs.private: -pthread' \
	  'Cflags: -I$${includedir}' >$(DESTDIR)$(PREFIX)/lib/pkgconfig/pqpool.pc
	if [ -x $(PGFAULT) ]; then install -m 755 $(PGFAULT) $(DESTDIR)$(PREFIX)/bin/; fi

FORMAT_SRCS = $(wildcard pool/*.[ch] fakes/*.[ch] harness/*.[ch] harness/drivers/*.[ch] tests/*.[ch])
# pgbench through the fault proxy, socat and haproxy against a direct
# connection: reports/bench-proxy.md. Not part of `make test` (speed claims
# live in reports/, never in timed tests).
bench: all
	tools/bench-proxy.sh

format:
	clang-format -i $(FORMAT_SRCS)
format-check:
	clang-format --dry-run --Werror $(FORMAT_SRCS)

clean:
	rm -rf build

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
