"""Direct branches of a whole object: who jumps or calls where.

A redirect replaces the first bytes of a function.  A relative branch from
anywhere in the object that lands strictly inside those bytes (``mempcpy``
ending with a jump to ``memmove``'s entry + 3, a ``.cold`` part jumping back
into its function's prologue, a loop of a function without ``.size``) would
run half of the new ``jmp``.  Scanning only the patched function misses
those, so the question is asked of the whole object's code.

The C core (``native/xrefs.c``) answers it with capstone's C library, the one
the capstone wheel ships, without the GIL: the raw bytes are prefiltered for
anything that could encode a relative branch into the range asked about, and
each candidate is confirmed by decoding from the function symbol before it
(linear sweep, one byte past anything undecodable), once per function.
Compilers pad between functions with NOPs and int3, which decode, so a sweep
from a function's start is in step with its real instructions; a
desynchronised stretch can only add a branch that is not there (a refusal
too many), or, rarely, hide one.  Indirect branches (jump tables, function
pointers) are not seen: they target function entries, not their middle.

A whole-object sweep from Python took a second for libc with the GIL held,
and a quarter of a second from C (capstone decodes about two instructions a
microsecond here): the first patch of a process must cost milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from hotpatch._native import ffi, lib
from hotpatch.errors import HotpatchError

from .decode import sweep

__all__ = ["BranchIndex", "could_branch_into", "index_branches"]

_MAX_INSTRUCTION = 15


class BranchIndex:
    """The relative branches of an object, found by target (held in C)."""

    def __init__(self, handle, read: Callable[[int, int], bytes],
                 exec_ranges: Sequence[tuple[int, int]]) -> None:
        self._handle = handle
        self._read = read
        self._ranges = tuple(exec_ranges)

    def into(self, lo: int, hi: int) -> list[tuple[int, str, int]]:
        """``(source, "mnemonic target", target)`` of the branches landing
        in [lo, hi), by target."""
        capacity = 16
        while True:
            sources = ffi.new("uint64_t[]", capacity)
            targets = ffi.new("uint64_t[]", capacity)
            count = lib.hp_branch_index_into(self._handle, lo, hi, sources, targets, capacity)
            if count < 0:
                raise MemoryError("indexing branches")
            if count <= capacity:
                break
            capacity = count
        return [(sources[i], self._text(sources[i]), targets[i]) for i in range(count)]

    def any_into(self, lo: int, hi: int) -> bool:
        """Whether any branch lands in [lo, hi) (nothing decoded for text)."""
        sources, targets = ffi.new("uint64_t[]", 1), ffi.new("uint64_t[]", 1)
        count = lib.hp_branch_index_into(self._handle, lo, hi, sources, targets, 1)
        if count < 0:
            raise MemoryError("indexing branches")
        return count > 0

    def _text(self, source: int) -> str:
        # The index keeps addresses only: the few branches a query returns
        # are decoded again for their text.
        end = next(hi for lo, hi in self._ranges if lo <= source < hi)
        swept = sweep(self._read(source, min(_MAX_INSTRUCTION, end - source)), source)
        _, _, mnemonic, op_str = swept[0]
        return f"{mnemonic} {op_str}"


def index_branches(read: Callable[[int, int], bytes],
                   exec_ranges: Sequence[tuple[int, int]],
                   function_starts: Sequence[int] = ()) -> BranchIndex:
    """Index the relative branches of the code in ``exec_ranges`` of this
    process's memory.  The code is copied and prefiltered now; the stretch
    from each of ``function_starts`` (absolute) to the next is decoded when
    a query first needs it.  ``read(addr, n)`` reads the text of a branch
    found."""
    flat = _flat(exec_ranges)
    starts = ffi.new("uintptr_t[]", list(function_starts) or [0])
    err = ffi.new("char[]", 256)
    handle = lib.hp_branch_index_build(flat, len(exec_ranges), starts, len(function_starts), err)
    if handle == ffi.NULL:
        raise HotpatchError(f"indexing branches: {ffi.string(err).decode(errors='replace')}")
    return BranchIndex(ffi.gc(handle, lib.hp_branch_index_free), read, exec_ranges)


def could_branch_into(exec_ranges: Sequence[tuple[int, int]],
                      into: Sequence[tuple[int, int]]) -> bool:
    """Whether any bytes of the code in ``exec_ranges`` could encode a direct
    branch into one of the intervals ``into`` (the index's candidates, none
    confirmed): False means nothing branches there, without building an
    index.  True where the code cannot be read."""
    return lib.hp_branch_candidates_into(_flat(exec_ranges), len(exec_ranges), _flat(into),
                                         len(into)) != 0


def _flat(pairs: Sequence[tuple[int, int]]):
    """``[(lo, hi), ...]`` as the C core's ``uintptr_t[]`` of lo, hi, lo, hi..."""
    return ffi.new("uintptr_t[]", [a for lo_hi in pairs for a in lo_hi] or [0])
