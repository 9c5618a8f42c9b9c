#!/usr/bin/python3
"""Deliberately broken drivers, for testing `pgfault driver-check`.

    /usr/bin/python3 tests/drivers/broken.py MODE

MODE is one of:
  silent   reads requests and never answers any of them
  garbage  answers hello, then writes a line that is not JSON for the next
           request
  exits    answers hello and open, then exits with status 3 on the first
           acquire
  stalls   answers hello and open, then never answers again (a driver
           that hangs mid-case)
  nanos    reports elapsed_us in nanoseconds (a unit mistake that would
           make every timing bound pass)
  serial   a correct driver that serves one request at a time on the
           reading thread: a request that blocks (a slow connect or query)
           holds back every reply after it

Each is the example driver (harness/drivers/example/driver.py) with one
behaviour overridden, so it otherwise speaks the protocol correctly.
"""
import importlib.util
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the example
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "..", "..", "harness", "drivers", "example", "driver.py")
spec = importlib.util.spec_from_file_location("example_driver", EXAMPLE)
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


class Silent(example.Driver):
    def run_request(self, req):
        pass


class Garbage(example.Driver):
    def run_request(self, req):
        if req.get("op") == "hello":
            return super().run_request(req)
        with self.out_lock:
            self.out.write("this is not JSON\n")
            self.out.flush()


class Exits(example.Driver):
    def run_request(self, req):
        if req.get("op") == "acquire":
            with self.out_lock:  # no half-written line from another thread
                self.out.flush()
                os._exit(3)
        super().run_request(req)


class Stalls(example.Driver):
    def run_request(self, req):
        if req.get("op") in ("hello", "open"):
            super().run_request(req)


class Nanos(example.Driver):
    def send(self, obj):
        if "elapsed_us" in obj:
            obj = dict(obj, elapsed_us=obj["elapsed_us"] * 1000)
        super().send(obj)


class Serial(example.Driver):
    def spawn(self, fn, *args):
        fn(*args)  # on the reading thread: nothing else is read meanwhile


MODES = {"silent": Silent, "garbage": Garbage, "exits": Exits, "stalls": Stalls,
         "nanos": Nanos, "serial": Serial}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in MODES:
        print("usage: broken.py %s" % "|".join(MODES), file=sys.stderr)
        sys.exit(2)
    MODES[sys.argv[1]]().serve(sys.stdin)
