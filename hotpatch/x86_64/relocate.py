"""The x86-64 relocator: moves instructions to a stub and keeps their meaning.

Copied instructions keep their bytes except where they depend on where they
are: a RIP-relative displacement is recomputed, and every relative branch is
re-encoded to the same absolute target (rel32 where it reaches, else through
an absolute jump; branch-hint and ``bnd`` prefixes are dropped).  Branches to
instructions inside the moved region follow them into the stub, so loops
within the region keep working.  RIP-relative operands keep addressing the
same bytes, even inside the region (``lea rax, [rip - 7]`` still yields the
function's own address).

``jrcxz``/``jecxz``/``loop``/``loope``/``loopne`` only have a rel8 form, so
they are rewritten as ``<same insn> +2; jmp short over; jmp target``, which
keeps their semantics (and their address-size prefix) for any target.
``xbegin`` is refused: its abort handler is entered by the CPU, with state
rolled back, at an address we would have to move along with the whole
transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

from hotpatch.errors import UnsafeToPatch

from .decode import Instruction
from .encode import (CALL_ABS_SIZE, CALL_REL32_SIZE, JCC_REL32_SIZE,
                     JMP_ABS_SIZE, JMP_REL32_SIZE, call_abs, call_rel32,
                     in_reach, jcc_rel32, jmp_abs, jmp_rel32)

__all__ = ["check_relocatable", "relocate", "relocated_size_bound"]

# Legacy and REX prefixes, skipped to find a jcc's opcode.
_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3") | frozenset(range(0x40, 0x50))
# Bytes of `loop* +2; jmp short +N` around the jump to the target.
_LOOP_EXTRA = 2


def check_relocatable(instructions: Sequence[Instruction],
                      region: tuple[int, int]) -> None:
    """Raise UnsafeToPatch if ``instructions`` cannot be moved out of ``region``.

    Everything that does not depend on where the stub goes is checked here;
    only the reach of RIP-relative operands is left to :func:`relocate`.
    """
    starts = _starts(instructions, region)
    start, end = region
    for insn in instructions:
        if insn.branch == "xbegin":
            raise UnsafeToPatch(f"xbegin at {insn.address:#x}: a transaction's "
                                f"abort handler cannot be relocated")
        if insn.target is None or not start <= insn.target < end:
            continue
        if insn.branch == "call":
            raise UnsafeToPatch(f"call at {insn.address:#x} targets {insn.target:#x} "
                                f"inside the relocated bytes: the callee would see "
                                f"a return address in the stub")
        if insn.target not in starts:
            raise UnsafeToPatch(f"{insn.mnemonic} at {insn.address:#x} targets "
                                f"{insn.target:#x}, inside the relocated bytes "
                                f"[{start:#x}, {end:#x}) but not at an "
                                f"instruction boundary")


def relocated_size_bound(instructions: Sequence[Instruction]) -> int:
    """An upper bound of :func:`relocate`'s output, wherever the stub goes."""
    return sum(_size(insn, far=True) for insn in instructions) + JMP_ABS_SIZE


def relocate(instructions: Sequence[Instruction], stub_address: int, *,
             resume: int | None, region: tuple[int, int]) -> bytes:
    """Code for ``stub_address`` that runs ``instructions`` then continues at ``resume``.

    ``instructions`` are consecutive, copied from ``region`` = [start, end)
    and starting at its start.  When the last one can fall through, the stub
    ends with a jump to ``resume`` (rel32 where it reaches, else absolute).
    """
    instructions = list(instructions)
    check_relocatable(instructions, region)
    if instructions[-1].can_fall_through() and resume is None:
        raise ValueError(f"{instructions[-1]} falls through but no resume "
                         f"address was given")
    if not any(insn.branch or insn.rip_disp_offset is not None for insn in instructions):
        # The common prologue: nothing depends on where it runs, so its
        # bytes are copied as they are (what the general path below yields
        # for it, without its per-instruction bookkeeping).
        code = b"".join(insn.raw for insn in instructions)
        if instructions[-1].can_fall_through():
            code += _jmp(stub_address + len(code), resume)
        return code
    # A branch goes far only when its near form does not reach, and staying
    # far only grows the stub, so this settles in a few rounds.
    far: set[int] = set()
    while True:
        offsets = _offsets(instructions, far)
        targets = _stub_targets(instructions, region, stub_address, offsets)
        too_far = {i for i, insn in enumerate(instructions)
                   if i not in far and not _near_reaches(insn, stub_address + offsets[i], targets[i])}
        if not too_far:
            break
        far |= too_far
    code = b"".join(_emit(insn, stub_address + offsets[i], targets[i], i in far)
                    for i, insn in enumerate(instructions))
    if instructions[-1].can_fall_through():
        code += _jmp(stub_address + len(code), resume)
    return code


def _starts(instructions: Sequence[Instruction], region: tuple[int, int]) -> set[int]:
    """The instruction boundaries, after checking the instructions fill the region's start."""
    if not instructions:
        raise ValueError("no instructions to relocate")
    start, end = region
    expected = start
    for insn in instructions:
        if insn.address != expected:
            raise ValueError(f"{insn} does not follow {expected:#x}: instructions "
                             f"must be consecutive from the region's start")
        expected = insn.end
    if expected > end:
        raise ValueError(f"instructions end at {expected:#x}, past the region's end {end:#x}")
    return {insn.address for insn in instructions}


def _size(insn: Instruction, far: bool) -> int:
    """Bytes ``insn`` takes in the stub, in its near or far form."""
    if insn.rip_disp_offset is not None:
        return insn.size
    if insn.branch == "jmp":
        return JMP_ABS_SIZE if far else JMP_REL32_SIZE
    if insn.branch == "call":
        return CALL_ABS_SIZE if far else CALL_REL32_SIZE
    if insn.branch == "jcc":
        return 2 + JMP_ABS_SIZE if far else JCC_REL32_SIZE
    if insn.branch == "loop":
        return insn.size + _LOOP_EXTRA + (JMP_ABS_SIZE if far else JMP_REL32_SIZE)
    return insn.size


def _offsets(instructions: Sequence[Instruction], far: set[int]) -> list[int]:
    """The stub offset of each instruction, then the end of the last."""
    offsets = [0]
    for i, insn in enumerate(instructions):
        offsets.append(offsets[-1] + _size(insn, i in far))
    return offsets


def _stub_targets(instructions: Sequence[Instruction], region: tuple[int, int],
                  stub_address: int, offsets: list[int]) -> list[int | None]:
    """Each branch target seen from the stub: moved along when inside the region."""
    moved = {insn.address: stub_address + offsets[i] for i, insn in enumerate(instructions)}
    start, end = region
    return [moved[insn.target] if insn.target is not None and start <= insn.target < end
            else insn.target for insn in instructions]


def _near_reaches(insn: Instruction, at: int, target: int | None) -> bool:
    """Whether the near (rel32) form of ``insn`` placed at ``at`` reaches ``target``."""
    if insn.branch in ("jmp", "call"):
        return in_reach(at, target, JMP_REL32_SIZE)
    if insn.branch == "jcc":
        return in_reach(at, target, JCC_REL32_SIZE)
    if insn.branch == "loop":
        return in_reach(at + insn.size + _LOOP_EXTRA, target, JMP_REL32_SIZE)
    return True


def _emit(insn: Instruction, at: int, target: int | None, far: bool) -> bytes:
    """The bytes of ``insn`` moved to ``at``."""
    if insn.rip_disp_offset is not None:
        return _with_new_disp(insn, at)
    if insn.branch == "jmp":
        return jmp_abs(target) if far else jmp_rel32(at, target)
    if insn.branch == "call":
        return call_abs(target) if far else call_rel32(at, target)
    if insn.branch == "jcc":
        cc = _condition_code(insn)
        if far:
            # The inverted condition skips the absolute jump.
            return bytes((0x70 | (cc ^ 1), JMP_ABS_SIZE)) + jmp_abs(target)
        return jcc_rel32(cc, at, target)
    if insn.branch == "loop":
        jump_at = at + insn.size + _LOOP_EXTRA
        jump = jmp_abs(target) if far else jmp_rel32(jump_at, target)
        # Taken: skip the short jmp and land on the jump to the target;
        # not taken: the short jmp steps over it.
        return insn.raw[:-1] + b"\x02" + bytes((0xEB, len(jump))) + jump
    return insn.raw


def _with_new_disp(insn: Instruction, at: int) -> bytes:
    """``insn`` at ``at`` with its RIP-relative disp32 still addressing the same byte."""
    disp = insn.rip_target - (at + insn.size)
    if not -(1 << 31) <= disp < (1 << 31):
        raise UnsafeToPatch(f"'{insn.mnemonic} {insn.op_str}' at {insn.address:#x} "
                            f"refers to {insn.rip_target:#x}, beyond ±2 GiB of "
                            f"its new place at {at:#x}")
    offset = insn.rip_disp_offset
    return insn.raw[:offset] + disp.to_bytes(4, "little", signed=True) + insn.raw[offset + 4:]


def _condition_code(insn: Instruction) -> int:
    """The condition nibble of a jcc, from its opcode (7x rel8 or 0F 8x rel32)."""
    i = 0
    while insn.raw[i] in _PREFIXES:
        i += 1
    opcode = insn.raw[i + 1] if insn.raw[i] == 0x0F else insn.raw[i]
    return opcode & 0x0F


def _jmp(at: int, target: int) -> bytes:
    """The shortest of our jumps from ``at`` to ``target``."""
    return jmp_rel32(at, target) if in_reach(at, target) else jmp_abs(target)
