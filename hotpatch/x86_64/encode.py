"""The x86-64 writer: hand-encoded branches, NOPs and trampolines.

Encoding by hand keeps applying a patch fast (no assembler in the loop); the
tests check every form against keystone.
"""

from __future__ import annotations

import struct

__all__ = [
    "JMP_REL32_SIZE", "CALL_REL32_SIZE", "JCC_REL32_SIZE", "JMP_ABS_SIZE",
    "CALL_ABS_SIZE", "JMP_RIP_INDIRECT_SIZE",
    "in_reach", "jmp_rel32", "call_rel32", "jcc_rel32", "jmp_abs", "call_abs",
    "nops", "jmp_rip_indirect",
]

JMP_REL32_SIZE = 5
CALL_REL32_SIZE = 5
JCC_REL32_SIZE = 6
JMP_ABS_SIZE = 14
CALL_ABS_SIZE = 16
JMP_RIP_INDIRECT_SIZE = 6

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1

# Intel SDM vol. 2B, "NOP": the recommended multi-byte sequences.
_NOPS = (
    b"",
    b"\x90",
    b"\x66\x90",
    b"\x0f\x1f\x00",
    b"\x0f\x1f\x40\x00",
    b"\x0f\x1f\x44\x00\x00",
    b"\x66\x0f\x1f\x44\x00\x00",
    b"\x0f\x1f\x80\x00\x00\x00\x00",
    b"\x0f\x1f\x84\x00\x00\x00\x00\x00",
    b"\x66\x0f\x1f\x84\x00\x00\x00\x00\x00",
)


def in_reach(src: int, dst: int, size: int = JMP_REL32_SIZE) -> bool:
    """Whether an instruction of ``size`` bytes at ``src`` reaches ``dst`` by rel32."""
    return _INT32_MIN <= dst - (src + size) <= _INT32_MAX


def _rel32(src: int, dst: int, size: int) -> bytes:
    if not in_reach(src, dst, size):
        raise ValueError(f"{dst:#x} is out of rel32 reach of {src:#x}")
    return struct.pack("<i", dst - (src + size))


def jmp_rel32(src: int, dst: int) -> bytes:
    """``jmp dst`` (E9 rel32) placed at ``src``."""
    return b"\xe9" + _rel32(src, dst, JMP_REL32_SIZE)


def jmp_rel8(src: int, dst: int) -> bytes:
    """``jmp dst`` (EB rel8) placed at ``src``."""
    rel = dst - (src + 2)
    if not -128 <= rel <= 127:
        raise ValueError(f"{dst:#x} is out of rel8 reach of {src:#x}")
    return struct.pack("<Bb", 0xEB, rel)


def call_rel32(src: int, dst: int) -> bytes:
    """``call dst`` (E8 rel32) placed at ``src``."""
    return b"\xe8" + _rel32(src, dst, CALL_REL32_SIZE)


def jcc_rel32(cc: int, src: int, dst: int) -> bytes:
    """``jcc dst`` (0F 8cc rel32) placed at ``src``; ``cc`` is the condition nibble."""
    if not 0 <= cc <= 0xF:
        raise ValueError(f"condition code {cc:#x} is not a nibble")
    return bytes((0x0F, 0x80 | cc)) + _rel32(src, dst, JCC_REL32_SIZE)


def jmp_abs(dst: int) -> bytes:
    """``jmp [rip+0]`` followed by the 8-byte target: reaches anywhere, 14 bytes."""
    return b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", dst)


def call_abs(dst: int) -> bytes:
    """A position-independent absolute call, 16 bytes.

    ``call [rip+2]`` reads the target stored after a ``jmp +8`` that the
    callee returns to, so the return address skips the stored target.
    """
    return b"\xff\x15\x02\x00\x00\x00\xeb\x08" + struct.pack("<Q", dst)


def nops(n: int) -> bytes:
    """``n`` bytes of NOPs in as few instructions as the SDM's forms allow."""
    if n < 0:
        raise ValueError(f"negative NOP length {n}")
    longest = len(_NOPS) - 1
    return _NOPS[longest] * (n // longest) + _NOPS[n % longest]


def jmp_rip_indirect(src: int, slot: int) -> bytes:
    """``jmp [rip+d]`` placed at ``src``, reading its target from the 8-byte
    ``slot`` (within rel32 reach).  The slot path's trampoline: the slot
    lives in a writable data page, so retargeting is one atomic store and no
    page is ever writable and executable."""
    return b"\xff\x25" + _rel32(src, slot, JMP_RIP_INDIRECT_SIZE)
