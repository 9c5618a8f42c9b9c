#!/usr/bin/python3
"""pgfault driver for psycopg_pool's ConnectionPool (psycopg 3).

Drives one psycopg_pool.ConnectionPool over the JSON-lines protocol of
docs/driver-protocol.md. Written for Debian 12's python3-psycopg-pool
(package 3.1.7, module psycopg_pool 3.1.5) and python3-psycopg 3.1.7, so it
runs with Debian's /usr/bin/python3 (`hello` fails with a clear error under
an interpreter that cannot import them):

    pgfault driver-check psycopg-pool
    pgfault run --driver psycopg-pool --backend proxy

The driver is thin. It uses the pool the way a threaded service does and
does nothing the pool does not do: no retry, no validation of its own (3.1
has no check= argument, and the driver never calls pool.check()), no repair
of what the pool hands out. What psycopg_pool does in its own threads (its
workers connect, reconnect with back-off, replace broken connections) stays
there; the driver only reports it, as events.

How the service uses the pool
-----------------------------
open     ConnectionPool(kwargs=..., open=True): the constructor starts the
         background workers, which open min_size connections, and returns at
         once. No wait(): the docs (advanced/pool.rst, "Pool life cycle")
         describe the constructor as the plain way and wait() as the choice
         of a program that prefers to crash at start-up; a service that
         stays up while its database is not is what the catalogue measures.
acquire  pool.getconn(timeout=...). The docs prefer the connection()
         context manager, but a context manager cannot span two requests:
         the runner acquires in one request and releases, discards, or
         releases twice in others, which is exactly what getconn()/putconn()
         are for ("Use this function only if it is not possible to use the
         connection as context manager", ConnectionPool.getconn). health
         does use connection(), as a readiness endpoint would.
release  pool.putconn(conn): the pool rolls back a connection returned in
         a transaction, closes one returned with a command running, and
         replaces one returned broken (ConnectionPool._return_connection,
         _reset_connection). A second release goes to putconn() again.
discard  conn.close() then pool.putconn(conn): 3.1 has no discard call; a
         connection returned closed is "returned in broken state", which the
         pool disposes of and replaces (advanced/pool.rst, "Connections
         life cycle"; it counts in returns_bad).
query    conn.execute(sql) in psycopg's default mode (a transaction opens
         before the first statement; the driver never commits: putconn's
         rollback is the pool's business). A timer answers `timeout` at
         timeout_ms; the late result is dropped.

Scenario `pool` keys (the SETTINGS table below says the same in short)
---------------------------------------------------------------------
max               -> max_size.
min_idle          -> min_size: connections the pool holds (idle or checked
                     out), opened by the workers at open and after a loss.
                     Unset with max < 4: na (psycopg's default min_size is 4
                     and may not exceed max_size).
acquire_timeout   -> timeout (seconds); a step's own timeout is
                     getconn(timeout=). It bounds the wait only: the acquirer
                     never connects, the workers do.
connect_timeout   -> kwargs connect_timeout. psycopg 3.1's Connection.connect
                     takes it with int() (whole seconds) and applies it to
                     each wait on the socket (psycopg/waiting.py wait_conn);
                     libpq's own 2 s floor does not apply because psycopg
                     drives PQconnectPoll itself (measured: 1 s gives up
                     after 1.0 s). Anything but a whole number of seconds
                     >= 1 s is na, never rounded; 0 would mean "no deadline".
idle_timeout      -> max_idle (seconds): only connections above min_size are
                     closed, one per max_idle period (ShrinkPool).
max_lifetime      -> max_lifetime (seconds). The pool shortens it by up to 5 %
                     of jitter (BasePool._set_connection_expiry_date) and
                     checks it only when a connection is returned.
validate_idle     -> none: the pool never checks a connection it hands out
                     (advanced/pool.rst, "Connection quality"). Only `never`
                     is honoured; any other value is na.
validation_timeout   unsupported: there is no validation to bound.
auth_retry_after     unsupported: a rejected connect is one more failure for
                     the workers' reconnect loop; there is no auth back-off.
backoff_initial      unsupported: the back-off is fixed in ConnectionAttempt
                     (1 s +-10 %, doubling), not an option.
backoff_max          unsupported: no cap; delays double until
                     reconnect_timeout gives the attempt up.
release_timeout      unsupported: putconn() takes no deadline.
housekeeping         ignored: no periodic pass to set or turn off. The workers
                     run tasks the pool queues (connect, return with reset)
                     and the scheduler runs ShrinkPool every max_idle.
init_sql          -> configure=: conn.execute(init_sql); conn.commit() (the
                     docs ask configure to close any transaction it opens).
application_name  -> kwargs application_name.
dbname            -> kwargs dbname.
password          -> 3.1 has no password callback: connection_class is a
                     psycopg.Connection subclass whose connect() reads the
                     current password, so each new connection uses the value
                     of the latest `password` request (the rotating-token
                     idiom for 3.1).

ConnectionPool options no key sets, left at the pool's defaults as a service
leaves them: max_waiting=0 (no queue limit, so TooManyRequests never
happens), reconnect_timeout=300 s (how long the workers retry a connection
before calling reconnect_failed, which the driver reports as an event),
num_workers=3, reset=None, name "pgfault".

Metrics (pool.get_stats(); the pool omits counters that are 0)
--------------------------------------------------------------
idle              pool_available  (connections idle in the pool)
total             pool_size       (in the pool, given to clients, or being
                                   prepared: a slot whose connect is being
                                   retried counts until reconnect_timeout)
waiting           requests_waiting
connect_attempts  connections_num
connect_failures  connections_errors (a failing configure is not counted)
created           connections_num - connections_errors
ejected           returns_bad + connections_lost (returned broken, or found
                  broken by check(); expiry and shrink closes are not counted
                  by the pool)
stats.NAME        any get_stats() key, as the pool names it
Not declared, because the pool has no such figure: in_use (pool_size counts
connections being prepared too), acquire_timeouts (requests_errors also
counts waiters failed by close or a full queue), auth_failures (the pool does
not tell a rejected connect from any other failure).

Events: every record of the "psycopg" loggers at INFO and above (the pool's
own log: requests, grows, connects, connect errors, discards, rollbacks) and
reconnect_failed from the pool's callback.
"""
import logging
import os
import socket
import sys
import threading
import time

# The protocol's plumbing, shared with the other Python drivers.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pgfault_driver import (BadRequest, ProtocolDriver, ignored, mapped,  # noqa: E402
                            unsupported, us_since)

try:
    import psycopg
    import psycopg_pool
    from psycopg.pq import TransactionStatus
    IMPORT_ERROR = None
except Exception as _e:  # reported at hello, where the runner shows it
    psycopg = psycopg_pool = TransactionStatus = None
    IMPORT_ERROR = "%s: %s" % (type(_e).__name__, _e)


def msg(e):
    """The error's text on one line (libpq's messages span several)."""
    return " ".join(str(e).split())


# ---- what each scenario `pool` key becomes ----------------------------------------
SETTINGS = {
    "max": mapped("max_size"),
    "min_idle": mapped("min_size (connections held, idle or checked out; the workers open them "
                       "at open and after a loss)"),
    "acquire_timeout": mapped("timeout (seconds; getconn(timeout=) for a step's own timeout)"),
    "connect_timeout": mapped("kwargs connect_timeout (psycopg 3.1: whole seconds, on each wait "
                              "for the socket; any other value is na)"),
    "idle_timeout": mapped("max_idle (seconds; closes only connections above min_size, one per "
                           "max_idle period)"),
    "max_lifetime": mapped("max_lifetime (seconds, less up to 5% jitter; checked when a "
                           "connection is returned)"),
    "validate_idle": mapped("(none: psycopg_pool 3.1 never checks a connection it hands out; "
                            "only never is honoured)"),
    "validation_timeout": unsupported("psycopg_pool 3.1 never validates a connection before "
                                      "handing it out (no check= argument): no check to bound"),
    "auth_retry_after": unsupported("no auth back-off: a rejected connect is retried by the "
                                    "workers' reconnect loop like any other failure"),
    "backoff_initial": unsupported("the reconnect back-off is fixed in ConnectionAttempt "
                                   "(1 s +-10%, doubling): not an option"),
    "backoff_max": unsupported("no back-off cap: delays double until reconnect_timeout "
                               "(300 s) gives the attempt up"),
    "release_timeout": unsupported("putconn() takes no deadline: its rollback of a returned "
                                   "transaction runs with none"),
    "housekeeping": ignored("no periodic pass to set or turn off: workers run tasks the pool "
                            "queues (connect, return) and a shrink every max_idle"),
    "init_sql": mapped("configure callback: conn.execute(init_sql); conn.commit()"),
    "application_name": mapped("kwargs application_name"),
    "dbname": mapped("kwargs dbname"),
    "password": mapped("connection_class whose connect() reads the current password (3.1 has "
                       "no password callback)"),
}
# "idle" first: driver-check asks metrics[0] while a query sleeps.
METRICS = ["idle", "total", "waiting", "created", "ejected", "connect_attempts",
           "connect_failures", "stats.*"]
CAPABILITIES = ["health", "txstatus", "backend_pid", "client_port", "password",
                "acquire_timeout"]
# get_stats() keys (psycopg_pool/base.py, BasePool._POOL_MIN ... _CONNECTIONS_LOST);
# a counter still at 0 is left out of get_stats(), so these answer 0 then.
STATS = ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting",
         "requests_num", "requests_queued", "requests_wait_ms", "requests_errors",
         "usage_ms", "returns_bad", "connections_num", "connections_ms",
         "connections_errors", "connections_lost")
TXSTATUS = ["idle", "active", "intrans", "inerror", "unknown"]  # by TransactionStatus
COUNTS = ("max", "min_idle")
DURATIONS = ("acquire_timeout", "connect_timeout", "idle_timeout", "max_lifetime",
             "validation_timeout", "auth_retry_after", "backoff_initial", "backoff_max",
             "release_timeout")
STRINGS = ("init_sql", "application_name", "dbname", "password")
PSYCOPG_DEFAULT_MIN_SIZE = 4  # ConnectionPool(min_size=4) in psycopg_pool 3.1


def classify(e):
    """The acquire outcome for what getconn() raised. getconn() only waits (the
    workers connect), so in practice it raises PoolTimeout, PoolClosed or
    TooManyRequests; the SQLSTATE rules are there for anything else."""
    if isinstance(e, psycopg_pool.PoolTimeout):
        return "timeout"
    if isinstance(e, psycopg_pool.PoolClosed):
        return "closed"
    if isinstance(e, psycopg_pool.TooManyRequests):
        return "other"
    code = getattr(e, "sqlstate", None) or ""
    if code in ("28P01", "28000"):
        return "auth"
    if code == "3D000":
        return "config"
    if code[:2] == "08" or code in ("53300", "57P01", "57P02", "57P03"):
        return "connect"
    if isinstance(e, psycopg.OperationalError) and not code:
        return "connect"
    return "other"


# The pool's log lines, as one-word events (the message is the pool's own text).
EVENT_WORDS = (
    ("connection requested", "request"), ("connection given", "acquire"),
    ("returning connection", "release"), ("growing pool", "grow"),
    ("adding new connection", "connect"), ("error connecting", "connect_error"),
    ("reconnection attempt", "reconnect_failed"), ("discarding closed", "remove"),
    ("discarding broken", "remove"), ("discarding expired", "expire"),
    ("closing returned", "remove"), ("rolling back returned", "rollback"),
    ("rollback failed", "error"), ("error resetting", "error"), ("shrinking pool", "shrink"),
    ("task run", "error"), ("waiting for pool", "wait"), ("error ignored", "error"),
)


class PoolLog(logging.Handler):
    """Turns the psycopg loggers' records into protocol events."""

    def __init__(self, driver):
        super().__init__(logging.INFO)
        self.driver = driver

    def emit(self, record):
        text = record.getMessage()
        word = next((w for prefix, w in EVENT_WORDS if text.startswith(prefix)),
                    record.levelname.lower())
        conn = None
        for arg in record.args if isinstance(record.args, tuple) else ():
            if psycopg is not None and isinstance(arg, psycopg.Connection):
                conn = self.driver.handle_of(arg)
        self.driver.event(word, text, conn)


class Driver(ProtocolDriver):
    def __init__(self, out=sys.stdout):
        super().__init__(out)
        self.pool = None
        self.lock = threading.Lock()  # conns, names, password, next handle
        self.conns, self.names = {}, {}  # handle -> connection, connection -> last handle
        self.next_handle = 1
        self.password = None

    def precheck(self, op):
        if op != "hello" and IMPORT_ERROR is not None:
            raise BadRequest("%s: psycopg_pool is not importable (%s)" % (op, IMPORT_ERROR))
        if op not in ("hello", "open") and self.pool is None:
            raise BadRequest("%s: no pool (send open first)" % op)

    def conn(self, req):
        with self.lock:
            if req.get("conn") not in self.conns:
                raise BadRequest("%s: unknown conn %r" % (req["op"], req.get("conn")))
            return req["conn"], self.conns[req["conn"]]

    def handle_of(self, conn):
        with self.lock:
            return self.names.get(conn)

    def current_password(self):
        with self.lock:
            return self.password

    # ---- operations: each returns its reply's fields ----
    def op_hello(self, req, reply):
        if IMPORT_ERROR is not None:
            raise BadRequest(
                "this driver needs psycopg 3 and psycopg_pool, which %s cannot import "
                "(%s); run it with Debian's /usr/bin/python3 (apt-get install "
                "python3-psycopg-pool)" % (sys.executable, IMPORT_ERROR))
        return dict(protocol=1, driver="psycopg-pool", pool="psycopg_pool.ConnectionPool",
                    version="psycopg_pool %s, psycopg %s, libpq %d" % (
                        psycopg_pool.__version__, psycopg.__version__, psycopg.pq.version()),
                    settings=SETTINGS, metrics=METRICS, capabilities=CAPABILITIES)

    def not_honoured(self, s):
        """The reason the pool cannot honour these settings, or None."""
        for key, value in s.items():
            st = SETTINGS.get(key, unsupported("the driver does not know this key"))
            if st["status"] == "unsupported":
                return "%s=%s: %s" % (key, value, st["reason"])
        if s.get("validate_idle", "never") != "never":
            return ("validate_idle=%s: psycopg_pool 3.1 never checks a connection before handing "
                    "it out (advanced/pool.rst, Connection quality)" % s["validate_idle"])
        ct = s.get("connect_timeout")
        if ct is not None and (ct < 1000 or ct % 1000):
            return ("connect_timeout=%d ms: psycopg 3.1 takes connect_timeout in whole seconds "
                    "(int(), 0 meaning none); %d ms cannot be given" % (ct, ct))
        if "min_idle" not in s and s.get("max", PSYCOPG_DEFAULT_MIN_SIZE) < \
                PSYCOPG_DEFAULT_MIN_SIZE:
            return ("min_idle unset with max=%d: psycopg_pool's default min_size is %d and may "
                    "not exceed max_size" % (s["max"], PSYCOPG_DEFAULT_MIN_SIZE))
        return None

    def op_open(self, req, reply):
        if self.pool is not None:
            raise BadRequest("open: the pool is already open")
        s = req.get("settings") or {}
        if not isinstance(s, dict):
            raise BadRequest("open: settings must be an object")
        for key, value in s.items():
            if key in COUNTS + DURATIONS and (type(value) is not int or value < 0):
                raise BadRequest("open: settings.%s must be a non-negative integer" % key)
            if key in STRINGS and not isinstance(value, str):
                raise BadRequest("open: settings.%s must be a string" % key)
        na = self.not_honoured(s)
        if na:
            return {"na": na}

        kwargs = {k: req[k] for k in ("host", "port", "user", "dbname") if req.get(k) is not None}
        for key in ("dbname", "application_name"):
            if key in s:
                kwargs[key] = s[key]
        if "connect_timeout" in s:
            kwargs["connect_timeout"] = s["connect_timeout"] // 1000
        with self.lock:
            self.password = s.get("password", req.get("password"))

        options = {}
        if "max" in s:
            options["max_size"] = s["max"]
        if "min_idle" in s:
            options["min_size"] = s["min_idle"]
        if "acquire_timeout" in s:
            options["timeout"] = s["acquire_timeout"] / 1000
        if "idle_timeout" in s:
            options["max_idle"] = s["idle_timeout"] / 1000
        if "max_lifetime" in s:
            options["max_lifetime"] = s["max_lifetime"] / 1000
        if "init_sql" in s:
            sql = s["init_sql"]

            def configure(conn):  # what a service's configure= does
                conn.execute(sql)
                conn.commit()
            options["configure"] = configure

        driver = self

        class RotatingPasswordConnection(psycopg.Connection):
            """psycopg_pool 3.1 connects with connection_class.connect(conninfo,
            **kwargs): this one adds the password current at that moment."""
            __qualname__ = "PasswordConnection"  # how the pool's log lines name it

            @classmethod
            def connect(cls, conninfo="", **kw):
                password = driver.current_password()
                if password is not None:
                    kw["password"] = password
                return super().connect(conninfo, **kw)

        def reconnect_failed(pool):
            self.event("reconnect_failed", "no connection within reconnect_timeout=%g s "
                       "(pool_size now %d)" % (pool.reconnect_timeout,
                                               pool.get_stats().get("pool_size", 0)))

        log = logging.getLogger("psycopg")
        log.setLevel(logging.INFO)
        log.propagate = False  # events only; nothing else on stderr
        log.addHandler(PoolLog(self))
        try:
            self.pool = psycopg_pool.ConnectionPool(
                "", kwargs=kwargs, open=True, name="pgfault",
                connection_class=RotatingPasswordConnection,
                reconnect_failed=reconnect_failed, **options)
        except Exception as e:  # the pool refused its arguments: the case fails
            raise BadRequest("open: ConnectionPool(...) raised %s: %s" % (type(e).__name__, msg(e)))
        return {}

    def op_acquire(self, req, reply):
        ms = req.get("timeout_ms")
        t0 = time.monotonic_ns()
        try:
            c = self.pool.getconn(timeout=None if ms is None else ms / 1000)
        except Exception as e:
            us = us_since(t0)
            res = dict(outcome=classify(e), message="%s: %s" % (type(e).__name__, msg(e)),
                       elapsed_us=us)
            if getattr(e, "sqlstate", None):
                res["sqlstate"] = e.sqlstate
            return res
        us = us_since(t0)
        with self.lock:
            name = "h%d" % self.next_handle  # not "c1": scenarios name theirs so
            self.next_handle += 1
            self.conns[name], self.names[c] = c, name
        return dict(outcome="ok", conn=name, elapsed_us=us)

    def op_release(self, req, reply):
        name, c = self.conn(req)
        try:  # a second release goes to the pool too, as an application's would
            self.pool.putconn(c)
        except Exception as e:
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        return dict(outcome="ok")

    def op_discard(self, req, reply):
        name, c = self.conn(req)
        try:  # closed, the pool sees it broken on return and replaces it
            c.close()
            self.pool.putconn(c)
        except Exception as e:
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        return dict(outcome="ok")

    def op_query(self, req, reply):
        name, c = self.conn(req)
        if not isinstance(req.get("sql"), str):
            raise BadRequest("query: sql must be a string")
        t0 = time.monotonic_ns()
        timer = reply.deadline(req, t0)
        try:
            c.execute(req["sql"])
            res = dict(outcome="ok")
        except Exception as e:
            res = dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
            if getattr(e, "sqlstate", None):
                res["sqlstate"] = e.sqlstate
        timer.cancel()
        return dict(res, elapsed_us=us_since(t0))

    def op_health(self, req, reply):
        # The pool has no readiness check (check() tests the idle connections and
        # reports nothing): SELECT 1 through pool.connection(), as an endpoint would.
        ms = req.get("timeout_ms")
        t0 = time.monotonic_ns()
        timer = reply.deadline(req, t0)
        try:
            with self.pool.connection(timeout=None if ms is None else ms / 1000) as c:
                c.execute("SELECT 1")
            res = dict(outcome="ok")
        except Exception as e:
            res = dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        timer.cancel()
        return dict(res, elapsed_us=us_since(t0))

    def op_conn_info(self, req, reply):
        name, c = self.conn(req)
        pid = port = None
        try:
            pid = c.info.backend_pid or None
        except Exception:
            pass
        try:  # on a duplicate of the socket: closing it keeps the connection's
            with socket.socket(fileno=os.dup(c.pgconn.socket)) as sk:
                port = sk.getsockname()[1]  # IndexError: a Unix socket
        except (OSError, IndexError, psycopg.Error):
            port = None
        try:
            tx = TXSTATUS[c.info.transaction_status]
        except Exception:
            tx = "unknown"
        return dict(backend_pid=pid, client_port=port, txstatus=tx)

    def op_metric(self, req, reply):
        name = req.get("name")
        st = self.pool.get_stats()

        def stat(k):
            return int(st.get(k, 0))

        values = {
            "idle": stat("pool_available"),
            "total": stat("pool_size"),
            "waiting": stat("requests_waiting"),
            "connect_attempts": stat("connections_num"),
            "connect_failures": stat("connections_errors"),
            "created": stat("connections_num") - stat("connections_errors"),
            "ejected": stat("returns_bad") + stat("connections_lost"),
        }
        if isinstance(name, str) and name.startswith("stats.") and name[6:] in STATS:
            return dict(value=stat(name[6:]))
        if name not in values:
            raise BadRequest("metric: no metric %r" % (name,))
        return dict(value=values[name])

    def op_password(self, req, reply):
        if not isinstance(req.get("password"), str):
            raise BadRequest("password: password must be a string")
        with self.lock:  # connect() reads it for every new connection from now on
            self.password = req["password"]
        return {}

    def op_close(self, req, reply):
        # close() fails the waiters with PoolClosed, closes the idle connections
        # and waits (5 s per thread at most) for its threads; connections still
        # out are closed when put back. A second close() returns at once.
        try:
            self.pool.close()
        except Exception as e:
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        return dict(outcome="ok")


if __name__ == "__main__":
    driver = Driver()
    driver.serve(sys.stdin)
    # stdin closed: the runner is done. Leave at once, without the interpreter's
    # shutdown, which would race the pool's daemon threads (they may be in a
    # connect or writing an event) and can abort the process.
    with driver.out_lock:
        sys.stdout.flush()
    os._exit(0)
