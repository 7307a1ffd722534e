"""Decoding x86-64 machine code into :class:`Instruction` records.

Capstone does the decoding; this module only keeps the facts the relocator and
the entry analysis need (branch kind and target, the RIP-relative displacement
and what it refers to), taken from capstone's operand details rather than from
its text.  The C core drives capstone's C library for the common work (the
scans below, ``native/plan.c``); capstone's Python binding decodes the rest.
The binding is imported with this module, at the core's import, though a
patch planned in C never uses it: its first import calls the dynamic linker
(``ctypes.util``'s extension modules, a ``dlsym`` per function), which the
loader's handling of an event must never do (``hotpatch/loader.py``: the
worker would wait for the linker's lock, GIL held, while a loading thread
inside it waits for the GIL), and that handling may be the first to plan
in Python (an object loaded after the patch, a thunk's clobber analysis).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterator, NamedTuple

from hotpatch._native import ffi, lib
from hotpatch.errors import UnsafeToPatch

__all__ = ["EntryScan", "Instruction", "boundary_before", "decode", "decode_one",
           "function_branches", "scan_code", "scan_memory"]

_MASK64 = (1 << 64) - 1


def _capstone_library() -> str | None:
    """The ``libcapstone.so`` capstone's binding loads first, found without
    importing the binding: ``$LIBCAPSTONE_PATH``, else the package's ``lib``
    directory (its own search order; None when the file is not there, and
    the binding then searches on as it does)."""
    directory = os.environ.get("LIBCAPSTONE_PATH")
    if directory is None:
        spec = importlib.util.find_spec("capstone")
        if spec is None or not spec.submodule_search_locations:
            return None
        directory = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    path = os.path.join(directory, "libcapstone.so")
    return path if os.path.isfile(path) else None


def _load_capstone() -> None:
    # The C core drives capstone's C library where Python is the cost: the
    # very file capstone's binding loads (one copy of the library in the
    # process, the version the binding was built for).  The C core maps it
    # in a cffi call, with the GIL released.
    binding = sys.modules.get("capstone")
    path = binding._cs._name if binding is not None else _capstone_library()
    if path is None:
        import capstone     # only the binding's own search finds the file
        path = capstone._cs._name
    err = ffi.new("char[]", 256)
    if lib.hp_capstone_load(path.encode(), err) != 0:
        raise ImportError(ffi.string(err).decode(errors="replace"))


_load_capstone()

# Mnemonics whose kind or target comes from the operand details: branches,
# returns, and prefixed forms of them ("bnd jmp", "notrack call").
_DETAILED_PREFIXES = ("j", "call", "ret", "iret", "loop", "lcall", "ljmp", "xbegin", "bnd",
                      "notrack")
# Branches after which execution never reaches the next instruction.
_NO_FALL_THROUGH = frozenset({"jmp", "jmp_indirect", "ret"})


class _Binding:
    """capstone's Python binding and what this module takes from it."""

    def __init__(self) -> None:
        import capstone
        from capstone import x86_const as X
        self.X = X
        # One handle of each kind for the process: creating a Cs handle costs
        # far more than decoding a function.
        self.detailed = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.detailed.detail = True
        # Without operand details, for scanning whole functions: an order of
        # magnitude faster, and the text of a relative branch's operand is its
        # absolute target.
        self.lite = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.jcc = frozenset({
            X.X86_INS_JO, X.X86_INS_JNO, X.X86_INS_JB, X.X86_INS_JAE,
            X.X86_INS_JE, X.X86_INS_JNE, X.X86_INS_JBE, X.X86_INS_JA,
            X.X86_INS_JS, X.X86_INS_JNS, X.X86_INS_JP, X.X86_INS_JNP,
            X.X86_INS_JL, X.X86_INS_JGE, X.X86_INS_JLE, X.X86_INS_JG,
        })
        # The rel8-only branches on rcx/ecx.
        self.loops = frozenset({
            X.X86_INS_JRCXZ, X.X86_INS_JECXZ, X.X86_INS_JCXZ,
            X.X86_INS_LOOP, X.X86_INS_LOOPE, X.X86_INS_LOOPNE,
        })
        self.returns = frozenset({
            X.X86_INS_RET, X.X86_INS_RETF, X.X86_INS_RETFQ,
            X.X86_INS_IRET, X.X86_INS_IRETD, X.X86_INS_IRETQ,
        })


def _binding() -> _Binding:
    """The :class:`_Binding` (made at this module's import)."""
    return _the_binding


_the_binding = _Binding()


class Instruction(NamedTuple):
    """One decoded instruction and the facts needed to move it (immutable;
    a named tuple rather than a frozen dataclass: a batch makes thousands,
    and a frozen dataclass costs three times as much to create)."""

    address: int
    size: int
    raw: bytes
    mnemonic: str
    op_str: str
    #: "jmp" | "jcc" | "call" | "loop" | "ret" | "jmp_indirect" |
    #: "call_indirect" | "xbegin" | None
    branch: str | None
    #: absolute target of a relative branch
    target: int | None
    #: byte offset of the disp32 of a RIP-relative memory operand within raw
    rip_disp_offset: int | None
    #: absolute address that RIP-relative operand refers to
    rip_target: int | None

    @property
    def end(self) -> int:
        """The address just after the instruction."""
        return self.address + self.size

    def is_nop(self) -> bool:
        """A NOP of any form (``90``, ``66 90``, ``0F 1F /0``, ``data16 cs nopw``)."""
        return self.mnemonic == "nop"

    def is_padding(self) -> bool:
        """Bytes compilers and linkers put between functions: a NOP or int3."""
        return self.is_nop() or self.mnemonic == "int3"

    def can_fall_through(self) -> bool:
        """Whether execution may continue with the next instruction."""
        return self.branch not in _NO_FALL_THROUGH and self.mnemonic != "ud2"

    def __str__(self) -> str:
        return f"{self.address:#x}: {self.mnemonic} {self.op_str}".rstrip()


def sweep(code: bytes, address: int) -> list[tuple[int, int, str, str]]:
    """Linear sweep without operand details: ``(address, size, mnemonic,
    op_str)`` of each instruction, an order of magnitude cheaper than
    :func:`decode`.  Stops where :func:`decode` would."""
    return list(_binding().lite.disasm_lite(bytes(code), address))


def described(swept: tuple[int, int, str, str], raw: bytes) -> Instruction:
    """The :class:`Instruction` for one entry of :func:`sweep` and its bytes.

    Capstone's operand details cost ~20 µs an instruction from Python, so
    they are read only for instructions whose operands matter (branches and
    RIP-relative operands); the others are described from the sweep.
    """
    at, size, mnemonic, op_str = swept
    if "rip" in op_str or mnemonic.startswith(_DETAILED_PREFIXES):
        return decode_one(raw, at)
    return Instruction(at, size, raw, mnemonic, op_str, None, None, None, None)


def iter_decode(code: bytes, address: int) -> Iterator[Instruction]:
    """Decode ``code`` placed at ``address`` by linear sweep, lazily: callers
    that need the first few instructions pay for those only.

    Stops at the first byte that does not start a valid instruction (or at
    an instruction cut by the end of ``code``): callers compare the end of the
    last instruction with what they asked for.
    """
    code = bytes(code)
    for swept in _binding().lite.disasm_lite(code, address):
        yield described(swept, code[swept[0] - address:swept[0] - address + swept[1]])


def decode(code: bytes, address: int) -> list[Instruction]:
    """Every instruction of ``code`` placed at ``address`` (see :func:`iter_decode`)."""
    return list(iter_decode(code, address))


def function_branches(code: bytes, address: int, stop: int) -> tuple[int, list[tuple[int, int]]]:
    """Linear sweep of ``code`` placed at ``address`` up to the first
    instruction at or after ``stop`` (or the first undecodable byte), in the
    C core with capstone's C library: ``(end of the last instruction
    decoded, [(source, target) of each relative branch]``).  A function of
    thousands of instructions took milliseconds through the Python
    binding."""
    code = bytes(code)
    end = ffi.new("uint64_t *")
    capacity = 64
    while True:
        sources = ffi.new("uint64_t[]", capacity)
        targets = ffi.new("uint64_t[]", capacity)
        count = lib.hp_function_branches(code, len(code), address, stop, end,
                                         sources, targets, capacity)
        if count < 0:
            raise UnsafeToPatch(f"{address:#x}: capstone's C library cannot be used")
        if count <= capacity:
            return end[0], [(sources[i], targets[i]) for i in range(count)]
        capacity = count


class EntryScan(NamedTuple):
    """What the C core saw of one function for the entry analysis (see
    ``hp_scan_entries`` in ``native/xrefs.c``)."""

    code: bytes             #: the bytes read from the entry
    address: int            #: where a site goes: the entry, or past its endbr64
    #: ``(address, size, mnemonic, op_str)`` from ``address`` up to the first
    #: instruction reaching 5 bytes (as :func:`sweep` has them)
    head: tuple[tuple[int, int, str, str], ...]
    decoded_end: int        #: end of the last instruction swept before the function's end
    #: ``(source, target)`` of the function's relative branches landing in
    #: (address, address + 24); None when there were more than the C core keeps
    branches: tuple[tuple[int, int], ...] | None


def scan_code(code: bytes, entry: int, stop: int) -> EntryScan:
    """:class:`EntryScan` of ``code`` placed at ``entry`` (``stop``: the
    function's end, 0 when unknown: its branches are then not scanned)."""
    code = bytes(code)
    buf = ffi.new("uint8_t[]", max(len(code), 1))
    ffi.memmove(buf, code, len(code))
    scans = ffi.new("struct hp_entry_scan[]", 1)
    scans[0].entry, scans[0].stop, scans[0].offset, scans[0].len = entry, stop, 0, len(code)
    _scan(scans, 1, buf, 0)
    return _entry_scan(scans[0], code)


def scan_memory(requests: list[tuple[int, int, int]]) -> list[EntryScan | None]:
    """:class:`EntryScan` of each ``(entry, length, stop)``, its bytes read
    from this process by the C core, the whole batch in one call; None where
    they are not mapped."""
    init, offset = [], 0
    for entry, length, stop in requests:
        init.append((entry, stop, offset, length))      # the struct's first fields
        offset += length
    scans = ffi.new("struct hp_entry_scan[]", init or 1)
    buf = ffi.new("uint8_t[]", max(offset, 1))
    _scan(scans, len(requests), buf, 1)
    data = ffi.buffer(buf, offset)[:]
    return [_entry_scan(scan, data[scan.offset:scan.offset + scan.len])
            if scan.status == 0 else None for scan in scans[0:len(requests)]]


def _scan(scans, n: int, buf, read: int) -> None:
    if lib.hp_scan_entries(scans, n, buf, read) < 0:
        raise UnsafeToPatch("capstone's C library cannot be used")


def _entry_scan(scan, code: bytes) -> EntryScan:
    string = ffi.string
    head = tuple([(h.address, h.size, string(h.mnemonic).decode(), string(h.op_str).decode())
                  for h in scan.head[0:scan.nhead]])
    nbranches = scan.nbranches
    branches = (tuple([(b.source, b.target) for b in scan.branches[0:nbranches]])
                if nbranches <= len(scan.branches) else None)
    return EntryScan(code, scan.address, head, scan.decoded_end, branches)


def boundary_before(code: bytes, start: int, address: int) -> int | None:
    """Where the instruction holding ``address`` starts, decoding ``code``
    placed at ``start`` (a function's first byte) by linear sweep: ``address``
    itself when it is an instruction boundary; None when decoding stops
    before reaching it."""
    for at, size, _, _ in _binding().lite.disasm_lite(bytes(code), start):
        if at <= address < at + size:
            return at
    return None


def decode_one(code: bytes, address: int) -> Instruction | None:
    """The instruction at the start of ``code``, or None if it is undecodable."""
    for ci in _binding().detailed.disasm(bytes(code[:15]), address, 1):
        return _instruction(ci)
    return None


def _instruction(ci) -> Instruction:
    branch, target = _branch(ci)
    disp_offset, rip_target = _rip_operand(ci)
    return Instruction(ci.address, ci.size, bytes(ci.bytes), ci.mnemonic,
                       ci.op_str, branch, target, disp_offset, rip_target)


def _branch(ci) -> tuple[str | None, int | None]:
    """The branch kind of ``ci`` and, for a relative branch, its target."""
    binding = _binding()
    X = binding.X
    iid = ci.id
    if iid in binding.returns:
        return "ret", None
    if iid == X.X86_INS_LJMP:
        return "jmp_indirect", None
    if iid == X.X86_INS_LCALL:
        return "call_indirect", None
    if iid in (X.X86_INS_JMP, X.X86_INS_CALL):
        kind = "jmp" if iid == X.X86_INS_JMP else "call"
        operand = ci.operands[0]
        if operand.type == X.X86_OP_IMM:
            return kind, operand.imm & _MASK64
        return kind + "_indirect", None
    if iid in binding.jcc:
        return "jcc", ci.operands[0].imm & _MASK64
    if iid in binding.loops:
        return "loop", ci.operands[0].imm & _MASK64
    if iid == X.X86_INS_XBEGIN:
        return "xbegin", ci.operands[0].imm & _MASK64
    return None, None


def _rip_operand(ci) -> tuple[int | None, int | None]:
    """Where the disp32 of a RIP-relative operand sits, and what it addresses."""
    X = _binding().X
    for operand in ci.operands:
        if operand.type == X.X86_OP_MEM and operand.mem.base == X.X86_REG_RIP:
            offset = ci.disp_offset
            # capstone 5 misreports disp_size after 66/VEX prefixes, so check
            # the offset against the displacement itself before trusting it:
            # the relocator rewrites these four bytes.
            if int.from_bytes(ci.bytes[offset:offset + 4], "little",
                              signed=True) != operand.mem.disp:
                raise UnsafeToPatch(f"{ci.address:#x}: cannot locate the disp32 "
                                    f"of the RIP-relative operand of "
                                    f"'{ci.mnemonic} {ci.op_str}'")
            return offset, (ci.address + ci.size + operand.mem.disp) & _MASK64
    return None, None
