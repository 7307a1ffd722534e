"""Writes that need no stop (native/unstopped.c): one atomic store where the
bytes replaced hold one instruction -- hotpatch's own jmp when an entry is
restored or retargeted, an entry whose first instruction covers the write --
and the stop for everything else: entries of several instructions, a write
across a cache line, a process where the kernel refuses a writable and
executable page (PR_SET_MDWE), and HOTPATCH_STOP=always.

Every test runs in a child process with faulthandler's watchdog blocking
every signal (conftest.run_child)."""
import os

import pytest

from conftest import (ALONE, CALLERS_AND_SLEEPERS, STOPS_PRELUDE, check_callers_and_sleepers,
                      compile_library)


@pytest.fixture(scope="session")
def unstopped_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("unstopped"))
    path = compile_library(
        os.path.join(out, "libunstopped.so"),
        ["targets/stopper.c", "targets/shapes.c", "targets/fentry.c", "targets/patchable.c",
         "targets/unstopped.c"],
        flags=["-pthread"],
        per_source_flags={
            "targets/fentry.c": ["-fno-pic", "-pg", "-mfentry", "-mnop-mcount"],
            "targets/patchable.c": ["-fPIC", "-fpatchable-function-entry=5"],
        })
    return {"lib": path}


PRELUDE = STOPS_PRELUDE + """
import capstone
def first_instruction(name):
    # past an endbr64, where the site goes
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = list(md.disasm(sites.read_memory(addr(name), 32), addr(name)))
    if insns[0].mnemonic == "endbr64":
        insns = insns[1:]
    return insns[0].size
"""


def test_which_writes_need_no_stop(child, unstopped_lib):
    r = child(PRELUDE + """
NAMES = ("us_long_first", "fentry_nop", "patchable", "calls_other")
out = {"shape": {n: first_instruction(n) for n in NAMES}}
for name in NAMES:
    p1 = hotpatch.register(Patch(name + "-1", [Object(OBJ, [Func(name, addr("replacement"))])]),
                           enable=False)
    p2 = hotpatch.register(Patch(name + "-2", [Object(OBJ, [Func(name, addr("replacement2"))])]),
                           enable=False)
    old = call(name)
    steps = {"enable": took(lambda: hotpatch.enable(p1)), "patched": call(name),
             "stack": took(lambda: hotpatch.enable(p2)), "stacked": call(name),
             "unstack": took(lambda: hotpatch.disable(p2)), "unstacked": call(name),
             "disable": took(lambda: hotpatch.disable(p1)), "restored": call(name) == old}
    out[name] = steps
report(out)
""", **unstopped_lib)[0]
    # The shapes this test relies on, as cc -O2 built them: a 7-byte load,
    # -mnop-mcount's one 5-byte NOP, -fpatchable-function-entry's five 1-byte
    # NOPs, a 4-byte sub then a call (9 bytes replaced).
    shape = r["shape"]
    assert shape["us_long_first"] >= 5 and shape["fentry_nop"] == 5, r
    assert shape["patchable"] == 1 and shape["calls_other"] < 5, r
    for name in ("us_long_first", "fentry_nop", "patchable", "calls_other"):
        steps = r[name]
        assert steps["patched"] == 1007 and steps["stacked"] == 2007, (name, steps)
        assert steps["unstacked"] == 1007 and steps["restored"], (name, steps)
        # a retarget and a restore replace hotpatch's own jmp: no stop
        for step in ("stack", "unstack", "disable"):
            assert steps[step] == [0, 1], (name, step, steps)
    # the first instruction covers the write: no stop; several instructions: a
    # stop where the first is 1 byte, else none through the hot-patch point
    # in the padding before the entry (test_hops.py)
    assert r["us_long_first"]["enable"] == [0, 1], r
    assert r["fentry_nop"]["enable"] == [0, 1], r
    assert r["patchable"]["enable"] == [1, 0], r
    assert r["calls_other"]["enable"] == [0, 1], r


def test_stop_always_sends_every_write_to_the_stop(child, unstopped_lib):
    r = child(PRELUDE + """
p = hotpatch.register(Patch("p", [Object(OBJ, [Func("us_long_first", addr("replacement"))])]),
                      enable=False)
report({"enable": took(lambda: hotpatch.enable(p)), "patched": call("us_long_first"),
        "disable": took(lambda: hotpatch.disable(p)), "restored": call("us_long_first")})
""", env={"HOTPATCH_STOP": "always"}, **unstopped_lib)[0]
    assert r["enable"] == [1, 0] and r["disable"] == [1, 0], r
    assert r["patched"] == 1007 and r["restored"] == 10, r


def test_a_process_that_refuses_writable_code_gets_the_stop(child, unstopped_lib):
    # PR_SET_MDWE: the kernel refuses to make an executable page writable,
    # so the store's mprotect window cannot open; /proc/self/mem still writes.
    r = child(PRELUDE + """
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
mdwe = libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)
p = hotpatch.register(Patch("p", [Object(OBJ, [Func("us_long_first", addr("replacement"))])]),
                      enable=False)
report({"mdwe": mdwe, "errno": ctypes.get_errno(),
        "enable": took(lambda: hotpatch.enable(p)), "patched": call("us_long_first"),
        "disable": took(lambda: hotpatch.disable(p)), "restored": call("us_long_first"),
        "perms": sorted({line.split()[1] for line in open("/proc/self/maps")
                         if "libunstopped" in line})})
""", **unstopped_lib)[0]
    assert r["mdwe"] == 0, r
    assert r["enable"] == [1, 0] and r["disable"] == [1, 0], r
    assert r["patched"] == 1007 and r["restored"] == 10, r
    assert not any("w" in p and "x" in p for p in r["perms"]), r


@pytest.mark.parametrize("offset, expected", [(0, [0, 1]), (57, [0, 1]), (58, [1, 0]), (60, [1, 0])])
def test_a_write_across_a_cache_line_takes_the_stop(child, unstopped_lib, offset, expected):
    # `mov rax, imm32` (7 bytes) + `add rax, rdi` + ret on an RWX page, at
    # `offset` in its first cache line: the 7-byte write fits in one line at
    # 0 and 56, not at 57 or 60, where no store of it is atomic.
    r = child(PRELUDE + """
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
page = libc.mmap(None, 4096, 7, 0x22, -1, 0)
code = bytes([0x48, 0xc7, 0xc0, 0x05, 0, 0, 0, 0x48, 0x01, 0xf8, 0xc3]) + b"\\xcc" * 8
at = page + P["offset"]
ctypes.memmove(at, code, len(code))
jit = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(at)
site = sites.prepare(at, size=11)
out = {"before": jit(7)}
out["redirect"] = took(lambda: sites.redirect_batch([(site, addr("replacement"))]))
out["patched"] = jit(7)
out["restore"] = took(lambda: sites.restore(site))
out.update(restored=jit(7), identical=sites.read_memory(at, len(code)) == code)
report(out)
""", offset=offset, **unstopped_lib)[0]
    assert r["before"] == 12 and r["patched"] == 1007 and r["restored"] == 12, r
    assert r["identical"], r
    assert r["redirect"] == expected and r["restore"] == expected, r


def test_callers_and_sleepers_through_unstopped_writes(child, unstopped_lib):
    # us_long_first is patched, stacked and restored hundreds of times, each
    # write one atomic store (conftest.CALLERS_AND_SLEEPERS).
    r = child(PRELUDE + CALLERS_AND_SLEEPERS, name="us_long_first", results=[10, 1007, 2007],
              cycles=600, timeout=300, **unstopped_lib)[0]
    check_callers_and_sleepers(r, 600, old=10)


def test_the_first_patch_of_a_process_takes_no_stop_where_none_is_needed(child, unstopped_lib):
    # The first register() also hooks the dynamic linker's r_brk function:
    # `ret` and nops between functions, so its write needs no stop either.
    r = child(PRELUDE + """
from hotpatch import loader
p = hotpatch.register(Patch("p", [Object(OBJ, [Func("us_long_first", addr("replacement"))])]))
hook = loader._state["sites"]
report({"stops": counts(), "patched": call("us_long_first"),
        "hook": [sites.read_memory(s.entry, 1).hex() for s in hook],
        "hook_first": [s.plan.original_bytes[:1].hex() for s in hook]})
""", **unstopped_lib)[0]
    assert r["hook_first"] == ["c3"] and r["hook"] == ["e9"], r
    assert r["stops"] == [0, 2] and r["patched"] == 1007, r


def test_a_library_nobody_here_wrote(child, unstopped_lib):
    # libz's inflate (a 1-byte push first and no padding before it: its first
    # patch takes a stop) sent to zlibCompileFlags and back: the disable is
    # one atomic store, and libz's bytes come back exactly.
    r = child(PRELUDE + """
libz = ctypes.CDLL("libz.so.1")
libz.inflate.restype = libz.zlibCompileFlags.restype = ctypes.c_int
libz.inflate.argtypes = [ctypes.c_void_p, ctypes.c_int]
inflate = ctypes.cast(libz.inflate, ctypes.c_void_p).value
flags = ctypes.cast(libz.zlibCompileFlags, ctypes.c_void_p).value
before = sites.read_memory(inflate, 16)
p = hotpatch.register(Patch("z", [Object("libz.so.1", [Func("inflate", flags)])]), enable=False)
want = {"inflate": libz.inflate(None, 0), "flags": libz.zlibCompileFlags()}
enable = took(lambda: hotpatch.enable(p))
patched = libz.inflate(None, 0)
disable = took(lambda: hotpatch.disable(p))
report({"want": want, "enable": enable, "patched": patched, "disable": disable,
        "restored": libz.inflate(None, 0), "identical": sites.read_memory(inflate, 16) == before})
""", **unstopped_lib)[0]
    assert r["patched"] == r["want"]["flags"] != r["want"]["inflate"], r
    assert r["enable"] == [1, 0] and r["disable"] == [0, 1], r
    assert r["restored"] == r["want"]["inflate"] and r["identical"], r


def test_a_process_of_one_thread_stops_nothing(child, unstopped_lib):
    # With the watchdog gone the calling thread is the process's only one
    # (sites used directly: no loader worker): an entry of several
    # instructions with a 1-byte first instruction (no hot-patch point) is
    # written with nothing to stop.  A second thread brings the stop back.
    r = child(PRELUDE + ALONE + """
site = sites.prepare(addr("patchable"))
before = sites.read_memory(addr("patchable"), 16)
out = {"threads": len(os.listdir("/proc/self/task"))}
a0 = alone()
out["redirect"] = took(lambda: sites.redirect_batch([(site, addr("replacement"))]))
out.update(patched=call("patchable"), alone=alone() - a0, threads_after=len(os.listdir("/proc/self/task")))
sites.restore(site)
release = threading.Event()
t = threading.Thread(target=release.wait)
t.start()
a0 = alone()
out["redirect_two"] = took(lambda: sites.redirect_batch([(site, addr("replacement"))]))
out.update(patched_two=call("patchable"), alone_two=alone() - a0)
sites.restore(site)
release.set()
t.join()
out.update(restored=call("patchable"), identical=sites.read_memory(addr("patchable"), 16) == before)
report(out)
""", **unstopped_lib)[0]
    assert r["threads"] == 1 and r["threads_after"] == 1, r
    assert r["redirect"] == [0, 0] and r["alone"] == 1 and r["patched"] == 1007, r
    assert r["redirect_two"] == [1, 0] and r["alone_two"] == 0 and r["patched_two"] == 1007, r
    assert r["restored"] == 49 and r["identical"], r
