"""Consistency models: when code may switch (the kernel's transition.c).

``consistency="immediate"`` writes at once: a thread switches at its next
call of a patched function, and one already inside finishes the old code.

``consistency="stack"`` is kpatch's model.  The code is written only in a
stop in which no thread -- the patching one included -- has code of the
patch on its stack: on enable, the functions being replaced (and the new
code of the patch on top of their stacks now, if any); on disable, the new
code being removed.  Every stopped thread's stack is unwound by libunwind
from its registers (native/unwind.c), signal frames included; a frame that
cannot be unwound makes the stack unreliable, which counts as busy.  A busy
stop lets the threads go and is tried again every :data:`RETRY_INTERVAL`
seconds until the patch's ``transition_timeout``; then
:class:`~hotpatch.TransitionError` names the thread, the code and the frame,
and nothing is written.  Meanwhile ``patch.transition`` is True, and the
tree and other queries read the state without waiting for the transition.

``force=True`` (the kernel's ``force``) writes even though a stack holds
code of the patch: the patch is marked ``forced``, and a WARNING on the
``hotpatch`` logger names what was overridden.  Threads inside the bytes
being replaced still hold the write: that is never safe.

The stack model needs the ptrace stopper (only ptrace reads every thread's
registers without its cooperation); under the signal stop it is refused
with a TransitionError that says why.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from . import _locks, _procfs, sites, symbols
from . import patch as stacks
from ._native import ffi, lib
from .errors import TransitionError, UnsafeToPatch

if TYPE_CHECKING:
    from .core import Func, Patch

log = logging.getLogger("hotpatch")

#: Seconds the threads run between two stops of a transition.
RETRY_INTERVAL = 0.01

#: The default of ``Patch(transition_timeout=...)``, in seconds.
DEFAULT_TIMEOUT = 2.0


@dataclass(frozen=True)
class CodeRange:
    """Code that no thread may be running when the patch switches."""

    lo: int
    hi: int
    what: str       # for messages: "libfoo.so: bar (the old function)"


def _function_at(address: int) -> tuple[int, int] | None:
    """[start, end) of the sized function symbol holding ``address`` in a
    loaded object, or None (a Python callable's callback, a JIT)."""
    for obj in symbols.loaded_objects():
        if any(lo <= address < hi for lo, hi in obj.exec_ranges):
            found = symbols.containing_function(obj, address - obj.base)
            if found is None:
                return None
            _, start, size = found
            return obj.base + start, obj.base + start + size
    return None


def _new_code(func: "Func") -> CodeRange | None:
    span = _function_at(func.new_addr)
    if span is None:
        return None
    return CodeRange(*span, f"{func.object.label}: {func.old_name}: the new code of patch "
                            f"{func.object.patch.name!r}")


def code_ranges(push: Iterable["Func"], pop: Iterable["Func"]) -> list[CodeRange]:
    """What a switch pushing ``push`` and popping ``pop`` takes away from
    running threads: each replaced function's old code and the new code now
    on top of its stack, and the new code of every popped func.  New code
    without a sized symbol (a Python callable) cannot be checked and is left
    out."""
    ranges: list[CodeRange] = []
    for func in push:
        if not func.old_size:
            raise UnsafeToPatch(f"{func.object.label}: {func.old_name}: consistency=\"stack\" "
                                f"needs the function's size, and its symbol has none")
        ranges.append(CodeRange(func.old_addr, func.old_addr + func.old_size,
                                f"{func.object.label}: {func.old_name} (the old function)"))
        stack = stacks.stack_of(func.old_addr)
        if stack is not None and stack.top is not None:
            ranges.append(_new_code(stack.top))
    ranges += [_new_code(func) for func in pop]
    unique = {}
    for r in ranges:
        if r is not None:
            unique.setdefault((r.lo, r.hi), r)
    return list(unique.values())


def _thread_name(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return "exited"


def _where(pc: int) -> str:
    """``name+0x12 (0x7f...) in libfoo.so`` for a code address."""
    for obj in symbols.loaded_objects():
        if any(lo <= pc < hi for lo, hi in obj.exec_ranges):
            return f"{symbols.describe_address(obj, pc)} in {obj}"
    return f"{pc:#x}"


class StackTransition:
    """One enable or disable of ``patch`` under the stack model: a batch
    written (by :mod:`hotpatch.sites`) only when no stack holds ``ranges``."""

    def __init__(self, patch: "Patch", ranges: list[CodeRange], force: bool = False):
        self.patch = patch
        self.ranges = ranges
        self.force = force
        self.overridden: str | None = None     # what force went past

    def describe(self, hit) -> str:
        """What a busy stop found, as a sentence."""
        tid = hit.tid
        who = f"thread {tid} ({_thread_name(tid)})"
        if hit.inside:
            return f"{who} stayed inside the bytes being replaced (pc {hit.pc:#x})"
        if hit.unreliable:
            at = f", pc {_where(hit.pc)}" if hit.pc else ""
            return (f"the stack of {who} could not be unwound reliably: the walk stopped at "
                    f"frame #{hit.frame}{at} (no unwind information there, or a bad stack)")
        return (f"{who} has {self.ranges[hit.range].what} on its stack: frame #{hit.frame}, "
                f"pc {_where(hit.pc)}")

    def write(self, batch, count: int, stores: list[tuple[object, int]]) -> None:
        """Write ``count`` entries of ``batch`` (``struct hp_write[]``) and make
        ``stores`` (``(uint64_t *, value)``) in one stop where no stack holds
        the patch's code, retrying until the patch's transition_timeout."""
        ranges = ffi.new("struct hp_code_range[]", max(len(self.ranges), 1))
        for c, r in zip(ranges, self.ranges):
            c.lo, c.hi = r.lo, r.hi
        slots = ffi.new("struct hp_store[]", max(len(stores), 1))
        for s, (slot, value) in zip(slots, stores):
            s.slot, s.value = slot, value
        hit, err = ffi.new("struct hp_stack_hit *"), ffi.new("char[256]")
        timeout = self.patch.transition_timeout
        deadline = time.monotonic() + timeout
        tries = 0
        self.patch._transition = True
        try:
            with _locks.open_to_queries():
                while True:
                    tries += 1
                    rc = lib.hp_write_batch_stack(batch, count, slots, len(stores), ranges,
                                                  len(self.ranges), self.force,
                                                  sites.STOP_TIMEOUT_MS, hit, err)
                    if rc == 0:
                        break
                    if rc < 0:
                        raise TransitionError(ffi.string(err).decode() +
                                              _procfs.exited_main_thread_note())
                    if time.monotonic() >= deadline:
                        raise TransitionError(
                            f"{self.describe(hit)}; the stacks were checked for {timeout:g} s "
                            f"({tries} tries): nothing was written")
                    time.sleep(RETRY_INTERVAL)
        finally:
            self.patch._transition = False
        if self.force and hit.tid:
            self.overridden = self.describe(hit)
