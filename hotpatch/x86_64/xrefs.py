"""Direct branches of a whole object: who jumps or calls where.

A redirect replaces the first bytes of a function.  A relative branch from
anywhere in the object that lands strictly inside those bytes (``mempcpy``
ending with a jump to ``memmove``'s entry + 3, a ``.cold`` part jumping back
into its function's prologue, a loop of a function without ``.size``) would
run half of the new ``jmp``.  Scanning only the patched function misses
those, so the executable segments of the object are swept once and every
relative branch is indexed by its target.

The sweep is linear (capstone, without details) and resumes one byte after
any undecodable byte.  Compilers pad between functions with NOPs and int3,
which decode, so the sweep stays in step with the real instructions; a
desynchronised stretch can only add a branch that is not there (a refusal
too many), or, rarely, hide one.  Indirect branches (jump tables, function
pointers) are not seen: they target function entries, not their middle.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .decode import relative_branches, sweep

__all__ = ["BranchIndex", "index_branches"]

# Bytes decoded per capstone call: a smaller window keeps the restart after
# an undecodable byte cheap without paying the per-call cost too often.
_WINDOW = 1 << 20
_MAX_INSTRUCTION = 15


@dataclass(frozen=True)
class BranchIndex:
    """Every relative branch of an object, sorted by target."""

    targets: tuple[int, ...]
    #: (source address, "mnemonic target") in the order of ``targets``
    sources: tuple[tuple[int, str], ...]

    def into(self, lo: int, hi: int) -> list[tuple[int, str, int]]:
        """``(source, text, target)`` of the branches landing in [lo, hi)."""
        i = bisect.bisect_left(self.targets, lo)
        found = []
        while i < len(self.targets) and self.targets[i] < hi:
            source, text = self.sources[i]
            found.append((source, text, self.targets[i]))
            i += 1
        return found


def index_branches(read: Callable[[int, int], bytes],
                   exec_ranges: Sequence[tuple[int, int]]) -> BranchIndex:
    """Sweep every [lo, hi) of ``exec_ranges`` (read with ``read(addr, n)``)
    and index its relative branches."""
    branches: list[tuple[int, int, str]] = []
    for lo, hi in exec_ranges:
        code = bytes(read(lo, hi - lo))
        for at, text, target in relative_branches(_sweep_all(code, lo)):
            branches.append((target, at, text))
    branches.sort()
    return BranchIndex(tuple(b[0] for b in branches), tuple((b[1], b[2]) for b in branches))


def _sweep_all(code: bytes, base: int):
    """Linear sweep of all of ``code``, stepping over undecodable bytes."""
    position = 0
    while position < len(code):
        window_end = min(position + _WINDOW, len(code))
        swept = sweep(code[position:window_end], base + position)
        yield from swept
        end = swept[-1][0] + swept[-1][1] - base if swept else position
        # Near a window's end the sweep may have stopped at an instruction
        # the window cut: decode it again in the next window.  Anywhere
        # else it stopped at an undecodable byte: step over it.
        cut = window_end < len(code) and end > window_end - _MAX_INSTRUCTION
        position = end if cut else end + 1
