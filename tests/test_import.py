"""Importing hotpatch in a running service: the core is imported on first
use, giving the GIL up between modules (hotpatch/__init__.py _GivingUp)."""


def test_first_use_imports_the_core_giving_the_gil_up(child):
    r = child("""
import sys, threading, time
import hotpatch
before = set(sys.modules)
main = threading.get_ident()
yields = []
sleep = time.sleep
def counting_sleep(seconds):
    if seconds == 0 and threading.get_ident() == main:
        yields.append(1)
    return sleep(seconds)
time.sleep = counting_sleep

# Another thread importing meanwhile is neither slowed nor broken.
other = []
def importer():
    import json, decimal, fractions
    other.append(decimal.Decimal("1.5") + 1)
t = threading.Thread(target=importer)
t.start()
register = hotpatch.register
t.join()
time.sleep = sleep
finder = hotpatch._giving_up
binding_imported = "capstone" in sys.modules
import capstone
with open("/proc/self/maps") as maps:
    mapped = {line.split()[-1] for line in maps if "capstone" in line and ".so" in line}
report([sorted(mapped), capstone._cs._name, binding_imported, "hotpatch.core" in sys.modules,
        "hotpatch.core" in before, len(yields), sys.meta_path[0] is finder, finder.thread,
        str(other[0]), register is sys.modules["hotpatch.core"].register])
""")[0]
    mapped, loaded, binding_imported, core, core_before, yields, first, thread, other, same = r
    # Mapped by the C core, with the GIL released, without the binding
    # (x86_64/decode.py): the very file the binding opens when a service
    # imports it, once.
    assert mapped == [loaded] and not binding_imported, r
    assert core and not core_before and same
    # ~60 modules imported over tens of milliseconds: several 2 ms slices.
    assert yields >= 3, r
    # It stays first in sys.meta_path, inactive (no import of hotpatch's under way).
    assert first and thread is None
    assert other == "2.5"


def test_a_module_that_is_not_there_is_an_attribute_error(child):
    r = child("""
import hotpatch
try:
    hotpatch.no_such_submodule
except AttributeError as e:
    report(str(e))
""")[0]
    assert "no attribute 'no_such_submodule'" in r


def test_a_first_patch_imports_nothing_the_core_did_not(child):
    # capstone's Python binding is not imported, with the core or later
    # (x86_64/decode.py drives the C core's capstone): the loader's handling
    # of an event must never import a module whose import calls the dynamic
    # linker.
    # pycparser (50-80 ms) is only for signatures the C core's FFI cannot
    # read (newcode.function_type): libz's crc32 and adler32 are planned in
    # C, from a Python callable with a signature and from a cffi function
    # pointer, and import nothing more.
    r = child("""
import ctypes, sys, traceback

class Watch:
    # Asked first about every import: where each watched one was imported
    # (not merely looked for: importlib.util.find_spec asks too).
    def __init__(self):
        self.asked = {}
    def find_spec(self, name, path=None, target=None):
        stack = traceback.extract_stack()[:-1]
        if (name in ("capstone", "pycparser") and name not in self.asked
                and stack[-2].name == "_find_and_load_unlocked"):
            self.asked[name] = "".join(traceback.format_list(stack[-25:]))
        return None

watch = Watch()
sys.meta_path.insert(0, watch)
import hotpatch
hotpatch.register
after_import = dict(watch.asked)
from hotpatch import Func, Object, Patch
from hotpatch._native import ffi
libz = ctypes.CDLL("libz.so.1")
signature = "unsigned long(unsigned long, const unsigned char *, unsigned int)"
pointer = ffi.callback(signature, lambda value, buf, n: 7)
patch = Patch("first", [Object("libz.so.1", [Func("crc32", lambda value, buf, n: 5, signature=signature),
                                             Func("adler32", pointer)])])
hotpatch.register(patch)
report([after_import, watch.asked, libz.crc32(0, b"abc", 3), libz.adler32(0, b"abc", 3),
        sorted(m for m in sys.modules if m.split(".")[0] in ("capstone", "pycparser"))])
""")[0]
    after_import, after_patch, crc, adler, imported = r
    assert after_import == {}, after_import
    assert after_patch == after_import, after_patch
    assert (crc, adler) == (5, 7)
    assert imported == [], imported


def test_a_signature_the_core_cannot_read_is_read_by_cffi_s_parser(child):
    r = child("""
import ctypes, sys
import hotpatch
from hotpatch import Func, Object, Patch
libz = ctypes.CDLL("libz.so.1")
# An unknown struct: the C core's FFI knows none of the caller's types.
patch = Patch("opaque", [Object("libz.so.1", [
    Func("crc32", lambda value, buf, n: 5, signature="unsigned long(unsigned long, struct opaque *, unsigned int)")])])
hotpatch.register(patch)
try:
    hotpatch.register(Patch("variadic", [Object("libz.so.1", [
        Func("adler32", lambda *a: 0, signature="int(int, ...)")])]))
    refused = None
except hotpatch.HotpatchError as e:
    refused = str(e)
report([libz.crc32(0, b"abc", 3), "pycparser" in sys.modules, refused])
""")[0]
    crc, parsed, refused = r
    assert crc == 5 and parsed
    assert refused and "variadic" in refused, refused
