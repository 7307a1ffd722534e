"""The livepatch model: Patch / Object / Func, register / enable / disable,
stacking, atomic replace, callbacks, new code of every kind, patch modules,
taint and the tree.  Every test patches inside a child process."""
import os
import re
import subprocess
import sys
import sysconfig

import pytest

from conftest import HERE, compile_library


@pytest.fixture(scope="session")
def model_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("model"))
    return compile_library(os.path.join(out, "libmodel.so"),
                           ["targets/shapes.c", "targets/stress.c",
                            "symbols_targets/dup_a.c", "symbols_targets/dup_b.c"],
                           flags=["-pthread"])


PRELUDE = """
import ctypes, os
import hotpatch
from hotpatch import Patch, Object, Func
lib = ctypes.CDLL(P["lib"])
OBJ = os.path.basename(P["lib"])
NAMES = ["plain_add", "rip_load", "jcc_leaf", "frame_pointer", "short_unpadded"]
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def call(name, x=5):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(x)
def calls():
    return {n: call(n) for n in ["plain_add", "rip_load", "jcc_leaf", "frame_pointer"]}
def code():
    return {n: ctypes.string_at(addr(n), 16).hex() for n in NAMES}
REPL, REPL2 = addr("replacement"), addr("replacement2")
"""

ORIGINAL = {"plain_add": 6, "rip_load": 45, "jcc_leaf": 6, "frame_pointer": 16}


def test_register_enable_disable_and_attributes(child, model_lib):
    r = child(PRELUDE + """
func = Func("plain_add", REPL)
obj = Object(OBJ, [func])
patch = Patch("fix", [obj])
out = {"before": (func.old_addr, func.patched, func.original, obj.patched, patch.enabled,
                  hotpatch.tainted())}
assert hotpatch.register(patch) is patch
out["enabled"] = dict(enabled=patch.enabled, transition=patch.transition, name=patch.name,
                      objects=patch.objects == [obj], obj_name=obj.name, loaded=obj.loaded,
                      obj_patched=obj.patched, funcs=obj.funcs == [func],
                      old_name=func.old_name, sympos=func.old_sympos,
                      old_addr_ok=func.old_addr == addr("plain_add"), new_addr_ok=func.new_addr == REPL,
                      patched=func.patched, result=call("plain_add"),
                      original=ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(func.original)(5),
                      listed=hotpatch.patches() == [patch], tainted=hotpatch.tainted())
patch.disable()
out["disabled"] = dict(enabled=patch.enabled, patched=func.patched,
                       original=ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(func.original)(5),
                       obj_patched=obj.patched, result=call("plain_add"), tainted=hotpatch.tainted())
hotpatch.enable(patch)
out["again"] = call("plain_add")
hotpatch.disable(patch)
hotpatch.unregister(patch)
out["after"] = [hotpatch.patches(), call("plain_add")]
report(out)
""", lib=model_lib)[0]
    assert r["before"] == [None, False, None, False, False, False]
    assert r["enabled"] == dict(enabled=True, transition=False, name="fix", objects=True,
                                obj_name="libmodel.so", loaded=True, obj_patched=True, funcs=True,
                                old_name="plain_add", sympos=0, old_addr_ok=True, new_addr_ok=True,
                                patched=True, result=1005, original=6, listed=True, tainted=True)
    # the original stays callable after disable (contract: pinned)
    assert r["disabled"] == dict(enabled=False, patched=False, original=6, obj_patched=False,
                                 result=6, tainted=True)
    assert r["again"] == 1005
    assert r["after"] == [[], 6]


@pytest.mark.parametrize("bad,error", [
    ('Func("no_such_function", REPL)', "SymbolNotFound"),
    ('Func("helper", REPL)', "AmbiguousSymbol"),
    ('Func("short_unpadded", REPL)', "UnsafeToPatch"),
    # the same function under a second name (its offset)
    ('Func("alias", REPL2, old_offset=addr("plain_add") - symbols.find_object(OBJ).base)',
     "PatchStateError"),
])
def test_enabling_is_all_or_nothing(child, model_lib, bad, error):
    r = child(PRELUDE + f"""
import zlib
from hotpatch import symbols
before_code, before_calls, before_crc = code(), calls(), zlib.crc32(b"x")
patch = Patch("fix", [
    Object("libz.so.1", [Func("crc32", REPL)]),
    Object(OBJ, [Func("plain_add", REPL), Func("rip_load", REPL), Func("jcc_leaf", REPL), {bad}]),
])
try:
    hotpatch.register(patch)
    report({{"raised": None}})
except hotpatch.HotpatchError as e:
    report({{"raised": type(e).__name__, "message": str(e),
            "same_code": code() == before_code, "same_calls": calls() == before_calls,
            "same_crc": zlib.crc32(b"x") == before_crc,
            "registered": hotpatch.patches(), "enabled": patch.enabled,
            "patched": [f.patched for o in patch.objects for f in o.funcs]}})
""", lib=model_lib)[0]
    assert r["raised"] == error, r
    assert "fix" in r["message"] and "libmodel.so" in r["message"]
    assert r["same_code"] and r["same_calls"] and r["same_crc"]
    assert r["registered"] == [] and not r["enabled"]
    assert not any(r["patched"])


def test_ambiguous_symbol_lists_candidates_and_sympos_picks(child, model_lib):
    r = child(PRELUDE + """
try:
    hotpatch.register(Patch("amb", [Object(OBJ, [Func("helper", REPL)])]))
except hotpatch.AmbiguousSymbol as e:
    message = str(e)
dup_b = getattr(lib, "dup_b"); dup_b.restype = ctypes.c_int
before = dup_b(2)
patch = hotpatch.register(Patch("pick", [Object(OBJ, [Func("helper", REPL, old_sympos=2)])]))
after = dup_b(2)
report({"message": message, "before": before, "after": after})
""", lib=model_lib)[0]
    assert "helper" in r["message"] and "sympos 1" in r["message"] and "sympos 2" in r["message"]
    assert r["before"] == 2 * 7 - 3 + 5
    assert r["after"] == 2 + 1000 + 5


def test_missing_symbol_names_object_symbol_and_reason(child, model_lib):
    r = child(PRELUDE + """
try:
    hotpatch.register(Patch("p", [Object(OBJ, [Func("plain_ad", REPL)])]))
except hotpatch.SymbolNotFound as e:
    report(str(e))
""", lib=model_lib)[0]
    assert "libmodel.so" in r and "plain_ad" in r and "not found" in r
    assert "plain_add" in r     # a close name is suggested


def test_stacking_top_wins_and_only_the_top_may_be_disabled(child, model_lib):
    r = child(PRELUDE + """
p1 = hotpatch.register(Patch("p1", [Object(OBJ, [Func("plain_add", REPL), Func("rip_load", REPL)])]))
p2 = hotpatch.register(Patch("p2", [Object(OBJ, [Func("plain_add", REPL2)])]))
out = {"both": calls()}
try:
    p1.disable()
except hotpatch.PatchStateError as e:
    out["refused"] = str(e)
try:
    hotpatch.unregister(p2)
except hotpatch.PatchStateError as e:
    out["unregister_enabled"] = str(e)
out["order"] = [hotpatch.tree()["livepatch"][n]["stack_order"] for n in ("p1", "p2")]
p2.disable()
out["p1_only"] = calls()
out["order_after"] = [hotpatch.tree()["livepatch"][n]["stack_order"] for n in ("p1", "p2")]
p2.enable()
out["p2_again"] = calls()
p2.disable(); p1.disable()
out["none"] = calls()
p1.enable()
out["p1_again"] = calls()
report(out)
""", lib=model_lib)[0]
    assert r["both"] == {**ORIGINAL, "plain_add": 2005, "rip_load": 1005}
    assert "p1" in r["refused"] and "p2" in r["refused"] and "top" in r["refused"]
    assert "disable" in r["unregister_enabled"]
    assert r["order"] == [1, 2]
    assert r["p1_only"] == {**ORIGINAL, "plain_add": 1005, "rip_load": 1005}
    assert r["order_after"] == [1, 0]
    assert r["p2_again"] == r["both"]
    assert r["none"] == ORIGINAL
    assert r["p1_again"] == r["p1_only"]


def test_registering_twice_or_a_taken_name_is_an_error(child, model_lib):
    r = child(PRELUDE + """
p = hotpatch.register(Patch("same", [Object(OBJ, [Func("plain_add", REPL)])]))
out = []
for attempt in (lambda: hotpatch.register(p),
                lambda: hotpatch.register(Patch("same", [Object(OBJ, [Func("rip_load", REPL)])])),
                lambda: p.enable(),
                lambda: hotpatch.unregister(Patch("never", []))):
    try:
        attempt()
        out.append(None)
    except hotpatch.PatchStateError as e:
        out.append(str(e))
out.append([q.name for q in hotpatch.patches()])
out.append(calls()["rip_load"])
report(out)
""", lib=model_lib)[0]
    assert "already registered" in r[0]
    assert "same" in r[1] and "already registered" in r[1]
    assert "already enabled" in r[2]
    assert "not registered" in r[3]
    assert r[4] == ["same"]
    assert r[5] == 45


def test_atomic_replace_takes_over_and_reverts_what_it_does_not_name(child, model_lib):
    r = child(PRELUDE + """
events = []
def cb(name):
    return lambda obj: events.append(name)
original_code = code()
p1 = hotpatch.register(Patch("p1", [Object(OBJ, [Func("plain_add", REPL), Func("rip_load", REPL)],
                                           pre_unpatch=cb("p1 pre_unpatch"), post_unpatch=cb("p1 post_unpatch"))]))
p2 = hotpatch.register(Patch("p2", [Object(OBJ, [Func("jcc_leaf", REPL)])]))
p3 = hotpatch.register(Patch("p3", [Object(OBJ, [Func("rip_load", REPL2), Func("frame_pointer", REPL2)])],
                             replace=True))
tree = hotpatch.tree()["livepatch"]
out = {"calls": calls(), "enabled": [p.enabled for p in (p1, p2, p3)], "events": events,
       "registered": [p.name for p in hotpatch.patches()],
       "orders": [tree[n]["stack_order"] for n in ("p1", "p2", "p3")], "replace": tree["p3"]["replace"],
       "p1_patched": [f.patched for f in p1.objects[0].funcs]}
p3.disable()
out["after_disable"] = calls()
out["code_restored"] = code() == original_code
report(out)
""", lib=model_lib)[0]
    # p3 names rip_load and frame_pointer; what only p1 and p2 named is back to the original.
    assert r["calls"] == {"plain_add": 6, "rip_load": 2005, "jcc_leaf": 6, "frame_pointer": 2005}
    assert r["enabled"] == [False, False, True]
    assert r["p1_patched"] == [False, False]
    assert r["events"] == []          # replaced patches' unpatch callbacks do not run
    assert r["registered"] == ["p1", "p2", "p3"]
    assert r["orders"] == [0, 0, 1] and r["replace"] is True
    assert r["after_disable"] == ORIGINAL
    assert r["code_restored"]


def test_new_code_of_every_kind(child, model_lib):
    r = child(PRELUDE + """
import cffi
ffi = cffi.FFI()
ffi.cdef("long replacement2(long);")
clib = ffi.dlopen(P["lib"])
seen = []
def python_new(x):
    seen.append(x)
    return x * 100
patch = hotpatch.register(Patch("kinds", [Object(OBJ, [
    Func("plain_add", REPL),                                   # an int
    Func("rip_load", clib.replacement2),                       # a cffi function pointer
    Func("jcc_leaf", lib.replacement),                      # a ctypes function pointer
    Func("frame_pointer", python_new, signature="long(long)"),  # a Python callable
])]))
report({"calls": calls(), "seen": seen})
""", lib=model_lib)[0]
    assert r["calls"] == {"plain_add": 1005, "rip_load": 2005, "jcc_leaf": 1005, "frame_pointer": 500}
    assert r["seen"] == [5]


def test_python_callable_can_wrap_the_original_and_errors_are_reported(child, model_lib):
    r = child(PRELUDE + """
state = {}
def wrapper(x):
    if x == 13:
        raise ValueError("unlucky")
    return state["original"](x) * 10
func = Func("calls_other", wrapper, signature="long(long)")
hotpatch.register(Patch("wrap", [Object(OBJ, [func])]))
state["original"] = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)(func.original)
report({"wrapped": call("calls_other", 5), "error_result": call("calls_other", 13),
        "original_13": func.call_original(13),
        "errors": func.errors, "last": repr(func.last_error), "after": call("calls_other", 1)})
""", lib=model_lib)[0]
    assert r["wrapped"] == 120
    assert r["error_result"] == r["original_13"]   # the original ran instead
    assert r["errors"] == 1 and "unlucky" in r["last"]
    assert r["after"] == 40


def test_python_callable_needs_a_signature(child, model_lib):
    r = child(PRELUDE + """
try:
    hotpatch.register(Patch("nosig", [Object(OBJ, [Func("plain_add", lambda x: x)])]))
except hotpatch.HotpatchError as e:
    report([str(e), hotpatch.patches(), call("plain_add")])
""", lib=model_lib)[0]
    assert "signature" in r[0] and r[1] == [] and r[2] == 6


def test_callbacks_run_in_the_kernels_order(child, model_lib):
    r = child(PRELUDE + """
events = []
def cbs(label):
    def make(kind):
        def callback(obj):
            assert obj.name == label_names[label]
            events.append(f"{kind} {label} patched={call('plain_add') != 6}")
        return callback
    return {k: make(k) for k in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")}
label_names = {"A": OBJ, "B": None}
patch = Patch("cb", [Object(OBJ, [Func("plain_add", REPL)], **cbs("A")),
                     Object(None, [], **cbs("B"))])      # callbacks only, the main program
hotpatch.register(patch)
enabled = list(events); events.clear()
patch.disable()
report({"enable": enabled, "disable": events})
""", lib=model_lib)[0]
    assert r["enable"] == ["pre_patch A patched=False", "pre_patch B patched=False",
                           "post_patch A patched=True", "post_patch B patched=True"]
    assert r["disable"] == ["pre_unpatch A patched=True", "pre_unpatch B patched=True",
                            "post_unpatch A patched=False", "post_unpatch B patched=False"]


@pytest.mark.parametrize("veto", ["return 1", "raise RuntimeError('not now')"])
def test_pre_patch_veto_changes_nothing(child, model_lib, veto):
    r = child(PRELUDE + f"""
events = []
def a_pre(obj):
    events.append("pre A")
def a_post_unpatch(obj):
    events.append("post_unpatch A")
def b_pre(obj):
    events.append("pre B")
    {veto}
def c_pre(obj):
    events.append("pre C")
before = code()
patch = Patch("veto", [Object(OBJ, [Func("plain_add", REPL)], pre_patch=a_pre, post_unpatch=a_post_unpatch),
                       Object(None, [], pre_patch=b_pre),
                       Object("libc.so.6", [], pre_patch=c_pre)])
try:
    hotpatch.register(patch)
except hotpatch.PatchStateError as e:
    report({{"message": str(e), "events": events, "same": code() == before,
            "registered": hotpatch.patches(), "enabled": patch.enabled, "result": call("plain_add")}})
""", lib=model_lib)[0]
    assert "veto" in r["message"] and "pre_patch" in r["message"] and "main" in r["message"]
    assert r["events"] == ["pre A", "pre B", "post_unpatch A"]   # stops at the vetoing object
    assert r["same"] and r["registered"] == [] and not r["enabled"] and r["result"] == 6


PATCH_MODULE = r"""
#include <hotpatch.h>
#include <Python.h>

static long fixed_plain_add(long x) { return x + 5000; }

/* math.erf's implementation is a static function of the math extension
 * module: replace it with one that answers 42. */
static PyObject *fixed_erf(PyObject *module, PyObject *arg) { return PyFloat_FromDouble(42.0); }

int callbacks_seen;
static int pre(struct hp_object *obj) { callbacks_seen |= 1; return 0; }
static void post(struct hp_object *obj) { callbacks_seen |= 2; }
static void pre_un(struct hp_object *obj) { callbacks_seen |= 4; }
static void post_un(struct hp_object *obj) { callbacks_seen |= 8; }

static struct hp_func model_funcs[] = {
    { .old_name = "plain_add", .new_func = fixed_plain_add },
    { }
};
static struct hp_func math_funcs[] = {
    { .old_name = "math_erf", .new_func = fixed_erf },
    { }
};
static struct hp_object objs[] = {
    { .name = "libmodel.so", .funcs = model_funcs,
      .callbacks = { .pre_patch = pre, .post_patch = post, .pre_unpatch = pre_un, .post_unpatch = post_un } },
    { .name = MATH_SO, .funcs = math_funcs },
    { }
};
static struct hp_patch patch = { .name = "c-module", .objs = objs };
HP_PATCH(patch);
"""


def test_c_patch_module_built_with_hotpatch_build(child, model_lib, tmp_path):
    import math
    math_so = os.path.basename(math.__file__)
    source = tmp_path / "fix.c"
    source.write_text(PATCH_MODULE)
    output = tmp_path / "fix.so"
    build = subprocess.run([sys.executable, "-m", "hotpatch", "build", str(source), "-o", str(output),
                            "--", "-I", sysconfig.get_paths()["include"], f'-DMATH_SO="{math_so}"'],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    r = child(PRELUDE + """
import math
before = [call("plain_add"), math.erf(0.5)]
patch = hotpatch.load(P["module"])
seen = ctypes.c_int.in_dll(ctypes.CDLL(P["module"]), "callbacks_seen")
during = [call("plain_add"), math.erf(0.5), patch.name, patch.enabled, seen.value,
          [o.name for o in patch.objects]]
patch.disable()
after = [call("plain_add"), math.erf(0.5), seen.value]
maps = open("/proc/self/maps").read()
report({"before": before, "during": during, "after": after, "mapped": P["module"] in maps})
""", lib=model_lib, module=str(output))[0]
    assert r["before"][0] == 6 and abs(r["before"][1] - 0.5204998778) < 1e-9
    assert r["during"][:5] == [5005, 42.0, "c-module", True, 3]
    assert r["during"][5] == ["libmodel.so", math_so]
    assert r["after"][:2] == r["before"] and r["after"][2] == 15
    assert r["mapped"]           # RTLD_NODELETE: the module stays mapped


def test_hotpatch_build_reports_compiler_errors(tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("this is not C;\n")
    result = subprocess.run([sys.executable, "-m", "hotpatch", "build", str(source), "-o",
                             str(tmp_path / "broken.so")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "broken.c" in result.stderr


def test_load_refuses_a_library_without_a_descriptor(child, model_lib):
    r = child(PRELUDE + """
try:
    hotpatch.load(P["lib"])
except hotpatch.HotpatchError as e:
    report(str(e))
""", lib=model_lib)[0]
    assert "not a hotpatch patch module" in r


def test_python_patch_module(child, model_lib, tmp_path):
    module = tmp_path / "fix.py"
    module.write_text(
        "import ctypes, hotpatch\n"
        f"lib = ctypes.CDLL({model_lib!r})\n"
        "patch = hotpatch.Patch('py-module', [hotpatch.Object('libmodel.so', [\n"
        "    hotpatch.Func('rip_load', lambda x: -x, signature='long(long)')])])\n")
    r = child(PRELUDE + """
patch = hotpatch.load(P["module"])
report([patch.name, call("rip_load"), hotpatch.tree()["livepatch"]["py-module"]["enabled"]])
""", lib=model_lib, module=str(module))[0]
    assert r == ["py-module", -5, True]


def test_zlib_crc32_redirected_to_a_python_callable(child):
    r = child("""
import zlib, hotpatch
seen = []
def fake_crc32(crc, buf, length):
    seen.append(length)
    return 0x1234
patch = hotpatch.Patch("crc", [hotpatch.Object("libz.so.1", [hotpatch.Func(
    "crc32", fake_crc32, signature="unsigned long(unsigned long, const unsigned char *, unsigned int)")])])
before = zlib.crc32(b"hello world")
hotpatch.register(patch)
during = zlib.crc32(b"hello world")
patch.disable()
report([before, during, zlib.crc32(b"hello world"), seen])
""")[0]
    assert r[0] == 0x0d4a1185
    assert r[1] == 0x1234
    assert r[2] == r[0]
    assert r[3] == [11]


def test_tree_shows_the_hierarchy(child, model_lib):
    r = child(PRELUDE + """
hotpatch.register(Patch("t", [Object(OBJ, [Func("plain_add", REPL), Func("helper", REPL, old_sympos=2)]),
                              Object("not-loaded.so", [Func("x", REPL)])]))
report([hotpatch.tree(), REPL, addr("plain_add")])
""", lib=model_lib, env={"HOTPATCH_STOP": "always"})[0]    # a stop: the helper's pid shows
    tree, repl, plain_add = r
    t = tree["livepatch"]["t"]
    assert tree["tainted"] is True
    assert t["enabled"] is True and t["transition"] is False and t["replace"] is False
    assert t["stack_order"] == 1
    assert t["libmodel.so"]["patched"] is True
    func = t["libmodel.so"]["plain_add,1"]
    assert func["patched"] is True and func["old_addr"] == plain_add and func["new_addr"] == repl
    assert isinstance(func["original"], int)
    assert t["libmodel.so"]["helper,2"]["patched"] is True
    assert t["not-loaded.so"]["patched"] is False
    assert t["not-loaded.so"]["x,1"]["patched"] is False and t["not-loaded.so"]["x,1"]["old_addr"] is None
    core = tree["core"]
    assert core["sites"] == 2
    assert "memfd" in core["pool"] or "PR_SET_VMA_ANON_NAME" in core["pool"]
    assert core["code_writes"] == "/proc/self/mem" and core["core_sync"] == "membarrier SYNC_CORE"
    assert core["stopper"]["method"] == "ptrace" and core["stopper"]["reason"] is None
    assert core["stopper"]["helper_pid"] > 0 and core["stopper"]["park_signal"] > 32
    assert core["stops"]["count"] >= 1      # every code write is made in a stop
    assert 0 < core["stops"]["longest_hold_ms"] <= core["stops"]["held_ms"]


@pytest.mark.parametrize("faulthandler_first", [True, False])
def test_crash_report_lists_enabled_patches_with_faulthandler(model_lib, faulthandler_first):
    enable_faulthandler = "import faulthandler; faulthandler.enable()\n"
    code = (PRELUDE.replace('P["lib"]', repr(model_lib))
            + (enable_faulthandler if faulthandler_first else "")
            + 'hotpatch.register(Patch("crashy", [Object(OBJ, [Func("plain_add", REPL)])]))\n'
            + ("" if faulthandler_first else enable_faulthandler)
            + "ctypes.string_at(0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -11
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "hotpatch: this process is live patched (tainted); enabled patches: crashy [1]" in proc.stderr
    # and where it died, as an oops gives RIP: string_at(0) reads address 0
    # (a signal faulthandler raised again after its dump has no address)
    address = ", address 0x0" if faulthandler_first else ""
    assert re.search(rf"hotpatch: signal 11 in thread \d+ at pc 0x[0-9a-f]+{address}\n", proc.stderr), \
        proc.stderr


def test_concurrent_lifecycle_while_threads_call(child, model_lib):
    r = child(PRELUDE + """
import threading, time
ok = (ctypes.c_long * 2)(8, 1007)           # jcc_leaf(7): old, or new
lib.stress_start(ctypes.c_void_p(addr("jcc_leaf")), 3, ok, 2)
errors = []
def toggle(name, func, target, rounds):
    # Only the top patch may be disabled: wait for the others to step down.
    try:
        patch = hotpatch.register(Patch(name, [Object(OBJ, [Func(func, target)])]), enable=False)
        for _ in range(rounds):
            patch.enable()
            while True:
                try:
                    patch.disable()
                    break
                except hotpatch.PatchStateError:
                    time.sleep(0.0005)
        hotpatch.unregister(patch)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=toggle, args=(name, func, target, 100))
           for name, func, target in (("a", "plain_add", REPL), ("b", "rip_load", REPL2),
                                      ("c", "jcc_leaf", REPL), ("d", "frame_pointer", REPL))]
for t in threads: t.start()
for t in threads: t.join()
total, a_bad = ctypes.c_long(), ctypes.c_long()
lib.stress_stop.restype = ctypes.c_long
bad = lib.stress_stop(ctypes.byref(total), ctypes.byref(a_bad))
report({"errors": errors, "bad": bad, "calls": total.value, "final": calls(),
        "patches": hotpatch.patches()})
""", lib=model_lib, timeout=300)[0]
    assert r["errors"] == []
    assert r["bad"] == 0 and r["calls"] > 0
    assert r["final"] == ORIGINAL
    assert r["patches"] == []
