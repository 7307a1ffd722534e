"""The preserving thunk: calls the new code and keeps registers the old
function's callers rely on (see :mod:`hotpatch.x86_64.clobbers`).

Layout, entered with the caller's return address on the stack::

    push <each preserved general-purpose register>
    push rbp; mov rbp, rsp
    sub  rsp, FRAME; and rsp, -16   ; stack-argument copy and saved xmms
    mov  r11, [rbp+16+8k+8i]        ; copy 8 qwords of the caller's stack
    mov  [rsp+8i], r11              ;   arguments, so the new code finds its
                                    ;   7th.. arguments where it expects them
    movdqu [rsp+64+16j], xmm<j>     ; each preserved xmm
    call new
    movdqu xmm<j>, [rsp+64+16j]
    mov  rsp, rbp; pop rbp
    pop  <in reverse>
    ret

The stack is aligned by the thunk itself: a caller that knows its callee
needs no alignment (gcc's ``-fipa-stack-alignment``) may call it with the
stack at any 8-byte boundary, and the new code may need 16.  r11 is used as
scratch only after it was saved (when it is preserved); it is never an
argument register.  The new code's result (rax, rdx, xmm0, xmm1) passes
through unless the old function never wrote it: then callers cannot be
reading a result there.
"""

from __future__ import annotations

import struct

from .clobbers import CALL_CLOBBERED
from .encode import call_abs, call_rel32, in_reach

__all__ = ["thunk_code", "thunk_return_offset", "THUNK_SIZE_BOUND", "STACK_ARGS"]

#: Qwords of stack arguments copied for the new code.
STACK_ARGS = 8
_GPR_NUMBER = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6,
               "rdi": 7, **{f"r{i}": i for i in range(8, 16)}}
THUNK_SIZE_BOUND = 2 * 9 * 2 + 4 + 7 + 4 + STACK_ARGS * 16 + 16 * 2 * 10 + 16 + 4 + 1


_PROLOGUE = b"\x55\x48\x89\xe5"        # push rbp; mov rbp, rsp
_ALIGN_RSP = b"\x48\x83\xe4\xf0"      # and rsp, -16
_EPILOGUE = b"\x48\x89\xec\x5d"        # mov rsp, rbp; pop rbp


def _push(reg: str) -> bytes:
    n = _GPR_NUMBER[reg]
    return bytes((0x50 + n,)) if n < 8 else bytes((0x41, 0x50 + n - 8))


def _pop(reg: str) -> bytes:
    n = _GPR_NUMBER[reg]
    return bytes((0x58 + n,)) if n < 8 else bytes((0x41, 0x58 + n - 8))


def _rsp_imm(opcode_ext: int, value: int) -> bytes:
    """``sub rsp, imm32`` (/5) or ``add rsp, imm32`` (/0)."""
    return bytes((0x48, 0x81, 0xC0 | opcode_ext << 3 | 4)) + struct.pack("<i", value)


def _rsp_mem(prefix: bytes, opcode: bytes, reg: int, disp: int, wide: bool = False) -> bytes:
    """``<op> reg, [rsp+disp32]``: ``prefix`` (mandatory prefix, before
    REX), REX.W when ``wide``, REX.R for reg >= 8."""
    rex = (0x48 if wide else 0) | (0x44 if reg >= 8 else 0)
    return (prefix + (bytes((rex,)) if rex else b"") + opcode
            + bytes((0x84 | (reg & 7) << 3, 0x24)) + struct.pack("<i", disp))


def _movdqu_store(xmm: int, disp: int) -> bytes:
    """``movdqu [rsp+disp32], xmm``."""
    return _rsp_mem(b"\xf3", b"\x0f\x7f", xmm, disp)


def _movdqu_load(xmm: int, disp: int) -> bytes:
    """``movdqu xmm, [rsp+disp32]``."""
    return _rsp_mem(b"\xf3", b"\x0f\x6f", xmm, disp)


def _mov_r11_from_rbp(disp: int) -> bytes:
    """``mov r11, [rbp+disp32]``."""
    return b"\x4c\x8b\x9d" + struct.pack("<i", disp)


def _mov_r11_to(disp: int) -> bytes:
    """``mov [rsp+disp32], r11``."""
    return _rsp_mem(b"", b"\x89", 11, disp, wide=True)


def _thunk_parts(at: int, new: int, preserve) -> tuple[bytes, bytes]:
    """The thunk's code up to and including its call of ``new``, and the rest."""
    gprs = [r for r in CALL_CLOBBERED if r in preserve and not r.startswith("xmm")]
    xmms = [int(r[3:]) for r in CALL_CLOBBERED if r in preserve and r.startswith("xmm")]
    args = 8 * STACK_ARGS
    frame = args + 16 * len(xmms)
    above = 16 + 8 * len(gprs)      # from rbp to the caller's stack arguments
    code = b"".join(_push(r) for r in gprs) + _PROLOGUE + _rsp_imm(5, frame) + _ALIGN_RSP
    for i in range(STACK_ARGS):
        code += _mov_r11_from_rbp(above + 8 * i) + _mov_r11_to(8 * i)
    code += b"".join(_movdqu_store(x, args + 16 * j) for j, x in enumerate(xmms))
    call_at = at + len(code)
    code += call_rel32(call_at, new) if in_reach(call_at, new) else call_abs(new)
    rest = b"".join(_movdqu_load(x, args + 16 * j) for j, x in enumerate(xmms))
    rest += _EPILOGUE + b"".join(_pop(r) for r in reversed(gprs)) + b"\xc3"
    return code, rest


def thunk_code(at: int, new: int, preserve) -> bytes:
    """The thunk placed at ``at`` calling ``new`` and preserving the registers
    ``preserve`` (names from :data:`CALL_CLOBBERED`)."""
    return b"".join(_thunk_parts(at, new, preserve))


def thunk_return_offset(at: int, new: int, preserve) -> int:
    """Where the new code returns to in that thunk, from ``at``: a stack
    unwinder finds its frame there (``rbp`` set up, above it the saved
    registers, then the return address to the old function's caller)."""
    return len(_thunk_parts(at, new, preserve)[0])
