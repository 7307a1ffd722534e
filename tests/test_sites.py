"""The low-level layer: redirect, retarget, restore and the original code, in
every entry form, on real compiled prologues, under concurrency.

Every test patches inside a child process (see conftest.run_child)."""
import os
import subprocess

import pytest

from conftest import compile_library, symbol_sizes

SHAPES = {   # function -> (f(5) before, what the shape is)
    "plain_add": (6, "lea+ret, exactly five bytes"),
    "frame_pointer": (16, "push rbp; mov rbp, rsp"),
    "rip_load": (45, "RIP-relative load first"),
    "calls_other": (12, "generic prologue"),
    "jcc_leaf": (6, "jcc inside the first five bytes"),
    "short_padded": (0, "three bytes and padding"),
    "fentry_nop": (25, "-pg -mfentry -mnop-mcount"),
    "patchable": (35, "-fpatchable-function-entry=5"),
    "endbr_func": (56, "endbr64 first"),
}


@pytest.fixture(scope="session")
def targets(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sites"))
    path = compile_library(
        os.path.join(out, "libshapes.so"),
        ["targets/shapes.c", "targets/fentry.c", "targets/patchable.c", "targets/endbr.c",
         "targets/stress.c"],
        flags=["-pthread"],
        per_source_flags={
            "targets/fentry.c": ["-fno-pic", "-pg", "-mfentry", "-mnop-mcount"],
            "targets/patchable.c": ["-fPIC", "-fpatchable-function-entry=5"],
            "targets/endbr.c": ["-fPIC", "-fcf-protection=full"],
        })
    sizes = symbol_sizes(path)
    return {"lib": path, "sizes": sizes}


PRELUDE = """
import ctypes, os
from hotpatch import sites, errors
from hotpatch._native import ffi, lib as native
lib = ctypes.CDLL(P["lib"])
SIZES = P["sizes"]
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def fn(address):
    return ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(address)
def call(name, x=5):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(x)
def prepare(name):
    return sites.prepare(addr(name), size=SIZES[name])
"""


@pytest.mark.parametrize("form", ["direct", "slot", "call"])
def test_every_shape_redirects_keeps_original_and_restores(child, targets, form):
    results = child(PRELUDE + """
out = {}
for name in P["shapes"]:
    entry = addr(name)
    before_bytes = sites.read_memory(entry, 32)
    before = call(name)
    site = prepare(name)
    sites.redirect_batch([(site, addr("replacement"))], form=P["form"])
    patched = call(name)
    original = fn(site.original)(5)
    sites.redirect_batch([(site, addr("replacement2"))])
    retargeted = call(name)
    sites.restore(site)
    out[name] = dict(before=before, patched=patched, original=original, retargeted=retargeted,
                     restored=call(name), kind=site.kind, form_seen=P["form"],
                     identical=sites.read_memory(entry, 32) == before_bytes)
report(out)
""", form=form, shapes=list(SHAPES), **targets)[0]
    for name, (expected, what) in SHAPES.items():
        r = results[name]
        assert r["before"] == expected, (name, what)
        assert r["patched"] == 5 + 1000, (name, what, r)
        assert r["original"] == expected, (name, what, r)
        assert r["retargeted"] == 5 + 2000, (name, what, r)
        assert r["restored"] == expected, (name, what, r)
        assert r["identical"], (name, what, "bytes differ after restore")


def test_site_kinds(child, targets):
    kinds = child(PRELUDE + """
report({name: [prepare(name).kind, prepare(name).address - addr(name),
               prepare(name).original - addr(name)] for name in P["names"]})
""", names=["fentry_nop", "patchable", "endbr_func", "plain_add"], **targets)[0]
    assert kinds["fentry_nop"] == ["fentry", 0, 5]      # the old body is intact after the NOP
    assert kinds["patchable"] == ["nops", 0, 5]
    assert kinds["endbr_func"][:2] == ["generic", 4]   # redirected after endbr64
    assert kinds["plain_add"][0] == "generic"


def test_prepare_batch(child, targets):
    """prepare_batch: one site per function as prepare makes it, the error
    for a refused one (the others still prepared), one site for a function
    asked twice, the kept site on a second call."""
    r = child(PRELUDE + """
names = P["shapes"] + ["jumps_back", "plain_add"]
got = sites.prepare_batch([(addr(n), SIZES[n]) for n in names])
again = sites.prepare_batch([(addr(n), SIZES[n]) for n in names])
good = [s for s in got[:len(P["shapes"])]]
sites.redirect_batch([(s, addr("replacement")) for s in good])
patched = {n: call(n) for n in P["shapes"]}
sites.restore_batch(good)
report({"kinds": [s.kind if isinstance(s, sites.Site) else type(s).__name__ for s in got],
        "refusal": str(got[-2]), "same_twice": got[names.index("plain_add")] is got[-1],
        "kept": all(a is b for a, b in zip(got, again) if isinstance(a, sites.Site)),
        "as_prepare": [prepare(n) is s for n, s in zip(P["shapes"], got)],
        "patched": patched, "restored": {n: call(n) for n in P["shapes"]}})
""", shapes=list(SHAPES), **targets)[0]
    assert r["kinds"][-2] == "UnsafeToPatch" and "branch" in r["refusal"]
    assert r["same_twice"] and r["kept"] and all(r["as_prepare"])
    assert r["patched"] == {name: 1005 for name in SHAPES}
    assert r["restored"] == {name: before for name, (before, _) in SHAPES.items()}


@pytest.mark.parametrize("name,reason", [
    ("short_unpadded", "short"),
    ("jumps_back", "branch"),
])
def test_refusals_change_nothing(child, targets, name, reason):
    r = child(PRELUDE + """
before = sites.read_memory(addr(P["name"]), 16)
try:
    prepare(P["name"])
    report({"refused": False})
except errors.UnsafeToPatch as e:
    report({"refused": True, "message": str(e),
            "unchanged": sites.read_memory(addr(P["name"]), 16) == before})
""", name=name, **targets)[0]
    assert r["refused"], name
    assert reason in r["message"].lower()
    assert hex(0)[:2] in r["message"]          # it names the address
    assert r["unchanged"]


def test_far_target_takes_the_slot_path(child, targets):
    r = child(PRELUDE + """
import mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
entry = addr("plain_add")
# 16 TiB away from the library: far beyond rel32.
hint = (entry + (1 << 44)) & ~0xfff if entry < (1 << 46) else (entry - (1 << 44)) & ~0xfff
far = libc.mmap(hint, 4096, 7, 0x22 | 0x100000, -1, 0)   # MAP_PRIVATE|ANON|FIXED_NOREPLACE
code = bytes([0x48, 0xc7, 0xc0, 0x2a, 0, 0, 0, 0xc3])     # mov rax, 42; ret
ctypes.memmove(far, code, len(code))
site = sites.redirect(entry, far, size=SIZES["plain_add"])
maps = open("/proc/self/maps").read()
report({"form": site.form, "result": call("plain_add"), "distance": abs(far - entry),
        "named": "hotpatch" in maps})
sites.restore(site)
""", **targets)[0]
    assert r["distance"] > 1 << 32
    assert r["form"] == "slot"
    assert r["result"] == 42
    assert r["named"]


def test_direct_form_refuses_a_far_target(child, targets):
    r = child(PRELUDE + """
site = prepare("plain_add")
try:
    sites.redirect_batch([(site, site.address + (1 << 40))], form="direct")
    report("accepted")
except errors.UnsafeToPatch as e:
    report(str(e))
""", **targets)[0]
    assert "2 GiB" in r


def test_call_path_runs_observers(child, targets):
    r = child(PRELUDE + """
site = prepare("calls_other")
sites.redirect_batch([(site, addr("replacement"))], form="call")
count = ctypes.c_long.in_dll(lib, "observed_calls")
arg = ctypes.c_long.in_dll(lib, "observed_arg")
handle = sites.add_observer(site, addr("count_observer"))
results = [call("calls_other", x) for x in (1, 2, 3)]
sites.remove_observer(site, handle)
after = call("calls_other", 9)
report({"results": results, "count": count.value, "arg": arg.value, "after": after})
sites.restore(site)
""", **targets)[0]
    assert r["results"] == [1001, 1002, 1003]
    assert r["count"] == 3 and r["arg"] == 3
    assert r["after"] == 1009


def test_batch_is_all_or_nothing(child, targets):
    r = child(PRELUDE + """
names = ["plain_add", "rip_load", "calls_other", "frame_pointer"]
batch = [prepare(n) for n in names]
before = {n: sites.read_memory(addr(n), 16) for n in names}
# Someone else changes the last function after it was analysed.
victim = addr("frame_pointer")
native.hp_write_code(victim + batch[-1].plan.length - 1, b"\\x90", 1)
changed = sites.read_memory(victim, 16)
try:
    sites.redirect_batch([(s, addr("replacement")) for s in batch])
    report({"raised": False})
except errors.TransitionError as e:
    report({"raised": True, "message": str(e),
            "untouched": all(sites.read_memory(addr(n), 16) == before[n] for n in names[:-1]),
            "victim": sites.read_memory(victim, 16) == changed,
            "installed": [s.installed for s in batch],
            "calls": [call(n) for n in names[:-1]]})
""", **targets)[0]
    assert r["raised"]
    assert "not what it was expected" in r["message"]
    assert r["untouched"] and r["victim"]
    assert r["installed"] == [False] * 4
    assert r["calls"] == [6, 45, 12]


def test_many_sites_in_one_batch(child, targets):
    r = child(PRELUDE + """
names = ["plain_add", "rip_load", "calls_other", "frame_pointer", "jcc_leaf", "fentry_nop",
         "patchable", "endbr_func", "short_padded"]
batch = [prepare(n) for n in names]
sites.redirect_batch([(s, addr("replacement")) for s in batch])
patched = [call(n) for n in names]
sites.restore_batch(batch)
report({"patched": patched, "restored": [call(n) for n in names]})
""", **targets)[0]
    assert r["patched"] == [1005] * 9
    assert r["restored"] == [SHAPES[n][0] for n in ["plain_add", "rip_load", "calls_other",
                                                     "frame_pointer", "jcc_leaf", "fentry_nop",
                                                     "patchable", "endbr_func", "short_padded"]]


STRESS = PRELUDE + """
import time
entry = addr(P["name"])
old = call(P["name"], 7)
ok = (ctypes.c_long * 3)(old, 1007, 2007)
lib.stress_start(ctypes.c_void_p(entry), 4, ok, 3)
time.sleep(0.05)
site = prepare(P["name"])
t0 = time.time()
for i in range(P["rounds"]):
    sites.redirect_batch([(site, addr("replacement"))], form=P["form"])
    sites.redirect_batch([(site, addr("replacement2"))])
    sites.restore(site)
elapsed = time.time() - t0
total, a_bad = ctypes.c_long(), ctypes.c_long()
lib.stress_stop.restype = ctypes.c_long
bad = lib.stress_stop(ctypes.byref(total), ctypes.byref(a_bad))
report({"bad": bad, "a_bad": a_bad.value, "calls": total.value, "elapsed": elapsed})
"""


@pytest.mark.parametrize("name,form", [
    ("calls_other", "direct"),    # generic prologue: each install stops the world
    ("fentry_nop", "direct"),     # single NOP: one instruction, still written under a stop
    ("frame_pointer", "slot"),
    ("jcc_leaf", "call"),
])
def test_stress_threads_see_only_old_or_new(child, targets, name, form):
    rounds = 3_000 if (name, form) == ("calls_other", "direct") else 1_000
    r = child(STRESS, name=name, form=form, rounds=rounds, timeout=600, **targets)[0]
    assert r["calls"] > 100_000, r
    assert r["bad"] == 0, r


def test_thread_blocked_in_a_system_call_does_not_stop_patching(child, targets):
    r = child(PRELUDE + """
import time
lib.reader_start()
time.sleep(0.1)   # the reader is now blocked in read()
site = prepare("calls_other")      # generic: needs every thread parked
t0 = time.time()
sites.redirect_batch([(site, addr("replacement"))])
elapsed = time.time() - t0
sites.restore(site)
lib.reader_finish.restype = ctypes.c_long
report({"elapsed": elapsed, "read": lib.reader_finish()})
""", **targets)[0]
    assert r["elapsed"] < 1.0
    assert r["read"] == 42     # read() restarted and returned the byte, no EINTR


@pytest.mark.parametrize("stopper", ["ptrace", "signals"])
def test_thread_that_blocks_every_signal(child, targets, stopper):
    # ptrace stops it like any other thread; the signal stop cannot park it
    # and must say so, changing nothing.  (calls_other's entry has a
    # hot-patch point, which needs no stop: the stop is forced here.)
    r = child(PRELUDE + """
import faulthandler
faulthandler.cancel_dump_traceback_later()   # the deaf thread alone blocks signals
def blocking():
    found = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as status:
                if any(l.startswith("SigBlk:") and int(l.split()[1], 16) for l in status):
                    found.add(int(tid))
        except FileNotFoundError:
            pass   # exited meanwhile (the cancelled watchdog)
    return found
others = blocking()
lib.deaf_start()
deaf = sorted(blocking() - others)
site = prepare("calls_other")
before = sites.read_memory(site.address, 16)
sites.STOP_TIMEOUT_MS = 300
try:
    sites.redirect_batch([(site, addr("replacement"))])
    out = {"raised": False, "result": call("calls_other")}
    sites.restore(site)
except errors.TransitionError as e:
    out = {"raised": True, "message": str(e), "installed": site.installed,
           "result": call("calls_other")}
out.update(deaf=deaf, unchanged=sites.read_memory(site.address, 16) == before)
lib.deaf_stop()
report(out)
""", env={"HOTPATCH_STOPPER": stopper, "HOTPATCH_STOP": "always"}, **targets)[0]
    assert len(r["deaf"]) == 1, r
    if stopper == "ptrace":
        assert not r["raised"], r
        assert r["result"] == 1005 and r["unchanged"], r
    else:
        assert r["raised"], r
        assert f"thread {r['deaf'][0]}" in r["message"] and "blocks" in r["message"], r["message"]
        assert not r["installed"] and r["unchanged"] and r["result"] == 12, r


def test_fork_after_patching(child, targets):
    r = child(PRELUDE + """
site = prepare("calls_other")
sites.redirect_batch([(site, addr("replacement"))], form="slot")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    # The child has its own copy: restoring or retargeting here leaves the parent alone.
    seen = [call("calls_other")]
    sites.redirect_batch([(site, addr("replacement2"))])
    seen.append(call("calls_other"))
    sites.restore(site)
    seen.append(call("calls_other"))
    os.write(w, repr(seen).encode())
    os._exit(0)
os.close(w)
_, status = os.waitpid(pid, 0)
child_seen = os.read(r, 100).decode()
report({"status": status, "child": child_seen, "parent": call("calls_other")})
""", **targets)[0]
    assert r["status"] == 0
    assert r["child"] == "[1005, 2005, 12]"
    assert r["parent"] == 1005


def test_a_fork_while_the_core_registers_its_syncs(child, targets):
    # The core's own thread (native/ahead.c) registers the process for
    # membarrier's SYNC_CORE from the import on: an RCU grace period (5-25
    # ms here, the process having a thread besides), and a first batch
    # waits for it rather than registering again.  A child forked while the
    # thread is in that system call has no such thread: its first batch (a
    # thread there, so the cores are synced) registers for itself, not
    # waiting for the thread forever.
    r = child("""
import os, threading, time
from hotpatch._native import lib as native

def registering():
    # A thread in membarrier (system call 324 on x86-64): ahead.c's, registering.
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/syscall") as f:
                if f.read().split()[0] == "324":
                    return True
        except (FileNotFoundError, IndexError):
            pass
    return False

native.hp_first_write_ahead()
deadline = time.monotonic() + 5
while not registering() and time.monotonic() < deadline:
    pass
caught = registering()
pid = os.fork()
""" + PRELUDE + """
if pid == 0:
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    site = prepare("calls_other")
    sites.redirect_batch([(site, addr("replacement"))])
    seen = [call("calls_other"), native.hp_core_sync_ready()]
    sites.restore(site)
    seen.append(call("calls_other"))
    report({"child": seen})
    os._exit(0)
site = prepare("plain_add")
sites.redirect_batch([(site, addr("replacement"))])
parent = [call("plain_add"), native.hp_core_sync_ready()]
sites.restore(site)
deadline = time.monotonic() + 20
done, status = os.waitpid(pid, os.WNOHANG)
while not done and time.monotonic() < deadline:
    time.sleep(0.01)
    done, status = os.waitpid(pid, os.WNOHANG)
if not done:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
report({"child exited": bool(done), "status": status, "parent": parent, "caught": caught})
""", **targets)
    out = next(o for o in r if "parent" in o)
    assert out["caught"], "the fork did not come while the thread was registering"
    assert out["child exited"] and out["status"] == 0, out
    assert out["parent"] == [1005, 1], out
    assert [o["child"] for o in r if "child" in o] == [[1005, 1, 12]], r


def test_foreign_int3_reaches_the_earlier_sigtrap_handler(child, targets):
    r = child(PRELUDE + """
import signal
hits = []
signal.signal(signal.SIGTRAP, lambda *a: hits.append(1))
site = prepare("fentry_nop")              # single instruction: an int3 round
sites.redirect_batch([(site, addr("replacement"))])
sites.restore(site)
lib.raise_trap.restype = ctypes.c_long
value = lib.raise_trap()
report({"value": value, "hits": len(hits)})
""", **targets)[0]
    assert r == {"value": 7, "hits": 1}


def test_no_page_is_writable_and_executable(child, targets):
    r = child(PRELUDE + """
def wx_mappings():
    found = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if "w" in fields[1] and "x" in fields[1] and (
                "hotpatch" in line or P["lib"] in line):
            found.append(line.strip())
    return found
batch = [prepare(n) for n in ("plain_add", "fentry_nop", "calls_other")]
sites.redirect_batch([(batch[0], addr("replacement"))], form="slot")
sites.redirect_batch([(batch[1], addr("replacement"))], form="call")
sites.redirect_batch([(batch[2], addr("replacement"))])
during = wx_mappings()
pool = [l for l in open("/proc/self/maps") if "hotpatch" in l]
sites.restore_batch(batch)
report({"during": during, "after": wx_mappings(), "pool": pool})
""", **targets)[0]
    assert r["pool"], "the pool is not named in /proc/self/maps"
    assert r["during"] == [] and r["after"] == []


def test_mprotect_window_when_proc_self_mem_is_not_used(child, targets):
    # Kernels booted with proc_mem.force_override=never refuse /proc/self/mem
    # writes; the fallback is an mprotect window, forced here to test it.
    r = child(PRELUDE + """
import hotpatch
names = ["plain_add", "fentry_nop", "calls_other"]
before = {n: sites.read_memory(addr(n), 16) for n in names}
batch = [prepare(n) for n in names]
sites.redirect_batch([(s, addr("replacement")) for s in batch])
patched = [call(n) for n in names]
sites.redirect_batch([(s, addr("replacement2")) for s in batch], form="slot")
retargeted = [call(n) for n in names]
sites.restore_batch(batch)
wx = [l for l in open("/proc/self/maps") if "w" in l.split()[1] and "x" in l.split()[1]
      and (P["lib"] in l or "hotpatch" in l)]
report({"how": hotpatch.tree()["core"]["code_writes"], "patched": patched,
        "retargeted": retargeted, "restored": [call(n) for n in names],
        "identical": all(sites.read_memory(addr(n), 16) == before[n] for n in names), "wx": wx})
""", env={"HOTPATCH_CODE_WRITES": "mprotect"}, **targets)[0]
    assert r["how"] == "mprotect window"
    assert r["patched"] == [1005] * 3 and r["retargeted"] == [2005] * 3
    assert r["restored"] == [6, 25, 12] and r["identical"]
    assert r["wx"] == []


@pytest.fixture(scope="session")
def adjacent(tmp_path_factory):
    """400 small functions side by side (16 bytes apart at -O2)."""
    out = tmp_path_factory.mktemp("adjacent")
    source = out / "adjacent.c"
    source.write_text("".join(f"__attribute__((noipa)) long adj_{i}(long x) "
                              f"{{ return (x ^ (x >> 3)) * 5 + {i}; }}\n" for i in range(400)))
    path = str(out / "libadjacent.so")
    subprocess.run(["cc", "-O2", "-fPIC", "-shared", "-o", path, str(source)], check=True)
    return {"lib": path, "sizes": symbol_sizes(path)}


@pytest.mark.parametrize("how", ["ptrace", "signals", "mprotect"])
def test_adjacent_entries_are_written_by_spans(child, targets, adjacent, how):
    # With the threads held, writes close together are read, checked and
    # written as one span (check.c): every entry gets its jmp, the bytes
    # between the entries are left exactly as they were, and a restore
    # gives back the whole range byte for byte.
    r = child("""
import ctypes, faulthandler, os
from hotpatch import sites
if P["how"] == "signals":
    faulthandler.cancel_dump_traceback_later()      # every thread must take the park signal
shapes = ctypes.CDLL(P["shapes"])
lib = ctypes.CDLL(P["lib"])
def addr(l, name):
    return ctypes.cast(getattr(l, name), ctypes.c_void_p).value
names = [f"adj_{i}" for i in range(400)]
entries = [addr(lib, n) for n in names]
lo, hi = min(entries), max(entries) + 16
before = sites.read_memory(lo, hi - lo)
batch = sites.prepare_batch([(addr(lib, n), P["sizes"][n]) for n in names])
sites.redirect_batch([(s, addr(shapes, "replacement")) for s in batch])
during = sites.read_memory(lo, hi - lo)
written = set()
for s in batch:
    written.update(range(s.address - lo, s.address - lo + len(s.written)))
calls = [ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(e)(5) for e in entries]
sites.restore_batch(batch)
report({"calls": sorted(set(calls)),
        "between_kept": all(during[k] == before[k] for k in range(hi - lo) if k not in written),
        "written": len(written), "restored": sites.read_memory(lo, hi - lo) == before,
        "stopper": __import__("hotpatch").tree()["core"]["stopper"]["method"],
        "how": __import__("hotpatch").tree()["core"]["code_writes"]})
""", how=how, shapes=targets["lib"], env={"signals": {"HOTPATCH_STOPPER": "signals"},
                                           "mprotect": {"HOTPATCH_CODE_WRITES": "mprotect"}}
        .get(how, {}), **adjacent)[0]
    assert r["calls"] == [1005], r
    assert r["written"] >= 400 * 5 and r["between_kept"] and r["restored"], r
    assert r["stopper"] == ("signals" if how == "signals" else "ptrace"), r
    assert r["how"] == ("mprotect window" if how == "mprotect" else "/proc/self/mem"), r


def test_the_index_of_nearby_sites_answers_as_a_scan_of_every_site(child):
    """The sites near an address (native/nearby.c: what a first redirect and
    a hot-patch point must leave alone), filed by 64-byte block: the sites
    whose entry writes reach a span, whether a written point lies in it,
    and the bytes other sites write there (first.c's question), the same
    answers as asking every site, for spans on and across block boundaries,
    sites of every length ending just inside, just outside and across
    them, some of them taken out again, enough of them to grow the table."""
    r = child("""
import random
from hotpatch import sites
from hotpatch._native import ffi, lib
from hotpatch.x86_64.entry import EntryPlan
rng = random.Random(7)
base = 0x7f0000000000
made = []
for start in sorted(rng.sample(range(0, 65536), 3000)):
    # At most what a plan replaces: instructions covering 5 bytes, the last
    # starting within them (15 bytes at most), after an endbr64 sometimes.
    length = rng.choice([5, 6, 8, 11, 15, 19])
    address = base + start + rng.choice([0, 0, 4])
    plan = EntryPlan(base + start, address, length, bytes(length), "generic", False, False,
                     1, None, True)
    site = sites.Site(base + start, plan, 0)
    sites._sites[site.entry] = site
    sites._file(site)
    made.append(site)
points = {}
for site in rng.sample(made, 600):
    points[site.entry] = site.entry - 5
    lib.hp_near_point(site.entry, site.entry - 5)
for site in rng.sample(made, 300):      # taken out, their points with them
    del sites._sites[site.entry]
    lib.hp_near_unfile(site.entry)
    points.pop(site.entry, None)
    made.remove(site)
pairs = ffi.new("uint64_t[]", 512)
wrong = []
for _ in range(20000):
    lo = base + rng.randrange(-64, 65600)
    hi = lo + rng.randint(1, 200)
    reach = {s.entry for s in made if s.plan.address < hi and s.plan.address + s.plan.length > lo}
    got = {s.entry for s in sites._sites_reaching(lo, hi)}
    point = any(lo < hop + 5 and hop < hi for hop in points.values())
    plan = EntryPlan(lo, lo, hi - lo, bytes(hi - lo), "generic", False, False, 1, None, True)
    self = rng.choice(made).entry
    taken = sorted([(s.plan.address, s.plan.address + s.plan.length) for s in made
                    if s.entry in reach and s.entry != self] +
                   [(hop, hop + 5) for entry, hop in points.items()
                    if entry != self and lo < hop + 5 and hop < hi])
    n = lib.hp_near_taken(lo, hi, self, pairs, 256)
    got_taken = sorted((pairs[2 * k], pairs[2 * k + 1]) for k in range(n))
    if got != reach or sites._overlaps_a_hop(plan) != point or got_taken != taken:
        wrong.append([hex(lo), hex(hi), sorted(map(hex, reach ^ got)), point])
report({"wrong": wrong[:5], "count": len(wrong), "points": lib.hp_near_points(),
        "want_points": len(points)})
""")[0]
    assert r["count"] == 0 and r["points"] == r["want_points"], r
