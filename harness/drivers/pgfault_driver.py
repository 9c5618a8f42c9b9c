"""The driver protocol's plumbing, shared by pgfault's Python drivers.

docs/driver-protocol.md over stdin/stdout: JSON lines in, each request served
on a thread of its own (pool calls block), replies in any order, each sent
exactly once -- by the request's thread or by its deadline timer. A driver
subclasses ProtocolDriver, adds its op_<name> methods (each returns the
reply's fields, or raises BadRequest) and, where some ops need an open pool,
overrides precheck. The example driver (example/driver.py) carries its own
copy of this plumbing so that it stays a single file to copy.
"""
import json
import sys
import threading
import time


def mapped(option):
    return {"status": "mapped", "option": option}


def ignored(reason):
    return {"status": "ignored", "reason": reason}


def unsupported(reason):
    return {"status": "unsupported", "reason": reason}


class BadRequest(Exception):
    """The request itself is wrong: an `"ok": false` reply."""


def us_since(t0):
    """Microseconds since t0 (time.monotonic_ns())."""
    return (time.monotonic_ns() - t0) // 1000


class Reply:
    """Answers one request exactly once, whoever comes first: the request's
    thread or its deadline timer. A later answer goes to stderr only."""

    def __init__(self, driver, req_id):
        self.driver, self.id, self.lock, self.sent = driver, req_id, threading.Lock(), False

    def send(self, **fields):
        with self.lock:
            late, self.sent = self.sent, True
        if late:
            print("request %d: late answer dropped: %r" % (self.id, fields), file=sys.stderr)
        else:
            self.driver.send(dict(id=self.id, **fields))

    def deadline(self, req, t0):
        """A timer answering `timeout` at t0 + the request's timeout_ms (10 s
        when null), unless answered before."""
        ms = 10000 if req.get("timeout_ms") is None else req["timeout_ms"]
        timer = threading.Timer(ms / 1000, lambda: self.send(
            ok=True, outcome="timeout", message="no answer within %d ms" % ms,
            elapsed_us=us_since(t0)))
        timer.daemon = True
        timer.start()
        return timer


class ProtocolDriver:
    def __init__(self, out=sys.stdout):
        self.out, self.out_lock = out, threading.Lock()

    def send(self, obj):
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self.out_lock:  # whole lines, never interleaved
            self.out.write(line)
            self.out.flush()

    def event(self, name, message=None, conn=None):
        ev = {"event": name, "message": message, "conn": conn}
        self.send({k: v for k, v in ev.items() if v is not None})

    def serve(self, lines):
        """Reads requests until stdin closes; each runs on a thread of its
        own, since the pool's calls block."""
        for line in lines:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if not isinstance(req, dict) or type(req.get("id")) is not int:
                    raise ValueError("no integer id")
            except ValueError as e:
                print("bad request ignored: %r: %s" % (line, e), file=sys.stderr)
                continue
            threading.Thread(target=self.run_request, args=(req,), daemon=True).start()

    def precheck(self, op):
        """Raises BadRequest when op cannot run now (say, no pool yet)."""

    def run_request(self, req):
        reply, op = Reply(self, req["id"]), req.get("op")
        try:
            fn = getattr(self, "op_%s" % op, None) if isinstance(op, str) else None
            if fn is None:
                raise BadRequest("unknown op %r" % (op,))
            self.precheck(op)
            ms = req.get("timeout_ms")
            if ms is not None and (type(ms) is not int or ms < 0):
                raise BadRequest("%s: timeout_ms must be a non-negative integer" % op)
            reply.send(ok=True, **fn(req, reply))
        except BadRequest as e:
            reply.send(ok=False, error=str(e))
        except Exception as e:  # a driver bug, not the pool's doing
            reply.send(ok=False, error="%s: driver error: %r" % (op, e))
