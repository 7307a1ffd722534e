"""Decoding x86-64 machine code into :class:`Instruction` records.

Capstone does the decoding; this module only keeps the facts the relocator and
the entry analysis need (branch kind and target, the RIP-relative displacement
and what it refers to), taken from capstone's operand details rather than from
its text.  The C core drives capstone's C library for all of it: the scans
below, ``native/plan.c``, and the records of :func:`decode` and the others
(``native/decode.c``, one call per run of bytes, with the GIL released).
capstone's Python binding is not imported (unless its library is not in
its package: ``_load_capstone``).
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


def _capstone_library() -> str | None:
    """The ``libcapstone.so`` capstone's binding would load first, found
    without importing the binding: ``$LIBCAPSTONE_PATH``, else the package's
    ``lib`` directory (its own search order; None when the file is not
    there)."""
    directory = os.environ.get("LIBCAPSTONE_PATH")
    if directory is None:
        spec = importlib.util.find_spec("capstone")
        if spec is None or not spec.submodule_search_locations:
            return None
        directory = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    path = os.path.join(directory, "libcapstone.so")
    return path if os.path.isfile(path) else None


def _load_capstone() -> None:
    # The very file capstone's binding loads (one copy of the library in the
    # process, should the service use the binding too; the version the
    # binding was built for), mapped by the C core in a cffi call, with the
    # GIL released.
    binding = sys.modules.get("capstone")
    path = binding._cs._name if binding is not None else _capstone_library()
    if path is None:
        # A capstone whose library is not in its package (built against a
        # system one): only the binding's own search finds it, at the cost
        # of its import.
        import capstone
        path = capstone._cs._name
    err = ffi.new("char[]", 256)
    if lib.hp_capstone_load(path.encode(), err) != 0:
        raise ImportError(ffi.string(err).decode(errors="replace"))
    # This thread's two decoders opened now, the GIL released: opening them
    # costs 0.4-0.5 ms each, and the thread that imports the core is most
    # often the one whose first patch would otherwise open them.
    lib.hp_capstone_usable()


_load_capstone()

# Mnemonics whose kind or target comes from the operand details: branches,
# returns, and prefixed forms of them ("bnd jmp", "notrack call").  (The C
# core asks the same of a sweep: native/decode.c, hp_wants_details, which plan.c asks too.)
_DETAILED_PREFIXES = ("j", "call", "ret", "iret", "loop", "lcall", "ljmp", "xbegin", "bnd",
                      "notrack")
# Branches after which execution never reaches the next instruction.
_NO_FALL_THROUGH = frozenset({"jmp", "jmp_indirect", "ret"})
# The C core's branch kinds (HP_BRANCH_*), and those with a target.
_BRANCH_KIND = {lib.HP_BRANCH_NONE: None, lib.HP_BRANCH_RET: "ret", lib.HP_BRANCH_JMP: "jmp",
                lib.HP_BRANCH_JCC: "jcc", lib.HP_BRANCH_CALL: "call", lib.HP_BRANCH_LOOP: "loop",
                lib.HP_BRANCH_XBEGIN: "xbegin", lib.HP_BRANCH_JMP_INDIRECT: "jmp_indirect",
                lib.HP_BRANCH_CALL_INDIRECT: "call_indirect"}
_RELATIVE = frozenset({"jmp", "jcc", "call", "loop", "xbegin"})
# Records asked of the C core per call: a run of bytes longer than that many
# instructions is decoded in several calls, as it is consumed.
_RUN = 256


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


def _records(code: bytes, address: int, mode: int, run: int = _RUN) -> Iterator:
    """The C core's records (``struct hp_decoded_insn``) of ``code`` placed
    at ``address``, decoded by linear sweep in ``mode`` (``HP_DECODE_*``),
    up to ``run`` instructions per call: until the first byte that does not
    start a valid instruction, or an instruction cut by the end of ``code``.
    A record is valid until the next one is asked for."""
    view = ffi.from_buffer("uint8_t[]", code)
    offset = 0
    while offset < len(code):
        capacity = min(len(code) - offset, run)
        records = ffi.new("struct hp_decoded_insn[]", capacity)
        count = lib.hp_decode(view + offset, len(code) - offset, address + offset, mode,
                              records, capacity)
        if count < 0:
            raise UnsafeToPatch(f"{address + offset:#x}: capstone's C library cannot be used")
        yield from records[0:count]
        if count < capacity:
            return
        last = records[count - 1]
        offset = last.address + last.size - address


def sweep(code: bytes, address: int) -> list[tuple[int, int, str, str]]:
    """Linear sweep without operand details: ``(address, size, mnemonic,
    op_str)`` of each instruction, cheaper than :func:`decode`.  Stops where
    :func:`decode` would."""
    string = ffi.string
    return [(r.address, r.size, string(r.mnemonic).decode(), string(r.op_str).decode())
            for r in _records(bytes(code), address, lib.HP_DECODE_TEXT)]


def described(swept: tuple[int, int, str, str], raw: bytes) -> Instruction:
    """The :class:`Instruction` for one entry of :func:`sweep` and its bytes.

    Operand details slow capstone down, so they are read only for
    instructions whose operands matter (branches and RIP-relative operands);
    the others are described from the sweep.
    """
    at, size, mnemonic, op_str = swept
    if "rip" in op_str or mnemonic.startswith(_DETAILED_PREFIXES):
        return decode_one(raw, at)
    return Instruction(at, size, raw, mnemonic, op_str, None, None, None, None)


def iter_decode(code: bytes, address: int) -> Iterator[Instruction]:
    """Decode ``code`` placed at ``address`` by linear sweep, lazily, by
    runs of instructions (a RIP-relative operand whose displacement capstone
    misplaces is refused when reached).  Operand details are read as
    :func:`described` reads them.

    Stops at the first byte that does not start a valid instruction (or at
    an instruction cut by the end of ``code``): callers compare the end of the
    last instruction with what they asked for.
    """
    code = bytes(code)
    for record in _records(code, address, lib.HP_DECODE_OPERANDS):
        yield _instruction(record, code, address)


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
    for record in _records(bytes(code), start, lib.HP_DECODE_TEXT):
        at = record.address
        if at > address:
            return None         # a sweep only goes on
        if address < at + record.size:
            return at
    return None


def decode_one(code: bytes, address: int) -> Instruction | None:
    """The instruction at the start of ``code``, or None if it is undecodable."""
    code = bytes(code[:15])
    for record in _records(code, address, lib.HP_DECODE_DETAILS, run=1):
        return _instruction(record, code, address)
    return None


def _instruction(record, code: bytes, address: int) -> Instruction:
    """The :class:`Instruction` of a record of ``code`` placed at ``address``."""
    at, size = record.address, record.size
    mnemonic = ffi.string(record.mnemonic).decode()
    op_str = ffi.string(record.op_str).decode()
    rip = record.rip
    if rip == lib.HP_RIP_MISPLACED:
        # capstone 5 misreports disp_size after 66/VEX prefixes: the bytes
        # at the disp_offset it gives do not hold the displacement, and the
        # relocator would rewrite the wrong four bytes.
        raise UnsafeToPatch(f"{at:#x}: cannot locate the disp32 of the RIP-relative "
                            f"operand of '{mnemonic} {op_str}'")
    branch = _BRANCH_KIND[record.branch]
    return Instruction(at, size, code[at - address:at - address + size], mnemonic, op_str,
                       branch, record.target if branch in _RELATIVE else None,
                       record.rip_disp_offset if rip == lib.HP_RIP_FOUND else None,
                       record.rip_target if rip == lib.HP_RIP_FOUND else None)


def register_writes(code: bytes, address: int) -> Iterator[tuple[str, frozenset, int | None]]:
    """For the clobber analysis, each instruction of ``code`` placed at
    ``address`` (linear sweep, stopping as :func:`decode` does):
    ``(mnemonic, names of the registers it writes as capstone lists them,
    implicit ones included, its first operand's immediate or None)``."""
    names = _register_names
    for record in _records(bytes(code), address, lib.HP_DECODE_WRITES):
        written = []
        for register in record.written[0:record.nwritten]:
            name = names.get(register)
            if name is None:
                found = lib.hp_register_name(register)
                name = names[register] = ffi.string(found).decode() if found else ""
            written.append(name)
        yield (ffi.string(record.mnemonic).decode(), frozenset(written),
               record.imm if record.has_imm else None)


# capstone's register names by id, as they are first asked for.
_register_names: dict[int, str] = {}
