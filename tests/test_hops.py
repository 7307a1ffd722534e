"""Hot-patch points (native/hop.c, sites.py): an entry of several
instructions, whose jmp rel32 would need a stop, redirected without one by
a jmp rel8 over its first instruction to a jmp rel32 in the dead padding
before it -- and refused where the padding is not dead (a function falls
through it), where the first instruction is shorter than the jmp rel8,
where the batch takes a stop anyway, and under HOTPATCH_STOP=always.

Every test runs in a child process with faulthandler's watchdog blocking
every signal (conftest.run_child)."""
import os

import pytest

from conftest import (CALLERS_AND_SLEEPERS, LIBZ, STOPS_PRELUDE, check_callers_and_sleepers,
                      compile_library)


@pytest.fixture(scope="session")
def hops_lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hops"))
    return {"lib": compile_library(os.path.join(out, "libhops.so"),
                                   ["targets/stopper.c", "targets/shapes.c", "targets/hops.c"],
                                   flags=["-pthread"])}


PRELUDE = STOPS_PRELUDE + """
def site_of(name):
    return next(s for s in sites.installed_sites() if s.entry == addr(name))
def patch(name, new="replacement"):
    return hotpatch.register(Patch(name + "-" + new, [Object(OBJ, [Func(name, addr(new))])]),
                             enable=False)
"""


def test_an_entry_of_several_instructions_patched_without_a_stop(child, hops_lib):
    r = child(PRELUDE + """
p1, p2 = patch("hop_plain"), patch("hop_plain", "replacement2")
before = sites.read_memory(addr("hop_plain") - 8, 24)
out = {"old": call("hop_plain"), "enable": took(lambda: hotpatch.enable(p1)),
       "patched": call("hop_plain")}
site = site_of("hop_plain")
out.update(hop=site._hop - addr("hop_plain"), hopped=site.hopped,
           entry=sites.read_memory(addr("hop_plain"), 2).hex(),
           stack=took(lambda: hotpatch.enable(p2)), stacked=call("hop_plain"),
           unstack=took(lambda: hotpatch.disable(p2)), unstacked=call("hop_plain"),
           disable=took(lambda: hotpatch.disable(p1)), restored=call("hop_plain"))
after = sites.read_memory(addr("hop_plain") - 8, 24)
out.update(entry_back=after[8:] == before[8:], padding_jmp=after[3:4].hex(),
           again=took(lambda: hotpatch.enable(p2)), again_patched=call("hop_plain"),
           again_hop=site_of("hop_plain")._hop == site._hop)
report(out)
""", **hops_lib)[0]
    assert r["old"] == 22 and r["patched"] == 1007, r
    # the jmp rel32 in the padding just before the entry, a jmp rel8 to it
    assert r["hop"] == -5 and r["hopped"] and r["entry"] == "ebf9", r
    assert r["enable"] == [0, 1], r
    for step in ("stack", "unstack", "disable"):
        assert r[step] == [0, 1], (step, r)
    # again, to another target: the padding's jmp first (one atomic store: a
    # thread of the earlier install may be on it), then the entry's
    assert r["again"] == [0, 2], r
    assert r["stacked"] == 2007 and r["unstacked"] == 1007 and r["restored"] == 22, r
    # the entry's bytes come back exactly; the padding keeps its jmp (a
    # thread may be on it) and is used again
    assert r["entry_back"] and r["padding_jmp"] == "e9", r
    assert r["again_patched"] == 2007 and r["again_hop"], r


def test_the_function_before_tells_where_the_bytes_do_not(child, hops_lib):
    # Before hop_swept's padding: `mov $0, %eax; ret`, whose last two bytes
    # also decode as `add %al, %bl`.  The livepatch model passes the symbol
    # table's function before, swept to the padding: a point.  A site
    # prepared without it has none, and takes the stop.
    r = child(PRELUDE + """
bare = sites.prepare(addr("hop_swept"))
out = {"bare": [took(lambda: sites.redirect_batch([(bare, addr("replacement"))])),
                bare.hopped, call("hop_swept")]}
sites.restore(bare)
sites.forget([bare])
p = patch("hop_swept")
out["model"] = [took(lambda: hotpatch.enable(p)), site_of("hop_swept").hopped, call("hop_swept")]
hotpatch.disable(p)
out["restored"] = call("hop_swept")
report(out)
""", **hops_lib)[0]
    assert r["bare"] == [[1, 0], False, 1007], r
    assert r["model"] == [[0, 1], True, 1007] and r["restored"] == 22, r


def test_padding_that_a_function_falls_through_is_no_hot_patch_point(child, hops_lib):
    # hop_falls(x >= 0) runs the padding before hop_fallen_into: a jmp
    # written there would survive the disable and keep sending it to the
    # replacement.
    r = child(PRELUDE + """
p = patch("hop_fallen_into")
out = {"old": [call("hop_falls"), call("hop_falls", -1), call("hop_fallen_into")],
       "enable": took(lambda: hotpatch.enable(p)),
       "patched": [call("hop_falls"), call("hop_fallen_into")],
       "hop": site_of("hop_fallen_into")._hop, "hopped": site_of("hop_fallen_into").hopped}
out.update(disable=took(lambda: hotpatch.disable(p)),
           restored=[call("hop_falls"), call("hop_falls", -1), call("hop_fallen_into")])
report(out)
""", **hops_lib)[0]
    assert r["old"] == [12, -1, 12], r
    assert r["hop"] == 0 and not r["hopped"] and r["enable"] == [1, 0], r
    assert r["patched"] == [1007, 1007], r
    assert r["restored"] == [12, -1, 12] and r["disable"] == [0, 1], r


def test_where_a_hot_patch_point_is_not_taken(child, hops_lib):
    r = child(PRELUDE + """
out = {}
# a 1-byte push first: no short jmp fits over it
p = patch("hop_push")
out["push"] = [took(lambda: hotpatch.enable(p)), call("hop_push"), site_of("hop_push").hopped]
hotpatch.disable(p)
# one entry of the batch needs a stop anyway (hop_push): the others take
# the jmp rel32 at their entry, one jump per call instead of two
both = hotpatch.register(Patch("both", [Object(OBJ, [Func("hop_push", addr("replacement")),
                                                     Func("hop_plain", addr("replacement"))])]),
                         enable=False)
out["batch"] = [took(lambda: hotpatch.enable(both)), call("hop_plain"),
                site_of("hop_plain").hopped, sites.read_memory(addr("hop_plain"), 1).hex()]
hotpatch.disable(both)
report(out)
""", **hops_lib)[0]
    assert r["push"] == [[1, 0], 1007, False], r
    assert r["batch"] == [[1, 0], 1007, False, "e9"], r


def test_stop_always_and_the_stack_model_take_no_hot_patch_point(child, hops_lib):
    r = child(PRELUDE + """
p = patch("hop_plain")
out = {"always": [took(lambda: hotpatch.enable(p)), call("hop_plain"),
                  site_of("hop_plain").hopped]}
report(out)
""", env={"HOTPATCH_STOP": "always"}, **hops_lib)[0]
    assert r["always"] == [[1, 0], 1007, False], r
    r = child(PRELUDE + """
p = hotpatch.register(Patch("s", [Object(OBJ, [Func("hop_plain", addr("replacement"))])],
                            consistency="stack"), enable=False)
report([took(lambda: hotpatch.enable(p)), call("hop_plain"), site_of("hop_plain").hopped])
""", **hops_lib)[0]
    assert r == [[1, 0], 1007, False], r


@pytest.mark.parametrize("name", ["hop_plain", "hop_swept"])
def test_callers_and_sleepers_through_hot_patch_points(child, hops_lib, name):
    # Patched, stacked and restored hundreds of times through the hot-patch
    # point, without a single stop (conftest.CALLERS_AND_SLEEPERS): hop_plain's
    # padding is dead by its bytes alone, hop_swept's by the sweep from the
    # function before, which the C core looks up in the model's index.
    r = child(PRELUDE + CALLERS_AND_SLEEPERS, name=name, results=[22, 1007, 2007],
              cycles=600, timeout=300, **hops_lib)[0]
    check_callers_and_sleepers(r, 600, old=22)


def test_a_library_nobody_here_wrote(child, hops_lib):
    # libz's crc32 (two instructions at its entry, padding before it) sent
    # to adler32 and back through its hot-patch point with no stop; its
    # entry's bytes come back exactly.
    r = child(PRELUDE + LIBZ + """
p = hotpatch.register(Patch("z", [Object("libz.so.1", [Func("crc32", adler)])]), enable=False)
enable = took(lambda: hotpatch.enable(p))
out = {"want": want, "enable": enable, "patched": libz.crc32(0, b"abc", 3),
       "hopped": next(s for s in sites.installed_sites() if s.entry == crc).hopped}
out.update(disable=took(lambda: hotpatch.disable(p)), restored=libz.crc32(0, b"abc", 3),
           identical=sites.read_memory(crc, 16) == before)
report(out)
""", **hops_lib)[0]
    assert r["patched"] == r["want"]["adler"] != r["want"]["crc"], r
    assert r["hopped"] and r["enable"] == [0, 1] and r["disable"] == [0, 1], r
    assert r["restored"] == r["want"]["crc"] and r["identical"], r


# Functions of several instructions with padding before each (hb_first
# only puts a function's end before hb_0), as many as a patch of a real fix
# may hold: their points looked for in one call of the C core
# (hp_hops_find), their jmps put with the entries by one
# (hp_write_dead_then_batch).
MANY = 48
MANY_SOURCE = "".join(
    f"__attribute__((noipa)) long hb_{i}(long x) {{ return ((x ^ (x >> 7)) * 3) + {1000 + i}; }}\n"
    for i in range(-1, MANY)).replace("hb_-1", "hb_first") \
    + "__attribute__((noipa)) long hb_new(long x) { return x + 1000000; }\n"


@pytest.fixture(scope="session")
def many_lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("many")
    source = out / "many.c"
    source.write_text(MANY_SOURCE)
    return {"lib": compile_library(os.path.join(out, "libmany.so"),
                                   ["targets/stopper.c", str(source)], flags=["-pthread"]),
            "many": MANY}


def test_a_batch_of_many_goes_through_their_points_at_once(child, many_lib):
    r = child(PRELUDE + """
names = [f"hb_{i}" for i in range(P["many"])]
p = hotpatch.register(Patch("many", [Object(OBJ, [Func(n, addr("hb_new")) for n in names])]),
                      enable=False)
old = [call(n) for n in names]
enable = took(lambda: hotpatch.enable(p))
out = {"enable": enable, "patched": sorted({call(n) for n in names}),
       "hopped": all(site_of(n).hopped for n in names)}
out.update(disable=took(lambda: hotpatch.disable(p)), restored=[call(n) for n in names] == old)
report(out)
""", **many_lib)[0]
    assert r["enable"] == [0, 1] and r["disable"] == [0, 1], r
    assert r["patched"] == [1000007] and r["hopped"] and r["restored"], r


@pytest.mark.parametrize("changed, change", [
    ("padding", 'sites.lib.hp_write_code(points[30], b"\\x90" * 5, 5)'),
    # The first instruction (mov %rdi,%rax, 3 bytes) made a nop of the same
    # length: the entry is no longer what the analysis read.
    ("entry", 'sites.lib.hp_write_code(victim.entry, b"\\x0f\\x1f\\x00", 3)'),
])
def test_a_batch_through_points_is_written_all_or_nothing(child, many_lib, changed, change):
    # Every point looked for (its padding's bytes kept), then one site's
    # padding or entry changes before the write.  The points' jmps go with
    # the entries in one hold of the core's lock (hp_write_dead_then_batch):
    # the batch is refused, naming that entry, and no point's bytes and no
    # entry's bytes have changed (the points written before the entries
    # that failed are put back).
    r = child(PRELUDE + """
from hotpatch.errors import TransitionError
from hotpatch import symbols
obj = symbols.find_object(OBJ)
names = [f"hb_{i}" for i in range(P["many"])]
prepared = sites.prepare_batch([(addr(n), None) for n in names], exec_ranges=obj.exec_ranges,
                               function_before=lambda a: symbols.function_before(obj, a))
points = [sites.hot_patch_point(s) for s in prepared]
spans = [(p, 5) for p in points] + [(s.entry, 8) for s in prepared]
victim = prepared[30]
""" + change + """
before = [sites.read_memory(a, n) for a, n in spans]
try:
    sites.redirect_batch([(s, addr("hb_new")) for s in prepared])
    refused = None
except TransitionError as e:
    refused = str(e)
out = {"points": all(points), "refused": refused, "victim": f"{victim.entry:#x}",
       "unchanged": [sites.read_memory(a, n) for a, n in spans] == before,
       "installed": [s.installed for s in prepared].count(True),
       "others": [call(n) for i, n in enumerate(names) if i != 30]
                 == [1021 + i for i in range(P["many"]) if i != 30],
       "victim's": call("hb_30")}
report(out)
""", **many_lib)[0]
    assert r["points"], r
    assert r["refused"] and r["victim"] in r["refused"], r
    # Its padding changed, the victim itself still runs as before.
    assert changed != "padding" or ("padding" in r["refused"] and r["victim's"] == 1051), r
    assert r["unchanged"] and r["installed"] == 0 and r["others"], r
