"""The replacement's contract: shared entry points refused, the original
always callable, Python replacements that fail safe, inputs checked before
anything runs, callers' register assumptions kept, C modules that reach the
target.  Every test that patches runs in a child process."""
import os

import pytest

from conftest import compile_library


@pytest.fixture(scope="session")
def contract_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("contract"))
    return compile_library(os.path.join(out, "libcontract.so"),
                           ["contract_targets/xrefs.c", "targets/shapes.c",
                            "contract_targets/ipa_ra.c", "contract_targets/statics.c",
                            "contract_targets/nsi.c"],
                           per_source_flags={"contract_targets/nsi.c":
                                             ["-fPIC", "-fno-semantic-interposition"]})


PRELUDE = """
import ctypes, os
import hotpatch
from hotpatch import Patch, Object, Func
lib = ctypes.CDLL(P["lib"])
OBJ = os.path.basename(P["lib"])
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def fn(name, restype=ctypes.c_long, *argtypes):
    f = getattr(lib, name); f.restype = restype; f.argtypes = list(argtypes) or [ctypes.c_long]
    return f
def code(name, n=16):
    return ctypes.string_at(addr(name), n).hex()
REPL = addr("replacement")
"""


# --- shared entry points ------------------------------------------------------

@pytest.mark.parametrize("name,jumper", [
    ("xr_target", "xr_jumper"),     # another function jumps to its second instruction
    ("xr_unsized", "xr_unsized"),   # no .size: its own loop goes back to +3
])
def test_branch_from_elsewhere_into_replaced_bytes_is_refused(child, contract_lib, name, jumper):
    r = child(PRELUDE + f"""
before = code("{name}"), fn("xr_jumper")(5), fn("xr_unsized")(5)
try:
    hotpatch.register(Patch("shared", [Object(OBJ, [Func("{name}", REPL)])]))
    report({{"raised": None}})
except hotpatch.UnsafeToPatch as e:
    report({{"raised": str(e), "same": (code("{name}"), fn("xr_jumper")(5),
                                        fn("xr_unsized")(5)) == before,
            "registered": len(hotpatch.patches())}})
""", lib=contract_lib)[0]
    assert r["raised"], r
    assert f"{jumper}+0x" in r["raised"] and name in r["raised"] and "libcontract.so" in r["raised"]
    assert r["same"] and r["registered"] == 0


def test_glibc_memcpy_shared_entry(child):
    """glibc's mempcpy ends with a jump into memmove's implementation, which
    memcpy shares: patching memcpy must not break mempcpy."""
    r = child("""
import ctypes, hotpatch
from hotpatch import symbols, Patch, Object, Func
libc = ctypes.CDLL("libc.so.6")
obj = symbols.find_object("libc.so.6")
memcpy = symbols.resolve(obj, "memcpy")
jumpers = symbols.branches_into(obj, memcpy.address + 1, memcpy.address + 5)
out = {"jumpers": [d for _, d, _ in jumpers], "raised": None}
if jumpers:    # never redirected: memcpy's replacement would be memcpy itself
    try:
        labs = ctypes.cast(libc.labs, ctypes.c_void_p).value
        p = hotpatch.register(Patch("memcpy", [Object("libc.so.6", [Func("memcpy", labs)])]))
    except hotpatch.HotpatchError as e:
        out["raised"] = type(e).__name__ + ": " + str(e)
dst = ctypes.create_string_buffer(8)
libc.mempcpy.restype = ctypes.c_void_p
end = libc.mempcpy(dst, b"abcdefg", 7)
out["mempcpy"] = [dst.value.decode(), end - ctypes.addressof(dst)]
report(out)
""")[0]
    assert r["mempcpy"] == ["abcdefg", 7]
    if not r["jumpers"]:
        pytest.skip("this CPU's memcpy has no shared entry point")
    assert r["raised"].startswith("UnsafeToPatch") and "memcpy" in r["raised"], r
    assert any(j.split(" ")[0].split("+")[0] in r["raised"] for j in r["jumpers"]), r


# --- the original, always callable ----------------------------------------------

def test_original_callable_from_threads_through_enable_disable_cycles(child, contract_lib):
    """A wrapper calling func.original from 4 threads while the patch is
    enabled and disabled 1,000 times never sees None, and its C callers
    never get 0."""
    r = child(PRELUDE + """
import threading, time
CALL = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)
seen_none, bad = [], []
def wrapper(x):
    original = func.original
    if original is None:
        seen_none.append(x)
        return -1
    return CALL(original)(x) + 1
func = Func("xr_plain", wrapper, signature="long(long)")
patch = Patch("wrap", [Object(OBJ, [func])])
stop = False
calls = dict.fromkeys(range(1, 5), 0)
def caller(k):
    f = fn("xr_plain")
    while not stop:
        got = f(k)
        if got not in (3 * k, 3 * k + 1):
            bad.append(got)
        calls[k] += 1
        # Leave the GIL to the cycles now and then: every release in an
        # operation otherwise waits for the four callers in turn.
        time.sleep(0.0001)
threads = [threading.Thread(target=caller, args=(k,)) for k in range(1, 5)]
for t in threads:
    t.start()
hotpatch.register(patch)
for _ in range(1000):
    patch.disable()
    patch.enable()
patch.disable()
stop = True
for t in threads:
    t.join()
report({"none": len(seen_none), "bad": bad[:5], "after": CALL(func.original)(7),
        "calls": min(calls.values())})
""", lib=contract_lib, timeout=240)[0]
    assert r["calls"] > 1000, r      # every thread called all along
    assert (r["none"], r["bad"], r["after"]) == (0, [], 21)


# --- Python replacements fail safe ------------------------------------------------

@pytest.mark.parametrize("new,signature,problem", [
    ("lambda x: x", "long(long, int", "bad signature"),
    ("lambda x: x", "long", "not a function type"),
    ("lambda x: x", "int(int, ...)", "variadic"),
    ("lambda x, y: x", "long(long)", "cannot be called with the 1 argument"),
    ("lambda: 0", "long(long)", "cannot be called with the 1 argument"),
])
def test_python_replacement_checked_at_register(child, contract_lib, new, signature, problem):
    r = child(PRELUDE + f"""
before = code("xr_plain"), fn("xr_plain")(5)
try:
    hotpatch.register(Patch("py", [Object(OBJ, [Func("xr_plain", {new}, signature={signature!r})])]))
    report({{"raised": None}})
except Exception as e:
    report({{"raised": type(e).__name__, "message": str(e),
            "same": (code("xr_plain"), fn("xr_plain")(5)) == before,
            "registered": len(hotpatch.patches())}})
""", lib=contract_lib)[0]
    assert r["raised"] == "HotpatchError", r
    assert problem in r["message"] and "xr_plain" in r["message"] and "libcontract.so" in r["message"]
    assert r["same"] and r["registered"] == 0


def test_python_replacement_failing_at_call_time_runs_the_original(child, contract_lib):
    r = child(PRELUDE + """
import logging
logged = []
class Keep(logging.Handler):
    def emit(self, record):
        logged.append(record.getMessage())
logging.getLogger("hotpatch").addHandler(Keep())
def replacement(x):
    if x == 1:
        raise ValueError("unlucky")
    if x == 2:
        return "not a number"
    if x == 3:
        return 1 << 70          # does not fit a long
    return func.call_original(x) + 1000
func = Func("xr_plain", replacement, signature="long(long)")
hotpatch.register(Patch("py", [Object(OBJ, [func])]))
f = fn("xr_plain")
results = [f(x) for x in (1, 2, 3, 4)]
node = hotpatch.tree()["livepatch"]["py"][OBJ]["xr_plain,1"]
report({"results": results, "errors": func.errors, "last": repr(func.last_error),
        "tree": [node["errors"], node["last_error"]], "logged": logged})
""", lib=contract_lib)[0]
    assert r["results"] == [3, 6, 9, 1012]
    assert r["errors"] == 3 and "OverflowError" in r["last"]
    assert r["tree"] == [3, r["last"]]
    assert len(r["logged"]) == 1 and "xr_plain" in r["logged"][0] and "unlucky" in r["logged"][0]


def test_callback_reused_across_register_cycles(child, contract_lib):
    r = child(PRELUDE + """
def replacement(x):
    return x + 7
addresses = set()
for i in range(50):
    patch = hotpatch.register(Patch(f"p{i}", [Object(OBJ, [Func("xr_plain", replacement,
                                                                signature="long(long)")])]))
    addresses.add(patch.objects[0].funcs[0].new_addr)
    patch.disable()
    hotpatch.unregister(patch)
report({"callbacks": len(addresses), "result": fn("xr_plain")(5)})
""", lib=contract_lib)[0]
    assert r == {"callbacks": 1, "result": 15}


# --- inputs checked before anything runs -------------------------------------------

def test_new_in_a_data_buffer_is_refused(child, contract_lib):
    r = child(PRELUDE + """
buffer = ctypes.create_string_buffer(b"\\xc3" * 64)     # a ret, in data
before = code("xr_plain")
try:
    hotpatch.register(Patch("data", [Object(OBJ, [Func("xr_plain", ctypes.addressof(buffer))])]))
    report({"raised": None})
except hotpatch.HotpatchError as e:
    report({"raised": type(e).__name__, "message": str(e), "same": code("xr_plain") == before,
            "result": fn("xr_plain")(5)})
""", lib=contract_lib)[0]
    assert r["raised"] == "UnsafeToPatch" and "executable" in r["message"], r
    assert "xr_plain" in r["message"] and "libcontract.so" in r["message"]
    assert r["same"] and r["result"] == 15


def test_old_offset_inside_an_instruction_is_refused(child, contract_lib):
    r = child(PRELUDE + """
from hotpatch import symbols
offset = addr("xr_target") - symbols.find_object(OBJ).base
out = {}
for delta in (1, 3):    # inside `mov %rdi,%rax`; the boundary of `add $1,%rax`
    try:
        p = hotpatch.register(Patch(f"off{delta}", [Object(OBJ, [
            Func("inner", REPL, old_offset=offset + delta)])]))
        out[delta] = "accepted"
        p.disable()
    except hotpatch.HotpatchError as e:
        out[delta] = f"{type(e).__name__}: {e}"
report(out)
""", lib=contract_lib)[0]
    assert r["1"].startswith("UnsafeToPatch") and "instruction boundary" in r["1"], r
    assert "xr_target+0x0" in r["1"]
    # +3 is a boundary, but a short function: refused for what it is, not for the boundary
    assert "instruction boundary" not in r["3"]


NO_DESCRIPTOR = r"""
#include <stdlib.h>
__attribute__((constructor)) static void ran(void) { setenv("HP_CONSTRUCTOR_RAN", "1", 1); }
int not_a_patch(void) { return 1; }
"""


def test_patch_module_without_descriptor_is_never_opened(child, tmp_path):
    source = tmp_path / "nodesc.c"
    source.write_text(NO_DESCRIPTOR)
    from hotpatch import module
    so = module.build(str(source), str(tmp_path / "nodesc.so"))
    r = child("""
import ctypes, hotpatch
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
try:
    hotpatch.load(P["so"])
    report({"raised": None})
except hotpatch.HotpatchError as e:
    report({"raised": str(e), "constructor": libc.getenv(b"HP_CONSTRUCTOR_RAN"),
            "mapped": P["so"] in open("/proc/self/maps").read()})
""", so=so)[0]
    assert r["raised"] and so in r["raised"] and "HP_PATCH" in r["raised"], r
    assert r["constructor"] is None and r["mapped"] is False


@pytest.mark.parametrize("text,line,what", [
    ("import hotpatch\n\npatch = hotpatch.Patch('x', [\n", 3, "does not compile"),
    ("import hotpatch\nx = 1\nraise RuntimeError('boom')\n", 3, "RuntimeError: boom"),
    ("import hotpatch\nfrom hotpatch import Patch, Object, Func\n"
     "patch = Patch('sig', [Object('libcontract.so', [\n"
     "    Func('xr_plain', lambda x: x, signature='long(long, int'),\n])])\n", 4, "bad signature"),
])
def test_python_patch_module_errors_name_file_and_line(child, contract_lib, tmp_path, text, line, what):
    path = tmp_path / "fix.py"
    path.write_text(text)
    r = child("""
import ctypes, hotpatch
ctypes.CDLL(P["lib"])
try:
    hotpatch.load(P["path"])
    report({"raised": None})
except hotpatch.HotpatchError as e:
    report({"raised": str(e), "patches": len(hotpatch.patches())})
""", lib=contract_lib, path=str(path))[0]
    assert r["raised"] and f"{path}:{line}" in r["raised"] and what in r["raised"], r
    assert r["patches"] == 0


# --- callers' register assumptions ----------------------------------------------

IPA = PRELUDE + """
from hotpatch import symbols
obj = symbols.find_object(OBJ)
def static(name):
    return symbols.resolve(obj, name).address
line_total = fn("line_total", ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int)
blend = fn("blend", ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_double)
via = fn("call_via_libc", ctypes.c_long, ctypes.c_long, ctypes.c_long)
pub_total = fn("pub_line_total", ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int)
def results():
    return [line_total(500, 3, 2), line_total(7, 2000, -5), blend(1.5, 2.0, 3.0), via(-4, 3),
            pub_total(500, 3, 2)]
"""


@pytest.mark.parametrize("kind", ["c", "python"])
def test_callers_registers_kept_across_a_replaced_static_function(child, contract_lib, kind):
    r = child(IPA + f"""
expected = results()
if "{kind}" == "c":
    funcs = [Func("clamp_qty", addr("clamp_qty_scribbling")),
             Func("half", addr("half_scribbling")), Func("via_libc", addr("plain_add")),
             Func("pub_clamp", addr("clamp_qty_scribbling"))]
else:
    scribble_int = fn("clamp_qty_scribbling", ctypes.c_int, ctypes.c_int)
    scribble_dbl = fn("half_scribbling", ctypes.c_double, ctypes.c_double)
    funcs = [Func("clamp_qty", lambda q: scribble_int(q), signature="int(int)"),
             Func("half", lambda x: scribble_dbl(x), signature="double(double)"),
             Func("via_libc", lambda x: x + 1, signature="long(long)"),
             Func("pub_clamp", lambda q: scribble_int(q), signature="int(int)")]
patch = hotpatch.register(Patch("ipa", [Object(OBJ, funcs)]))
node = hotpatch.tree()["livepatch"]["ipa"][OBJ]
report({{"expected": expected, "patched": results(),
        "thunks": {{f.old_name: node[f.old_name + ",1"]["thunk"] and node[f.old_name + ",1"]["thunk"]["preserves"]
                   for f in funcs}}}})
""", lib=contract_lib)[0]
    assert r["patched"] == r["expected"], r
    assert "rsi" in r["thunks"]["clamp_qty"] and "rax" not in r["thunks"]["clamp_qty"]
    assert "xmm2" in r["thunks"]["half"] and "xmm0" not in r["thunks"]["half"]
    assert r["thunks"]["via_libc"] is None      # calls out of its object: no thunk, no cost
    # exported, but called directly inside its object (-fno-semantic-interposition)
    assert "r8" in r["thunks"]["pub_clamp"] and "r10" in r["thunks"]["pub_clamp"]


def test_thunk_encodings_match_keystone():
    from keystone import KS_ARCH_X86, KS_MODE_64, Ks
    from hotpatch.x86_64 import thunk
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    code = thunk.thunk_code(0x10000, 0x20000, {"rsi", "r10", "xmm9", "xmm0"})
    text = ("push rsi; push r10; push rbp; mov rbp, rsp; sub rsp, 0x60; and rsp, -16; "
            + "".join(f"mov r11, qword ptr [rbp+{0x20 + 8 * i}]; mov qword ptr [rsp+{8 * i}], r11; "
                      for i in range(8))
            + "movdqu xmmword ptr [rsp+0x40], xmm0; movdqu xmmword ptr [rsp+0x50], xmm9; "
              "call 0x20000; movdqu xmm0, xmmword ptr [rsp+0x40]; "
              "movdqu xmm9, xmmword ptr [rsp+0x50]; mov rsp, rbp; pop rbp; pop r10; pop rsi; ret")
    # keystone picks short displacements where they fit: compare decoded text
    from hotpatch.x86_64 import decode
    ours = [str(i).split(": ", 1)[1] for i in decode(code, 0x10000)]
    theirs = [str(i).split(": ", 1)[1] for i in decode(bytes(ks.asm(text, 0x10000)[0]), 0x10000)]
    assert ours == theirs


# --- C patch modules reach the target ----------------------------------------------

C_MODULE = r"""
#include <hotpatch.h>
#ifndef BUILD_ID
#define BUILD_ID 0
#endif
static long (*old_use_scale)(long);
static long (*scale)(long);        /* static in the target */
static int *calls;                 /* static in the target */

static long fixed(long x)
{
    *calls += 100;
    return old_use_scale(x) + scale(x);
}

static struct hp_func funcs[] = {
    { .old_name = "st_use_scale", .new_func = fixed, .original = (void **)&old_use_scale },
    { }
};
static struct hp_object objs[] = {
    { .name = "libcontract.so", .funcs = funcs, .build_id = BUILD_ID },
    { }
};
static struct hp_symbol symbols[] = {
    HP_SYMBOL(scale, "libcontract.so", "st_scale", 0),
    HP_SYMBOL(calls, "libcontract.so", "st_calls", 0),
    { }
};
static struct hp_patch patch = { .name = "reach", .objs = objs, .symbols = symbols };
HP_PATCH(patch);
"""

LOAD = PRELUDE + """
from hotpatch import symbols
real_build_id = symbols.find_object(OBJ).build_id.hex()
use_scale = fn("st_use_scale")
calls = lib.st_calls_so_far; calls.argtypes = []; calls.restype = ctypes.c_int
try:
    patch = hotpatch.load(P["so"])
    out = {"result": use_scale(2), "calls": calls(), "original": patch.objects[0].funcs[0].original}
    patch.disable()
    out["after"] = use_scale(2)
except hotpatch.HotpatchError as e:
    out = {"raised": f"{type(e).__name__}: {e}", "result": use_scale(2)}
out["real_build_id"] = real_build_id
report(out)
"""


def _module(tmp_path, name, defines=()):
    from hotpatch import module
    source = tmp_path / f"{name}.c"
    source.write_text(C_MODULE)
    return module.build(str(source), str(tmp_path / f"{name}.so"), [f"-D{d}" for d in defines])


def test_c_module_calls_the_original_and_reaches_statics(child, contract_lib, tmp_path):
    r = child(LOAD, lib=contract_lib, so=_module(tmp_path, "reach"))[0]
    # old(2) = scale(2) + 1 = 21, + scale(2) = 20; st_calls: 2 calls + 100
    assert r.get("raised") is None, r
    assert r["result"] == 41 and r["calls"] == 102 and r["original"]
    assert r["after"] == 21


def test_c_module_for_another_build_is_refused(child, contract_lib, tmp_path):
    so = _module(tmp_path, "otherbuild", ['BUILD_ID="0123456789abcdef"'])
    r = child(LOAD, lib=contract_lib, so=so)[0]
    assert r["raised"].startswith("UnsafeToPatch"), r
    assert "0123456789abcdef" in r["raised"] and r["real_build_id"] in r["raised"]
    assert so in r["raised"] and r["result"] == 21


def test_c_module_for_this_build_is_accepted(child, contract_lib, tmp_path):
    import lief
    binary = lief.parse(contract_lib)    # its notes do not outlive it
    build_id = bytes(next(n.description for n in binary.notes
                          if n.type == lief.ELF.Note.TYPE.GNU_BUILD_ID)).hex()
    so = _module(tmp_path, "thisbuild", [f'BUILD_ID="{build_id}"'])
    r = child(LOAD, lib=contract_lib, so=so)[0]
    assert r.get("raised") is None and r["result"] == 41, r


@pytest.mark.parametrize("change,error,named", [
    (('"st_calls", 0', '"st_no_such_variable", 0'), "SymbolNotFound", "st_no_such_variable"),
    (('HP_SYMBOL(calls, "libcontract.so", "st_calls", 0)',
      '{ .address = 0, .object = "libcontract.so", .name = "st_calls" }'), "HotpatchError", "NULL"),
])
def test_c_module_bad_symbol_reference_names_it(child, contract_lib, tmp_path, change, error, named):
    from hotpatch import module
    source = tmp_path / "bad.c"
    source.write_text(C_MODULE.replace(*change))
    so = module.build(str(source), str(tmp_path / "bad.so"))
    r = child(LOAD, lib=contract_lib, so=so)[0]
    assert r["raised"].startswith(error) and named in r["raised"] and "st_" in r["raised"], r
    assert so in r["raised"] and r["result"] == 21


def test_call_dispatch_from_an_unknown_site_stops_with_a_message():
    import signal
    import subprocess
    import sys
    code = ("from hotpatch._native import lib, ffi\n"
            "lib.hp_call_dispatch(0x1005, ffi.new('uint64_t[8]'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGABRT, proc
    assert "called from 0x1000, which is no call site" in proc.stderr


V1_MODULE = r"""
/* A module built against version 1 of hotpatch.h (no original, build_id, symbols). */
#include <stdbool.h>
struct hp_object;
struct hp_callbacks { int (*pre_patch)(struct hp_object *); void (*post_patch)(struct hp_object *);
                      void (*pre_unpatch)(struct hp_object *); void (*post_unpatch)(struct hp_object *); };
struct hp_func { const char *old_name; void *new_func; unsigned long old_sympos; };
struct hp_object { const char *name; struct hp_func *funcs; struct hp_callbacks callbacks; };
struct hp_patch { const char *name; struct hp_object *objs; bool replace; };
static long plus_one(long x) { return 3 * x + 1; }
static long plus_two(long x) { return 3 * x + 2; }
static struct hp_func funcs[] = { { "xr_plain", plus_one, 0 }, { "st_use_scale", plus_two, 0 }, { } };
static struct hp_object objs[] = { { "libcontract.so", funcs }, { } };
static struct hp_patch patch = { "v1", objs, false };
__attribute__((visibility("default"))) struct hp_patch *const hotpatch_patch_descriptor = &patch;
__attribute__((visibility("default"))) const unsigned int hotpatch_abi_version = 1;
"""


def test_version_1_module_still_loads(child, contract_lib, tmp_path):
    from hotpatch import module
    source = tmp_path / "v1.c"
    source.write_text(V1_MODULE)
    so = module.build(str(source), str(tmp_path / "v1.so"))
    r = child(PRELUDE + """
patch = hotpatch.load(P["so"])
report([fn("xr_plain")(5), fn("st_use_scale")(5), [f.old_name for f in patch.objects[0].funcs]])
""", lib=contract_lib, so=so)[0]
    assert r == [16, 17, ["xr_plain", "st_use_scale"]]


SLOW_CONSTRUCTOR_MODULE = r"""
/* A module whose constructor takes 300 ms: dlopen runs it. */
#include <hotpatch.h>
#include <unistd.h>
static long times_four(long x) { return 4 * x; }
__attribute__((constructor)) static void slow(void) { usleep(300000); }
static struct hp_func funcs[] = { { .old_name = "xr_plain", .new_func = times_four }, { } };
static struct hp_object objs[] = { { .name = "libcontract.so", .funcs = funcs }, { } };
static struct hp_patch patch = { .name = "slow-ctor", .objs = objs };
HP_PATCH(patch);
"""


def test_loading_a_module_holds_no_gil_and_parses_no_declarations(child, contract_lib, tmp_path):
    """The module is opened (its constructors run) with the GIL released, and
    its structures are read through the compiled core: no pycparser."""
    from hotpatch import module
    source = tmp_path / "slow.c"
    source.write_text(SLOW_CONSTRUCTOR_MODULE)
    so = module.build(str(source), str(tmp_path / "slow.so"))
    r = child(PRELUDE + """
import sys, threading, time
hotpatch.register, hotpatch.load      # the core and hotpatch.module imported
import hashlib                         # (its first import is not what is measured)
ticks = []
running = True
def ticker():
    while running:
        time.sleep(0.001)
        ticks.append(time.monotonic())
t = threading.Thread(target=ticker)
t.start()
time.sleep(0.02)
start = time.monotonic()
patch = hotpatch.load(P["so"])
end = time.monotonic()
running = False
t.join()
during = [x for x in ticks if start < x < end - 0.001]
report([fn("xr_plain")(5), end - start, len(during), "pycparser" in sys.modules,
        "cffi.cparser" in sys.modules])
""", lib=contract_lib, so=so)[0]
    result, took, ticks_during, pycparser, cparser = r
    assert result == 20 and took >= 0.3, r
    # Through cffi's ffi.dlopen, which keeps the GIL, the ticker ran 16-20
    # times (around the open); with the GIL released it runs most of its
    # 300 1-ms ticks (about 300 at load average 8 here; 60 leaves room).
    assert ticks_during >= 60, r
    assert not pycparser and not cparser, r


ONE_FUNCTION_MODULE = r"""
#include <hotpatch.h>
static long times_four(long x) { return 4 * x; }
static struct hp_func funcs[] = { { .old_name = "xr_plain", .new_func = times_four }, { } };
static struct hp_object objs[] = { { .name = "libcontract.so", .funcs = funcs }, { } };
static struct hp_patch patch = { .name = "one-function", .objs = objs };
HP_PATCH(patch);
"""

SWITCH_INTERVAL_MODULE = """
import sys
import __main__
from hotpatch import Patch
__main__.SEEN_INTERVAL = sys.getswitchinterval()     # for the test to read
patch = Patch("switch-interval", [])
"""


def test_a_load_imports_no_subprocess_and_runs_at_the_short_switch_interval(child, contract_lib,
                                                                            tmp_path):
    """A service's first load() does not import what only ``hotpatch build``
    needs (subprocess, with selectors, locale, signal: 3-7 ms with the GIL
    held), and the whole load, the module's own code included, runs at
    hotpatch's short switch interval (_gil), set back after."""
    from hotpatch import module
    source = tmp_path / "one.c"
    source.write_text(ONE_FUNCTION_MODULE)
    so = module.build(str(source), str(tmp_path / "one.so"))
    py = tmp_path / "interval.py"
    py.write_text(SWITCH_INTERVAL_MODULE)
    r = child(PRELUDE + """
import sys
before = sys.getswitchinterval()
hotpatch.load(P["so"])
hotpatch.load(P["py"])
report([fn("xr_plain")(5), "subprocess" in sys.modules, before, SEEN_INTERVAL,
        sys.getswitchinterval()])
""", lib=contract_lib, so=so, py=str(py))[0]
    result, subprocess_imported, before, during, after = r
    assert result == 20 and not subprocess_imported, r
    assert during == 0.001 and before == after == 0.005, r


def test_module_refusals_at_open(child, contract_lib, tmp_path):
    from hotpatch import module
    bad_version = tmp_path / "v9.c"
    bad_version.write_text(V1_MODULE.replace("hotpatch_abi_version = 1", "hotpatch_abi_version = 9"))
    no_api = tmp_path / "noapi.c"
    no_api.write_text(SLOW_CONSTRUCTOR_MODULE.replace("usleep(300000)", "").replace(
        "HP_PATCH(patch);",
        "__attribute__((visibility(\"default\"))) struct hp_patch *const "
        "hotpatch_patch_descriptor = &patch;\n"
        "__attribute__((visibility(\"default\"))) const unsigned int hotpatch_abi_version = 3;"))
    unresolved = tmp_path / "unresolved.c"
    unresolved.write_text(V1_MODULE + "extern long hp_test_nowhere(long);\n"
                          "long hp_test_call(long x) { return hp_test_nowhere(x); }\n")
    sos = [module.build(str(src), str(src) + ".so") for src in (bad_version, no_api, unresolved)]
    r = child(PRELUDE + """
out = []
for so in P["sos"]:
    try:
        hotpatch.load(so)
        out.append("loaded")
    except hotpatch.HotpatchError as e:
        out.append(str(e))
out.append(hotpatch.patches())
report(out)
""", lib=contract_lib, sos=sos)[0]
    assert "built for hotpatch ABI 9, this is 3" in r[0], r
    assert "does not export hotpatch_api" in r[1], r
    assert "cannot load the patch module" in r[2] and "hp_test_nowhere" in r[2], r
    assert r[3] == [], r
