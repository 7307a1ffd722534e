"""Callers' register assumptions: where the redirect goes through a thunk.

A function whose body the compiler saw when compiling its callers (local
binding, hidden visibility, the main program, or any function its object
branches to directly rather than through the PLT) may have callers that keep values in call-clobbered registers
across the call, because gcc's IPA-RA saw that it never writes them.  For
such a function the registers it (and what it reaches in its object) never
writes are computed once (:mod:`hotpatch.x86_64.clobbers`); when there are
any, calls go to a thunk that preserves exactly those around the new code
(:mod:`hotpatch.x86_64.thunk`).  Where it already writes them all -- it
calls out of its object, for instance -- calls go straight to the new code.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import sites, symbols
from ._native import lib
from .errors import UnsafeToPatch
from .x86_64.clobbers import CALL_CLOBBERED, never_written
from .x86_64.thunk import THUNK_SIZE_BOUND, thunk_code, thunk_return_offset


@dataclass(frozen=True)
class Thunk:
    address: int
    preserves: tuple[str, ...]      # in CALL_CLOBBERED order


# By object and function address: an object unloaded and another mapped at
# the same place is another key.
_preserved: dict[tuple[symbols.LoadedObject, int], frozenset] = {}
_thunks: dict[tuple[int, int, frozenset], Thunk] = {}   # never freed
_memos: dict[symbols.LoadedObject, dict] = {}


def preserved_registers(loaded: symbols.LoadedObject, address: int, size: int | None,
                        local: bool) -> frozenset:
    """The call-clobbered registers callers of the function may rely on."""
    if not local:
        return frozenset()      # callers from other objects assume only the ABI
    key = (loaded, address)
    if key not in _preserved:
        if not size:
            # Not decodable to its end: every register may be relied on.
            _preserved[key] = frozenset(CALL_CLOBBERED)
        else:
            memo = _memos.setdefault(loaded, {})
            _preserved[key] = never_written(
                sites.read_memory, address, size,
                lambda target: symbols.callee_extent(loaded, target), memo)
    return _preserved[key]


def forget(loaded: symbols.LoadedObject) -> None:
    """Forget what callers in ``loaded`` rely on: it was unloaded.  Its
    thunks stay (a thread may still run one; they are keyed by addresses
    and registers, so a later object at the same place may reuse them)."""
    _memos.pop(loaded, None)
    for key in [k for k in _preserved if k[0] == loaded]:
        del _preserved[key]


def thunk_for(function: int, near: int, new: int, preserve: frozenset) -> Thunk:
    """The thunk calling ``new`` that preserves ``preserve``, within reach of
    ``near`` (made once per function, new code and register set)."""
    key = (function, new, preserve)
    thunk = _thunks.get(key)
    if thunk is None:
        at = lib.hp_alloc_code(near, THUNK_SIZE_BOUND)
        if not at:
            raise UnsafeToPatch(f"{function:#x}: no free memory within +-2 GiB for the thunk "
                                f"that preserves {', '.join(sorted(preserve))}")
        code = thunk_code(at, new, preserve)
        if lib.hp_write_code(at, code, len(code)):
            raise UnsafeToPatch(f"{function:#x}: cannot write the thunk at {at:#x}")
        thunk = _thunks[key] = Thunk(at, tuple(r for r in CALL_CLOBBERED if r in preserve))
        # Its frame, for the stack model's unwinder (the pool has no
        # unwind tables): the pushed general-purpose registers lie between
        # its saved rbp and the return address.
        pushed = sum(1 for r in thunk.preserves if not r.startswith("xmm"))
        lib.hp_unwind_add_thunk(at + thunk_return_offset(at, new, preserve), pushed)
    return thunk
