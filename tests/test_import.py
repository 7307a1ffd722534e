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
import capstone
with open("/proc/self/maps") as maps:
    mapped = {line.split()[-1] for line in maps if "capstone" in line and ".so" in line}
report([sorted(mapped), capstone._cs._name, "hotpatch.core" in sys.modules, "hotpatch.core" in before, len(yields),
        sys.meta_path[0] is finder, finder.thread, str(other[0]),
        register is sys.modules["hotpatch.core"].register])
""")[0]
    mapped, loaded, core, core_before, yields, first, thread, other, same = r
    # Mapped ahead with the GIL released (hotpatch/_ahead.py): the very file
    # the binding then opened, once.
    assert mapped == [loaded], r
    assert core and not core_before and same
    # ~100 modules imported over tens of milliseconds: several 2 ms slices.
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
