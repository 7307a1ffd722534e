"""PLT slots of patched functions (hotpatch/plt.py, native/gotslot.c): the
JUMP_SLOT slots through which other objects call a patched function point
at its new code, follow the top of its stack and go back to the entry on
the last disable; function pointers (GLOB_DAT) keep the entry.  Every test
patches inside a child process."""
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _cc(out, source, *flags):
    subprocess.run(["cc", "-O2", "-fPIC", "-shared", "-o", out, os.path.join(HERE, source),
                    *flags], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def plt_libs(tmp_path_factory):
    """libcallee.so defines f; libcaller.so calls it through its PLT (partial
    RELRO, bound lazily when loaded so), libcaller_now.so the same with
    -z now (full RELRO: its GOT is read-only once relocated); libpointer.so
    takes f's address (GLOB_DAT)."""
    out = str(tmp_path_factory.mktemp("plt"))
    link = ["-L", out, "-lcallee", f"-Wl,-rpath,{out}", "-pthread"]
    libs = {"callee": _cc(os.path.join(out, "libcallee.so"), "targets/plt_callee.c")}
    libs["caller"] = _cc(os.path.join(out, "libcaller.so"), "targets/plt_caller.c", *link)
    libs["caller_now"] = _cc(os.path.join(out, "libcaller_now.so"), "targets/plt_caller.c",
                             *link, "-Wl,-z,now")
    libs["pointer"] = _cc(os.path.join(out, "libpointer.so"), "targets/plt_pointer.c", *link)
    return libs


PRELUDE = """
import ctypes, logging, os, struct
import lief
import hotpatch
from hotpatch import Patch, Object, Func, plt, sites, symbols

RTLD_LAZY, RTLD_NOW = 1, 2
libc = ctypes.CDLL(None)
libc.dlopen.restype = ctypes.c_void_p
libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.dlsym.restype = ctypes.c_void_p
libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

def load(path, mode=RTLD_NOW):
    handle = libc.dlopen(path.encode(), mode)
    assert handle, path
    return handle

def function(handle, name, restype=ctypes.c_long, argtypes=(ctypes.c_long,)):
    address = libc.dlsym(handle, name.encode())
    assert address, name
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)

def slot_of(path, name="f"):
    # The JUMP_SLOT slot of `name` in the loaded object `path`, from its file.
    base = symbols.find_object(path).base
    binary = lief.parse(path)      # kept alive while its relocations are read
    for rel in binary.pltgot_relocations:
        if (rel.type == lief.ELF.Relocation.TYPE.X86_64_JUMP_SLOT and rel.has_symbol
                and rel.symbol.name == name):
            return base + rel.address
    raise AssertionError(f"no JUMP_SLOT for {name} in {path}")

def read(address):
    return struct.unpack("<Q", ctypes.string_at(address, 8))[0]

def prot(address):
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return perms

callee = load(P["callee"])
F = libc.dlsym(callee, b"f")
NEW, NEW2 = libc.dlsym(callee, b"f_new"), libc.dlsym(callee, b"f_new2")
def patch(name, new, **kw):
    return Patch(name, [Object("libcallee.so", [Func("f", new)])], **kw)
def plt_slots(p):
    return hotpatch.tree()["livepatch"][p.name]["libcallee.so"]["f,1"]["plt_slots"]
"""


@pytest.mark.parametrize("variant", ["caller", "caller_now"])
def test_caller_slot_points_at_new_code_and_back(child, plt_libs, variant):
    r = child(PRELUDE + """
caller = load(P["caller"])
call_f = function(caller, "call_f")
pointer = load(P["pointer"])
f_address = function(pointer, "f_address", ctypes.c_void_p, ())
pointer_calls_f = function(pointer, "pointer_calls_f")
callee_calls_f = function(callee, "callee_calls_f")
slot, own = slot_of(P["caller"]), slot_of(P["callee"])
before = [read(slot) == F, read(own) == F, call_f(5), prot(slot)]
p = patch("fix", NEW)
hotpatch.register(p)
during = [read(slot) == NEW, read(own) == NEW, call_f(5), callee_calls_f(5), prot(slot),
          plt_slots(p),
          # function pointers still compare equal to f, and still reach the new code
          f_address() == F, libc.dlsym(callee, b"f") == F, pointer_calls_f(5)]
p.disable()
after = [read(slot) == F, read(own) == F, call_f(5), prot(slot), plt_slots(p)]
report({"before": before, "during": during, "after": after})
""", **{**plt_libs, "caller": plt_libs[variant]})[0]
    relro = "r--p" if variant == "caller_now" else "rw-p"
    assert r["before"] == [True, True, 11, relro]
    # The caller's slot and libcallee's own PLT call to f; the GOT of the
    # full RELRO object is read-only again after the store.
    assert r["during"] == [True, True, 1005, 1005, relro, 2, True, True, 1005]
    assert r["after"] == [True, True, 11, relro, 0]


def test_slots_follow_the_top_of_the_stack(child, plt_libs):
    r = child(PRELUDE + """
caller = load(P["caller_now"])
call_f = function(caller, "call_f")
slot = slot_of(P["caller_now"])
def holds(value):
    return [read(slot) == value, call_f(5)]
p1, p2 = patch("one", NEW), patch("two", NEW2)
hotpatch.register(p1)
hotpatch.register(p2)
out = {"stacked": holds(NEW2), "counts": [plt_slots(p1), plt_slots(p2)]}
p2.disable()
out["top disabled"] = holds(NEW) + [plt_slots(p1)]
p3 = patch("three", NEW2, replace=True)
hotpatch.register(p3)
out["replace"] = holds(NEW2) + [p1.enabled]
p3.disable()
out["last disabled"] = holds(F)
report(out)
""", **plt_libs)[0]
    # Two slots each time: the caller's, and libcallee's own PLT call to f.
    assert r == {"stacked": [True, 2005], "counts": [0, 2], "top disabled": [True, 1005, 2],
                 "replace": [True, 2005, False], "last disabled": [True, 11]}


def test_a_slot_changed_by_someone_else_is_left_alone(child, plt_libs):
    r = child(PRELUDE + """
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("hotpatch").addHandler(Keep())
caller = load(P["caller"])
call_f = function(caller, "call_f")
slot = slot_of(P["caller"])
p = patch("fix", NEW)
hotpatch.register(p)
ctypes.memmove(slot, struct.pack("<Q", NEW2), 8)   # someone else's redirect
p.disable()
report({"slot": read(slot) == NEW2, "call": call_f(5), "log": records,
        "recorded": [s for _b, s, _v in plt.redirected(F)]})
""", **plt_libs)[0]
    assert r["slot"] and r["call"] == 2005
    assert any("someone else changed it" in m and "libcaller.so" in m and "of f at" in m
               for m in r["log"]), r["log"]
    assert r["recorded"] == []


def test_lazily_bound_slot_is_left_alone_then_redirected_at_the_next_operation(child, plt_libs):
    r = child(PRELUDE + """
caller = load(P["caller"], RTLD_LAZY)
call_f = function(caller, "call_f")
slot = slot_of(P["caller"])
obj = symbols.find_object(P["caller"])
def in_caller(value):
    return any(lo <= value < hi for lo, hi in obj.exec_ranges)
unbound = read(slot)
p = patch("fix", NEW)
hotpatch.register(p)
out = {"unbound": in_caller(unbound), "left alone": read(slot) == unbound}
out["call"] = call_f(5)                   # the dynamic linker binds it now: to the entry
out["bound to the entry"] = read(slot) == F
other = Patch("other", [Object("libcallee.so", [Func("f_new2", NEW)])])
hotpatch.register(other)                 # any later operation finds it
out["redirected"] = read(slot) == NEW
out["call again"] = call_f(5)
other.disable()
p.disable()
out["restored"] = read(slot) == F
report(out)
""", **plt_libs, env={"LD_BIND_NOW": ""})[0]
    assert r == {"unbound": True, "left alone": True, "call": 1005, "bound to the entry": True,
                 "redirected": True, "call again": 1005, "restored": True}


def test_failed_batch_puts_the_slots_back(child, plt_libs):
    r = child(PRELUDE + """
caller = load(P["caller_now"])
call_f = function(caller, "call_f")
slot = slot_of(P["caller_now"])
p1 = patch("one", NEW)
hotpatch.register(p1)
real = sites.update_batch
def refuse(*a, **k):
    raise hotpatch.TransitionError("a thread stayed inside (simulated)")
sites.update_batch = refuse
try:
    hotpatch.register(patch("two", NEW2))
    failed = False
except hotpatch.TransitionError:
    failed = True
sites.update_batch = real
report([failed, read(slot) == NEW, call_f(5), plt_slots(p1)])
""", **plt_libs)[0]
    assert r == [True, True, 1005, 2]


def test_threads_calling_through_the_plt_while_it_flips(child, plt_libs):
    r = child(PRELUDE + """
caller = load(P["caller_now"])
start = function(caller, "start_callers", ctypes.c_int,
                 (ctypes.c_int, ctypes.c_long, ctypes.POINTER(ctypes.c_long), ctypes.c_int))
stop = function(caller, "stop_callers", ctypes.c_long, ())
calls = function(caller, "caller_calls", ctypes.c_long, ())
allowed = (ctypes.c_long * 2)(11, 1005)
p = patch("fix", NEW)
hotpatch.register(p, enable=False)
started = start(2, 5, allowed, 2)
for _ in range(200):
    p.enable()
    p.disable()
bad = stop()
report({"started": started, "bad": bad, "calls": calls(),
        "slot back": read(slot_of(P["caller_now"])) == F})
""", **plt_libs, timeout=180)[0]
    assert r["started"] == 2 and r["bad"] == 0 and r["calls"] > 0 and r["slot back"]


def test_redirect_object_and_forget_object(child, plt_libs):
    r = child(PRELUDE + """
p = patch("fix", NEW)
hotpatch.register(p)
caller = load(P["caller"])                # loaded after the patch: bound to the entry
slot = slot_of(P["caller"])
obj = symbols.find_object(P["caller"])
out = {"loaded": read(slot) == F}
plt.redirect_object(obj)                   # COMING, once relocated
out["redirected"] = read(slot) == NEW
out["recorded"] = any(s == slot for _b, s, _v in plt.redirected(F))
out["call"] = function(caller, "call_f")(5)
plt.forget_object(obj)                     # GOING: nothing written
out["forgotten"] = not any(s == slot for _b, s, _v in plt.redirected(F))
out["untouched"] = read(slot) == NEW
out["others kept"] = len(plt.redirected(F))
plt.forget_object(symbols.find_object(P["callee"]))   # the function's own object
out["function forgotten"] = [plt.redirected(F), plt.target_of(F)]
report(out)
os._exit(0)    # the caller's slot now points at code hotpatch no longer tracks
""", **plt_libs)[0]
    assert r == {"loaded": True, "redirected": True, "recorded": True, "call": 1005,
                 "forgotten": True, "untouched": True, "others kept": 1,
                 "function forgotten": [[], None]}


def test_observed_site_keeps_its_slots_at_the_entry(child, plt_libs):
    # Observers see every call: PLT calls must keep going through the entry.
    r = child(PRELUDE + """
caller = load(P["caller"])
call_f = function(caller, "call_f")
slot = slot_of(P["caller"])
site = sites.prepare(F)
sites.redirect_batch([(site, NEW)], form="call")
sites.add_observer(site, libc.dlsym(callee, b"count_observer"))
p = patch("fix", NEW2)
hotpatch.register(p)
observed = ctypes.c_long.in_dll(ctypes.CDLL(P["callee"]), "observed_calls")
report([site.form, read(slot) == F, call_f(5), observed.value, plt_slots(p)])
""", **plt_libs)[0]
    assert r == ["call", True, 2005, 1, 0]


def test_python_zlib_module_calls_patched_libz_crc32(child):
    r = child("""
import zlib
import hotpatch
from hotpatch import Patch, Object, Func, plt, symbols
expected = zlib.crc32(b"hotpatch")
func = Func("crc32", lambda crc, buf, n: 12345,
            signature="unsigned long(unsigned long, const unsigned char *, unsigned int)")
p = Patch("crc", [Object("libz.so.1", [func])])
hotpatch.register(p)
module = symbols.find_object(zlib.__file__)
slots = {base: value for base, _slot, value in plt.redirected(func.old_addr)}
during = [zlib.crc32(b"hotpatch"), slots.get(module.base) == func.new_addr,
          hotpatch.tree()["livepatch"]["crc"]["libz.so.1"]["crc32,1"]["plt_slots"] >= 1]
p.disable()
report({"during": during, "after": zlib.crc32(b"hotpatch") == expected,
        "left": plt.redirected(func.old_addr)})
""")[0]
    assert r == {"during": [12345, True, True], "after": True, "left": []}
