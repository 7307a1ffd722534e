"""The decoder (x86_64/decode.py on native/decode.c) against capstone's Python binding.

The records the C core fills must say exactly what the binding says of the
same bytes, read the way decode.py read it before: address, size, bytes,
mnemonic, op_str, branch kind and target, the RIP-relative disp32's offset
and target (and the same refusal where capstone misplaces it), the
registers written and the first immediate (the clobber analysis).  The
corpus: every function of libz, libpython's first functions (6,000
instructions or more), and hand-picked encodings of every branch kind.
The binding is a test dependency only.
"""
from __future__ import annotations

import ctypes
import sysconfig

import capstone
import pytest
from capstone import x86_const as X

from hotpatch import objects, symbols
from hotpatch._native import lib
from hotpatch.errors import UnsafeToPatch
from hotpatch.x86_64.decode import (_RUN, _records, boundary_before, decode, decode_one, iter_decode,
                                    register_writes, sweep)

MASK64 = (1 << 64) - 1
DETAILED_PREFIXES = ("j", "call", "ret", "iret", "loop", "lcall", "ljmp", "xbegin", "bnd",
                     "notrack")
JCC = {X.X86_INS_JO, X.X86_INS_JNO, X.X86_INS_JB, X.X86_INS_JAE, X.X86_INS_JE, X.X86_INS_JNE,
       X.X86_INS_JBE, X.X86_INS_JA, X.X86_INS_JS, X.X86_INS_JNS, X.X86_INS_JP, X.X86_INS_JNP,
       X.X86_INS_JL, X.X86_INS_JGE, X.X86_INS_JLE, X.X86_INS_JG}
LOOPS = {X.X86_INS_JRCXZ, X.X86_INS_JECXZ, X.X86_INS_JCXZ, X.X86_INS_LOOP, X.X86_INS_LOOPE,
         X.X86_INS_LOOPNE}
RETURNS = {X.X86_INS_RET, X.X86_INS_RETF, X.X86_INS_RETFQ, X.X86_INS_IRET, X.X86_INS_IRETD,
           X.X86_INS_IRETQ}
LIBPYTHON_INSTRUCTIONS = 6000
# Every branch kind, prefixed forms, RIP-relative operands after 66/VEX/REX
# prefixes, and writes capstone lists implicitly (syscall, cpuid, div).
ENCODINGS = [
    "c3", "c20800", "cb", "48cb", "cf", "48cf", "f3c3", "ebfe", "e900000000", "66e90000",
    "7405", "0f8400010000", "e2fe", "e1fe", "e0fe", "e3fe", "67e3fe", "c7f800000000",
    "e800000000", "ffd0", "ff10", "ff15f0ffffff", "ffe0", "ff25f0ffffff", "ff18", "ff28",
    "f2e900000000", "f2ffe0", "3effe0", "3effd0", "f2c3", "488b0500100000",
    "66c705f80000003412", "c5f96f0500010000", "f083050001000001", "66480f6e0500010000",
    "c4e27d180500010000", "0f05", "0fa2", "48f7f1", "c5f877", "c5fc77", "0f0b", "f4", "cc",
    "90", "660f1f840000000000", "f30f1efa", "06",
]


def reference_text(code: bytes, address: int) -> list[tuple]:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return list(cs.disasm_lite(code, address))


def reference_instruction(ci) -> tuple:
    """decode.py's record of ``ci`` (decoded with details) before the C core,
    or the message it refused it with."""
    iid, branch, target = ci.id, None, None
    if iid in RETURNS:
        branch = "ret"
    elif iid == X.X86_INS_LJMP:
        branch = "jmp_indirect"
    elif iid == X.X86_INS_LCALL:
        branch = "call_indirect"
    elif iid in (X.X86_INS_JMP, X.X86_INS_CALL):
        kind = "jmp" if iid == X.X86_INS_JMP else "call"
        if ci.operands[0].type == X.X86_OP_IMM:
            branch, target = kind, ci.operands[0].imm & MASK64
        else:
            branch = kind + "_indirect"
    elif iid in JCC or iid in LOOPS or iid == X.X86_INS_XBEGIN:
        branch = "jcc" if iid in JCC else "loop" if iid in LOOPS else "xbegin"
        target = ci.operands[0].imm & MASK64
    disp_offset = rip_target = None
    for operand in ci.operands:
        if operand.type == X.X86_OP_MEM and operand.mem.base == X.X86_REG_RIP:
            offset = ci.disp_offset
            if int.from_bytes(ci.bytes[offset:offset + 4], "little", signed=True) != operand.mem.disp:
                return (f"{ci.address:#x}: cannot locate the disp32 of the RIP-relative operand "
                        f"of '{ci.mnemonic} {ci.op_str}'")
            disp_offset, rip_target = offset, (ci.address + ci.size + operand.mem.disp) & MASK64
            break
    return (ci.address, ci.size, bytes(ci.bytes), ci.mnemonic, ci.op_str, branch, target,
            disp_offset, rip_target)


def detailed(code: bytes, address: int, count: int = 0) -> list:
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return list(cs.disasm(code, address, count))


def reference_decode(code: bytes, address: int) -> list[tuple]:
    """decode() as it was: a sweep, details where the text says they matter;
    a refusal ends the list."""
    found = []
    for at, size, mnemonic, op_str in reference_text(code, address):
        raw = code[at - address:at - address + size]
        if "rip" in op_str or mnemonic.startswith(DETAILED_PREFIXES):
            found.append(reference_instruction(detailed(raw, at, 1)[0]))
            if isinstance(found[-1], str):
                break
        else:
            found.append((at, size, raw, mnemonic, op_str, None, None, None, None))
    return found


def ours_decode(code: bytes, address: int) -> list[tuple]:
    found = []
    try:
        for insn in iter_decode(code, address):
            found.append(tuple(insn))
    except UnsafeToPatch as e:
        found.append(str(e))
    return found


def ours_one(code: bytes, address: int):
    try:
        insn = decode_one(code, address)
    except UnsafeToPatch as e:
        return str(e)
    return tuple(insn) if insn is not None else None


def reference_one(code: bytes, address: int):
    insns = detailed(code[:15], address, 1)
    return reference_instruction(insns[0]) if insns else None


def reference_writes(code: bytes, address: int) -> list[tuple]:
    found = []
    for ci in detailed(code, address):
        written = ci.regs_access()[1]
        first = ci.operands[0] if ci.operands else None
        found.append((ci.mnemonic, list(written), frozenset(ci.reg_name(r) or "" for r in written),
                      first.imm if first is not None and first.type == X.X86_OP_IMM else None))
    return found


def ours_writes(code: bytes, address: int) -> list[tuple]:
    ids = [list(r.written[0:r.nwritten]) for r in _records(code, address, lib.HP_DECODE_WRITES)]
    return [(mnemonic, registers, names, immediate) for registers, (mnemonic, names, immediate)
            in zip(ids, register_writes(code, address))]


def assert_same(code: bytes, address: int, what: str) -> int:
    """Every view of ``code`` placed at ``address`` as the binding has it;
    returns how many instructions the sweep decoded."""
    swept = reference_text(code, address)
    assert sweep(code, address) == swept, what
    assert ours_decode(code, address) == reference_decode(code, address), what
    assert ours_writes(code, address) == reference_writes(code, address), what
    for at, size, _, _ in swept:
        assert ours_one(code[at - address:], at) == reference_one(code[at - address:], at), what
    end = swept[-1][0] + swept[-1][1] if swept else address
    for probe in {address, address + 1, (address + end) // 2, end - 1, end}:
        expected = next((at for at, size, _, _ in swept if at <= probe < at + size), None)
        assert boundary_before(code, address, probe) == expected, (what, probe)
    return len(swept)


def function_code(obj) -> list[tuple[str, int, bytes]]:
    return [(f.name, f.address, objects.read_memory(f.address, f.size))
            for f in symbols.functions(obj) if f.size]


def test_every_function_of_libz_decodes_as_the_binding_has_it():
    ctypes.CDLL("libz.so.1")
    functions = function_code(symbols.find_object("libz.so.1"))
    total = sum(assert_same(code, address, name) for name, address, code in functions)
    assert len(functions) > 50 and total > 10000, (len(functions), total)


def test_libpython_s_first_functions_decode_as_the_binding_has_them():
    name = (sysconfig.get_config_var("INSTSONAME")
            if sysconfig.get_config_var("Py_ENABLE_SHARED") else None)
    obj = symbols.find_object(name) if name else None
    if obj is None:
        pytest.skip("python is not linked against a shared libpython")
    total = 0
    for name, address, code in function_code(obj):
        total += assert_same(code, address, name)
        if total >= LIBPYTHON_INSTRUCTIONS:
            break
    assert total >= LIBPYTHON_INSTRUCTIONS


@pytest.mark.parametrize("hexcode", ENCODINGS)
def test_each_branch_kind_and_prefix_decodes_as_the_binding_has_it(hexcode):
    code = bytes.fromhex(hexcode)
    assert_same(code, 0x7F12_3456_0000, hexcode)
    # Followed by more code, and at an address where a target wraps.
    assert_same(code + bytes.fromhex("4889c3c3"), 0x7F12_3456_0000, hexcode)
    assert_same(code, (1 << 64) - 8, hexcode)


def test_a_run_longer_than_one_call_is_decoded_whole():
    code = bytes.fromhex("4883c001" "7402" "ebfe") * (_RUN // 2) + b"\x06\x90"
    insns = decode(code, 0x400000)
    assert len(insns) == 3 * (_RUN // 2)
    assert insns[-1].end == 0x400000 + len(code) - 2     # stopped at the invalid 06
    assert [tuple(i) for i in insns] == reference_decode(code, 0x400000)
    assert boundary_before(code, 0x400000, 0x400000 + len(code) - 3) == insns[-1].address


def test_a_thread_s_capstone_handles_are_closed_when_it_exits():
    # Each decoding thread opens two handles (native/xrefs.c): about 100 KB
    # of capstone's, which a service creating threads must get back.
    import threading

    def resident_kb():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4

    def decodes():
        assert decode_one(b"\xc3", 0x1000).branch == "ret"
        assert sweep(b"\x90\xc3", 0x1000)[1][2] == "ret"

    decodes()
    before = resident_kb()
    for _ in range(300):
        thread = threading.Thread(target=decodes)
        thread.start()
        thread.join()
    assert resident_kb() - before < 300 * 20, resident_kb() - before
