"""PLT slots of patched functions: calls through the PLT at zero added cost.

An object calls a function of another object (or an interposable one of its
own) through its PLT: ``call f@plt`` → ``jmp *slot(%rip)``, the slot being a
GOT entry that the dynamic linker filled from an ``R_X86_64_JUMP_SLOT``
relocation with ``f``'s address.  Once ``f`` is patched that address is the
redirected entry, so each such call takes one more ``jmp``.  Here the slots
that hold exactly ``f``'s entry are pointed at the new code itself, and the
call costs what it did before the patch.

What is and is not touched:

- Only ``JUMP_SLOT`` slots: they are read by PLT entries and nothing else.
  ``GLOB_DAT`` and ``R_X86_64_64`` slots hold function pointers that a program
  may compare with ``f`` (``&f == p``); they keep the entry.
- Only slots holding the entry: a lazily bound slot that still points into
  its own PLT is left alone.  When the dynamic linker binds it later it
  stores the entry, which jumps to the new code: calls are right, one
  ``jmp`` dearer, until the next :func:`settle` (every enable and disable)
  finds the slot and points it at the new code.
- A slot gets the new code itself, not the func's thunk: PLT callers cannot
  have relied on more than the ABI (see :mod:`hotpatch.thunks`).  A site in
  the call form (observers) keeps its slots at the entry, so that the
  observers see those calls too.
- Every loaded object counts, the one defining ``f`` included: its own PLT
  calls to ``f`` (a default-visibility function called from its own library)
  go through the entry like anyone's.

How slots change (``hotpatch/patch.py`` calls these under the lifecycle
lock): before a batch of entry writes, :func:`park` sets every recorded slot
of the functions whose stack changes back to the entry, which is right
whatever the entry does; after the batch, successful or not, :func:`settle`
points every slot holding the entry of a patched function at that
function's current target.  So at every moment a PLT call runs the function
as its entry would.  Each store is a compare-and-swap: a slot that no longer
holds what hotpatch put there is left alone and logged.  The stores are
``hp_store_got_slots`` (``native/gotslot.c``): no stop is needed for an
aligned 8-byte store; see there for why not through ``/proc/self/mem``.

The slots are found in the mapped images, by ``hp_find_jump_slots``: one
pass of ``dl_iterate_phdr`` over every object's ``DT_JMPREL`` table (the
relocations the dynamic linker applied), comparing each JUMP_SLOT slot's
value with the patched entries.  No file is read and nothing is cached: a
whole process (35 objects, 4300 slots here) takes about 40 us, less than
reading the slots' names would, and a value match also finds slots bound
through an alias, a versioned name or an IFUNC.

Objects loaded or unloaded later (COMING / GOING, ``hotpatch/loader.py``):
:func:`redirect_object` and :func:`forget_object`.  glibc announces a new
object (``RT_CONSISTENT``) before relocating it, so its slots are bound only
after the COMING notification: :func:`redirect_object` does something only
once the object is relocated.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

from . import objects, symbols
from ._locks import OperationLock
from ._native import ffi, lib
from .errors import HotpatchError

_log = logging.getLogger("hotpatch")


def _refused(what: str) -> HotpatchError:
    return HotpatchError(f"{what}: hotpatch is already changing PLT slots in this thread "
                         f"(called from a signal handler or a callback in the middle of it); "
                         f"retry after it returns")


# Between the code writes (sites, 1) and the list of loaded objects (symbols, 2).
_lock = OperationLock(1.5, _refused)


@dataclass(frozen=True)
class _Slot:
    """One JUMP_SLOT slot of a loaded object."""

    address: int
    phdr_address: int     # its object's identity for dl_iterate_phdr
    base: int             # its object's load bias
    name: str             # the symbol it is relocated against

    def __str__(self) -> str:
        obj = next((o for o in symbols.loaded_objects() if o.base == self.base), None)
        return f"{obj or hex(self.base)}: PLT slot of {self.name} at {self.address:#x}"


#: function entry -> where its PLT slots go now (only functions whose slots
#: are redirected: patched, and not in the call form)
_targets: dict[int, int] = {}
#: function entry -> {slot: the value hotpatch stored there}
_records: dict[int, dict[_Slot, int]] = {}


def _find(values: Iterable[int], only: int = 0) -> list[tuple[_Slot, int]]:
    """``(slot, value)`` for every JUMP_SLOT slot of the loaded objects (or of
    the one whose program headers are at ``only``) holding one of ``values``."""
    values = sorted(set(values))
    if not values:
        return []
    wanted = ffi.new("uint64_t[]", values)
    capacity = 64
    while True:
        out = ffi.new("struct hp_jump_slot[]", capacity)
        count = lib.hp_find_jump_slots(wanted, len(values), only, out, capacity)
        if count <= capacity:
            break
        capacity = count
    return [(_Slot(o.slot, o.phdr_address, o.base, ffi.string(o.name).decode(errors="replace")),
             o.value) for o in out[0:count]]


# ---------------------------------------------------------------------------
# Stores


@dataclass
class _Store:
    entry: int            # the function
    slot: _Slot
    expected: int
    value: int


def _store(stores: list[_Store]) -> list[tuple[_Store, int, int]]:
    """Compare-and-swap every store; ``(store, result, found)`` for each."""
    if not stores:
        return []
    batch = ffi.new("struct hp_got_store[]", len(stores))
    for c, s in zip(batch, stores):
        c.slot, c.phdr_address = s.slot.address, s.slot.phdr_address
        c.expected, c.value = s.expected, s.value
    lib.hp_store_got_slots(batch, len(stores))
    return [(s, c.result, c.found) for s, c in zip(stores, batch)]


def _forget(entry: int, slot: _Slot) -> None:
    records = _records.get(entry)
    if records is not None:
        records.pop(slot, None)
        if not records:
            del _records[entry]


def _errno_text(result: int) -> str:
    return os.strerror(-result)


# ---------------------------------------------------------------------------
# The operations


def park(entries: Iterable[int]) -> None:
    """Point every recorded slot of the functions at ``entries`` back at the
    function's entry (before the entries are rewritten).  A slot someone
    else changed, or whose object is gone, is forgotten.  Raises
    HotpatchError if a slot cannot be written: the caller must then
    :func:`settle` to point the parked ones at their targets again."""
    with _lock.operation("park PLT slots"):
        stores = [_Store(entry, slot, value, entry)
                  for entry in entries for slot, value in _records.get(entry, {}).items()]
        failed = []
        for s, result, found in _store(stores):
            if result == lib.HP_GOT_CHANGED:
                _log.warning("%s holds %#x, not %#x as hotpatch left it: someone else changed "
                             "it; left alone", s.slot, found, s.expected)
            elif result < 0:
                failed.append(f"{s.slot}: {_errno_text(result)}")
                continue
            _forget(s.entry, s.slot)
        if failed:
            raise HotpatchError("cannot point PLT slots back at the patched function: "
                                + "; ".join(failed))


def settle(targets: Mapping[int, int | None] | None = None) -> None:
    """Record the new slot target of each function entry in ``targets``
    (None: its slots are no longer redirected), then point every JUMP_SLOT
    slot of every loaded object that holds the entry of a redirected
    function at its target.  A slot that cannot be written keeps the entry,
    which is right, only dearer: logged, never an error."""
    with _lock.operation("redirect PLT slots"):
        for entry, target in (targets or {}).items():
            if target is None:
                _targets.pop(entry, None)
            else:
                _targets[entry] = target
        _redirect()


def _redirect(only: int = 0) -> None:
    stores = [_Store(entry, slot, entry, _targets[entry]) for slot, entry in _find(_targets, only)]
    for s, result, found in _store(stores):
        if result == lib.HP_GOT_STORED:
            _records.setdefault(s.entry, {})[s.slot] = s.value
        elif result < 0:
            _log.warning("%s: cannot point it at the new code (%s); calls keep going "
                         "through the patched entry", s.slot, _errno_text(result))


def _phdr_address(obj: symbols.LoadedObject) -> int | None:
    """Where ``obj``'s program headers are mapped: its identity for dl_iterate_phdr."""
    for entry in objects.loaded_entries():
        if entry.base == obj.base and (os.fsdecode(ffi.string(entry.name)) or None) == obj.name:
            return entry.phdr_address
    return None


def redirect_object(obj: symbols.LoadedObject) -> None:
    """COMING: point the slots of ``obj`` that hold the entry of a patched
    function at its new code.  Only once ``obj`` is relocated: glibc sends
    the load's ``RT_CONSISTENT`` notification before it binds the new
    object's slots, so called from there this finds nothing."""
    with _lock.operation(f"redirect the PLT slots of {obj}"):
        phdr = _phdr_address(obj)
        if phdr is not None:
            _redirect(phdr)


def forget_object(obj: symbols.LoadedObject) -> None:
    """GOING: forget ``obj``'s slots and the slots bound to its functions,
    writing nothing (its memory may be gone)."""
    with _lock.operation(f"forget the PLT slots of {obj}"):
        for entry in list(_records):
            inside = objects.inside(obj.exec_ranges, entry)
            for slot in list(_records[entry]):
                if inside or slot.base == obj.base:
                    _forget(entry, slot)
        for entry in list(_targets):
            if objects.inside(obj.exec_ranges, entry):
                del _targets[entry]


def redirected(entry: int) -> list[tuple[int, int, int]]:
    """``(object base, slot address, value)`` for each slot bound to
    ``entry`` that hotpatch redirected."""
    with _lock.query():
        return [(slot.base, slot.address, value)
                for slot, value in _records.get(entry, {}).items()]


def target_of(entry: int) -> int | None:
    """Where the slots bound to ``entry`` go now (None: they keep the entry)."""
    return _targets.get(entry)
