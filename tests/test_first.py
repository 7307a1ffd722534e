"""A function's first redirect in one call of the C core (native/first.c,
``sites.redirect``): the decisions of the batch path (prepare, then
redirect_batch) for every entry shape, its neighbours' bytes left alone,
and native threads that block every signal calling the function while it
is redirected and restored hundreds of times.

Every test runs in a child process with faulthandler's watchdog blocking
every signal (conftest.run_child)."""
import os

import pytest

from conftest import ALONE, LIBZ, STOPS_PRELUDE, compile_library, symbol_sizes


@pytest.fixture(scope="session")
def first_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("first"))
    lib = compile_library(os.path.join(out, "libfirst.so"),
                          ["targets/stopper.c", "targets/shapes.c", "targets/hops.c",
                           "targets/unstopped.c"], flags=["-pthread"])
    return {"lib": lib, "sizes": symbol_sizes(lib)}


PRELUDE = STOPS_PRELUDE + """
RANGES = hotpatch.symbols.find_object(OBJ).exec_ranges
def size(name):
    return P["sizes"][name]
# How many sites the batch path prepared (sites.redirect falls back to it).
batch_prepared = [0]
_prepare = sites._prepare
def _counting_prepare(*args, **kwargs):
    batch_prepared[0] += 1
    return _prepare(*args, **kwargs)
sites._prepare = _counting_prepare
def first_redirect(name, to="replacement"):
    return sites.redirect(addr(name), addr(to), size=size(name), exec_ranges=RANGES)
def batch_redirect(name, to="replacement"):
    site = sites.prepare(addr(name), size=size(name), exec_ranges=RANGES)
    sites.redirect_batch([(site, addr(to))])
    return site
"""

# Each shape the one-call path decides for: a hot-patch point taken
# (hop_plain, hop_after_short), none where the first instruction is 1 byte
# (hop_push), where only the function before could tell (hop_swept) or
# where a function falls through the padding (hop_fallen_into); an entry
# whose first instruction covers the jmp (us_long_first: one atomic
# store); a function shorter than the jmp, padding after it (short_padded).
SHAPES = ["hop_plain", "hop_after_short", "hop_push", "hop_swept", "hop_fallen_into",
          "us_long_first", "short_padded"]

DECIDE = PRELUDE + """
redirect = first_redirect if P["mode"] == "first" else batch_redirect
out = {}
for name in P["shapes"]:
    before = sites.read_memory(addr(name) - 8, 24)
    old = call(name)
    holder = []
    took_ = took(lambda: holder.append(redirect(name)))
    site = holder[0]
    out[name] = {"took": took_, "old": old, "patched": call(name), "form": site.form,
                 "hopped": site.hopped, "hop": site._hop and site._hop - addr(name),
                 "length": site.plan.length, "entry": sites.read_memory(site.address, 2).hex()}
    sites.restore(site)
    after = sites.read_memory(addr(name) - 8, 24)
    out[name].update(restored=call(name), entry_back=after[8:] == before[8:])
out["batch_prepared"] = batch_prepared[0]
report(out)
"""


def test_one_call_decides_as_the_batch_path(child, first_lib):
    batch = child(DECIDE, mode="batch", shapes=SHAPES, **first_lib)[0]
    first = child(DECIDE, mode="first", shapes=SHAPES, **first_lib)[0]
    # the one-call path took every shape without the batch path
    assert first.pop("batch_prepared") == 0, first
    assert batch.pop("batch_prepared") == len(SHAPES), batch
    assert first == batch
    for name, r in first.items():
        assert r["patched"] == 1007 and r["restored"] == r["old"] != 1007, (name, r)
        assert r["form"] == "direct" and r["entry_back"], (name, r)
    for name in ("hop_plain", "hop_after_short"):
        assert first[name]["hopped"] and first[name]["hop"] == -5, (name, first[name])
        assert first[name]["took"] == [0, 1] and first[name]["entry"] == "ebf9", first[name]
    for name in ("hop_push", "hop_swept", "hop_fallen_into", "short_padded"):
        assert not first[name]["hopped"] and first[name]["took"] == [1, 0], (name, first[name])
    assert first["us_long_first"]["took"] == [0, 1] and not first["us_long_first"]["hopped"]
    assert first["short_padded"]["length"] == 5, first["short_padded"]


def test_one_call_leaves_a_neighbours_bytes_alone(child, first_lib):
    # hop_short's site replaces the bytes where hop_after_short's hot-patch
    # point would be: with that site kept (restored, its stub kept for
    # next time), hop_after_short takes the stop instead.  The other way
    # round, hop_after_short redirected through its point: the padding
    # after hop_short is that point's jmp now, so hop_short is refused,
    # with nothing written.
    r = child(PRELUDE + """
out = {}
short = first_redirect("hop_short")
out["short"] = [short.plan.length, call("hop_short")]
sites.restore(short)
after = first_redirect("hop_after_short")
out["beside_a_site"] = [after.hopped, call("hop_after_short")]
report(out)
""", **first_lib)[0]
    assert r["short"] == [5, 1007] and r["beside_a_site"] == [False, 1007], r
    r = child(PRELUDE + """
from hotpatch.errors import UnsafeToPatch
after = first_redirect("hop_after_short")
before = sites.read_memory(addr("hop_short"), 16)
try:
    first_redirect("hop_short")
    refused = None
except UnsafeToPatch as e:
    refused = str(e)
report({"hopped": after.hopped, "refused": refused, "short": call("hop_short"),
        "after": call("hop_after_short"),
        "unchanged": sites.read_memory(addr("hop_short"), 16) == before})
""", **first_lib)[0]
    assert r["hopped"] and r["after"] == 1007, r
    assert "3 bytes, too short" in r["refused"] and "no padding follows it" in r["refused"], r
    assert r["short"] == 0 and r["unchanged"], r
    # A neighbour prepared by a batch counts too (the C core files the
    # sites it plans, native/nearby.c), and a forgotten one no longer does.
    r = child(PRELUDE + """
out = {}
short, = sites.prepare_batch([(addr("hop_short"), size("hop_short"))], exec_ranges=RANGES)
after = first_redirect("hop_after_short")
out["beside_a_batch_site"] = [after.hopped, call("hop_after_short")]
sites.restore(after)
sites.forget([short, after])
again = first_redirect("hop_after_short")
out["once_forgotten"] = [again.hopped, call("hop_after_short")]
report(out)
""", **first_lib)[0]
    assert r == {"beside_a_batch_site": [False, 1007], "once_forgotten": [True, 1007]}, r


def test_a_target_out_of_reach_goes_through_a_slot(child, first_lib):
    # Beyond +-2 GiB of the entry: the one-call path plans, the batch path
    # writes the slot form.
    r = child(PRELUDE + """
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
# 16 GiB away, above or below (a hint the kernel takes where it is free)
for hint in (addr("hop_plain") + (1 << 34), addr("hop_plain") - (1 << 34)):
    where = libc.mmap(hint & ~0xfff, 4096, 7, 0x22, -1, 0)     # rwx, private anonymous
    if abs(where - addr("hop_plain")) > 1 << 32:
        break
ctypes.memmove(where, bytes.fromhex("48c7c0e9030000c3"), 8)    # mov $1001, %rax; ret
site = sites.redirect(addr("hop_plain"), where, size=size("hop_plain"), exec_ranges=RANGES)
report({"far": abs(where - addr("hop_plain")) > 1 << 32, "form": site.form,
        "patched": call("hop_plain"), "batch_prepared": batch_prepared[0]})
sites.restore(site)
""", **first_lib)[0]
    assert r["far"], r
    assert r["form"] == "slot" and r["patched"] == 1001 and r["batch_prepared"] == 0, r


def test_callers_and_sleepers_while_redirected_again_and_again(child, first_lib):
    # Native threads that block every signal call the function in a loop
    # while it is redirected in one call, restored and its site forgotten
    # (the next redirect is a first one again, its stub from the freed
    # blocks), 200 times: only the old or the new result, and sleepers in
    # read, poll, epoll, nanosleep and sem_timedwait never woken early.
    r = child(PRELUDE + """
name = P["name"]
lib.st_callers_start(ctypes.c_void_p(addr(name)), 2, (ctypes.c_long * 2)(22, 1007), 2, 1)
lib.st_sleepers_start()
time.sleep(0.02)
before = sites.read_memory(addr(name), 16)
def retries():
    return hotpatch.tree()["core"]["stops"]["retries"]
stops0, unstopped0, retries0 = *counts(), retries()
for i in range(P["cycles"]):
    site = first_redirect(name)
    sites.restore(site)
    sites.forget([site])
stops1, unstopped1, retries1 = *counts(), retries()
total, a_bad = ctypes.c_long(), ctypes.c_long()
bad = lib.st_callers_stop(ctypes.byref(total), ctypes.byref(a_bad))
out = (ctypes.c_long * 25)()
lib.st_sleepers_finish(out)
report({"bad": bad, "calls": total.value, "stops": stops1 - stops0,
        "retries": retries1 - retries0,
        "unstopped": unstopped1 - unstopped0, "batch_prepared": batch_prepared[0],
        "free": len(sites._free_code),
        "sleepers": [list(out[k * 5:k * 5 + 4]) for k in range(5)],
        "identical": sites.read_memory(addr(name), 16) == before, "final": call(name)})
""", name="hop_plain", cycles=200, timeout=300, **first_lib)[0]
    assert r["bad"] == 0 and r["calls"] > 10_000, r
    assert r["batch_prepared"] == 0 and r["free"] <= 2, r
    # the first redirect through the hot-patch point; after it the padding
    # holds a jmp (a thread may be on it): the others take a stop (tried
    # again where it held a caller inside the bytes)
    assert r["stops"] - r["retries"] == 199 and r["unstopped"] == 200 + 1, r
    assert r["identical"] and r["final"] == 22, r
    read, poll, epoll, nano, sem = r["sleepers"]
    for got, byte in ((read, "r"), (poll, "p"), (epoll, "e")):
        assert got[0] == 1 and got[1] == 0 and got[2] == ord(byte), r
    assert nano[0] == 0 and nano[3] >= 1_500_000_000, r


def test_a_process_of_one_thread_takes_no_hot_patch_point(child, first_lib):
    # With the watchdog gone the calling thread is the process's only one:
    # the jmp rel32 at hop_plain's entry needs no stop there, so neither
    # path takes its hot-patch point (it would add a jump to every call).
    # With a second thread the point is looked for, and taken, again.
    r = child(PRELUDE + ALONE + """
out = {"threads": len(os.listdir("/proc/self/task"))}
for name, redirect in (("hop_plain", first_redirect), ("hop_after_short", batch_redirect)):
    a0 = alone()
    site = redirect(name)
    out[name] = [site.hopped, sites.read_memory(site.address, 1).hex(), alone() - a0,
                 call(name)]
    sites.restore(site)
release = threading.Event()
t = threading.Thread(target=release.wait)
t.start()
site = first_redirect("hop_plain")
out["two_threads"] = [site.hopped, site._hop - addr("hop_plain"), call("hop_plain")]
sites.restore(site)
release.set()
t.join()
report(out)
""", **first_lib)[0]
    assert r["threads"] == 1, r
    assert r["hop_plain"] == [False, "e9", 1, 1007], r
    assert r["hop_after_short"] == [False, "e9", 1, 1007], r
    assert r["two_threads"] == [True, -5, 1007], r


SWEPT = PRELUDE + """
obj = hotpatch.symbols.find_object(OBJ)
def asked(address):
    return hotpatch.symbols.function_before(obj, address)
# Asked of a callable before the C call, or looked up by the C core in its
# index (the livepatch model's FunctionBefore).
before = asked if P["before"] == "callable" else hotpatch.symbols.function_before_of(obj)
holder = []
def redirect():
    if P["mode"] == "first":
        holder.append(sites.redirect(addr("hop_swept"), addr("replacement"),
                                     size=size("hop_swept"), exec_ranges=RANGES,
                                     function_before=before))
    else:
        site, = sites.prepare_batch([(addr("hop_swept"), size("hop_swept"))],
                                    exec_ranges=RANGES, function_before=before)
        sites.redirect_batch([(site, addr("replacement"))])
        holder.append(site)
took_ = took(redirect)
report({"took": took_, "hopped": holder[0].hopped, "patched": call("hop_swept"),
        "batch_prepared": batch_prepared[0]})
"""


@pytest.mark.parametrize("before", ["callable", "index"])
def test_the_function_before_finds_a_hot_patch_point_in_one_call(child, first_lib, before):
    # hop_swept's padding follows bytes that decode two ways: only a sweep
    # from the function before (the symbol table's) shows it is dead.  Given
    # that function, the one-call path takes the point as the batch path
    # does: no stop.
    first = child(SWEPT, mode="first", before=before, **first_lib)[0]
    batch = child(SWEPT, mode="batch", before=before, **first_lib)[0]
    assert first == {**batch, "batch_prepared": 0}, (first, batch)
    assert first["took"] == [0, 1] and first["hopped"] and first["patched"] == 1007, first


def test_each_redirect_looks_in_the_index_of_the_object_it_is_given(child, first_lib):
    # The one-call path keeps the last FunctionBefore's index in its request
    # (a patch's functions are in one object).  libz's crc32 first, by
    # libz's index; then hop_swept, whose point only a sweep from the
    # function before shows, by the test library's: looked up in libz's
    # index it would find no function before it, and take a stop.
    r = child(PRELUDE + LIBZ + """
zobj = hotpatch.symbols.find_object("libz.so.1")
zsize = next(s.size for s in hotpatch.symbols.functions(zobj) if s.address == crc)
theirs = hotpatch.symbols.function_before_of(zobj)
ours = hotpatch.symbols.function_before_of(hotpatch.symbols.find_object(OBJ))
holder = []
took_z = took(lambda: holder.append(sites.redirect(
    crc, adler, size=zsize, exec_ranges=zobj.exec_ranges, function_before=theirs)))
took_s = took(lambda: holder.append(sites.redirect(
    addr("hop_swept"), addr("replacement"), size=size("hop_swept"), exec_ranges=RANGES,
    function_before=ours)))
z, s = holder
report({"took": [took_z, took_s], "hopped": [z.hopped, s.hopped],
        "patched": [libz.crc32(0, b"abc", 3), call("hop_swept")], "want": want,
        "batch_prepared": batch_prepared[0]})
""", **first_lib)[0]
    assert r["took"] == [[0, 1], [0, 1]] and r["hopped"] == [True, True], r
    assert r["patched"] == [r["want"]["adler"], 1007] and r["batch_prepared"] == 0, r


def test_a_library_nobody_here_wrote_in_one_call(child, first_lib):
    # libz's crc32 sent to adler32 by one call, with the function before
    # from libz's symbol table as the model gives it: no stop, the batch
    # path never asked, and its entry's bytes back exactly after.
    r = child(PRELUDE + LIBZ + """
obj = hotpatch.symbols.find_object("libz.so.1")
size = next(s.size for s in hotpatch.symbols.functions(obj) if s.address == crc)
holder = []
took_ = took(lambda: holder.append(sites.redirect(
    crc, adler, size=size, exec_ranges=obj.exec_ranges,
    function_before=lambda a: hotpatch.symbols.function_before(obj, a))))
out = {"want": want, "took": took_, "patched": libz.crc32(0, b"abc", 3),
       "hopped": holder[0].hopped, "batch_prepared": batch_prepared[0]}
sites.restore(holder[0])
out.update(restored=libz.crc32(0, b"abc", 3), identical=sites.read_memory(crc, 16) == before)
report(out)
""", **first_lib)[0]
    assert r["patched"] == r["want"]["adler"] != r["want"]["crc"], r
    assert r["took"] == [0, 1] and r["hopped"] and r["batch_prepared"] == 0, r
    assert r["restored"] == r["want"]["crc"] and r["identical"], r


def test_a_point_and_its_entry_are_written_all_or_nothing(child, first_lib):
    # The one call that writes a first redirect through its hot-patch point
    # (hp_write_dead_then_batch): a point whose padding is not there, or an
    # entry whose bytes are not, leaves both as they were; otherwise both
    # are written, the point's jmp first, and the function is redirected.
    r = child(PRELUDE + """
from hotpatch._native import ffi, lib as core
from hotpatch.x86_64 import encode
site = sites.prepare(addr("hop_plain"), size=size("hop_plain"), exec_ranges=RANGES)
point, entry = sites.hot_patch_point(site), site.entry
padding, first = sites.read_memory(point, 5), sites.read_memory(entry, 2)
jump, short = encode.jmp_rel32(point, addr("replacement")), bytes([0xEB, point - entry - 2 & 0xFF])
def attempt(point_old, entry_old):
    dead = ffi.new("struct hp_write *", (point, point_old, jump, 5))
    w = ffi.new("struct hp_write *", (entry, entry_old, short, 2))
    err = ffi.new("char[256]")
    rc = core.hp_write_dead_then_batch(dead, 1, w, 1, 1, 1000, err)
    return {"rc": rc, "err": ffi.string(err).decode(), "point": sites.read_memory(point, 5),
            "entry": sites.read_memory(entry, 2), "result": call("hop_plain")}
old = call("hop_plain")
out = {"point_changed": attempt(b"\\xcc" * 5, first), "entry_changed": attempt(padding, b"\\x90\\x90"),
       "written": attempt(padding, first)}
for k, v in out.items():
    v.update(point=v["point"] == jump, padding=v["point"] == padding, entry=v["entry"] == short,
             first=v["entry"] == first, redirected=v["result"] != old)
report(out)
""", **first_lib)[0]
    for refused in ("point_changed", "entry_changed"):
        assert r[refused]["rc"] == -1 and r[refused]["err"], r
        assert r[refused]["padding"] and r[refused]["first"] and not r[refused]["redirected"], r
    assert r["written"]["rc"] == 0 and r["written"]["point"] and r["written"]["entry"], r
    assert r["written"]["redirected"], r
