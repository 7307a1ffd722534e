"""Shared test fixtures: C targets compiled at test time, and child processes.

Code that patches runs in a child process (`run_child`): a crash there is a
failed test that names the signal, never a dead test run.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_library(path, sources, flags=(), per_source_flags=None):
    """Compile C sources (paths relative to tests/) into the shared library
    ``path`` with the system ``cc``; ``flags`` go to every step, as to one
    ``cc`` call, and each translation unit gets ``-fPIC`` unless
    ``per_source_flags`` gives its own flags.  Returns ``path``."""
    per_source_flags = per_source_flags or {}
    objects = []
    for source in sources:
        obj = f"{path}.{os.path.basename(source)}.o"
        extra = per_source_flags.get(source, ["-fPIC"])
        subprocess.run(["cc", "-O2", "-c", os.path.join(HERE, source), "-o", obj, *flags, *extra],
                       check=True, capture_output=True)
        objects.append(obj)
    subprocess.run(["cc", "-shared", "-o", str(path), *objects, *flags], check=True,
                   capture_output=True)
    return str(path)


def symbol_sizes(path):
    """``{symbol: size}`` of the symbols ``path`` defines (``nm -S``)."""
    sizes = {}
    for line in subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 4:
            sizes[parts[3]] = int(parts[1], 16)
    return sizes


def run_child(code, timeout=120, env=None, **params):
    """Run ``code`` in a fresh Python; ``params`` are visible to it as the
    dict ``P``.  The code reports with ``report(obj)``; returns the list of
    reported objects.  A crash or non-zero exit fails the calling test.

    Like a real service, the child has a thread that blocks every signal
    before the test code runs: faulthandler's watchdog (never cancelled
    here; a test that needs the signal stop to work cancels it)."""
    prelude = textwrap.dedent("""
        import faulthandler, json, sys
        def _watchdog_blocks_signals():
            import os, time
            faulthandler.dump_traceback_later(3600, exit=False)
            for _ in range(2000):
                for tid in os.listdir("/proc/self/task"):
                    try:
                        with open(f"/proc/self/task/{tid}/status") as status:
                            if int(tid) != os.getpid() and any(
                                    line.startswith("SigBlk:") and int(line.split()[1], 16)
                                    for line in status):
                                return
                    except FileNotFoundError:
                        pass
                time.sleep(0.0005)
        _watchdog_blocks_signals()
        P = json.loads(sys.argv[1])
        def report(obj):
            print("REPORT " + json.dumps(obj), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), json.dumps(params)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:      # a real-time signal has no name
            name = f"signal {-proc.returncode}"
        pytest.fail(f"child died of {name}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    if proc.returncode:
        pytest.fail(f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("REPORT ")]


@pytest.fixture(scope="session")
def child():
    return run_child


# The child's side of the tests that count how batches were written
# (test_unstopped.py, test_hops.py): a library built from targets/stopper.c
# and shapes.c at P["lib"], and the stops and unstopped batches an action took.
STOPS_PRELUDE = """
import ctypes, os, time
import hotpatch
from hotpatch import Patch, Object, Func, sites
lib = ctypes.CDLL(P["lib"])
for _name in ["st_callers_stop", "st_callers_calls"]:
    getattr(lib, _name).restype = ctypes.c_long
OBJ = os.path.basename(P["lib"])
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def call(name, x=7):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(x)
def counts():
    s = hotpatch.tree()["core"]["stops"]
    return s["count"], s["unstopped"]
def took(action):
    # (stops, batches written without one) that `action` took
    before = counts()
    action()
    after = counts()
    return after[0] - before[0], after[1] - before[1]
"""

# The child's side of the tests on libz, a library nobody here wrote (after
# STOPS_PRELUDE): crc32 and adler32, one signature; crc32's first bytes
# before any patch, and what each returns for "abc".
LIBZ = """
libz = ctypes.CDLL("libz.so.1")
libz.crc32.restype = libz.adler32.restype = ctypes.c_ulong
crc, adler = (ctypes.cast(libz.crc32, ctypes.c_void_p).value,
              ctypes.cast(libz.adler32, ctypes.c_void_p).value)
before = sites.read_memory(crc, 16)
want = {"crc": libz.crc32(0, b"abc", 3), "adler": libz.adler32(0, b"abc", 3)}
"""

# The child's side of a test of a process of one thread: the watchdog
# cancelled and gone (the calling thread is the only one), and the batches
# written alone so far.
ALONE = """
import faulthandler, threading
faulthandler.cancel_dump_traceback_later()
deadline = time.monotonic() + 5
while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.01)
def alone():
    return hotpatch.tree()["core"]["stops"]["alone"]
"""

# Native callers that block every signal call P["name"] in a loop while it
# is patched, stacked and restored P["cycles"] times (P["results"]: the old
# result and the replacements', for x = 7); sleepers in read, poll, epoll,
# nanosleep and sem_timedwait meanwhile.  Reports what check_callers_and_sleepers reads.
CALLERS_AND_SLEEPERS = """
name = P["name"]
p1 = hotpatch.register(Patch("p1", [Object(OBJ, [Func(name, addr("replacement"))])]), enable=False)
p2 = hotpatch.register(Patch("p2", [Object(OBJ, [Func(name, addr("replacement2"))])]), enable=False)
before = sites.read_memory(addr(name), 16)
lib.st_callers_start(ctypes.c_void_p(addr(name)), 2, (ctypes.c_long * 3)(*P["results"]), 3, 1)
lib.st_sleepers_start()
time.sleep(0.02)
stops0, unstopped0 = counts()
for i in range(P["cycles"]):
    hotpatch.enable(p1)
    if i % 3 == 0:
        hotpatch.enable(p2)
        hotpatch.disable(p2)
    hotpatch.disable(p1)
stops1, unstopped1 = counts()
total, a_bad = ctypes.c_long(), ctypes.c_long()
bad = lib.st_callers_stop(ctypes.byref(total), ctypes.byref(a_bad))
out = (ctypes.c_long * 25)()
lib.st_sleepers_finish(out)
report({"bad": bad, "a_bad": a_bad.value, "calls": total.value, "stops": stops1 - stops0,
        "unstopped": unstopped1 - unstopped0,
        "sleepers": [list(out[k * 5:k * 5 + 4]) for k in range(5)],
        "identical": sites.read_memory(addr(name), 16) == before, "final": call(name)})
"""


def check_callers_and_sleepers(r, cycles, old):
    """Only old or new results, not one stop, every write one unstopped
    batch, the entry's bytes back; the sleepers unaware (no EINTR, no short
    sleep)."""
    assert r["bad"] == 0, r
    assert r["calls"] > 10_000, r
    assert r["stops"] == 0, r
    assert r["unstopped"] == cycles * 2 + (cycles + 2) // 3 * 2, r
    assert r["identical"] and r["final"] == old, r
    read, poll, epoll, nano, sem = r["sleepers"]
    for got, byte in ((read, "r"), (poll, "p"), (epoll, "e")):
        assert got[0] == 1 and got[1] == 0 and got[2] == ord(byte), r
    assert nano[0] == 0 and nano[3] >= 1_500_000_000, r
    assert sem[0] == -1 and sem[1] == 110 and sem[3] >= 1_900_000_000, r    # ETIMEDOUT
