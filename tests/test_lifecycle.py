"""The process around the patches: fork() while another thread patches,
hotpatch entered again from a signal handler or a callback, and a main
thread that exited before the others.  Every test patches inside a child
process."""
import os

import pytest

from conftest import compile_library


@pytest.fixture(scope="session")
def lifecycle_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lifecycle"))
    return compile_library(os.path.join(out, "liblifecycle.so"),
                           ["targets/shapes.c", "targets/fentry.c"],
                           per_source_flags={
                               "targets/fentry.c": ["-fno-pic", "-pg", "-mfentry", "-mnop-mcount"]})


PRELUDE = """
import ctypes, os, signal, sys, threading, time, traceback
import hotpatch
from hotpatch import Patch, Object, Func, PatchStateError, sites, symbols
lib = ctypes.CDLL(P["lib"])
OBJ = os.path.basename(P["lib"])
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def call(name, x=5):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(x)
REPL, REPL2 = addr("replacement"), addr("replacement2")
"""

REFUSAL = "already in progress in this thread"


def test_fork_while_another_thread_patches(child, lifecycle_lib):
    # plain_add is written in a stop of the world, rip_load with the int3
    # protocol: a fork must land between operations of both kinds.
    r = child(PRELUDE + """
names = ["plain_add", "rip_load"]
original = {n: ctypes.string_at(addr(n), 5) for n in names}
patch = Patch("fix", [Object(OBJ, [Func(n, REPL) for n in names])])
hotpatch.register(patch)
stop = False
def flip():
    while not stop:
        patch.disable()
        patch.enable()
flipper = threading.Thread(target=flip)
flipper.start()

def in_child():
    enabled = patch.enabled
    for n in names:
        if call(n) != (5 + 1000 if enabled else ORIGINAL[n]):
            return 3    # the function does not do what the state says
        if (ctypes.string_at(addr(n), 5) != original[n]) != enabled:
            return 4    # memory is not what the state says
    if enabled:
        patch.disable(); patch.enable()
    else:
        patch.enable(); patch.disable()
    return 0

ORIGINAL = {"plain_add": 6, "rip_load": 45}
statuses = []
for i in range(50):
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            code = in_child()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            statuses.append(os.waitstatus_to_exitcode(status))
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            statuses.append("hung")
            break
        time.sleep(0.002)
    if statuses[-1] != 0:
        break
stop = True
flipper.join()
report({"statuses": statuses, "parent": [patch.enabled, call("plain_add"), call("rip_load")]})
""", lib=lifecycle_lib, timeout=60)[0]
    assert r["statuses"] == [0] * 50, r
    assert r["parent"] == [True, 1005, 1005]


def test_patching_from_a_signal_handler_is_refused_or_done(child, lifecycle_lib):
    r = child(PRELUDE + """
names = ["plain_add", "rip_load", "jcc_leaf"]
original = {n: ctypes.string_at(addr(n), 5) for n in names}
ORIGINAL = {"plain_add": 6, "rip_load": 45, "jcc_leaf": 6}
# Both patches redirect plain_add: the handler's patch stacks on the main one.
p1 = Patch("main-loop", [Object(OBJ, [Func("plain_add", REPL), Func("rip_load", REPL)])])
p2 = Patch("handler", [Object(OBJ, [Func("plain_add", REPL2), Func("jcc_leaf", REPL2)])])
hotpatch.register(p1)
hotpatch.register(p2, enable=False)
REFUSAL = P["REFUSAL"]
counts = {"main ok": 0, "main refused": 0, "handler ok": 0, "handler refused": 0}
unexpected = []
busy = False

def attempt(who, operation):
    try:
        operation()
        counts[who + " ok"] += 1
        return True
    except PatchStateError as e:
        if REFUSAL not in str(e) or "retry" not in str(e):
            unexpected.append(f"{who}: {e}")
        counts[who + " refused"] += 1
    except BaseException as e:
        unexpected.append(f"{who}: {type(e).__name__}: {e}\\n{traceback.format_exc()}")
    return False

def handler(signum, frame):
    global busy
    if busy:
        return
    busy = True
    try:
        # Queries work wherever the handler lands.
        hotpatch.patches(), hotpatch.tree(), hotpatch.tainted(), hotpatch.core.stack_order(p1)
    except BaseException as e:
        unexpected.append(f"query: {type(e).__name__}: {e}")
    # Enabled and disabled again in one go, so that p2 is never left on
    # top of p1 (which would make the main loop's disable wrong by the rules).
    if attempt("handler", p2.enable):
        attempt("handler", p2.disable)
    busy = False

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    attempt("main", p1.disable if p1.enabled else p1.enable)
signal.setitimer(signal.ITIMER_REAL, 0)
signal.signal(signal.SIGALRM, signal.SIG_IGN)

def expected(name):
    # The top func of the function's stack, by the model.
    on = [(hotpatch.core.stack_order(f.object.patch), f) for p in (p1, p2)
          for o in p.objects for f in o.funcs if f.old_name == name and f.patched]
    if not on:
        return ORIGINAL[name]
    top = max(on, key=lambda pair: pair[0])[1]
    return 5 + (1000 if top.new_addr == REPL else 2000)

state = {n: [call(n) == expected(n),
             (ctypes.string_at(addr(n), 5) != original[n]) == any(
                 f.patched for p in (p1, p2) for o in p.objects for f in o.funcs if f.old_name == n)]
         for n in names}
report({"counts": counts, "unexpected": unexpected[:5], "state": state,
        "enabled": [p1.enabled, p2.enabled]})
""", lib=lifecycle_lib, timeout=60, REFUSAL=REFUSAL)[0]
    assert r["unexpected"] == [], r
    assert r["state"] == {n: [True, True] for n in ["plain_add", "rip_load", "jcc_leaf"]}, r
    assert r["enabled"][1] is False
    # The handler landed both inside operations and between them.
    assert r["counts"]["handler ok"] > 0 and r["counts"]["handler refused"] > 0, r
    assert r["counts"]["main refused"] == 0, r


def test_callbacks_and_handlers_get_a_clear_refusal(child, lifecycle_lib):
    r = child(PRELUDE + """
out = {}
other = Patch("other", [Object(OBJ, [Func("rip_load", REPL2)])])
hotpatch.register(other, enable=False)

def post_patch(obj):
    for name, operation in [("enable", lambda: other.enable()),
                            ("register", lambda: hotpatch.register(Patch("x", []))),
                            ("unregister", lambda: hotpatch.unregister(other)),
                            ("load", lambda: hotpatch.load(P["lib"]))]:
        try:
            operation()
            out[name] = "done"
        except PatchStateError as e:
            out[name] = str(e)
    out["queries"] = [[p.name for p in hotpatch.patches()],
                      sorted(hotpatch.tree()["livepatch"]), hotpatch.tainted()]
    return 0

fix = Patch("fix", [Object(OBJ, [Func("plain_add", REPL)], post_patch=post_patch)])
hotpatch.register(fix)
out["after"] = [fix.enabled, other.enabled, call("plain_add"), call("rip_load")]

# The low-level layer: a signal handler that runs inside update_batch.
site, other_site = sites.prepare(addr("jcc_leaf")), sites.prepare(addr("frame_pointer"))
def handler(signum, frame):
    try:
        sites.redirect_batch([(other_site, REPL)])
        out["sites"] = "done"
    except hotpatch.HotpatchError as e:
        out["sites"] = f"{type(e).__name__}: {e}"
    try:
        sites.redirect(addr("frame_pointer"), REPL)
        out["redirect"] = "done"
    except hotpatch.HotpatchError as e:
        out["redirect"] = str(e)
    out["installed"] = [s.entry == addr("plain_add") for s in sites.installed_sites()]
signal.signal(signal.SIGUSR1, handler)
real_commit = sites._commit
def commit_with_a_signal(changes):
    os.kill(os.getpid(), signal.SIGUSR1)     # the handler runs before the next bytecode
    real_commit(changes)
sites._commit = commit_with_a_signal
sites.redirect_batch([(site, REPL)])
sites._commit = real_commit
out["sites after"] = [call("jcc_leaf"), other_site.installed]
out["frame_pointer"] = addr("frame_pointer")
report(out)
""", lib=lifecycle_lib)[0]
    for name in ["enable", "register", "unregister", "load"]:
        assert REFUSAL in r[name] and "signal handler or a callback" in r[name], (name, r[name])
    assert "enable patch 'other'" in r["enable"]
    assert r["queries"] == [["other", "fix"], ["fix", "other"], True]
    assert r["after"] == [True, False, 1005, 45]
    assert r["sites"].startswith("HotpatchError: ") and "in this thread" in r["sites"], r
    assert r["redirect"].startswith(f"redirect the function at {r['frame_pointer']:#x}: ") \
        and "in this thread" in r["redirect"], r
    assert r["installed"] == [True]      # fix's plain_add; jcc_leaf is not written yet
    assert r["sites after"] == [1005, False]


def test_patching_after_the_main_thread_exited(child, lifecycle_lib):
    r = child(PRELUDE + """
def leader_gone():
    with open(f"/proc/self/task/{os.getpid()}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"

def worker():
    out = {}
    try:
        while not leader_gone():
            time.sleep(0.01)
        main = symbols.find_object(None)
        out["main"] = [main.path == os.path.realpath(sys.executable),
                       len(symbols.functions(main)) > 0]
        # A 5-byte NOP entry: one instruction, its old body intact.
        patch = hotpatch.register(Patch("fix", [Object(OBJ, [Func("fentry_nop", REPL)])]))
        out["patched"] = call("fentry_nop")
        patch.disable()
        out["restored"] = call("fentry_nop")
        # A generic entry needs a stop and new pool memory: both work too.
        try:
            hotpatch.register(Patch("generic", [Object(OBJ, [Func("plain_add", REPL)])]))
            out["generic"] = call("plain_add")
        except hotpatch.HotpatchError as e:
            out["generic"] = str(e)
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}\\n{traceback.format_exc()}"
    report(out)
    sys.stdout.flush()
    os._exit(0)

threading.Thread(target=worker).start()
ctypes.CDLL(None).pthread_exit(None)
""", lib=lifecycle_lib)[0]
    assert "error" not in r, r["error"]
    assert r["main"] == [True, True]
    assert r["patched"] == 1005 and r["restored"] == 25
    assert r["generic"] == 1005, r
