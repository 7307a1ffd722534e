"""The loader hook (module notifiers): objects loaded and unloaded after a
patch was registered, and code that must never be written once its object
is gone.  Every test patches inside a child process."""
import os

import pytest

from conftest import compile_library


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("loader"))
    return {name: compile_library(os.path.join(out, f"lib{name}.so"), [f"loader_targets/{src}"])
            for name, src in [("same_a", "same_a.c"), ("same_b", "same_b.c"),
                              ("repl", "repl.c")]}


PRELUDE = """
import ctypes, _ctypes, os
import hotpatch
from hotpatch import Patch, Object, Func, sites, symbols
repl = ctypes.CDLL(P["repl"])
def addr(lib, name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def call(lib, name, x=1):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(x)
REPL, REPL2 = addr(repl, "replacement"), addr(repl, "replacement2")
def base_of(path):
    return symbols.find_object(os.path.basename(path)).base
"""


def test_restore_never_writes_into_another_object_at_the_same_address(child, libs):
    """A site whose object was unloaded, another library since loaded at its
    address: restoring it is refused and that library's code is untouched."""
    r = child(PRELUDE + """
a = ctypes.CDLL(P["same_a"])
base_a = base_of(P["same_a"])
site = sites.redirect(addr(a, "fn"), REPL)
patched = call(a, "fn")
_ctypes.dlclose(a._handle)
b = ctypes.CDLL(P["same_b"])
same = base_of(P["same_b"]) == base_a and addr(b, "other_fn") == site.entry
try:
    sites.restore(site)
    error = None
except hotpatch.HotpatchError as e:
    error = str(e)
report({"patched": patched, "same": same, "error": error, "other": call(b, "other_fn")})
""", **libs)[0]
    assert r["patched"] == 1001 and r["same"], r
    assert r["error"] and "changed by someone else" in r["error"]
    assert r["other"] == 8
