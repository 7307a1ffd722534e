"""The C core's plans and original stubs (native/plan.c) against the Python
entry analysis and relocator (x86_64/entry.py, x86_64/relocate.py).

The C core plans the common entry shapes of a batch and leaves every other
one, and every refusal, to Python.  On real code -- a file of -O2 shapes
compiled here with several sets of flags, the x86-64 test targets, libc's
and libz's exported functions -- each function the C core plans must get
exactly the plan analyze_entry makes and, at the same address, exactly the
stub build_original makes, byte for byte; and each function of a shape it
handles must be planned by it, so that the two cannot drift apart silently.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from conftest import compile_library
from hotpatch import symbols
from hotpatch.errors import UnsafeToPatch
from hotpatch.x86_64 import analyze_entry, build_original, original_stub_size_bound
from hotpatch.x86_64.decode import scan_code
from hotpatch.x86_64.entry import native_plans
from test_x86_64 import FLAVOURS as X86_FLAVOURS

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1 << 30
PLAN_FLAGS = {
    "o2": ["-O2"],
    "o2_ibt": ["-O2", "-fcf-protection"],
    "o3_avx2": ["-O3", "-mavx2"],
    "os": ["-Os"],
    "frame": ["-O2", "-fno-omit-frame-pointer"],
    "protector": ["-O2", "-fstack-protector-all"],
}
LIBRARIES = ["libc.so.6", "libz.so.1"]


def _functions(path: str) -> list[tuple[int, int]]:
    """``(offset, size)`` of the sized functions of ``path`` (its symbol
    table, else its dynamic one), one per address, IFUNC resolvers left out."""
    for extra in ([], ["-D"]):
        out = subprocess.run(["nm", "-S", "--defined-only", *extra, path], capture_output=True,
                             text=True).stdout
        rows = [line.split() for line in out.splitlines() if len(line.split()) == 4]
        if rows:
            break
    seen = {}
    for value, size, kind, _ in rows:
        if kind in "Tt" and int(size, 16):
            seen.setdefault(int(value, 16), int(size, 16))
    return sorted(seen.items())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """Paths of the compiled objects and the system libraries, all loaded."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("plan")
    paths = [compile_library(str(out / f"libplan_{name}.so"), ["plan_targets.c"], flags=flags)
             for name, flags in PLAN_FLAGS.items()]
    for flavour, flags in X86_FLAVOURS.items():
        paths.append(compile_library(str(out / f"libx86_{flavour.lower()}.so"), ["x86_targets.c"],
                                     flags=[*flags.split(), f"-DX86T_{flavour}"],
                                     per_source_flags={"x86_targets.c": []}))
    for name in LIBRARIES:
        ctypes.CDLL(name)
        paths.append(symbols.find_object(name).path)
    for path in paths:
        ctypes.CDLL(path)
    return paths


def _handled_by_c(plan, stub: int, entry: int, size: int) -> bool:
    """Whether ``plan`` (analyze_entry's) has a shape native/plan.c plans."""
    if plan.kind != "generic":
        return False        # (a plan whose instructions are shorter ends in padding: C's too)
    first = plan.instructions[0].mnemonic
    if first == "nop" or "call" in first:
        return False
    lo, hi = plan.address, plan.address + plan.length
    for insn in plan.instructions:
        if insn.branch in ("call", "call_indirect", "loop", "xbegin") or insn.mnemonic == "int3":
            return False
        if insn.target is not None and lo <= insn.target < hi:
            return False
    if scan_code(ctypes.string_at(entry, size), entry, entry + size).branches is None:
        return False     # more branches near the entry than the C scan keeps
    try:
        build_original(plan, stub)
    except UnsafeToPatch:
        return False     # a RIP-relative operand out of reach of the stub
    return True


@pytest.mark.parametrize("distance", [256 << 20, 8 * GiB], ids=["near", "far"])
def test_c_plans_and_stubs_are_the_python_ones(corpus, distance):
    """Near stubs keep every rel32; far ones need absolute jumps back and
    for jmp/jcc, and refuse RIP-relative operands (left to Python)."""
    planned = left = 0
    for path in corpus:
        obj = symbols.find_object(path)
        functions = [(obj.base + offset, size) for offset, size in _functions(path)]
        stubs = [entry + distance for entry, _ in functions]
        got = native_plans(functions, stubs, exec_ranges=obj.exec_ranges)
        for (entry, size), stub, native in zip(functions, stubs, got):
            where = f"{os.path.basename(path)} {entry - obj.base:#x}"
            try:
                want = analyze_entry(ctypes.string_at, entry, size=size,
                                     exec_ranges=obj.exec_ranges)
            except UnsafeToPatch:
                assert native is None, f"{where}: the C core planned what Python refuses"
                continue
            assert (native is not None) == _handled_by_c(want, stub, entry, size), \
                f"{where}: {want!r} {[str(i) for i in want.instructions]}"
            if native is None:
                left += 1
                continue
            plan, code, stub_size = native
            assert plan == want, where
            assert code == build_original(want, stub), where
            assert stub_size == original_stub_size_bound(want), where
            planned += 1
    # The common shapes are the C core's: most functions of real code (from
    # far stubs, RIP-relative operands no longer reach and are Python's).
    assert planned > (4 if distance < GiB else 2) * left, (planned, left)


def test_every_jump_form_is_compared(corpus):
    """The corpus exercises what the C core relocates: RIP-relative
    operands (with an immediate after the disp32 too), jmp and jcc, near
    and far, endbr64 first."""
    seen = set()
    for path in corpus:
        obj = symbols.find_object(path)
        functions = [(obj.base + offset, size) for offset, size in _functions(path)]
        for distance in (256 << 20, 8 * GiB):
            got = native_plans(functions, [e + distance for e, _ in functions],
                               exec_ranges=obj.exec_ranges)
            for native in got:
                if native is None:
                    continue
                plan = native[0]
                far = "far" if distance > 4 * GiB else "near"
                for insn in plan.instructions:
                    if insn.rip_disp_offset is not None:
                        seen.add("rip" if insn.rip_disp_offset + 4 == insn.size
                                 else "rip+imm")
                    if insn.branch in ("jmp", "jcc"):
                        seen.add(f"{insn.branch} {far}")
                if plan.endbr:
                    seen.add("endbr")
    assert seen >= {"rip", "rip+imm", "jmp near", "jmp far", "jcc near", "jcc far", "endbr"}, seen


def test_unplanned_functions_are_left_to_python(corpus):
    """Entries outside any executable segment, or not mapped, are Python's
    to refuse, in its words."""
    obj = symbols.find_object(corpus[0])
    entry, size = obj.base + _functions(corpus[0])[0][0], _functions(corpus[0])[0][1]
    got = native_plans([(entry, size), (0x7F12_3456_0000, 16)], [entry + GiB, 0],
                       exec_ranges=[(entry + size, entry + size + 64)])
    assert got == [None, None]


PRELUDE = """
import ctypes
from hotpatch import sites, symbols
from hotpatch.x86_64 import analyze_entry, build_original
from hotpatch.x86_64.entry import analyze_entries
from hotpatch.x86_64.xrefs import index_branches
from hotpatch import objects
"""


def test_prepare_batch_sites_are_the_python_plans(child, corpus):
    """prepare_batch through the C core: each site's plan and stub in pool
    memory are analyze_entry's and build_original's, and each refusal is
    analyze_entry's, word for word, whether branches from elsewhere into the
    entries are answered by the object's index in C or by the Python
    question; the stubs of forgotten sites are the next batch's."""
    r = child(PRELUDE + """
out = {"mismatch": [], "planned": 0, "refused": 0}
def compare(made, functions, obj, into):
    for (entry, size), got in zip(functions, made):
        try:
            want = analyze_entry(ctypes.string_at, entry, size=size, exec_ranges=obj.exec_ranges,
                                 branches_into=into)
        except Exception as e:
            out["refused"] += 1
            if type(got) is not type(e) or str(got) != str(e):
                out["mismatch"].append([hex(entry), str(got), str(e)])
            continue
        code = build_original(want, got.original)
        if got.plan != want or sites.read_memory(got.original, len(code)) != code:
            out["mismatch"].append([hex(entry), repr(got.plan), repr(want)])
        out["planned"] += 1
for path in P["paths"]:
    ctypes.CDLL(path)
    obj = symbols.find_object(path)
    functions = [(obj.base + offset, size) for offset, size in P["functions"][path]]
    into = lambda lo, hi: symbols.branches_into(obj, lo, hi)
    asked = sites.prepare_batch(functions, exec_ranges=obj.exec_ranges, branches_into=into)
    compare(asked, functions, obj, into)
    sites.forget([s for s in asked if isinstance(s, sites.Site)])
    indexed = sites.prepare_batch(functions, exec_ranges=obj.exec_ranges, branches_into=into,
                                  branch_index=lambda: symbols.branch_index(obj))
    compare(indexed, functions, obj, into)
    sites.forget([s for s in indexed if isinstance(s, sites.Site)])
# The stubs of forgotten sites are the next batch's.
free = {address for address, _ in sites._free_code}
remade = sites.prepare_batch(functions[:10], exec_ranges=obj.exec_ranges)
stubs = [s.original for s in remade if isinstance(s, sites.Site) and s.kind == "generic"]
out["reused"] = [len(stubs), all(stub in free for stub in stubs),
                 len(free) - len(sites._free_code)]
report(out)
""", paths=_batch_paths(corpus), functions={p: _functions(p) for p in _batch_paths(corpus)})[0]
    assert r["mismatch"] == [], r["mismatch"][:5]
    assert r["planned"] > 1000 and r["refused"] > 0, r
    stubs, reused, taken = r["reused"]
    assert stubs > 0 and reused and taken == stubs, r["reused"]


SMALL_BATCHES = PRELUDE + """
scanned = []
scan = sites.could_branch_into
def counted(exec_ranges, into):
    scanned.append(exec_ranges)
    return scan(exec_ranges, into)
sites.could_branch_into = counted
out = {"mismatch": [], "planned": 0, "refused": 0, "scans": []}
for path in P["paths"]:
    del scanned[:]
    ctypes.CDLL(path)
    obj = symbols.find_object(path)
    functions = [(obj.base + offset, size) for offset, size in P["functions"][path]][:400]
    into = lambda lo, hi: symbols.branches_into(obj, lo, hi)
    for k in range(0, len(functions), P["per_batch"]):
        batch = functions[k:k + P["per_batch"]]
        made = sites.prepare_batch(batch, exec_ranges=obj.exec_ranges,
                                   branch_index=symbols.branch_index_of(obj))
        for (entry, size), got in zip(batch, made):
            if not P["compare"]:    # the Python question would build the index
                out["planned"] += isinstance(got, sites.Site)
                continue
            try:
                want = analyze_entry(ctypes.string_at, entry, size=size,
                                     exec_ranges=obj.exec_ranges, branches_into=into)
            except Exception as e:
                out["refused"] += 1
                if type(got) is not type(e) or str(got) != str(e):
                    out["mismatch"].append([hex(entry), str(got), str(e)])
                continue
            if not isinstance(got, sites.Site) or got.plan != want:
                out["mismatch"].append([hex(entry), repr(got), repr(want)])
            out["planned"] += 1
        sites.forget([s for s in made if isinstance(s, sites.Site)])
    out["scans"].append([len(scanned), obj in symbols._branch_indexes])
report(out)
"""


def test_small_batches_give_the_python_answers_by_scan_or_index(child, corpus):
    """The model's small batches (symbols.BranchIndexOf) scan the object's
    code for bytes that could branch into their entries, or ask its branch
    index once it is built: the same sites and the same refusals, word for
    word, as the Python question."""
    r = child(SMALL_BATCHES, paths=_batch_paths(corpus), per_batch=4, compare=True,
              functions={p: _functions(p) for p in _batch_paths(corpus)})[0]
    assert r["mismatch"] == [], r["mismatch"][:5]
    assert r["planned"] > 400 and r["refused"] > 0, r


def test_small_batches_scan_an_object_a_few_times_then_index_it(child, tmp_path):
    """A service that patches one function at a time, again and again: its
    object's code is scanned SCANS_BEFORE_INDEX times (these functions are
    called by nothing, so no scan finds a candidate that would build the
    index), then the index is built and asked."""
    source = tmp_path / "many.c"
    source.write_text("".join(f"__attribute__((noipa)) long m_{i}(long x) "
                              f"{{ return ((x ^ (x >> 7)) * 3) + {i}; }}\n" for i in range(300)))
    path = compile_library(str(tmp_path / "libmany.so"), [str(source)])
    r = child(SMALL_BATCHES, paths=[path], per_batch=1, compare=False,
              functions={path: _functions(path)})[0]
    assert r["mismatch"] == [] and r["planned"] == 300, r
    assert r["scans"] == [[symbols.SCANS_BEFORE_INDEX, True]], r["scans"]


def _batch_paths(corpus):
    """A compiled object, a test target object and libc and libz."""
    return [corpus[1], corpus[len(PLAN_FLAGS)], *corpus[-len(LIBRARIES):]]


def test_a_failing_index_leaves_no_site_and_frees_the_stubs(child, corpus):
    """Where the object's branch index cannot be had, prepare_batch fails as
    the Python question would, makes no site and gives its stubs back."""
    r = child(PRELUDE + """
from hotpatch.errors import HotpatchError
ctypes.CDLL(P["path"])
obj = symbols.find_object(P["path"])
functions = [(obj.base + offset, size) for offset, size in P["functions"]]
def no_index():
    raise HotpatchError("no symbols to index")
try:
    sites.prepare_batch(functions, exec_ranges=obj.exec_ranges, branch_index=no_index)
    out = {"raised": None}
except HotpatchError as e:
    out = {"raised": str(e)}
out["sites"] = len(sites._sites)
out["freed"] = len(sites._free_code)
made = sites.prepare_batch(functions, exec_ranges=obj.exec_ranges)
out["reused"] = len(sites._free_code)
out["made"] = sum(isinstance(s, sites.Site) for s in made)
report(out)
""", path=corpus[0], functions=_functions(corpus[0]))[0]
    assert r["raised"] == "no symbols to index" and r["sites"] == 0, r
    assert r["freed"] > 0 and r["reused"] < r["freed"] and r["made"] > 0, r
