"""The branch index (native/xrefs.c) against a reference sweep.

The reference is the whole-object linear sweep the index replaced, written
here with capstone's Python binding.  The index prefilters raw bytes and
decodes from function starts on demand; its answers must be the same: every
(source, text, target) of libc and of a target with bytes that do not
decode, and the branches into the entries of libpython's functions.
"""
import bisect
import ctypes
import os
import sysconfig

import capstone
import pytest

from conftest import compile_library
from hotpatch import elf, objects, symbols
from hotpatch.x86_64.xrefs import could_branch_into, index_branches

_RELATIVE = {"jmp", "call", "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns",
             "jp", "jnp", "jl", "jge", "jle", "jg", "jrcxz", "jecxz", "loop", "loope",
             "loopne", "xbegin"}


def reference_branches(exec_ranges):
    """Linear sweep, one byte past anything undecodable, without details:
    a relative branch's operand text is its absolute target."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    found = []
    for lo, hi in exec_ranges:
        code = objects.read_memory(lo, hi - lo)
        position = 0
        while position < len(code):
            end = position
            for at, size, mnemonic, op_str in cs.disasm_lite(code[position:], lo + position):
                end = at + size - lo
                if mnemonic.rsplit(" ", 1)[-1] in _RELATIVE and op_str.startswith("0x"):
                    found.append((at, f"{mnemonic} {op_str}", int(op_str, 16)))
            position = end + 1
    return sorted(found, key=lambda b: (b[2], b[0]))


def index_of(obj):
    starts = sorted({obj.base + f.value for f in elf.table_of(obj, "the test").funcs})
    return index_branches(objects.read_memory, obj.exec_ranges, starts)


def indexed(obj):
    return index_of(obj).into(0, (1 << 64) - 1)


def _libpython():
    return sysconfig.get_config_var("INSTSONAME") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None


def test_index_matches_reference_sweep_on_libc():
    obj = symbols.find_object("libc.so.6")
    assert indexed(obj) == reference_branches(obj.exec_ranges)


def test_branches_into_entries_match_reference_sweep_on_libpython():
    name = _libpython()
    if name is None or symbols.find_object(name) is None:
        pytest.skip("python is not linked against a shared libpython")
    obj = symbols.find_object(name)
    reference = reference_branches(obj.exec_ranges)
    index = index_of(obj)
    targets = [b[2] for b in reference]
    entries = sorted({s.address for s in symbols.functions(obj)})[::20]
    for entry in entries:
        for lo, hi in ((entry, entry + 1), (entry + 1, entry + 5)):
            expected = reference[bisect.bisect_left(targets, lo):bisect.bisect_left(targets, hi)]
            assert index.into(lo, hi) == expected
            assert index.any_into(lo, hi) == bool(expected)      # symbols.branched_to


@pytest.mark.parametrize("name", ["libc.so.6", "libpython", "libz.so.1"])
def test_no_candidate_means_no_branch(name):
    # symbols.branched_to answers False without an index where no bytes
    # could encode a branch to the entry: every entry the reference sweep
    # finds a branch to must have candidates, and most entries of an object
    # nothing calls directly have none (else the shortcut saves nothing).
    if name == "libpython":
        name = _libpython()
        if name is None:
            pytest.skip("python is not linked against a shared libpython")
    if name == "libz.so.1":
        ctypes.CDLL(name)
    obj = symbols.find_object(name)
    reference = reference_branches(obj.exec_ranges)
    branched = {b[2] for b in reference}
    entries = sorted({s.address for s in symbols.functions(obj)})
    without = [e for e in entries if not could_branch_into(obj.exec_ranges, [(e, e + 1)])]
    assert not branched.intersection(without)
    assert len(without) > len(entries) // 10, (len(without), len(entries))
    # The bytes a plan replaces after the first (sites._may_be_branched_into),
    # asked several at a time.
    targets = sorted(branched)
    for k in range(0, len(entries), 97):
        into = [(e + 1, e + 7) for e in entries[k:k + 4]]
        if not could_branch_into(obj.exec_ranges, into):
            assert not any(bisect.bisect_left(targets, lo) < bisect.bisect_left(targets, hi)
                           for lo, hi in into), into


def test_index_matches_reference_sweep_with_data_in_code(tmp_path):
    # Bytes that do not decode between functions make both sweeps resync.
    source = tmp_path / "junk.c"
    source.write_text(
        "__asm__(\".text\\n.globl junk\\n.type junk,@function\\njunk: .Ljunk: jmp 1f\\n"
        ".byte 0x0f,0x0b,0xff,0xff,0x06\\n1: call .Ljunk+2\\n jne .Ljunk+1\\n ret\\n"
        ".byte 0xd6, 0x62\\n loop .Ljunk\\n ret\\n\");\n"
        "int after(int x) { return x ? after(x - 1) + 1 : 0; }\n")
    path = compile_library(tmp_path / "libjunk.so", [str(source)])
    ctypes.CDLL(path)
    obj = symbols.find_object(os.path.basename(path))
    expected = reference_branches(obj.exec_ranges)
    assert indexed(obj) == expected
    junk = symbols.resolve(obj, "junk").address
    assert [(s - junk, t - junk) for s, _, t in symbols.branches_into(obj, junk + 1, junk + 3)]
