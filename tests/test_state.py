"""System states (klp_state): the scenarios of the kernel's
tools/testing/selftests/livepatch/test-state.sh, ported.  Each runs in a
child process."""
import os

import pytest

from conftest import compile_library


@pytest.fixture(scope="session")
def state_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("state"))
    return compile_library(os.path.join(out, "libstate.so"), ["targets/shapes.c"])


PRELUDE = """
import ctypes, os
import hotpatch
from hotpatch import Patch, Object, Func, State, PatchStateError
lib = ctypes.CDLL(P["lib"])
OBJ = os.path.basename(P["lib"])
CONSOLE_LOGLEVEL = 1       # the state id test-state.sh uses
log = []
def addr(name):
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
def call(name="plain_add"):
    f = getattr(lib, name); f.restype = ctypes.c_long; f.argtypes = [ctypes.c_long]
    return f(5)
def livepatch(name, version, *, replace=True, target="replacement", take_over=True):
    # test_klp_state*.c: pre_patch allocates the state's data (or takes over
    # the previous patch's), post_patch applies it, pre_unpatch restores,
    # post_unpatch frees it -- unless a newer patch took it over.
    def pre_patch(obj):
        state = obj.patch.state(CONSOLE_LOGLEVEL)
        prev = obj.patch.prev_state(CONSOLE_LOGLEVEL)
        if take_over and prev is not None and prev.data is not None:
            state.data, prev.data = prev.data, None
            log.append(f"{name}: taking over the console_loglevel change")
        else:
            state.data = {"loglevel": 7}
            log.append(f"{name}: allocating space to store console_loglevel")
        return 0
    def post_patch(obj):
        log.append(f"{name}: fix console_loglevel")
    def pre_unpatch(obj):
        log.append(f"{name}: restore console_loglevel")
    def post_unpatch(obj):
        state = obj.patch.state(CONSOLE_LOGLEVEL)
        if state.data is not None:
            log.append(f"{name}: freeing space for the stored console_loglevel")
            state.data = None
    obj = Object(OBJ, [Func("plain_add", addr(target))], pre_patch=pre_patch,
                 post_patch=post_patch, pre_unpatch=pre_unpatch, post_unpatch=post_unpatch)
    return Patch(name, [obj], replace=replace, states=[State(CONSOLE_LOGLEVEL, version)])
"""


def test_system_state_modification(child, state_lib):
    r = child(PRELUDE + """
p = hotpatch.register(livepatch("test_klp_state", 1))
data = p.state(CONSOLE_LOGLEVEL).data
tree = hotpatch.tree()["livepatch"]["test_klp_state"]
patched = call()
p.disable()
report({"log": log, "data": data, "states": tree["states"], "consistency": tree["consistency"],
        "patched": patched, "restored": call(), "after": p.state(CONSOLE_LOGLEVEL).data})
""", lib=state_lib)[0]
    assert r["log"] == ["test_klp_state: allocating space to store console_loglevel",
                        "test_klp_state: fix console_loglevel",
                        "test_klp_state: restore console_loglevel",
                        "test_klp_state: freeing space for the stored console_loglevel"]
    assert r["data"] == {"loglevel": 7} and r["after"] is None
    assert r["states"] == "1:1" and r["consistency"] == "immediate"
    assert r["patched"] == 1005 and r["restored"] == 6


def test_taking_over_system_state_modification(child, state_lib):
    r = child(PRELUDE + """
p1 = hotpatch.register(livepatch("test_klp_state", 1))
first = p1.state(CONSOLE_LOGLEVEL).data
p2 = hotpatch.register(livepatch("test_klp_state2", 1, target="replacement2"))
taken = p2.state(CONSOLE_LOGLEVEL).data
enabled = [p1.enabled, p2.enabled]
patched = call()
p2.disable()
hotpatch.unregister(p1)
report({"log": log, "same": first is taken, "enabled": enabled, "patched": patched,
        "restored": call(), "old": p1.state(CONSOLE_LOGLEVEL).data})
""", lib=state_lib)[0]
    # The replaced patch's callbacks do not run: the new one took its data over.
    assert r["log"] == ["test_klp_state: allocating space to store console_loglevel",
                        "test_klp_state: fix console_loglevel",
                        "test_klp_state2: taking over the console_loglevel change",
                        "test_klp_state2: fix console_loglevel",
                        "test_klp_state2: restore console_loglevel",
                        "test_klp_state2: freeing space for the stored console_loglevel"]
    assert r["same"] and r["old"] is None
    assert r["enabled"] == [False, True]
    assert r["patched"] == 2005 and r["restored"] == 6


def test_compatible_cumulative_livepatches(child, state_lib):
    # test_klp_state2 (version 1) replaces test_klp_state (version 1), then
    # test_klp_state3 (version 2) replaces it, then test_klp_state2 again
    # is refused: it would take the state back to an older version.
    r = child(PRELUDE + """
p1 = hotpatch.register(livepatch("test_klp_state", 1))
p2 = hotpatch.register(livepatch("test_klp_state2", 1, target="replacement2"))
p3 = hotpatch.register(livepatch("test_klp_state3", 2))
hotpatch.unregister(p1); hotpatch.unregister(p2)
p2b = livepatch("test_klp_state2", 1, target="replacement2")
try:
    hotpatch.register(p2b)
    refused = None
except PatchStateError as e:
    refused = str(e)
report({"enabled": [p.name for p in hotpatch.patches() if p.enabled], "refused": refused,
        "registered": [p.name for p in hotpatch.patches()], "result": call()})
""", lib=state_lib)[0]
    assert r["enabled"] == ["test_klp_state3"]
    assert r["registered"] == ["test_klp_state3"]
    assert "test_klp_state2" in r["refused"] and "state 1 is version 1" in r["refused"]
    assert "version 2 of enabled patch 'test_klp_state3'" in r["refused"]
    assert r["result"] == 1005


@pytest.mark.parametrize("case", ["older-version", "replace-without-the-state",
                                  "no-replace-without-the-state"])
def test_incompatible_cumulative_livepatches(child, state_lib, case):
    r = child(PRELUDE + """
p1 = hotpatch.register(livepatch("test_klp_state3", 2))
before = ctypes.string_at(addr("plain_add"), 16)
if P["case"] == "older-version":
    p2 = livepatch("test_klp_state2", 1, target="replacement2")
else:
    p2 = Patch("plain", [Object(OBJ, [Func("plain_add", addr("replacement2"))])],
               replace=P["case"] == "replace-without-the-state")
try:
    hotpatch.register(p2)
    refused = None
except PatchStateError as e:
    refused = str(e)
report({"refused": refused, "registered": [p.name for p in hotpatch.patches()],
        "unchanged": ctypes.string_at(addr("plain_add"), 16) == before, "result": call(),
        "log": log})
""", lib=state_lib, case=case)[0]
    if case == "no-replace-without-the-state":
        # A patch that does not replace and does not touch the state is free
        # to stack on top (klp_is_state_compatible).
        assert r["refused"] is None and r["result"] == 2005
        return
    assert r["refused"] and "nothing was changed" in r["refused"]
    assert r["registered"] == ["test_klp_state3"] and r["unchanged"] and r["result"] == 1005
    # Refused before any callback of the new patch ran.
    assert not any(line.startswith("test_klp_state2") for line in r["log"])


def test_state_arguments_are_checked():
    from hotpatch import Object, Patch, PatchStateError, State
    with pytest.raises(PatchStateError, match="state 3 listed twice"):
        Patch("p", [Object("x.so")], states=[State(3, 1), State(3, 2)])
    with pytest.raises(TypeError, match="not a hotpatch.State"):
        Patch("p", [Object("x.so")], states=[(3, 1)])
    with pytest.raises(ValueError, match="version must be an integer >= 0"):
        State(1, -1)
