#!/usr/bin/python3
"""pgfault example driver: a small teaching pool over psycopg2 connections.

A complete driver for docs/driver-protocol.md, to copy. Run it with Debian's
Python: pgfault driver-check exec:'/usr/bin/python3 harness/drivers/example/driver.py'

To adapt it to another pool, delete TeachingPool, keep the plumbing (Reply,
Driver.send, event, serve, run_request) and rewrite the rest: SETTINGS (what
each scenario `pool` key becomes, or why not), op_open (reply `na`, never
clamp), classify (the pool's errors -> acquire outcomes), the op_* methods
(each calls the pool once, timed around that call), CAPABILITIES and METRICS
(only what the pool really has). Stay thin: never retry, never repair what
the pool did, and let what the pool throws outside a request crash the
process (that is a finding). Importing this module has no side effects.
"""
import collections
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time

import psycopg2
import psycopg2.extensions


def msg(e):
    return str(e).strip()


# ---- the pool: TeachingPool -------------------------------------------------------
# A TEACHING POOL, NOT A PRODUCTION ONE: the moving parts a driver talks to (a
# size limit, a FIFO queue with a deadline, a millisecond connect deadline,
# rollback on release, a password read at each connect) in as few lines as
# will do. It is naive on purpose: it never checks an idle connection before
# handing it out, never retries a failed connect, has no back-off and no
# housekeeping. The catalogue finds exactly that: once the server drops idle
# sessions (idle-drop, failover) it hands out dead connections; a refused or
# silent connect fails the acquire at once instead of being retried until its
# deadline; a wrong password is tried again at every acquire. Those scenarios
# FAIL, and that is their finding: do not add validation or retries to pass.
class PoolError(Exception):  # misuse: a second release, a second close
    pass


class PoolTimeout(PoolError):  # no connection by the acquire deadline
    pass


class PoolClosed(PoolError):  # the pool is closed
    pass


class ConnectFailed(PoolError):  # connect_timeout ran out, or init_sql failed
    pass


class TeachingPool:
    """At most `max_size` connections. Idle ones are handed out LIFO (the one
    released last first); an acquire that finds none and no room to connect
    waits, FIFO, on one Condition. Connects, rollbacks and closes run outside
    the lock; on_event(name, message, conn) hears what the pool does."""

    def __init__(self, max_size, min_idle=0, acquire_timeout_ms=None, connect_timeout_ms=None,
                 init_sql=None, on_event=lambda name, message, conn=None: None, **kwargs):
        self.max, self.min_idle, self.init_sql, self.on_event = max_size, min_idle, init_sql, on_event
        self.acquire_ms, self.connect_ms = acquire_timeout_ms, connect_timeout_ms
        self.password, self.kwargs = kwargs.pop("password", None), kwargs
        self.cond, self.closed = threading.Condition(), False
        self.idle, self.queue = [], collections.deque()
        self.out = {}  # checked out: connection -> True once its release has begun
        self.opening = self.filling = 0  # connects in progress; of them, for min_idle
        self.counts = dict.fromkeys(("created", "ejected", "connect_attempts",
                                     "connect_failures", "acquire_timeouts"), 0)
        self.top_up()

    def stats(self):
        with self.cond:
            return dict(self.counts, idle=len(self.idle), in_use=len(self.out),
                        total=len(self.idle) + len(self.out), waiting=len(self.queue))

    def set_password(self, password):  # what a password callback returns from now on
        with self.cond:
            self.password = password

    def acquire(self, timeout_ms=None):
        ms = self.acquire_ms if timeout_ms is None else timeout_ms
        deadline = None if ms is None else time.monotonic() + ms / 1000
        me, conn = object(), None
        with self.cond:  # an acquire served at once never shows in `waiting`
            self.queue.append(me)
            try:
                while True:
                    if self.closed:
                        raise PoolClosed("the pool is closed")
                    if self.queue[0] is me and self.idle:
                        conn = self.idle.pop()
                        self.out[conn] = False
                        break
                    if self.queue[0] is me and (len(self.idle) + len(self.out)
                                                + self.opening < self.max):
                        self.opening += 1  # room: connect, outside the lock
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        self.counts["acquire_timeouts"] += 1
                        raise PoolTimeout("no connection within %d ms" % ms)
                    self.cond.wait(left)
            finally:
                self.queue.remove(me)
                self.cond.notify_all()  # the next in line may go now
        if conn is None:
            conn = self.connect(deadline)
        self.top_up()
        return conn

    def connect(self, deadline, for_idle=False):
        """Opens the connection the caller counted in `opening` (and in
        `filling`), waiting at most connect_timeout and what is left until
        `deadline`. psycopg2.connect cannot be interrupted, so it runs on a
        thread of its own; a connect completing after that is closed then."""
        with self.cond:
            kw = dict(self.kwargs, password=self.password)
            self.counts["connect_attempts"] += 1
        wait = None if self.connect_ms is None else self.connect_ms / 1000
        if wait is not None:  # libpq's own, longer (whole seconds, at least 2): it
            kw["connect_timeout"] = max(2, -(-self.connect_ms // 1000))  # ends abandoned ones
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        acquire_bound = left is not None and (wait is None or left < wait)
        fut, conn, error = concurrent.futures.Future(), None, None
        threading.Thread(target=self.attempt, args=(kw, fut), daemon=True).start()
        try:
            conn = fut.result(left if acquire_bound else wait)
        except concurrent.futures.TimeoutError:
            fut.add_done_callback(self.close_late)  # runs at once if already done
            error = (PoolTimeout("no connection within the acquire deadline (connecting)")
                     if acquire_bound else
                     ConnectFailed("no answer from the server within %d ms" % self.connect_ms))
        except Exception as e:
            error = e
        with self.cond:
            self.opening, self.filling = self.opening - 1, self.filling - for_idle
            if conn is not None and self.closed:
                error = PoolClosed("the pool was closed while connecting")
            elif conn is not None:
                self.counts["created"] += 1
                if for_idle:
                    self.idle.append(conn)
                else:
                    self.out[conn] = False
            self.counts["connect_failures"] += error is not None and not self.closed
            self.counts["acquire_timeouts"] += isinstance(error, PoolTimeout)
            self.cond.notify_all()  # a connection, or a free slot, for a waiter
        if error is not None:
            if conn is not None:
                conn.close()
                self.on_event("close", "connected after the pool was closed")
            raise error
        return conn

    def attempt(self, kw, fut):  # on its own thread: the connect, then init_sql
        conn = None
        try:
            conn = psycopg2.connect(**kw)
            self.on_event("connect", "backend pid %d" % conn.info.backend_pid)
            if self.init_sql:
                with conn.cursor() as cur:
                    cur.execute(self.init_sql)
                conn.commit()
            fut.set_result(conn)
        except Exception as e:
            if conn is not None:
                conn.close()
                self.on_event("close", "init_sql failed")
                e = ConnectFailed("init_sql failed: %s" % msg(e))
            fut.set_exception(e)

    def close_late(self, fut):
        if fut.exception() is None:
            fut.result().close()
            self.on_event("close", "connected after the pool stopped waiting")

    def top_up(self):
        """Starts background connects until min_idle connections are idle or
        on their way. A failed one is not retried: the next acquire or
        release starts another."""
        with self.cond:
            n = min(self.min_idle - len(self.idle) - self.filling,
                    self.max - len(self.idle) - len(self.out) - self.opening)
            n = 0 if self.closed else max(n, 0)
            self.opening, self.filling = self.opening + n, self.filling + n
        for _ in range(n):
            threading.Thread(target=self.fill, daemon=True).start()

    def fill(self):
        try:
            self.connect(None, for_idle=True)
        except PoolClosed:
            pass
        except Exception as e:
            self.on_event("error", "min_idle connect: %s" % msg(e))

    def release(self, conn, discard=False):
        with self.cond:
            if self.out.get(conn) is not False:
                raise PoolError("this connection is not checked out (released twice?)")
            self.out[conn] = True
        why = "discarded" if discard else "broken" if conn.closed else None  # psycopg2 saw it
        try:  # no deadline: a rollback over a dead network blocks
            if not why and conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except Exception as e:
            why = "rollback failed"
            self.on_event("error", "rollback on release: %s" % msg(e), conn)
        with self.cond:
            del self.out[conn]
            self.counts["ejected"] += why is not None
            why = why or ("the pool is closed" if self.closed else None)
            if not why:
                self.idle.append(conn)
            self.cond.notify_all()
        if why:
            conn.close()
            self.on_event("close", "released connection closed: %s" % why, conn)
        self.top_up()

    def close(self):
        with self.cond:
            if self.closed:
                raise PoolError("the pool is already closed")
            self.closed, idle, self.idle = True, self.idle, []
            self.cond.notify_all()  # waiters wake up to PoolClosed
        for conn in idle:
            conn.close()
            self.on_event("close", "the pool is closed", conn)


# ---- the driver ------------------------------------------------------------------
def mapped(option):
    return {"status": "mapped", "option": option}


def unsupported(reason):
    return {"status": "unsupported", "reason": reason}


NO = "TeachingPool has no "
SETTINGS = {
    "max": mapped("max_size"),
    "min_idle": mapped("min_idle (topped up at open and after each acquire and release)"),
    "acquire_timeout": mapped("acquire_timeout_ms"),
    "connect_timeout": mapped("connect_timeout_ms"),
    "idle_timeout": unsupported(NO + "idle timeout: idle connections stay until handed out"),
    "max_lifetime": unsupported(NO + "connection lifetime"),
    "validate_idle": mapped("none (never validates)"),  # `na` at open for anything but never
    "validation_timeout": unsupported(NO + "validation, so no deadline for it"),
    "auth_retry_after": unsupported(NO + "auth back-off: each acquire that needs a "
                                    "connection tries the server"),
    "backoff_initial": unsupported(NO + "reconnect back-off: it never retries a connect"),
    "backoff_max": unsupported(NO + "reconnect back-off: it never retries a connect"),
    "release_timeout": unsupported(NO + "deadline on release (its rollback can block)"),
    "housekeeping": {"status": "ignored", "reason": NO + "maintenance thread"},
    "init_sql": mapped("init_sql (a failure closes the connection: outcome connect)"),
    "application_name": mapped("application_name (connection keyword)"),
    "dbname": mapped("dbname (connection keyword)"),
    "password": mapped("password (read at each new connection)"),
}
CAPABILITIES = ["health", "txstatus", "backend_pid", "client_port", "password",
                "acquire_timeout"]
METRICS = ["idle", "in_use", "total", "waiting", "created", "ejected", "connect_attempts",
           "connect_failures", "acquire_timeouts"]
# indexed by conn.info.transaction_status (libpq's PQtransactionStatus)
TXSTATUS = ["idle", "active", "intrans", "inerror", "unknown"]
INTEGERS = ("max", "min_idle", "acquire_timeout", "connect_timeout")


class BadRequest(Exception):
    """The request itself is wrong: an `"ok": false` reply."""


def classify(e):
    """The acquire outcome for what the pool raised. psycopg2 gives errors
    raised while connecting no pgcode, so those go by libpq's message."""
    text, code = str(e), getattr(e, "pgcode", None) or ""
    for cls, outcome in ((PoolTimeout, "timeout"), (PoolClosed, "closed"),
                         (ConnectFailed, "connect"), (PoolError, "other")):
        if isinstance(e, cls):
            return outcome
    if code in ("28P01", "28000") or any(s in text for s in (
            "password authentication failed", "no pg_hba.conf entry",
            "authentication failed", "no password supplied", 'role "')):
        return "auth"
    if code == "3D000" or ("database" in text and "does not exist" in text):
        return "config"
    if code[:2] in ("08", "53", "57") or isinstance(e, psycopg2.OperationalError):
        return "connect"  # refused, reset, server closed, too many clients...
    return "other"


def us_since(t0):
    return (time.monotonic_ns() - t0) // 1000


class Reply:
    """Answers one request exactly once, whoever comes first: the request
    thread or its deadline timer. A later answer goes to stderr only."""

    def __init__(self, driver, req_id):
        self.driver, self.id, self.lock, self.sent = driver, req_id, threading.Lock(), False

    def send(self, **fields):
        with self.lock:
            sent, self.sent = self.sent, True
        if sent:
            print("request %d: late answer dropped: %r" % (self.id, fields), file=sys.stderr)
        else:
            self.driver.send(dict(id=self.id, **fields))

    def deadline(self, req, t0):
        """Answers `timeout` at t0 + the request's timeout_ms (default 10 s)
        unless answered before."""
        ms = 10000 if req.get("timeout_ms") is None else req["timeout_ms"]
        t = threading.Timer(ms / 1000, lambda: self.send(
            ok=True, outcome="timeout", message="no answer within %d ms" % ms,
            elapsed_us=us_since(t0)))
        t.daemon = True
        t.start()
        return t


class Driver:
    def __init__(self, out=sys.stdout):
        self.out, self.out_lock = out, threading.Lock()
        self.pool = None
        self.conns, self.names = {}, {}  # handle -> connection, connection -> last handle
        self.lock = threading.Lock()

    # ---- plumbing ----
    def send(self, obj):
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self.out_lock:  # whole lines, never interleaved
            self.out.write(line)
            self.out.flush()

    def event(self, name, message=None, conn=None):
        ev = {"event": name, "message": message, "conn": conn}
        self.send({k: v for k, v in ev.items() if v is not None})

    def serve(self, lines):
        """Reads requests until stdin closes, each served by its own thread."""
        for line in lines:
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or type(req.get("id")) is not int:
                    raise ValueError("no integer id")
            except ValueError as e:
                print("bad request ignored: %r: %s" % (line, e), file=sys.stderr)
                continue
            self.spawn(self.run_request, req)

    def spawn(self, fn, *args):
        threading.Thread(target=fn, args=args, daemon=True).start()

    def run_request(self, req):
        reply, op = Reply(self, req["id"]), req.get("op")
        try:
            fn = getattr(self, "op_%s" % op, None) if isinstance(op, str) else None
            if fn is None:
                raise BadRequest("unknown op %r" % (op,))
            if op not in ("hello", "open") and self.pool is None:
                raise BadRequest("%s: no pool (send open first)" % op)
            ms = req.get("timeout_ms")
            if ms is not None and (type(ms) is not int or ms < 0):
                raise BadRequest("%s: timeout_ms must be a non-negative integer" % op)
            reply.send(ok=True, **fn(req, reply))
        except BadRequest as e:
            reply.send(ok=False, error=str(e))
        except Exception as e:  # a driver bug, not the pool's doing
            reply.send(ok=False, error="%s: driver error: %r" % (op, e))

    def conn(self, req):
        if req.get("conn") not in self.conns:
            raise BadRequest("%s: unknown conn %r" % (req["op"], req.get("conn")))
        return req["conn"], self.conns[req["conn"]]

    def pool_event(self, name, message, conn=None):  # the pool's on_event
        self.event(name, message, self.names.get(conn))

    def pool_error(self, e, conn=None):
        self.event("error", "%s: %s" % (type(e).__name__, msg(e)), conn)

    # ---- operations: each returns its reply's fields ----
    def op_hello(self, req, reply):
        return dict(protocol=1, driver="example", pool="TeachingPool (example) over psycopg2",
                    version=psycopg2.__version__.split()[0], settings=SETTINGS,
                    metrics=METRICS, capabilities=CAPABILITIES)

    def op_open(self, req, reply):
        if self.pool is not None:
            raise BadRequest("open: the pool is already open")
        s = req.get("settings") or {}
        for key, value in s.items():
            st = SETTINGS.get(key, unsupported("the driver does not know this key"))
            if st["status"] == "unsupported" or (key == "validate_idle" and value != "never"):
                return {"na": "%s=%s: %s" % (key, value, st.get("reason", NO + "validation"))}
            if key in INTEGERS and (type(value) is not int or value < 0):
                raise BadRequest("open: settings.%s must be a non-negative integer" % key)
            if key == "init_sql" and not isinstance(value, str):
                raise BadRequest("open: settings.init_sql must be a string")
        if "max" not in s:
            return {"na": "max unset: TeachingPool has no default size"}
        kw = {k: req[k] for k in ("host", "port", "user", "dbname", "password")
              if req.get(k) is not None}
        kw.update({k: s[k] for k in ("dbname", "application_name", "password") if k in s})
        self.pool = TeachingPool(s["max"], s.get("min_idle", 0), s.get("acquire_timeout"),
                                 s.get("connect_timeout"), s.get("init_sql"),
                                 self.pool_event, **kw)  # opens min_idle in the background
        return {}

    def op_acquire(self, req, reply):
        t0 = time.monotonic_ns()
        try:
            c = self.pool.acquire(req.get("timeout_ms"))
        except Exception as e:
            us = us_since(t0)
            self.pool_error(e)
            return dict(outcome=classify(e), message=msg(e), elapsed_us=us)
        us = us_since(t0)
        with self.lock:
            name = "c%d" % (len(self.conns) + 1)
            self.conns[name], self.names[c] = c, name
        return dict(outcome="ok", conn=name, elapsed_us=us)

    def put(self, req, discard):
        name, c = self.conn(req)
        try:  # a second release goes to the pool too, as an application's would
            self.pool.release(c, discard=discard)
        except Exception as e:
            self.pool_error(e, name)
            return dict(outcome="error", message=msg(e))
        return dict(outcome="ok")

    def op_release(self, req, reply):
        return self.put(req, discard=False)

    def op_discard(self, req, reply):
        return self.put(req, discard=True)

    def run_sql(self, c, sql, t0, timer):
        """Runs sql on c. If the server has not answered when `timer` fires,
        the timer answers `timeout` and this late result is dropped.
        psycopg2's default mode is kept: it opens a transaction before the
        first statement, the driver never commits, and whatever a released
        connection still has open is the pool's business."""
        try:
            with c.cursor() as cur:
                cur.execute(sql)
            res = dict(outcome="ok")
        except Exception as e:
            res = dict(outcome="error", message=msg(e))
            if getattr(e, "pgcode", None):
                res["sqlstate"] = e.pgcode
        timer.cancel()
        return dict(res, elapsed_us=us_since(t0))

    def op_query(self, req, reply):
        name, c = self.conn(req)
        if not isinstance(req.get("sql"), str):
            raise BadRequest("query: sql must be a string")
        t0 = time.monotonic_ns()
        return self.run_sql(c, req["sql"], t0, reply.deadline(req, t0))

    def op_health(self, req, reply):
        # The pool has no readiness check: SELECT 1 through it, acquire to
        # release, all under the deadline.
        t0 = time.monotonic_ns()
        timer = reply.deadline(req, t0)
        try:
            c = self.pool.acquire(req.get("timeout_ms"))
            res = self.run_sql(c, "SELECT 1", t0, timer)
            self.pool.release(c)
        except Exception as e:
            timer.cancel()
            self.pool_error(e)
            return dict(outcome="error", message=msg(e), elapsed_us=us_since(t0))
        return res

    def op_conn_info(self, req, reply):
        name, c = self.conn(req)
        if c.closed:
            return dict(backend_pid=None, client_port=None, txstatus=None)
        try:  # on a duplicate of the socket: closing it keeps the connection's
            with socket.socket(fileno=os.dup(c.fileno())) as sk:
                port = sk.getsockname()[1]  # IndexError: a Unix socket
        except (OSError, IndexError):
            port = None
        return dict(backend_pid=c.info.backend_pid or None, client_port=port,
                    txstatus=TXSTATUS[c.info.transaction_status])

    def op_metric(self, req, reply):
        values = self.pool.stats()
        if req.get("name") not in values:
            raise BadRequest("metric: no metric %r" % (req.get("name"),))
        return dict(value=values[req["name"]])

    def op_password(self, req, reply):
        if not isinstance(req.get("password"), str):
            raise BadRequest("password: password must be a string")
        self.pool.set_password(req["password"])  # in effect for the next connect
        return {}

    def op_close(self, req, reply):
        try:  # a second close raises PoolError: reported, not swallowed
            self.pool.close()
        except Exception as e:
            self.pool_error(e)
            return dict(outcome="error", message=msg(e))
        return dict(outcome="ok")


if __name__ == "__main__":
    Driver().serve(sys.stdin)
