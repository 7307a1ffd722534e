"""The write path calls nothing a patch may have replaced: while other
threads are stopped (one of them may hold the GIL, or a libc lock), the
patcher uses raw system calls only.  Every test patches inside a child."""
import os

import pytest

from conftest import compile_library


@pytest.fixture(scope="session")
def lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("writepath"))
    return compile_library(os.path.join(out, "libwp.so"), ["targets/shapes.c", "targets/stress.c"],
                           flags=["-pthread"])


def test_python_replacements_of_libc_calls_the_patcher_used(child, lib):
    # getpid, syscall (gettid) and pwrite64 (/proc/self/mem) were what the
    # stop path called; replaced by Python code that needs the GIL while a
    # stopped Python thread holds it, every patch deadlocked.
    r = child("""
import ctypes, os, threading, time
import hotpatch
from hotpatch import Patch, Object, Func
lib = ctypes.CDLL(P["lib"])
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
running = True
def spin():                    # holds the GIL most of the time
    n = 0
    while running:
        n += 1
# Started first: a Python thread starting while syscall() is a Python
# function would recurse into it for its own thread id.
spinners = [threading.Thread(target=spin) for _ in range(2)]
for t in spinners:
    t.start()
PID = os.getpid()
calls = {"getpid": 0, "syscall": 0, "pwrite64": 0}
orig = {}
def spy_getpid():
    calls["getpid"] += 1
    return PID
def spy_syscall(nr, a, b, c, d, e, f):
    calls["syscall"] += 1
    return orig["syscall"](nr, a, b, c, d, e, f)
def spy_pwrite(fd, buf, n, off):
    calls["pwrite64"] += 1
    return orig["pwrite64"](fd, buf, n, off)
funcs = [Func("getpid", spy_getpid, signature="int(void)"),
         Func("syscall", spy_syscall, signature="long(long, long, long, long, long, long, long)"),
         Func("pwrite64", spy_pwrite, signature="long(int, void *, unsigned long, long)")]
spies = Patch("libc-spies", [Object("libc.so.6", funcs)])
hotpatch.register(spies)
L = ctypes.c_long
orig["syscall"] = ctypes.CFUNCTYPE(L, L, L, L, L, L, L, L)(funcs[1].original)
orig["pwrite64"] = ctypes.CFUNCTYPE(L, ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, L)(funcs[2].original)

lib.calls_other.restype = ctypes.c_long
ok = (ctypes.c_long * 2)(lib.calls_other(ctypes.c_long(7)), 1007)
lib.stress_start(ctypes.c_void_p(addr("calls_other")), 2, ok, 2)
fix = Patch("fix", [Object(os.path.basename(P["lib"]), [Func("calls_other", addr("replacement"))])])
hotpatch.register(fix, enable=False)
before = dict(calls)
t0 = time.time()
for _ in range(100):
    fix.enable()
    fix.disable()
elapsed = time.time() - t0
during = {k: calls[k] - before[k] for k in calls}
running = False
for t in spinners:
    t.join()
total, bad = ctypes.c_long(), ctypes.c_long()
lib.stress_stop.restype = ctypes.c_long
nbad = lib.stress_stop(ctypes.byref(total), ctypes.byref(bad))
spies.disable()
report({"elapsed": elapsed, "during": during, "bad": nbad, "calls": total.value,
        "stopper": hotpatch.tree()["core"]["stopper"]["method"]})
""", timeout=120, lib=lib)[0]
    assert r["bad"] == 0 and r["calls"] > 0, r
    assert r["elapsed"] < 60, r
    assert r["during"] == {"getpid": 0, "syscall": 0, "pwrite64": 0}, r
    assert r["stopper"] == "ptrace"


def test_kept_descriptors_closed_and_reused_by_the_service(child, lib):
    # The core keeps /proc/self/mem and /proc/self/maps open across batches.
    # A service may close any descriptor and reuse its number (a file it
    # writes): the next patch must notice, open its own again, and never
    # write code bytes into the service's file.
    r = child("""
import ctypes, os, tempfile
import hotpatch
from hotpatch import Patch, Object, Func
lib = ctypes.CDLL(P["lib"])
OBJ = os.path.basename(P["lib"])
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def call(name):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(5)
def kept():
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(("/mem", "/maps")) and target.startswith("/proc/"):
            found[int(fd)] = target
    return found
first = hotpatch.register(Patch("first", [Object(OBJ, [Func("plain_add", addr("replacement"))])]))
fds = kept()
victims = []
for fd in fds:          # the service closes them, and its own files take their numbers
    os.close(fd)
    # on tmpfs where there is one: a write at a code address
    # (past 2**46) succeeds there, where ext4 refuses it
    f = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.dup2(f.fileno(), fd)
    victims.append((fd, f))
second = hotpatch.register(Patch("second", [Object(OBJ, [Func("rip_load", addr("replacement")),
                                                         Func("calls_other", addr("replacement2"))])]))
out = {"kept": sorted(fds.values()), "patched": [call("plain_add"), call("rip_load"), call("calls_other")]}
hotpatch.disable(second)
hotpatch.disable(first)
out["restored"] = [call("plain_add"), call("calls_other")]
out["files"] = [os.fstat(fd).st_size for fd, _ in victims]
out["reopened"] = sorted(set(kept().values()))
report(out)
""", lib=lib)[0]
    assert any(k.endswith("/mem") for k in r["kept"]), r
    assert r["patched"] == [1005, 1005, 2005] and r["restored"] == [6, 12], r
    assert r["files"] and all(size == 0 for size in r["files"]), r
    assert any(k.endswith("/mem") for k in r["reopened"]), r
