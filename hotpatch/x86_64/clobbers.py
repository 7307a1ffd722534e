"""Which call-clobbered registers a function never writes.

gcc's interprocedural register allocation (``-fipa-ra``, on at -O2) lets the
caller of a function whose body it knows (static, hidden, in the main
program, or bound locally with ``-fno-semantic-interposition``) keep values in call-clobbered registers the callee never writes.
A replacement compiled on its own, or a Python callback, writes any of
them.  This module finds, from the old machine code, the call-clobbered
registers the function (with the functions it calls or jumps to inside its
object) never writes: those the redirect must preserve.

Errors lean towards preserving too much: a callee that cannot be decoded
adds no writes; only what gcc itself cannot see through clobbers every
register (a call through a pointer, a call out of the object or through
its PLT), as it does for gcc.
"""

from __future__ import annotations

from collections.abc import Callable

from .decode import register_writes

__all__ = ["CALL_CLOBBERED", "ALL", "never_written"]

#: The SysV x86-64 call-clobbered registers that can carry a value across a
#: call under IPA-RA, in the order a thunk saves them.
CALL_CLOBBERED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11",
                  *(f"xmm{i}" for i in range(16)))
ALL = frozenset(CALL_CLOBBERED)

_GPR_FAMILIES = {
    "rax": ("rax", "eax", "ax", "al", "ah"), "rcx": ("rcx", "ecx", "cx", "cl", "ch"),
    "rdx": ("rdx", "edx", "dx", "dl", "dh"), "rsi": ("rsi", "esi", "si", "sil"),
    "rdi": ("rdi", "edi", "di", "dil"),
    **{f"r{i}": (f"r{i}", f"r{i}d", f"r{i}w", f"r{i}b") for i in range(8, 12)},
}
_FAMILY = {name: family for family, names in _GPR_FAMILIES.items() for name in names}
_FAMILY.update({f"{kind}{i}": f"xmm{i}" for kind in ("xmm", "ymm", "zmm") for i in range(16)})
# Writes capstone does not list: vzeroall clears every vector register (and
# vzeroupper only the upper halves, call-clobbered anyway: see _written_by);
# syscall returns in rax and clobbers rcx and r11.
_IMPLICIT = {"vzeroall": frozenset(f"xmm{i}" for i in range(16)),
             "syscall": frozenset({"rax", "rcx", "r11"})}

#: ``callee(target)`` -> (start, size) of the object's function holding a
#: branch target, ALL for a target that clobbers everything (PLT, another
#: object), or None when nothing is known (adds no writes).
Callee = Callable[[int], "tuple[int, int] | frozenset | None"]


def never_written(read: Callable[[int, int], bytes], start: int, size: int,
                  callee: Callee, memo: dict | None = None) -> frozenset:
    """The call-clobbered registers the function [start, start+size) and
    everything it reaches never write."""
    return ALL - _writes(read, start, size, callee, {} if memo is None else memo)


def _writes(read, start: int, size: int, callee: Callee, memo: dict) -> frozenset:
    if start in memo:
        return memo[start]
    memo[start] = frozenset()       # a recursive call adds nothing more
    written: set[str] = set()
    for mnemonic, registers, immediate in register_writes(read(start, size), start):
        written |= _written_by(mnemonic, registers)
        reached = _branch_out(mnemonic, immediate, start, start + size)
        if reached is None:
            continue
        if reached == "all":
            written = set(ALL)
            break
        target = callee(reached)
        if target == ALL:
            written = set(ALL)
            break
        if target is not None:
            written |= _writes(read, target[0], target[1], callee, memo)
    memo[start] = frozenset(written)
    return memo[start]


def _written_by(mnemonic: str, registers: frozenset) -> set[str]:
    implicit = _IMPLICIT.get(mnemonic)
    if implicit is not None:
        return set(implicit)
    if mnemonic == "vzeroupper":
        return set()     # the low 128 bits stay
    return {_FAMILY[name] for name in registers if name in _FAMILY}


def _branch_out(mnemonic: str, immediate: int | None, lo: int, hi: int):
    """A call's target, a jump's target outside [lo, hi), "all" for a call
    through a pointer, else None (``immediate``: the first operand's, if it
    is one)."""
    group = mnemonic.split()[-1]    # "notrack call", "bnd jmp"
    if group == "call":
        return immediate if immediate is not None else "all"
    if group.startswith("j") and immediate is not None:
        return immediate if not lo <= immediate < hi else None
    return None
