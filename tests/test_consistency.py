"""The stack consistency model (kpatch's): the code switches only when no
thread has code of the patch on its stack -- a thread asleep inside the old
function holds the enable until it returns, one that never returns gives a
TransitionError and nothing is written, a function on the stack only below
a signal frame counts, disable waits for the new code, force goes past and
says so -- and the immediate model is unaffected.

Every test patches inside a child process (conftest.run_child); the
threads under test are Python threads calling the target through ctypes,
so their stacks go through libffi and the interpreter as a service's do."""
import os

import pytest

from conftest import compile_library, symbol_sizes
from test_stopper import stopper_lib  # noqa: F401  (the fixture, for the hammer test)


@pytest.fixture(scope="session")
def consistency_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("consistency"))
    path = compile_library(os.path.join(out, "libconsistency.so"), ["targets/consistency.c"])
    return {"lib": path, "sizes": symbol_sizes(path)}


PRELUDE = """
import ctypes, logging, os, signal, threading, time
import hotpatch
from hotpatch import Patch, Object, Func, sites
lib = ctypes.CDLL(P["lib"])
for _name in ["cs_read_byte", "cs_read_byte_v2", "cs_spin"]:
    getattr(lib, _name).restype = ctypes.c_long
lib.cs_spin.argtypes = [ctypes.c_long]
OBJ = os.path.basename(P["lib"])
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def stack_patch(name="p", old="cs_read_byte", new="cs_read_byte_v2", timeout=2.0):
    return Patch(name, [Object(OBJ, [Func(old, addr(new))])], consistency="stack",
                 transition_timeout=timeout)
def reader(fd, results):
    # a thread asleep in read() inside the old function (or the new code)
    t = threading.Thread(target=lambda: results.append(lib.cs_read_byte(fd)), daemon=True)
    t.start()
    return t
def watch_transition(patch, seen, stop):
    # what another thread sees while the patching thread waits
    def loop():
        while not stop:
            tree = hotpatch.tree()["livepatch"].get(patch.name, {})
            seen.append((patch.transition, tree.get("transition")))
            time.sleep(0.02)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t
"""


def test_sleeper_in_the_old_function_holds_the_enable_until_it_returns(child, consistency_lib):
    r = child(PRELUDE + """
r, w = os.pipe()
results = []
t = reader(r, results)
time.sleep(0.2)                 # asleep in read() inside cs_read_byte
p = stack_patch(timeout=5.0)
def wake():
    time.sleep(0.3)
    os.write(w, b"A")
seen, stop = [], []
watcher = watch_transition(p, seen, stop)
threading.Thread(target=wake, daemon=True).start()
t0 = time.monotonic()
hotpatch.register(p)
elapsed = time.monotonic() - t0
stop.append(1)
watcher.join()
t.join()
os.write(w, b"B")
report({"elapsed": elapsed, "old_result": results, "new_result": lib.cs_read_byte(r),
        "seen_during": [list(s) for s in set(seen)], "transition_after": p.transition,
        "tree": {k: v for k, v in hotpatch.tree()["livepatch"]["p"].items() if not isinstance(v, dict)}})
""", **consistency_lib)[0]
    # Held while the thread slept inside the old function, through after it returned.
    assert 0.25 <= r["elapsed"] < 3.0, r
    assert r["old_result"] == [1000 + ord("A") + 1], "the sleeper finished the old code"
    assert r["new_result"] == 1000 + ord("B") + 2, "new calls run the new code"
    # Both the attribute and the tree showed the transition from another thread.
    assert [True, True] in r["seen_during"], r["seen_during"]
    assert r["transition_after"] is False
    assert r["tree"]["enabled"] is True and r["tree"]["transition"] is False
    assert r["tree"]["consistency"] == "stack" and r["tree"]["forced"] is False


def test_a_thread_that_never_returns_fails_the_transition_and_nothing_is_written(child, consistency_lib):
    r = child(PRELUDE + """
r, w = os.pipe()
t = reader(r, [])
time.sleep(0.2)
before = sites.read_memory(addr("cs_read_byte"), 16)
p = stack_patch(timeout=0.5)
t0 = time.monotonic()
try:
    hotpatch.register(p)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
elapsed = time.monotonic() - t0
report({"error": error, "elapsed": elapsed, "tid": t.native_id,
        "unchanged": sites.read_memory(addr("cs_read_byte"), 16) == before,
        "registered": [q.name for q in hotpatch.patches()], "transition": p.transition,
        "patched": sites.installed_sites() != []})
""", **consistency_lib)[0]
    error = r["error"]
    assert error is not None, "the enable went through with a thread inside the old function"
    assert 0.5 <= r["elapsed"] < 3.0, r
    # the thread, the function and the frame
    assert f"thread {r['tid']} " in error, error
    assert "cs_read_byte (the old function) on its stack" in error, error
    assert "frame #" in error and "cs_read_byte+0x" in error, error
    assert "nothing was written" in error, error
    assert r["unchanged"] and not r["patched"], "bytes changed by a failed transition"
    assert r["registered"] == [] and r["transition"] is False


def test_a_function_on_the_stack_only_through_a_signal_frame_counts(child, consistency_lib):
    # A thread spins in cs_spin; a signal interrupts it and its handler
    # blocks in read().  cs_spin's pc is past the bytes being replaced, so
    # only an unwind through the signal frame finds it.
    r = child(PRELUDE + """
r, w = os.pipe()
assert lib.cs_install_blocking_handler(signal.SIGUSR1, r) == 0
spinner = threading.Thread(target=lambda: lib.cs_spin(1), daemon=True)
spinner.start()
while not lib.cs_spinning():
    time.sleep(0.01)
signal.pthread_kill(spinner.ident, signal.SIGUSR1)
while lib.cs_in_handler() != 1:
    time.sleep(0.01)
p = stack_patch(old="cs_spin", new="cs_spin_v2", timeout=0.5)
try:
    hotpatch.register(p)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
os.write(w, b"x")               # the handler returns: cs_spin runs again ...
while lib.cs_in_handler() != 2:
    time.sleep(0.01)
lib.cs_spin_stop()              # ... and returns
spinner.join()
q = stack_patch("q", old="cs_spin", new="cs_spin_v2", timeout=2.0)
hotpatch.register(q)
report({"error": error, "tid": spinner.native_id, "after": lib.cs_spin(5)})
""", **consistency_lib)[0]
    error = r["error"]
    assert error is not None, "a function under a signal frame was not seen"
    assert f"thread {r['tid']} " in error and "cs_spin (the old function)" in error, error
    # below the handler, the read() it sleeps in and the signal frame
    frame = int(error.split("frame #")[1].split(",")[0])
    assert frame >= 3, error
    assert r["after"] == 7, "once the thread left, the patch went through"


def test_a_stack_that_cannot_be_unwound_holds_the_transition(child, consistency_lib):
    # A thread asleep under code with no unwind table (as a JIT's): its
    # stack is unreliable, which counts as busy (the kernel's rule), and
    # the error says where the walk stopped.  It ends cleanly once the
    # thread leaves that code.
    r = child(PRELUDE + """
lib.cs_call_from_anonymous_code.restype = ctypes.c_long
lib.cs_call_from_anonymous_code.argtypes = [ctypes.c_void_p, ctypes.c_int]
r, w = os.pipe()
results = []
t = threading.Thread(target=lambda: results.append(
    lib.cs_call_from_anonymous_code(addr("cs_wait"), r)), daemon=True)
t.start()
time.sleep(0.2)
p = stack_patch(timeout=0.3)
try:
    hotpatch.register(p)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
os.write(w, b"A")
t.join()
hotpatch.register(p)
report({"error": error, "tid": t.native_id, "results": results})
""", **consistency_lib)[0]
    error = r["error"]
    assert error and f"the stack of thread {r['tid']} " in error, r
    assert "could not be unwound reliably" in error and "frame #2" in error, error
    assert r["results"] == [1000 + ord("A") + 3]


def test_stacks_are_unwound_through_hotpatchs_own_thunks(child, consistency_lib):
    # A hidden leaf function's patch goes through a preserving thunk (in the
    # pool, which has no unwind tables).  A thread asleep in the new code
    # called through it: the walk steps over the thunk's known frame, so an
    # unrelated patch goes through, the thunk's caller is still found
    # above it, and the disable names the new code.
    r = child(PRELUDE + """
lib.cs_call_hidden.restype = ctypes.c_long
leaf = hotpatch.register(Patch("leaf", [Object(OBJ, [Func("cs_hidden_leaf", addr("cs_hidden_leaf_reads"))])],
                               consistency="stack", transition_timeout=0.3))
thunk = leaf.objects[0].funcs[0].thunk
r, w = os.pipe()
results = []
t = threading.Thread(target=lambda: results.append(lib.cs_call_hidden(r)), daemon=True)
t.start()
time.sleep(0.2)
out = {"thunk": thunk is not None, "tid": t.native_id}
other = stack_patch("other", timeout=0.3)
hotpatch.register(other)        # nothing of it on any stack
out["other_enabled"] = other.enabled
hotpatch.disable(other)
for name, patch in [("caller", stack_patch("caller", old="cs_call_hidden", new="cs_spin_v2", timeout=0.3)),
                    ("disable", None)]:
    try:
        hotpatch.register(patch) if patch else hotpatch.disable(leaf)
        out[name] = None
    except hotpatch.TransitionError as e:
        out[name] = str(e)
os.write(w, b"A")
t.join()
hotpatch.disable(leaf)
out.update(results=results, after=lib.cs_call_hidden(4))
report(out)
""", **consistency_lib)[0]
    assert r["thunk"], "the test needs a patch through a thunk"
    assert r["other_enabled"], "a stack through a thunk was not unwound"
    assert r["caller"] and "cs_call_hidden (the old function) on its stack" in r["caller"], r
    assert r["disable"] and "the new code of patch 'leaf' on its stack" in r["disable"], r
    assert "cs_hidden_leaf_reads+0x" in r["disable"], r["disable"]
    assert r["results"] == [1000 + ord("A") + 3 + 10000 + 100] and r["after"] == 113, r


def test_force_goes_past_a_busy_stack_and_says_so(child, consistency_lib):
    r = child(PRELUDE + """
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("hotpatch").addHandler(Keep())
r, w = os.pipe()
results = []
t = reader(r, results)
time.sleep(0.2)
p = stack_patch(timeout=0.3)
t0 = time.monotonic()
hotpatch.register(p, force=True)
elapsed = time.monotonic() - t0
os.write(w, b"A")
t.join()
os.write(w, b"B")
report({"elapsed": elapsed, "records": records, "forced": p.forced, "tid": t.native_id,
        "tree_forced": hotpatch.tree()["livepatch"]["p"]["forced"], "old_result": results,
        "new_result": lib.cs_read_byte(r)})
""", **consistency_lib)[0]
    assert r["elapsed"] < 0.3, "force does not wait for the timeout"
    assert r["forced"] is True and r["tree_forced"] is True
    warnings = [m for level, m in r["records"] if level == "WARNING"]
    assert len(warnings) == 1, r["records"]
    assert "forced" in warnings[0] and f"thread {r['tid']} " in warnings[0], warnings
    assert "cs_read_byte (the old function)" in warnings[0], warnings
    assert r["old_result"] == [1000 + ord("A") + 1] and r["new_result"] == 1000 + ord("B") + 2


def test_disable_waits_for_a_thread_inside_the_new_code(child, consistency_lib):
    r = child(PRELUDE + """
r, w = os.pipe()
p = stack_patch(timeout=0.4)
hotpatch.register(p)            # nobody inside: at once
results = []
t = reader(r, results)          # now asleep in cs_read_byte_v2
time.sleep(0.2)
try:
    hotpatch.disable(p)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
still = p.enabled
def wake():
    time.sleep(0.3)
    os.write(w, b"A")
threading.Thread(target=wake, daemon=True).start()
p.transition_timeout = 5.0
t0 = time.monotonic()
hotpatch.disable(p)
elapsed = time.monotonic() - t0
t.join()
os.write(w, b"B")
report({"error": error, "still_enabled": still, "elapsed": elapsed, "in_new": results,
        "after": lib.cs_read_byte(r), "enabled": p.enabled})
""", **consistency_lib)[0]
    assert r["error"] and "cs_read_byte: the new code of patch 'p' on its stack" in r["error"], r
    assert "cs_read_byte_v2" in r["error"], r["error"]
    assert r["still_enabled"] is True
    assert 0.25 <= r["elapsed"] < 3.0, r
    assert r["in_new"] == [1000 + ord("A") + 2], "the sleeper finished the new code"
    assert r["after"] == 1000 + ord("B") + 1 and r["enabled"] is False


def test_a_retarget_without_a_code_write_waits_too(child, consistency_lib):
    # Replacements out of reach of a direct jmp: the site takes the slot
    # form, and a second patch on top is one store to the slot, no code
    # write.  Under the stack model that store waits like a write.
    r = child(PRELUDE + """
lib.cs_far_code.restype = ctypes.c_void_p
first = hotpatch.register(Patch("first", [Object(OBJ, [Func("cs_read_byte", lib.cs_far_code(7),
                                                         signature="long(int)")])]))
r, w = os.pipe()
results = []
# asleep inside the old function, through the first patch's original
t = threading.Thread(target=lambda: results.append(first.objects[0].funcs[0].call_original(r)),
                     daemon=True)
t.start()
time.sleep(0.2)
form = [s.form for s in sites.installed_sites()]
second = Patch("second", [Object(OBJ, [Func("cs_read_byte", lib.cs_far_code(8))])],
               consistency="stack", transition_timeout=0.3)
try:
    hotpatch.register(second)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
held = lib.cs_read_byte(r)
os.write(w, b"A")
t.join()
hotpatch.register(second)
report({"form": form, "error": error, "held": held, "after": lib.cs_read_byte(r), "results": results})
""", **consistency_lib)[0]
    assert r["form"] == ["slot"], r
    assert r["error"] and "cs_read_byte (the old function) on its stack" in r["error"], r
    assert r["held"] == 7, "the slot was stored while a thread ran the old function"
    assert r["after"] == 8 and r["results"] == [1000 + ord("A") + 1]


def test_a_failed_disable_is_taken_back_with_post_patch(child, consistency_lib):
    # The kernel completes a reversed unpatch transition with post_patch:
    # the pre_unpatch that ran is answered, and the patch stays enabled.
    r = child(PRELUDE + """
log = []
def cb(name):
    return lambda obj: log.append(name) or 0
p = Patch("p", [Object(OBJ, [Func("cs_read_byte", addr("cs_read_byte_v2"))],
                       **{k: cb(k) for k in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")})],
          consistency="stack", transition_timeout=0.3)
hotpatch.register(p)
r, w = os.pipe()
t = reader(r, [])               # asleep in the new code
time.sleep(0.2)
try:
    hotpatch.disable(p)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
out = {"error": error, "log": list(log), "enabled": p.enabled}
os.write(w, b"A")
t.join()
hotpatch.disable(p)
out["log_after"] = log
report(out)
""", **consistency_lib)[0]
    assert r["error"] and r["enabled"], r
    assert r["log"] == ["pre_patch", "post_patch", "pre_unpatch", "post_patch"], r
    assert r["log_after"][-2:] == ["pre_unpatch", "post_unpatch"]


def test_the_immediate_model_does_not_wait(child, consistency_lib):
    r = child(PRELUDE + """
r, w = os.pipe()
results = []
t = reader(r, results)
time.sleep(0.2)
p = Patch("p", [Object(OBJ, [Func("cs_read_byte", addr("cs_read_byte_v2"))])])
t0 = time.monotonic()
hotpatch.register(p)
elapsed = time.monotonic() - t0
os.write(w, b"A")
t.join()
os.write(w, b"B")
report({"elapsed": elapsed, "old": results, "new": lib.cs_read_byte(r),
        "tree": hotpatch.tree()["livepatch"]["p"]["consistency"]})
""", **consistency_lib)[0]
    assert r["elapsed"] < 0.2, r
    assert r["old"] == [1000 + ord("A") + 1] and r["new"] == 1000 + ord("B") + 2
    assert r["tree"] == "immediate"


def test_a_thread_asleep_in_libc_holds_a_patch_of_libc(child, consistency_lib):
    # libc's sleep(), called through ctypes: a function of a library nobody
    # here wrote, with its own unwind tables, asleep in clock_nanosleep
    # under nanosleep under sleep.
    r = child(PRELUDE + """
libc = ctypes.CDLL("libc.so.6")
# The first patch of libc indexes its branches (about a second): done
# before the sleeper starts, with the immediate model.
warm = hotpatch.register(Patch("warm", [Object("libc.so.6", [Func("sleep", addr("cs_sleep"))])]))
hotpatch.disable(warm)
hotpatch.unregister(warm)
started = []
def sleeper():
    started.append(time.monotonic())
    libc.sleep(2)
t = threading.Thread(target=sleeper, daemon=True)
t.start()
time.sleep(0.1)
p = Patch("p", [Object("libc.so.6", [Func("sleep", addr("cs_sleep"))])], consistency="stack",
          transition_timeout=0.3)
try:
    hotpatch.register(p)
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
p.transition_timeout = 5.0
hotpatch.register(p)
done = time.monotonic()
t.join()
report({"error": error, "after_sleep": done - started[0], "now": libc.sleep(3)})
""", **consistency_lib)[0]
    assert r["error"] and "libc.so.6: sleep (the old function) on its stack" in r["error"], r
    assert "frame #2" in r["error"], r["error"]    # clock_nanosleep, nanosleep, sleep
    assert r["after_sleep"] >= 1.95, "enabled while the thread still slept inside sleep()"
    assert r["now"] == 4242


def test_stack_model_under_malloc_and_dlopen_hammers(child, stopper_lib):  # noqa: F811
    # Threads are stopped while they hold the allocator's and the loader's
    # locks, and their stacks are unwound meanwhile: nothing may take those
    # locks then.  The child's timeout is the watchdog.
    r = child("""
import ctypes, os, time
import hotpatch
from hotpatch import Patch, Object, Func
lib = ctypes.CDLL(P["lib"])
lib.st_hammer_stop.restype = ctypes.c_long
OBJ = os.path.basename(P["lib"])
new = ctypes.cast(lib.replacement, ctypes.c_void_p).value
p = hotpatch.register(Patch("p", [Object(OBJ, [Func("calls_other", new)])], consistency="stack"),
                      enable=False)
lib.st_hammer_start(P["victim"].encode(), 4, 2)
time.sleep(0.05)
t0 = time.monotonic()
for i in range(100):
    hotpatch.enable(p)
    hotpatch.disable(p)
elapsed = time.monotonic() - t0
mallocs, dlopens = ctypes.c_long(), ctypes.c_long()
failures = lib.st_hammer_stop(ctypes.byref(mallocs), ctypes.byref(dlopens))
stops = hotpatch.tree()["core"]["stops"]
report({"elapsed": elapsed, "mallocs": mallocs.value, "dlopens": dlopens.value,
        "dl_failures": failures, "stops": stops})
""", timeout=300, **stopper_lib)[0]
    assert r["mallocs"] > 100 and r["dlopens"] > 10, r
    assert r["dl_failures"] == 0, r
    assert r["stops"]["count"] >= 200, r


def test_the_stack_model_is_refused_under_the_signal_stop(child, consistency_lib):
    r = child(PRELUDE + """
before = sites.read_memory(addr("cs_read_byte"), 16)
try:
    hotpatch.register(stack_patch())
    error = None
except hotpatch.TransitionError as e:
    error = str(e)
report({"error": error, "unchanged": sites.read_memory(addr("cs_read_byte"), 16) == before})
""", env={"HOTPATCH_STOPPER": "signals"}, **consistency_lib)[0]
    assert r["error"] and 'consistency="stack" needs the ptrace stopper' in r["error"], r
    assert "HOTPATCH_STOPPER=signals" in r["error"] and r["unchanged"]


def test_models_and_timeouts_are_checked():
    import hotpatch
    with pytest.raises(ValueError, match="immediate, stack"):
        hotpatch.Patch("p", [], consistency="hybrid")
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="transition_timeout"):
            hotpatch.Patch("p", [], consistency="stack", transition_timeout=bad)
    p = hotpatch.Patch("p", [], consistency="stack", transition_timeout=0.5)
    assert (p.consistency, p.transition_timeout, p.transition, p.forced) == ("stack", 0.5, False, False)


def test_the_command_shows_the_transition_and_forces(child, consistency_lib):
    # `hotpatch enable PID p` over the control socket: the process's server
    # thread waits on the stacks and fails naming the thread; `--force`
    # goes through; `ls` shows the model and the forced flag.
    r = child(PRELUDE + """
import subprocess, sys
hotpatch.serve()
r, w = os.pipe()
t = reader(r, [])
time.sleep(0.2)
p = hotpatch.register(stack_patch(timeout=0.3), enable=False)
def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "hotpatch", *args], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr
out = {"refused": cli("enable", str(os.getpid()), "p"), "enabled_after_refusal": p.enabled}
out["forced"] = cli("enable", str(os.getpid()), "p", "--force")
out["ls"] = cli("ls", str(os.getpid()))
out.update(enabled=p.enabled, is_forced=p.forced, tid=t.native_id)
os.write(w, b"A")
t.join()
report(out)
""", timeout=180, **consistency_lib)[0]
    code, text = r["refused"]
    assert code == 1 and f"thread {r['tid']} " in text, text
    assert "cs_read_byte (the old function) on its stack" in text and not r["enabled_after_refusal"]
    assert r["forced"][0] == 0 and "patch 'p' enabled" in r["forced"][1], r["forced"]
    assert r["enabled"] and r["is_forced"]
    ls = r["ls"][1]
    assert "consistency  stack" in ls and "forced       1" in ls and "transition   0" in ls, ls
