"""Shadow variables (klp_shadow_*): the kernel's livepatch-shadow-mod /
-fix1 / -fix2 samples ported, native readers racing the writers, and the
Python API.  Each runs in a child process."""
import os

import pytest

from conftest import compile_library

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shadow_targets")


@pytest.fixture(scope="session")
def shadow_build(tmp_path_factory):
    from hotpatch import module
    out = str(tmp_path_factory.mktemp("shadow"))
    built = {"lib": compile_library(os.path.join(out, "libshadowdummy.so"),
                                    ["shadow_targets/dummy.c"]),
             "stress": compile_library(os.path.join(out, "libshadowstress.so"),
                                       ["shadow_targets/stress.c"],
                                       ["-I", module.INCLUDE_DIR, "-pthread"])}
    for name in ("fix1", "fix2"):
        built[name] = module.build(os.path.join(TARGETS, f"{name}.c"),
                                   os.path.join(out, f"shadow_{name}.so"))
    return built


PRELUDE = """
import ctypes
import hotpatch
from hotpatch import shadow
SV_LEAK, SV_COUNTER = 1, 2
lib = ctypes.CDLL(P["lib"])
lib.dummy_alloc.restype = ctypes.c_void_p
lib.dummy_alloc.argtypes = [ctypes.c_ulong]
lib.dummy_free.argtypes = [ctypes.c_void_p]
lib.dummy_check.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
leaks = ctypes.c_long.in_dll(lib, "dummy_live_leaks")
def cycles(n):
    for i in range(n):
        lib.dummy_free(lib.dummy_alloc(i))
def word(address):
    return ctypes.c_ulong.from_address(address).value
"""


def test_shadow_sample_leak_fixed_by_fix1_counted_by_fix2(child, shadow_build):
    r = child(PRELUDE + """
out = {}
cycles(10)
out["unpatched"] = leaks.value                 # every cycle leaks
before_patch = lib.dummy_alloc(0)              # leaks; no shadow data will know
fix1 = hotpatch.load(P["fix1"])
cycles(200)
out["fix1"] = leaks.value                      # no more
d = lib.dummy_alloc(5)
leak = shadow.get(d, SV_LEAK)                  # attached in C, found from Python
out["shadow_leak"] = leak is not None and word(leak) != 0
lib.dummy_free(d)
out["after_free"] = [shadow.get(d, SV_LEAK), leaks.value]
lib.dummy_free(before_patch)                   # no SV_LEAK: its buffer stays leaked
out["old_dummy"] = leaks.value
keep = [lib.dummy_alloc(100 + i) for i in range(5)]
out["kept"] = [leaks.value, shadow.count()]
fix2 = hotpatch.load(P["fix2"])                # stacked: dummy_check, dummy_free
for d in keep:
    for jiffies in (50, 150, 250):
        lib.dummy_check(d, jiffies)
out["counters"] = [word(shadow.get(d, SV_COUNTER)) for d in keep]
lib.dummy_free(keep.pop(0))                    # fix2's free: both shadow variables
out["fix2_free"] = [leaks.value, shadow.count()]
fix2.disable()                                 # post_unpatch: hp_shadow_free_all(SV_COUNTER)
out["fix2_off"] = [shadow.get(keep[0], SV_COUNTER), shadow.get(keep[0], SV_LEAK) is not None,
                   shadow.count()]
fix1.disable()                                 # post_unpatch: the kept dummies' buffers freed
out["fix1_off"] = [leaks.value, shadow.count()]
for d in keep:
    lib.dummy_free(d)
cycles(3)
out["unpatched_again"] = leaks.value
report(out)
""", **shadow_build)[0]
    assert r["unpatched"] == 10
    assert r["fix1"] == 11                     # 10 + the dummy allocated before the patch
    assert r["shadow_leak"] and r["after_free"] == [None, 11]
    assert r["old_dummy"] == 11
    assert r["kept"] == [16, 5]
    assert r["counters"] == [3] * 5
    assert r["fix2_free"] == [15, 4 + 4]       # 4 leaks + 4 counters attached
    assert r["fix2_off"] == [None, True, 4]
    assert r["fix1_off"] == [11, 0]
    assert r["unpatched_again"] == 14


def test_native_readers_race_alloc_and_free(child, shadow_build):
    r = child("""
import ctypes, itertools, os, time
from hotpatch import shadow
from hotpatch._native import lib as core, ffi
MAGIC, ID, N = 0x5ead5ead5ead5ead, 77, 10_000
stress = ctypes.CDLL(P["stress"])
stress.stress_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int]
arena = ctypes.create_string_buffer(1 << 22)          # addresses to attach to
base = ctypes.addressof(arena)
bucket = lambda a: core.hp_shadow_bucket(ffi.cast("void *", a), ID)
# All in one bucket: a lookup of a stable one walks through the churned ones.
# (1 MiB of addresses held only 23 of one bucket in some runs: 4 MiB, and
# the search stops at 24.)
same = list(itertools.islice((a for a in range(base, base + (1 << 22), 8)
                              if bucket(a) == bucket(base)), 24))
churned, stable = same[:8], same[8:]
def ctor(obj, data):
    for i in range(8):
        ctypes.c_ulong.from_address(data + 8 * i).value = MAGIC
def dtor(obj, data):
    for i in range(8):
        ctypes.c_ulong.from_address(data + 8 * i).value = 0
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for a in stable:
    shadow.alloc(a, ID, 64, ctor)                     # behind what is inserted later
everything = churned + stable
objs = (ctypes.c_void_p * len(everything))(*everything)
flags = (ctypes.c_int * len(everything))(*[a in stable for a in everything])
assert stress.stress_start(core.hp_api_table(), objs, flags, len(everything), ID, MAGIC, 4) == 0
start, rss_start, freed = time.monotonic(), None, 0
for i in range(N):
    shadow.alloc(churned[i % 8], ID, 64, ctor)
    if i % 8 == 7:
        for o in churned:
            freed += shadow.free(o, ID, dtor)
    if i == 1000:
        rss_start = rss()
out = (ctypes.c_ulong * 3)()
stress.stress_stop(out)
report({"gets": out[0], "hits": out[1], "bad": out[2], "freed": freed, "stable": len(stable),
        "left": shadow.count(), "stable_freed": shadow.free_all(ID),
        "growth": rss() - rss_start, "seconds": time.monotonic() - start})
""", **shadow_build)[0]
    assert r["stable"] == 16 and r["bad"] == 0, r
    assert r["freed"] == 10_000 and r["left"] == 16 and r["stable_freed"] == 16, r
    assert r["gets"] > 1000 and r["hits"] > 0, r
    assert r["growth"] < 8 << 20, r


def test_python_api_round_trip(child):
    r = child("""
import ctypes
import hotpatch
from hotpatch import shadow
out = {}
buf = ctypes.create_string_buffer(16)
obj = ctypes.addressof(buf)
calls = []
def ctor(o, data):
    calls.append(("ctor", o == obj))
    ctypes.c_int.from_address(data).value = 7
data = shadow.alloc(obj, 1, 4, ctor)
out["get"] = [shadow.get(obj, 1) == data, shadow.get(ctypes.c_void_p(obj), 1) == data,
              shadow.get(ctypes.cast(obj, ctypes.POINTER(ctypes.c_int)), 1) == data,
              shadow.get(obj, 2), shadow.get(obj + 1, 1)]
out["value"] = ctypes.c_int.from_address(data).value
try:
    shadow.alloc(obj, 1, 4)
except hotpatch.HotpatchError as e:
    out["double"] = str(e)
out["same"] = shadow.get_or_alloc(obj, 1, 4, ctor) == data
zeroed = shadow.get_or_alloc(obj, 2, 32)
out["zeroed"] = ctypes.string_at(zeroed, 32) == bytes(32)
for value in (1, -22):
    try:
        shadow.alloc(obj, 3, 8, lambda o, d: value)
    except hotpatch.HotpatchError as e:
        out.setdefault("ctor_failed", []).append([str(e), shadow.get(obj, 3)])
try:
    shadow.alloc(obj, 3, 8, lambda o, d: 1 / 0)
except ZeroDivisionError:
    out["ctor_raised"] = shadow.get(obj, 3)
for other in range(10):
    shadow.alloc(obj + 100 + other, 2, 8)
try:
    shadow.alloc(obj, 4, (1 << 64) - 1)
except hotpatch.HotpatchError as e:
    out["huge"] = [str(e), shadow.get(obj, 4)]
out["count"] = shadow.count()
out["free"] = [shadow.free(obj, 1, lambda o, d: calls.append(("dtor", ctypes.c_int.from_address(d).value))),
               shadow.get(obj, 1), shadow.free(obj, 1)]
out["free_all"] = shadow.free_all(2, lambda o, d: calls.append(("dtor2", o)))
out["after"] = [shadow.get(obj, 2), shadow.count()]
out["calls"] = [c[0] for c in calls]
out["dtor_value"] = list(calls[1])
out["hotpatch.shadow"] = hotpatch.shadow is shadow and "shadow" in dir(hotpatch)
try:
    shadow.get("x", 1)
except TypeError as e:
    out["type"] = str(e)
report(out)
""")[0]
    assert r["get"] == [True, True, True, None, None], r
    assert r["value"] == 7
    assert "exists already" in r["double"]
    assert r["same"] and r["zeroed"]
    assert [e[1] for e in r["ctor_failed"]] == [None, None]
    assert all("constructor failed" in e[0] for e in r["ctor_failed"])
    assert r["ctor_raised"] is None
    assert "out of memory" in r["huge"][0] and r["huge"][1] is None
    assert r["count"] == 12
    assert r["free"] == [True, None, False]
    assert r["free_all"] == 11 and r["after"] == [None, 0]
    assert r["calls"] == ["ctor", "dtor"] + ["dtor2"] * 11
    assert r["dtor_value"] == ["dtor", 7]
    assert r["hotpatch.shadow"] and "address" in r["type"]


V2_MODULE = r"""
/* A module built against version 2 of hotpatch.h: no hotpatch_api. */
#include <hotpatch.h>
static long plus(unsigned long x) { return 1; }
static struct hp_func funcs[] = { { .old_name = "dummy_check", .new_func = plus }, { } };
static struct hp_object objs[] = { { .name = "libshadowdummy.so", .funcs = funcs }, { } };
static struct hp_patch patch = { .name = "v2", .objs = objs };
__attribute__((visibility("default"))) struct hp_patch *const hotpatch_patch_descriptor = &patch;
__attribute__((visibility("default"))) const unsigned int hotpatch_abi_version = 2;
"""


def test_version_2_module_without_api_still_loads_and_fork_resets(child, shadow_build, tmp_path):
    from hotpatch import module
    source = tmp_path / "v2.c"
    source.write_text(V2_MODULE)
    so = module.build(str(source), str(tmp_path / "v2.so"))
    r = child(PRELUDE + """
import os
patch = hotpatch.load(P["so"])
out = {"patched": lib.dummy_check(lib.dummy_alloc(10), 0)}
data = shadow.alloc(0x1000, 9, 8)
pid = os.fork()
if pid == 0:                       # the child's table is the parent's, and usable
    ok = shadow.get(0x1000, 9) == data and shadow.free(0x1000, 9) and shadow.get(0x1000, 9) is None
    os._exit(0 if ok else 1)
out["child"] = os.waitpid(pid, 0)[1]
out["parent"] = shadow.get(0x1000, 9) == data
report(out)
""", lib=shadow_build["lib"], so=so)[0]
    assert r == {"patched": 1, "child": 0, "parent": True}
