#!/usr/bin/python3
"""pgfault driver for SQLAlchemy 1.4's QueuePool over psycopg2.

Speaks docs/driver-protocol.md for one Engine, used the way a threaded
Python service uses it. Needs Debian's interpreter, which has the Debian
packages python3-sqlalchemy (1.4) and python3-psycopg2; `hello` says so
when they do not import:

    pgfault driver-check sqlalchemy
    pgfault run --driver sqlalchemy [--driver-setting pre_ping=on|off] --backend proxy

How the service is modelled
---------------------------
- The Engine: create_engine("postgresql+psycopg2://...", future=True,
  pool_size=max, max_overflow=0, ...). future=True is 1.4's "2.0 style"
  (the style of 1.4's tutorial): statements run in a transaction the
  Connection begins by itself, as they do under an ORM Session, and
  Connection.close() rolls it back. Everything else is the default:
  QueuePool, FIFO (pool_use_lifo=False), pool_reset_on_return="rollback".
- acquire = engine.connect(): what application code calls (an ORM Session
  calls it too: orm/session.py SessionTransaction._connection_for_bind). It checks a connection out of engine.pool (where pool_pre_ping
  pings) and wraps it in a Connection, whose error handling is what
  invalidates a connection on a disconnect error (and, by default, marks
  every older pooled connection stale). pool.connect() would hand out the
  bare DBAPI connection and skip that handling, which no service using
  SQLAlchemy does. Timed around that one call.
- query = connection.exec_driver_sql(sql), rows fetched: the scenario's SQL
  reaches psycopg2 verbatim (text() would parse ":name" as a bind).
- release = connection.close(): back to the pool, rolled back on the way
  (a second close is a no-op in SQLAlchemy, and is passed on as such).
- discard = connection.invalidate() then connection.close(), what the
  `with engine.connect()` block around it does on exit.
- close = engine.dispose(): what a service calls at shutdown. It closes the
  checked-in connections and puts a brand-new pool in the engine's place;
  SQLAlchemy has no closed state, so engine.connect() keeps working after it.
- The driver never retries, never repairs, never swallows what the pool
  raises: every exception from a pool call goes into the reply.

Settings: each scenario `pool` key
----------------------------------
key                 status       becomes
max                 mapped       pool_size=max, max_overflow=0 (max=0 is na:
                                 pool_size=0 means no limit)
min_idle            ignored      QueuePool has no minimum: "the pool begins with
                                 no connections" and opens them only on demand,
                                 then keeps up to pool_size (impl.py QueuePool);
                                 scenarios run on-demand and their checks judge it
acquire_timeout     mapped       pool_timeout (seconds, float): how long a checkout
                                 waits for a checked-in connection once pool_size
                                 are open. It does not bound a connect.
connect_timeout     mapped       connect_args connect_timeout: libpq's, whole
                                 seconds, at least 2. Only whole seconds >= 2000 ms
                                 are honoured; anything else is na, never rounded.
idle_timeout        unsupported  QueuePool never closes a connection for idling
max_lifetime        mapped       pool_recycle (seconds): an older connection is
                                 closed and replaced at its next checkout
validate_idle       mapped       pool_pre_ping: 0 -> on (a ping at every checkout),
                                 never -> off; it overrides the driver setting
                                 pre_ping. Other durations are na: the ping has no
                                 idle threshold.
validation_timeout  unsupported  the pre-ping is a SELECT 1 with no deadline
auth_retry_after    unsupported  no auth back-off: each new connection is a connect
backoff_initial     unsupported  no reconnect back-off: a failed connect is raised
backoff_max         unsupported  (same)
release_timeout     unsupported  close() rolls back synchronously, no deadline
housekeeping        ignored      QueuePool has no maintenance thread
init_sql            mapped       a "connect" event listener runs it on each new
                                 DBAPI connection (the documented per-connection
                                 setup idiom); if it raises, the checkout raises
application_name    mapped       connect_args application_name
dbname              mapped       the URL's database
password            mapped       a "do_connect" event listener sets
                                 cparams["password"] for each new connection
                                 (the documented dynamic-token idiom)

Driver setting pre_ping (on|off, default on): create_engine's pool_pre_ping
for scenarios that do not set validate_idle. Default on: SQLAlchemy's own
default is off, but its docs answer connections gone stale across a
database restart or failover with pool_pre_ping ("Disconnect Handling -
Pessimistic", docs.sqlalchemy.org/en/14/core/pooling.html), and a service
whose database restarts, fails over or sits behind a NAT needs it to keep
the first request after such an event from failing. off is the untouched
default: the scorecard shows both.

Metrics (the pool's own numbers; a metric it does not have is not listed)
-------------------------------------------------------------------------
idle                 pool.checkedin()   records in the queue (one whose
                                        connection was invalidated counts until
                                        it reconnects at its next checkout)
in_use               pool.checkedout()
total                pool.size() + pool.overflow() (= checkedin + checkedout)
size, checkedin, checkedout, overflow   the four methods as they are
created              "connect" pool events (new DBAPI connections)
ejected              connections the pool closed other than at dispose:
ejected.invalidated    "invalidate" events (a disconnect error, a failed
                       pre-ping, discard)
ejected.recycled       "close" events at checkout without an invalidate: stale
                       after a pool invalidation, soft-invalidated, or past
                       pool_recycle
waiting              measured by this driver, not the pool (QueuePool does not
                       count its waiters): acquires inside engine.connect()
                       that have not returned. With the pool at its size that
                       is exactly the requests queued for a connection; below
                       it, a checkout opening a new connection counts too.
Not there: connect_attempts, connect_failures, acquire_timeouts,
auth_failures (QueuePool keeps no such counters).

Capabilities: health (SELECT 1 through engine.connect(); SQLAlchemy has no
readiness check), txstatus, backend_pid, client_port (from the psycopg2
connection), password. Not acquire_timeout: engine.connect() takes no
timeout; pool_timeout is fixed at create_engine.

Events: connect, checkin, invalidate, soft_invalidate, close -- the pool's
own event names (sqlalchemy.event.listen on engine.pool). The sqlalchemy.pool
logger goes to stderr at INFO (the trace), the pool's reasons in its words.
"""
import logging
import os
import socket
import sys
import threading
import time
import weakref

# The protocol's plumbing, shared with the other Python drivers.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pgfault_driver import (BadRequest, ProtocolDriver, ignored, mapped,  # noqa: E402
                            unsupported, us_since)

try:
    import psycopg2
    import sqlalchemy
    from sqlalchemy import event
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import URL

    IMPORT_ERROR = None
except ImportError as _e:  # reported at hello
    IMPORT_ERROR = _e


NO_BACKOFF = ("QueuePool has no reconnect back-off: a failed connect is raised to the caller "
              "and the next checkout that needs a connection connects again")
SETTINGS = {
    "max": mapped("pool_size (with max_overflow=0)"),
    "min_idle": ignored("QueuePool has no minimum of idle connections: the pool begins with no "
                        "connections and opens them only on demand, then keeps up to pool_size "
                        "(QueuePool pool_size docs); the scenario runs with on-demand connects"),
    "acquire_timeout": mapped("pool_timeout (the wait for a checked-in connection once pool_size "
                              "are open; a connect is not bounded by it)"),
    "connect_timeout": mapped("connect_args connect_timeout (libpq: whole seconds, at least 2; "
                              "any other value is na)"),
    "idle_timeout": unsupported("QueuePool never closes a connection for being idle: the "
                                "connections it opened stay until invalidated or recycled "
                                "(pool_recycle counts from the connect, not from the last use)"),
    "max_lifetime": mapped("pool_recycle (seconds; applied at the connection's next checkout)"),
    "validate_idle": mapped("pool_pre_ping (0: on, a ping at every checkout; never: off; it "
                            "overrides the driver setting pre_ping; other values are na, the "
                            "ping has no idle threshold)"),
    "validation_timeout": unsupported("pool_pre_ping's ping is a plain SELECT 1 on the psycopg2 "
                                      "connection with no deadline of its own"),
    "auth_retry_after": unsupported("QueuePool has no auth back-off: every checkout that needs a "
                                    "new connection calls psycopg2.connect again"),
    "backoff_initial": unsupported(NO_BACKOFF),
    "backoff_max": unsupported(NO_BACKOFF),
    "release_timeout": unsupported("Connection.close() rolls back (reset on return) "
                                   "synchronously and takes no deadline"),
    "housekeeping": ignored("QueuePool has no maintenance thread: it acts only inside checkout "
                            "and checkin"),
    "init_sql": mapped("a 'connect' event listener running it on each new DBAPI connection "
                       "(SQLAlchemy's per-connection setup idiom; an error fails the checkout)"),
    "application_name": mapped("connect_args application_name"),
    "dbname": mapped("the URL's database"),
    "password": mapped("a 'do_connect' event listener setting cparams['password'] for each new "
                       "connection (SQLAlchemy's dynamic-token idiom)"),
}
DRIVER_SETTINGS = {
    "pre_ping": {
        "values": ["on", "off"],
        "default": "on",
        "meaning": "create_engine(pool_pre_ping=...) where the scenario does not set "
                   "validate_idle: the service pings each connection at checkout (the "
                   "pessimistic disconnect handling SQLAlchemy documents) or not "
                   "(SQLAlchemy's default)",
    },
}
METRICS = ["waiting", "idle", "in_use", "total", "size", "checkedin", "checkedout", "overflow", "created",
           "ejected", "ejected.*"]
CAPABILITIES = ["health", "txstatus", "backend_pid", "client_port", "password"]
# indexed by psycopg2's connection.info.transaction_status (libpq's PQtransactionStatus)
TXSTATUS = ["idle", "active", "intrans", "inerror", "unknown"]
DURATIONS = ("acquire_timeout", "connect_timeout", "idle_timeout", "max_lifetime",
             "validation_timeout", "auth_retry_after", "backoff_initial", "backoff_max",
             "release_timeout")
STRINGS = ("init_sql", "application_name", "dbname", "password")


def msg(e):
    return str(e).strip()


def reason(e):
    """An exception on one line, for an event's message."""
    if e is None:
        return None
    text = " ".join(msg(e).split())
    return type(e).__name__ + (": " + text if text not in ("", "()") else "")


def sqlstate(e):
    """The SQLSTATE of a psycopg2 error, bare or wrapped by SQLAlchemy."""
    orig = getattr(e, "orig", None) or e
    code = getattr(orig, "pgcode", None)
    return code if isinstance(code, str) and len(code) == 5 else None


AUTH_TEXT = ("password authentication failed", "no pg_hba.conf entry", "no password supplied",
             "authentication failed", 'role "')


def classify(e):
    """The acquire outcome of what engine.connect() raised. psycopg2 gives
    errors raised while connecting no pgcode (libpq has no SQLSTATE there),
    so those go by libpq's message. Any other DBAPI error is `connect`: the
    checkout's only database work is opening a connection (and its connect
    listeners, and the pre-ping)."""
    if isinstance(e, sa_exc.TimeoutError):  # QueuePool's own: pool_timeout ran out
        return "timeout"
    text, code = msg(getattr(e, "orig", None) or e), sqlstate(e) or ""
    if code in ("28P01", "28000") or any(s in text for s in AUTH_TEXT):
        return "auth"
    if code == "3D000" or ('database "' in text and "does not exist" in text):
        return "config"
    if isinstance(e, (sa_exc.DBAPIError, psycopg2.Error)):
        return "connect"
    return "other"


class Driver(ProtocolDriver):
    def __init__(self, out=sys.stdout):
        super().__init__(out)
        self.engine = None
        self.acquire_timeout_ms = None
        self.password = ""
        self.lock = threading.Lock()
        self.conns = {}  # handle -> sqlalchemy Connection; handles are never reused
        self.count = 0
        self.in_connect = 0  # acquires inside engine.connect() right now
        # psycopg2 connection -> the handle of its latest checkout. Weak: the
        # driver must never keep a connection alive the pool let go of.
        self.handles = weakref.WeakKeyDictionary()
        self.counters = {"created": 0, "ejected.invalidated": 0, "ejected.recycled": 0}
        self.local = threading.local()  # per thread: disposing, just_invalidated

    def precheck(self, op):
        if op not in ("hello", "open") and self.engine is None:
            raise BadRequest("%s: no pool (send open first)" % op)

    def conn(self, req):
        name = req.get("conn")
        with self.lock:
            c = self.conns.get(name) if isinstance(name, str) else None
        if c is None:
            raise BadRequest("%s: unknown conn %r" % (req["op"], name))
        return name, c

    def handle_of(self, dbapi_connection):
        try:
            return self.handles.get(dbapi_connection)
        except TypeError:  # None, or not weak-referenceable
            return None

    # ---- the pool's events (sqlalchemy.event.listen on engine.pool) ----
    # Listeners run inside the pool's own calls: they only count and write.
    @staticmethod
    def pid(dbapi_connection):
        try:
            return "backend pid %d" % dbapi_connection.info.backend_pid
        except Exception:
            return None

    def on_connect(self, dbapi_connection, record):
        with self.lock:
            self.counters["created"] += 1
        self.event("connect", self.pid(dbapi_connection))

    def on_checkin(self, dbapi_connection, record):
        what = None
        if dbapi_connection is None:
            what = "a record without a connection (invalidated): it reconnects at its next checkout"
        self.event("checkin", what, self.handle_of(dbapi_connection))

    def on_invalidate(self, dbapi_connection, record, exception):
        with self.lock:
            self.counters["ejected.invalidated"] += 1
        self.local.just_invalidated = id(dbapi_connection)  # its close follows at once
        self.event("invalidate", reason(exception) or "invalidate()",
                   self.handle_of(dbapi_connection))

    def on_soft_invalidate(self, dbapi_connection, record, exception):
        self.event("soft_invalidate", reason(exception), self.handle_of(dbapi_connection))

    def on_close(self, dbapi_connection, record):
        handle = self.handle_of(dbapi_connection)
        if getattr(self.local, "just_invalidated", None) == id(dbapi_connection):
            self.local.just_invalidated = None
            why = "invalidated"
        elif getattr(self.local, "disposing", False):
            why = "engine.dispose()"
        else:
            with self.lock:
                self.counters["ejected.recycled"] += 1
            why = "recycled at checkout (stale after a pool invalidation, soft-invalidated, " \
                  "or past pool_recycle)"
        self.event("close", why, handle)

    # ---- operations: each returns its reply's fields ----
    def op_hello(self, req, reply):
        if IMPORT_ERROR is not None:
            raise BadRequest(
                "sqlalchemy driver: cannot import SQLAlchemy and psycopg2 (%s) in %s %s; run it "
                "with Debian's /usr/bin/python3 and the packages python3-sqlalchemy (1.4) and "
                "python3-psycopg2" % (IMPORT_ERROR, sys.executable, sys.version.split()[0]))
        if not sqlalchemy.__version__.startswith("1.4."):
            print("warning: written for SQLAlchemy 1.4, running %s" % sqlalchemy.__version__,
                  file=sys.stderr)
        return dict(protocol=1, driver="sqlalchemy", pool="SQLAlchemy QueuePool over psycopg2",
                    version="SQLAlchemy %s, psycopg2 %s" % (sqlalchemy.__version__,
                                                            psycopg2.__version__.split()[0]),
                    settings=SETTINGS, metrics=METRICS, capabilities=CAPABILITIES,
                    driver_settings=DRIVER_SETTINGS)

    def check_types(self, s):
        for key, value in s.items():
            if key in DURATIONS or key in ("max", "min_idle"):
                if type(value) is not int or value < 0:
                    raise BadRequest("open: settings.%s must be a non-negative integer" % key)
            elif key in STRINGS and not isinstance(value, str):
                raise BadRequest("open: settings.%s must be a string" % key)
            elif key in ("validate_idle", "housekeeping"):
                if not (isinstance(value, str) or (type(value) is int and value >= 0)):
                    raise BadRequest("open: settings.%s must be a duration or a word" % key)

    @staticmethod
    def not_honoured(s):
        """Why QueuePool cannot honour these settings, or None."""
        for key, value in s.items():
            st = SETTINGS.get(key, unsupported("the driver does not know this key"))
            if st["status"] == "unsupported":
                return "%s=%s: %s" % (key, value, st["reason"])
        if s.get("max") == 0:
            return "max=0: QueuePool reads pool_size=0 as no limit"
        if "validate_idle" in s and s["validate_idle"] not in (0, "never"):
            return ("validate_idle=%s: pool_pre_ping pings at every checkout or never; it has "
                    "no idle threshold" % s["validate_idle"])
        ct = s.get("connect_timeout")
        if ct is not None and (ct < 2000 or ct % 1000):
            return ("connect_timeout=%d: libpq's connect_timeout (connect_args) is whole "
                    "seconds, at least 2" % ct)
        return None

    def op_open(self, req, reply):
        if self.engine is not None:
            raise BadRequest("open: the pool is already open")
        s = req.get("settings") or {}
        if not isinstance(s, dict):
            raise BadRequest("open: settings must be an object")
        self.check_types(s)
        ds = req.get("driver_settings") or {}
        for key in ds:
            if key not in DRIVER_SETTINGS:
                raise BadRequest("open: unknown driver setting %r" % key)
        ping = ds.get("pre_ping", DRIVER_SETTINGS["pre_ping"]["default"])
        if ping not in DRIVER_SETTINGS["pre_ping"]["values"]:
            raise BadRequest("open: driver_settings.pre_ping must be on or off, not %r" % (ping,))
        na = self.not_honoured(s)
        if na:
            return {"na": na}

        pre_ping = ping == "on"
        if "validate_idle" in s:
            pre_ping = s["validate_idle"] == 0
            print("validate_idle=%s: pool_pre_ping=%s (the driver setting pre_ping=%s does not "
                  "apply)" % (s["validate_idle"], pre_ping, ping), file=sys.stderr)
        if s.get("min_idle"):
            print("min_idle=%d ignored: QueuePool opens connections only on demand"
                  % s["min_idle"], file=sys.stderr)
        self.password = s.get("password", req.get("password") or "")
        url = URL.create("postgresql+psycopg2", username=req.get("user"), host=req.get("host"),
                         port=req.get("port"), database=s.get("dbname", req.get("dbname")))
        kw = dict(future=True, pool_pre_ping=pre_ping)
        if "max" in s:  # else QueuePool's defaults, pool_size=5 and max_overflow=10
            kw.update(pool_size=s["max"], max_overflow=0)
        if "acquire_timeout" in s:
            kw["pool_timeout"] = s["acquire_timeout"] / 1000
            self.acquire_timeout_ms = s["acquire_timeout"]
        if "max_lifetime" in s:
            kw["pool_recycle"] = s["max_lifetime"] / 1000
        connect_args = {}
        if "connect_timeout" in s:
            connect_args["connect_timeout"] = s["connect_timeout"] // 1000
        if "application_name" in s:
            connect_args["application_name"] = s["application_name"]
        if connect_args:
            kw["connect_args"] = connect_args
        print("create_engine(%s, %s)" % (url, ", ".join("%s=%r" % kv for kv in kw.items())),
              file=sys.stderr)
        engine = sqlalchemy.create_engine(url, **kw)

        def provide_password(dialect, conn_rec, cargs, cparams):  # for each new connection
            with self.lock:
                cparams["password"] = self.password

        event.listen(engine, "do_connect", provide_password)
        if "init_sql" in s:
            init_sql = s["init_sql"]

            def run_init_sql(dbapi_connection, connection_record):
                # The shape of the search_path example in SQLAlchemy's
                # PostgreSQL dialect docs: autocommit around one statement.
                autocommit = dbapi_connection.autocommit
                dbapi_connection.autocommit = True
                cursor = dbapi_connection.cursor()
                cursor.execute(init_sql)
                cursor.close()
                dbapi_connection.autocommit = autocommit

            event.listen(engine, "connect", run_init_sql)
        # engine.dispose() hands these to the pool it creates (Pool.recreate).
        pool = engine.pool
        event.listen(pool, "connect", self.on_connect)
        event.listen(pool, "checkin", self.on_checkin)
        event.listen(pool, "invalidate", self.on_invalidate)
        event.listen(pool, "soft_invalidate", self.on_soft_invalidate)
        event.listen(pool, "close", self.on_close)
        self.engine = engine
        return {}

    def op_acquire(self, req, reply):
        ms = req.get("timeout_ms")
        if ms is not None and ms != self.acquire_timeout_ms:
            configured = ("30 s (unset)" if self.acquire_timeout_ms is None
                          else "%d ms" % self.acquire_timeout_ms)
            raise BadRequest("acquire: engine.connect() takes no timeout (asked %d ms; "
                             "pool_timeout is %s)" % (ms, configured))
        with self.lock:
            self.in_connect += 1
        t0 = time.monotonic_ns()
        try:
            c = self.engine.connect()
            us = us_since(t0)
        except Exception as e:
            us = us_since(t0)
            res = dict(outcome=classify(e), message=msg(e), elapsed_us=us)
            if sqlstate(e):
                res["sqlstate"] = sqlstate(e)
            return res
        finally:
            with self.lock:
                self.in_connect -= 1
        with self.lock:
            self.count += 1
            name = "c%d" % self.count
            self.conns[name] = c
        try:
            self.handles[c.connection.dbapi_connection] = name
        except Exception as e:  # names in events only: never the pool's business
            print("%s: no handle for its events: %r" % (name, e), file=sys.stderr)
        return dict(outcome="ok", conn=name, elapsed_us=us)

    def op_release(self, req, reply):
        name, c = self.conn(req)
        try:  # a second close reaches SQLAlchemy too, as an application's would
            c.close()
        except Exception as e:
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        return dict(outcome="ok")

    def op_discard(self, req, reply):
        name, c = self.conn(req)
        try:
            c.invalidate()
            c.close()
        except Exception as e:
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        return dict(outcome="ok")

    @staticmethod
    def execute(c, sql, t0, timer):
        """Runs sql on Connection c; if the timer has answered `timeout`
        meanwhile, this late result is dropped by the Reply."""
        try:
            result = c.exec_driver_sql(sql)
            if result.returns_rows:
                result.fetchall()
            res = dict(outcome="ok")
        except Exception as e:
            res = dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
            if sqlstate(e):
                res["sqlstate"] = sqlstate(e)
        timer.cancel()
        return dict(res, elapsed_us=us_since(t0))

    def op_query(self, req, reply):
        name, c = self.conn(req)
        if not isinstance(req.get("sql"), str):
            raise BadRequest("query: sql must be a string")
        t0 = time.monotonic_ns()
        return self.execute(c, req["sql"], t0, reply.deadline(req, t0))

    def op_health(self, req, reply):
        # No readiness check in SQLAlchemy: SELECT 1 through the engine, from
        # checkout to close, under the deadline.
        t0 = time.monotonic_ns()
        timer = reply.deadline(req, t0)
        try:
            with self.engine.connect() as c:
                return self.execute(c, "SELECT 1", t0, timer)
        except Exception as e:
            timer.cancel()
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)),
                        elapsed_us=us_since(t0))

    def op_conn_info(self, req, reply):
        name, c = self.conn(req)
        none = dict(backend_pid=None, client_port=None, txstatus=None)
        if c.closed or c.invalidated:  # .connection would reconnect an invalidated one
            return none
        raw = c.connection.dbapi_connection
        if raw is None or raw.closed:
            return none
        try:  # on a duplicate of the socket: closing it keeps the connection's
            with socket.socket(fileno=os.dup(raw.fileno())) as sk:
                port = sk.getsockname()[1]  # IndexError: a Unix socket
        except (OSError, IndexError, psycopg2.Error):
            port = None
        return dict(backend_pid=raw.info.backend_pid or None, client_port=port,
                    txstatus=TXSTATUS[raw.info.transaction_status])

    def op_metric(self, req, reply):
        name = req.get("name")
        pool = self.engine.pool  # after dispose(), the new pool
        with self.lock:
            counters = dict(self.counters)
        values = {
            "waiting": lambda: self.in_connect,
            "idle": lambda: pool.checkedin(),
            "in_use": lambda: pool.checkedout(),
            "total": lambda: pool.size() + pool.overflow(),
            "size": lambda: pool.size(),
            "checkedin": lambda: pool.checkedin(),
            "checkedout": lambda: pool.checkedout(),
            "overflow": lambda: pool.overflow(),
            "created": lambda: counters["created"],
            "ejected": lambda: counters["ejected.invalidated"] + counters["ejected.recycled"],
            "ejected.invalidated": lambda: counters["ejected.invalidated"],
            "ejected.recycled": lambda: counters["ejected.recycled"],
        }
        if name not in values:
            raise BadRequest("metric: no metric %r" % (name,))
        return dict(value=int(values[name]()))

    def op_password(self, req, reply):
        if not isinstance(req.get("password"), str):
            raise BadRequest("password: password must be a string")
        with self.lock:  # the do_connect listener reads it for the next connect
            self.password = req["password"]
        return {}

    def op_close(self, req, reply):
        self.local.disposing = True
        try:
            self.engine.dispose()
        except Exception as e:
            return dict(outcome="error", message="%s: %s" % (type(e).__name__, msg(e)))
        finally:
            self.local.disposing = False
        return dict(outcome="ok")


def main():
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("sqlalchemy.pool").setLevel(logging.INFO)
    Driver().serve(sys.stdin)


if __name__ == "__main__":
    main()
