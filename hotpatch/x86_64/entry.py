"""Analysis of a function's entry: where and how a 5-byte redirection can go.

This is policy-free: it reports what the entry looks like (a skippable
fentry/patchable NOP, a NOP sled, or ordinary prologue instructions to
relocate) and refuses, with :class:`UnsafeToPatch`, entries that cannot be
redirected safely.  Callers decide which redirection to write and how.

With the function's ``size`` known, the whole function is decoded to rule out
branches into the replaced bytes, and padding after a function shorter than
5 bytes can be used.  Without it (an address with no symbol, or a symbol of
size 0) only the replaced instructions themselves are checked: branches from
the rest of the function into them cannot be seen, and a ``ret``/``jmp``
ending before the 5 bytes is refused, because the bytes after it cannot be
told apart from the next function.  Branches from outside the function (a
``.cold`` part, another function jumping into this one) are seen only through
``branches_into``, which the model answers from an index of the whole object
(:mod:`hotpatch.x86_64.xrefs`); indirect branches (jump tables) are not seen.
"""

from __future__ import annotations

import itertools
import struct
from array import array
from collections.abc import Callable, Container, Iterable, Iterator, Sequence

from hotpatch._native import ffi, lib
from hotpatch.errors import HotpatchError, UnsafeToPatch

from .decode import (EntryScan, Instruction, decode, described, function_branches, iter_decode,
                     scan_code, scan_memory, sweep)
from .encode import JMP_REL32_SIZE
from .relocate import check_relocatable, relocate, relocated_size_bound

__all__ = ["EntryPlan", "analyze_entries", "analyze_entry", "build_original",
           "check_native_branches_into", "native_plans", "native_results", "original_stub_size_bound",
           "run_native_plans"]

ENDBR64 = b"\xf3\x0f\x1e\xfa"
# endbr64, the 5 bytes replaced, and the rest of an instruction of at most
# 15 bytes starting in them: all the entry analysis reads beyond a function.
MAX_INSTRUCTION_SIZE = 15
_READ_AHEAD = len(ENDBR64) + JMP_REL32_SIZE + MAX_INSTRUCTION_SIZE   # HP_SCAN_AHEAD in C


class EntryPlan:
    """Where the redirecting instruction goes and what it replaces (treated
    as immutable, compared by value; a slotted class rather than a frozen
    dataclass for the cost of creating one, see
    :class:`~hotpatch.x86_64.decode.Instruction`)."""

    __slots__ = ("entry", "address", "length", "original_bytes", "kind", "endbr",
                 "single_instruction", "_instructions", "body", "falls_through")

    def __init__(self, entry: int, address: int, length: int, original_bytes: bytes, kind: str,
                 endbr: bool, single_instruction: bool,
                 instructions: tuple[Instruction, ...] | int, body: int | None,
                 falls_through: bool) -> None:
        self.entry = entry                      #: the function's address
        #: where the redirection is written (entry, or entry+4 after endbr64)
        self.address = address
        self.length = length                    #: bytes replaced at ``address`` (>= 5)
        self.original_bytes = original_bytes    #: the bytes now at [address, address+length)
        self.kind = kind                        #: "fentry" | "nops" | "generic"
        self.endbr = endbr                      #: the function starts with endbr64 (kept in place)
        #: [address, address+length) is exactly one instruction now
        self.single_instruction = single_instruction
        self._instructions = instructions
        #: "fentry"/"nops": address + length, the untouched old body
        self.body = body
        #: "generic": the stub must jump back to address+length
        self.falls_through = falls_through

    @property
    def instructions(self) -> tuple[Instruction, ...]:
        """The instructions replaced (relocated for "generic"; for a
        function shorter than 5 bytes, its own only: the padding after it
        is overwritten).  Plans made by the C core (:func:`native_plans`)
        know only how many there are and decode them on first use: nothing
        on the way to a patch asks for them."""
        if isinstance(self._instructions, int):
            self._instructions = tuple(decode(self.original_bytes,
                                              self.address)[:self._instructions])
        return self._instructions

    def _key(self) -> tuple:
        return (self.entry, self.address, self.length, self.original_bytes, self.kind, self.endbr,
                self.single_instruction, self.instructions, self.body, self.falls_through)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EntryPlan):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"EntryPlan(entry={self.entry:#x}, address={self.address:#x}, "
                f"length={self.length}, original_bytes={self.original_bytes.hex()}, "
                f"kind={self.kind!r}, endbr={self.endbr}, "
                f"single_instruction={self.single_instruction}, body={self.body}, "
                f"falls_through={self.falls_through})")


def analyze_entry(read: Callable[[int, int], bytes], entry: int, *,
                  size: int | None = None,
                  exec_ranges: Sequence[tuple[int, int]] = (),
                  fentry_targets: Container[int] = (),
                  branches_into: Callable[[int, int], Iterable[tuple[int, str, int]]]
                  | None = None) -> EntryPlan:
    """Plan the redirection of the function at ``entry``.

    ``read(addr, n)`` returns ``n`` bytes of the live process.  ``size`` is
    the symbol's size (None or 0: unknown).  ``exec_ranges`` are the object's
    executable segments [lo, hi) (empty: not checked); when given, ``read``
    is never asked for bytes past the segment holding ``entry``.  ``fentry_targets`` are
    the addresses of ``__fentry__``/``mcount`` or of their GOT slots: a call
    to one of them at the entry is skipped like a NOP.  ``branches_into(lo,
    hi)``, when given, lists ``(source, description, target)`` of the direct
    branches anywhere in the object that land in [lo, hi): any landing
    strictly inside the replaced bytes refuses the plan.
    """
    window, segment_end = _window(entry, size, exec_ranges)
    scan = scan_code(read(entry, window), entry, entry + size if size else 0)
    return _plan(scan, entry, size, segment_end, fentry_targets, branches_into)


def analyze_entries(functions: Sequence[tuple[int, int | None]], *,
                    exec_ranges: Sequence[tuple[int, int]] = (),
                    fentry_targets: Container[int] = (),
                    branches_into: Callable[[int, int], Iterable[tuple[int, str, int]]]
                    | None = None) -> list[EntryPlan | HotpatchError]:
    """:func:`analyze_entry` of each ``(entry, size)`` of this process, the
    bytes read and decoded for the whole batch in one call of the C core:
    for each, its plan or the error refusing it (UnsafeToPatch, or
    HotpatchError where its bytes are not mapped)."""
    results: list = [None] * len(functions)
    requests, where = [], []
    for i, (entry, size) in enumerate(functions):
        try:
            window, segment_end = _window(entry, size, exec_ranges)
        except UnsafeToPatch as e:
            results[i] = e
            continue
        requests.append((entry, window, entry + size if size else 0))
        where.append((i, segment_end))
    for (i, segment_end), request, scan in zip(where, requests, scan_memory(requests)):
        entry, window, _ = request
        if scan is None:
            results[i] = HotpatchError(f"{entry:#x}: {window} bytes there are not mapped")
            continue
        try:
            results[i] = _plan(scan, entry, functions[i][1], segment_end, fentry_targets,
                               branches_into)
        except UnsafeToPatch as e:
            results[i] = e
    return results


# The C core plans the common entry shapes of a batch and relocates their
# prologue in one call (native/plan.c); anything else, refusals included,
# is left to _plan.  Its results are read back from struct hp_plan[] in one
# pass: entry, stub, address, status, length, stub_size, endbr,
# single_instruction, falls_through, ninsns, original (size and code_len
# passed over).
_PLAN_FIELDS = "<Q8xQQiII4x???B24s"
_PLAN_RECORD = _PLAN_FIELDS + f"{ffi.sizeof('struct hp_plan') - struct.calcsize(_PLAN_FIELDS)}x"
assert struct.calcsize(_PLAN_FIELDS) == ffi.offsetof("struct hp_plan", "code")


# A batch's requests are written into a zeroed struct hp_plan[] as strided
# 64-bit columns (entry, size, stub lead the struct): cffi converting a list
# of tuples into the structs cost a fifth of a microsecond a function.
_PLAN_WORDS = ffi.sizeof("struct hp_plan") // 8
assert ffi.sizeof("struct hp_plan") % 8 == 0
assert [ffi.offsetof("struct hp_plan", f) for f in ("entry", "size", "stub")] == [0, 8, 16]


def native_plan_batch(functions: Sequence[tuple[int, int | None]],
                      stubs: Sequence[int] | None = None):
    """The ``struct hp_plan[]`` asking for the plans of ``(entry, size)``
    (``stubs``: where each stub is to be encoded when the C core does not
    place them)."""
    n = len(functions)
    batch = ffi.new("struct hp_plan[]", n or 1)
    words = memoryview(ffi.buffer(batch)).cast("Q")
    end = n * _PLAN_WORDS
    words[0:end:_PLAN_WORDS] = array("Q", [entry for entry, _ in functions])
    words[1:end:_PLAN_WORDS] = array("Q", [size or 0 for _, size in functions])
    if stubs is not None:
        words[2:end:_PLAN_WORDS] = array("Q", stubs)
    return batch


def native_plan_ranges(exec_ranges: Sequence[tuple[int, int]]):
    """``exec_ranges`` as the C core's flat ``uint64_t[]``."""
    return ffi.new("uint64_t[]", [a for lo_hi in exec_ranges for a in lo_hi] or 1)


#: One ``struct hp_plan`` as :func:`native_result` takes it, unpacked.
NATIVE_PLAN = struct.Struct(_PLAN_RECORD)
_PLAN_PYTHON = lib.HP_PLAN_PYTHON


def native_results(batch, n: int) -> Iterator[tuple[int, EntryPlan | None, int, int]]:
    """:func:`native_result` of each function of a batch the C core
    planned, one at a time: a big batch's sites are made as its plans are
    read, with no list of them in between."""
    # starmap: no generator frame to resume per plan.
    return itertools.starmap(native_result,
                             NATIVE_PLAN.iter_unpack(ffi.buffer(batch, n * NATIVE_PLAN.size)))


def native_result(entry: int, stub: int, address: int, status: int, length: int, stub_size: int,
                  endbr: bool, single: bool, falls: bool, ninsns: int,
                  original: bytes) -> tuple[int, EntryPlan | None, int, int]:
    """``(status, plan or None, stub, stub_size)`` of one ``struct hp_plan``
    unpacked by :data:`NATIVE_PLAN` (plan only where status is HP_PLAN_OK or
    HP_PLAN_UNWRITTEN)."""
    return (status, EntryPlan(entry, address, length, original[:length], "generic", endbr,
                              single, ninsns, None, falls) if status != _PLAN_PYTHON else None,
            stub, stub_size)


def native_plans(functions: Sequence[tuple[int, int | None]], stubs: Sequence[int], *,
                 exec_ranges: Sequence[tuple[int, int]] = (),
                 branch_index=None) -> list[tuple[EntryPlan, bytes, int] | None]:
    """For each ``(entry, size)`` of this process, the plan the C core makes,
    the code of its original stub at the matching address of ``stubs``
    (nothing allocated or written) and the stub's size bound, or None where
    the shape is left to :func:`analyze_entry` (or refused).
    ``branch_index``: a :class:`~hotpatch.x86_64.xrefs.BranchIndex` of the
    object, for branches from elsewhere into the replaced bytes.  For
    comparing the C core's plans and stubs with :func:`analyze_entry` and
    :func:`build_original`."""
    batch = native_plan_batch(functions, stubs)
    if run_native_plans(batch, len(functions), exec_ranges, 0, ffi.NULL, 0) and branch_index:
        check_native_branches_into(batch, len(functions), branch_index)
    return [(plan, ffi.buffer(batch[i].code, batch[i].code_len)[:], stub_size)
            if status == lib.HP_PLAN_OK else None
            for i, (status, plan, _, stub_size) in enumerate(native_results(batch, len(functions)))]


def run_native_plans(batch, n: int, exec_ranges, place: int, free_blocks, nfree: int) -> int:
    """Plan the ``n`` functions of ``batch`` in the C core (``hp_plan_entries``):
    with ``place`` set it also puts each stub in pool memory (a block of
    ``free_blocks`` first) and writes it; else each is encoded for the stub
    address of its request.  Returns how many plans replace more than one
    instruction: branches from elsewhere into them are still to be ruled
    out (:func:`check_native_branches_into`, or ``branches_into``)."""
    count = lib.hp_plan_entries(batch, n, native_plan_ranges(exec_ranges), len(exec_ranges),
                                place, free_blocks, nfree)
    if count < 0:
        raise UnsafeToPatch("capstone's C library cannot be used, or memory is short")
    return count


def check_native_branches_into(batch, n: int, branch_index) -> None:
    """Leave to Python the plans of ``batch`` into whose replaced bytes a
    branch from elsewhere in the object lands (``branch_index``: the
    object's :class:`~hotpatch.x86_64.xrefs.BranchIndex`)."""
    if lib.hp_plan_branched_into(batch, n, branch_index._handle) < 0:
        raise MemoryError("indexing branches")


def _window(entry: int, size: int | None,
            exec_ranges: Sequence[tuple[int, int]]) -> tuple[int, int | None]:
    """How many bytes from ``entry`` the analysis reads (the function, at
    least the head, never past its segment), and that segment's end."""
    segment_end = _segment_end(entry, exec_ranges)
    window = max(size or 0, _READ_AHEAD)
    if segment_end is not None:
        window = min(window, segment_end - entry)
    return window, segment_end


def _plan(scan: EntryScan, entry: int, size: int | None, segment_end: int | None,
          fentry_targets: Container[int], branches_into) -> EntryPlan:
    code = scan.code
    function_end = entry + size if size else None
    address = scan.address
    endbr = address != entry
    _check_inside_segment(entry, max(function_end or 0, address + JMP_REL32_SIZE), segment_end)
    # The head lies within the first _READ_AHEAD bytes; the whole function
    # was scanned in C for branches (_check_no_branch_into).
    head = [described(item, code[item[0] - entry:item[0] - entry + item[1]]) for item in scan.head]
    plan = (_skippable_plan(head, code, entry, address, function_end, endbr, fentry_targets)
            or _generic_plan(head, code, entry, address, function_end, endbr))
    _check_inside_segment(entry, plan.address + plan.length, segment_end)
    if function_end is not None:
        _check_no_branch_into(scan, entry, function_end, plan)
    if branches_into is not None and not plan.single_instruction:
        _check_no_foreign_branch_into(branches_into, plan)
    return plan


def build_original(plan: EntryPlan, stub_address: int) -> bytes:
    """The code of the "original" stub at ``stub_address`` for a "generic" plan.

    It starts with endbr64 when the function does, so that calling the
    original through a pointer stays valid under indirect-branch tracking.
    """
    if plan.kind != "generic":
        raise ValueError(f"{plan.kind} entry at {plan.entry:#x} needs no stub: "
                         f"its original is the body at {plan.body:#x}")
    prefix = ENDBR64 if plan.endbr else b""
    region = (plan.address, plan.address + plan.length)
    resume = region[1] if plan.falls_through else None
    return prefix + relocate(plan.instructions, stub_address + len(prefix),
                             resume=resume, region=region)


def original_stub_size_bound(plan: EntryPlan) -> int:
    """An upper bound of :func:`build_original`'s size; 0 for kinds with a body."""
    if plan.kind != "generic":
        return 0
    return (len(ENDBR64) if plan.endbr else 0) + relocated_size_bound(plan.instructions)


def _segment_end(entry: int, exec_ranges: Sequence[tuple[int, int]]) -> int | None:
    """The end of the executable segment holding ``entry`` (None: not checked)."""
    if not exec_ranges:
        return None
    for lo, hi in exec_ranges:
        if lo <= entry < hi:
            return hi
    raise UnsafeToPatch(f"not code: {entry:#x} is not inside an executable segment")


def _check_inside_segment(entry: int, end: int, segment_end: int | None) -> None:
    if segment_end is not None and end > segment_end:
        raise UnsafeToPatch(f"not code: [{entry:#x}, {end:#x}) runs past the end of "
                            f"its executable segment at {segment_end:#x}")


def _skippable_plan(head: list[Instruction], code: bytes, entry: int, address: int,
                    function_end: int | None, endbr: bool,
                    fentry_targets: Container[int]) -> EntryPlan | None:
    """A "fentry" or "nops" plan when the entry starts with bytes that can be skipped."""
    if not head:
        return None
    first = head[0]
    if first.size >= JMP_REL32_SIZE and (first.is_nop() or _is_fentry_call(first, fentry_targets)):
        sled = [first]
    else:
        sled = _nop_sled(head, address)
    if not sled:
        return None
    length = sled[-1].end - address
    if function_end is not None and address + length > function_end:
        return None
    return EntryPlan(entry=entry, address=address, length=length,
                     original_bytes=code[address - entry:address - entry + length],
                     kind="fentry" if len(sled) == 1 else "nops", endbr=endbr,
                     single_instruction=len(sled) == 1, instructions=tuple(sled),
                     body=address + length, falls_through=False)


def _is_fentry_call(insn: Instruction, fentry_targets: Container[int]) -> bool:
    """``call __fentry__`` or ``call *__fentry__@GOTPCREL(%rip)``."""
    if insn.branch == "call":
        return insn.target in fentry_targets
    return insn.branch == "call_indirect" and insn.rip_target is not None \
        and insn.rip_target in fentry_targets


def _covering_window(code: bytes, entry: int, start: int) -> bytes:
    """The bytes from ``start`` that whole instructions covering 5 bytes can
    span: capstone decodes all it is given before yielding the first."""
    return code[start - entry:start - entry + JMP_REL32_SIZE + MAX_INSTRUCTION_SIZE - 1]


def _nop_sled(head: list[Instruction], address: int) -> list[Instruction]:
    """The fewest NOPs at ``address`` covering 5 bytes, or [] if there are not enough."""
    sled = []
    for insn in head:
        if not insn.is_nop():
            return []
        sled.append(insn)
        if insn.end - address >= JMP_REL32_SIZE:
            return sled
    return []


def _generic_plan(head: list[Instruction], code: bytes, entry: int, address: int,
                  function_end: int | None, endbr: bool) -> EntryPlan:
    """A "generic" plan: whole instructions covering 5 bytes, to relocate."""
    taken = _covering_instructions(head, code, entry, address, function_end)
    covered = taken[-1].end if taken else address
    if covered < address + JMP_REL32_SIZE:
        _check_padding(code, entry, address, function_end, taken)
        covered = address + JMP_REL32_SIZE
    length = covered - address
    _check_replaceable(taken, address, length)
    return EntryPlan(entry=entry, address=address, length=length,
                     original_bytes=code[address - entry:address - entry + length],
                     kind="generic", endbr=endbr,
                     single_instruction=len(taken) == 1 and taken[0].size == length,
                     instructions=tuple(taken), body=None,
                     falls_through=taken[-1].can_fall_through())


def _covering_instructions(head: list[Instruction], code: bytes, entry: int, address: int,
                           function_end: int | None) -> list[Instruction]:
    """Instructions from ``address`` covering 5 bytes, or up to the function's end."""
    want = address + JMP_REL32_SIZE
    taken: list[Instruction] = []
    covered = address
    for insn in head:
        if covered >= want or covered == function_end:
            break
        if function_end is not None and insn.end > function_end:
            raise UnsafeToPatch(f"{insn} crosses the end of the function at "
                                f"{function_end:#x}: its size is wrong or it is not code")
        if function_end is None and not insn.can_fall_through() and insn.end < want:
            raise UnsafeToPatch(f"{insn} ends the code at {insn.end:#x}, before the "
                                f"{JMP_REL32_SIZE} bytes needed at {address:#x}, and "
                                f"without the function's size the bytes after it "
                                f"cannot be told apart from the next function")
        taken.append(insn)
        covered = insn.end
    if covered < want and covered != function_end:
        raise UnsafeToPatch(f"cannot decode the instruction at {covered:#x}: "
                            f"undecodable bytes {code[covered - entry:covered - entry + 4].hex(' ')}")
    return taken


def _check_padding(code: bytes, entry: int, address: int, function_end: int,
                   taken: list[Instruction]) -> None:
    """Refuse a function shorter than 5 bytes unless padding it never reaches follows it."""
    want = address + JMP_REL32_SIZE
    short = (f"the function at {entry:#x} is {function_end - entry} bytes, too short "
             f"for the {JMP_REL32_SIZE} bytes needed at {address:#x}")
    if not taken or taken[-1].can_fall_through():
        raise UnsafeToPatch(f"{short}, and it falls through at its end {function_end:#x}")
    position = function_end
    for insn in iter_decode(_covering_window(code, entry, function_end), function_end):
        if position >= want:
            break
        if not insn.is_padding():
            raise UnsafeToPatch(f"{short}, and no padding follows it: {insn} is "
                                f"not int3/nop")
        position = insn.end
    if position < want:
        raise UnsafeToPatch(f"{short}, and no padding follows it: undecodable "
                            f"bytes at {position:#x}")


def _check_replaceable(taken: list[Instruction], address: int, length: int) -> None:
    """Refuse instructions that cannot leave [address, address+length)."""
    end = address + length
    for insn in taken:
        if insn.mnemonic == "int3":
            raise UnsafeToPatch(f"int3 at {insn.address:#x}: a breakpoint is already "
                                f"set there (a debugger or another patcher)")
        if insn.branch in ("call", "call_indirect") and insn.end < end:
            raise UnsafeToPatch(f"call at {insn.address:#x} returns to {insn.end:#x}, "
                                f"inside the replaced bytes [{address:#x}, {end:#x}): "
                                f"a thread inside the callee would return into the "
                                f"new jump")
    check_relocatable(taken, (address, end))


def _check_no_branch_into(scan: EntryScan, entry: int, function_end: int,
                          plan: EntryPlan) -> None:
    """Refuse when a branch of the function lands strictly inside the replaced bytes."""
    code = scan.code
    decoded, branches = scan.decoded_end, scan.branches
    if branches is None:      # more near the entry than the scan kept
        decoded, branches = function_branches(code, entry, function_end)
    if decoded != function_end:
        raise UnsafeToPatch(f"cannot decode the function at {entry:#x} up to its end "
                            f"{function_end:#x} (undecodable bytes at {decoded:#x}), so "
                            f"branches into its first bytes cannot be ruled out")
    lo, hi = plan.address, plan.address + plan.length
    for at, target in branches:
        # Branches among the replaced instructions move with them.
        if lo <= at < hi:
            continue
        if lo < target < hi:
            _, _, mnemonic, op_str = sweep(code[at - entry:at - entry + 15], at)[0]
            raise UnsafeToPatch(f"a branch lands inside the replaced bytes [{lo:#x}, {hi:#x}): "
                                f"{at:#x}: {mnemonic} {op_str} goes to {target:#x}")


def _check_no_foreign_branch_into(branches_into, plan: EntryPlan) -> None:
    """Refuse when a branch from anywhere in the object lands strictly inside
    the replaced bytes (one replaced instruction cannot be entered in its
    middle by real code, so single-instruction plans skip this)."""
    lo, hi = plan.address, plan.address + plan.length
    for source, description, target in branches_into(lo + 1, hi):
        if not lo <= source < hi:
            raise UnsafeToPatch(f"a branch lands inside the replaced bytes [{lo:#x}, {hi:#x}): "
                                f"{description} goes to {target:#x}, so the first "
                                f"{plan.length} bytes are a shared entry point")
