"""Symbol resolution: the kallsyms of hotpatch.

The loaded objects come from :mod:`hotpatch.objects` (what is mapped), their
function symbols from :mod:`hotpatch.elf` (what the file says).  This module
joins the two into the answers callers use: the address of a function, of an
offset, of an IFUNC's bound implementation, the branches that land in a
range, the ftrace entry sites.

Two rules keep addresses right:

* the file must still be the image that is mapped (same build-id; without
  build-ids, the same inode): a library upgraded under a running process is
  refused, never resolved against;
* an address handed out lies in an executable segment of its object, and an
  ``STT_GNU_IFUNC`` symbol resolves to the implementation the process bound,
  not to its resolver.

Symbols are counted as kallsyms counts them: ``sympos`` is the 1-based
position among same-named function symbols in symbol-table order.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib          # at import: messages may be made in the loader's handling (loader.py)
import os
import re
import struct
import threading
from dataclasses import dataclass

from hotpatch import elf, objects
from hotpatch._native import ffi, lib
from hotpatch.elf import debug_dirs, set_debug_dirs
from hotpatch.objects import LoadedObject, find_object, loaded_objects
from hotpatch.x86_64 import clobbers
from hotpatch.x86_64.xrefs import BranchIndex, could_branch_into, index_branches
from hotpatch.errors import (
    AmbiguousSymbol,
    HotpatchError,
    SymbolNotFound,
    UnsafeToPatch,
)

__all__ = [
    "LoadedObject",
    "Symbol",
    "loaded_objects",
    "find_object",
    "resolve",
    "resolve_offset",
    "functions",
    "fentry_sites",
    "fentry_targets",
    "set_debug_dirs",
    "debug_dirs",
    "cache_clear",
    "describe_address",
    "branched_to",
    "containing_function",
    "function_before",
    "function_before_of",
    "FunctionBefore",
    "resolve_any",
    "branches_into",
    "branch_index_of",
    "BranchIndexOf",
]

RTLD_LAZY, RTLD_NOLOAD = 0x1, 0x4

_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_JMP_RIP = re.compile(rb"\xff\x25")  # jmp *disp32(%rip): a PLT entry

# The direct branches of each loaded object, found on demand (see x86_64.xrefs).
_branch_indexes: dict[LoadedObject, BranchIndex] = {}
# How many times small batches scanned each object's code (BranchIndexOf).
_branch_scans: dict[LoadedObject, int] = {}
# The function starts of each loaded object, for the C core (FunctionBefore).
_function_befores: dict[LoadedObject, "FunctionBefore"] = {}


def cache_clear() -> None:
    """Forget every symbol table read: the next lookup reads the files again."""
    elf.cache_clear()
    _branch_indexes.clear()
    _branch_scans.clear()
    _function_befores.clear()


def forget(obj: LoadedObject) -> None:
    """Forget what was read and checked about ``obj``: it was unloaded (an
    object loaded at its place later is read afresh)."""
    elf.forget(obj)
    _branch_indexes.pop(obj, None)
    _branch_scans.pop(obj, None)
    _function_befores.pop(obj, None)


class NotBoundYet(UnsafeToPatch):
    """An IFUNC of an object still being loaded: its slot is filled when the
    object is relocated, after the dynamic linker's notification."""


# Set while resolving inside the dynamic linker's notification: nothing may
# call dlopen/dlsym then (its lock is held, and the object is not relocated).
_no_dynamic_linker = threading.local()


@contextlib.contextmanager
def no_dynamic_linker():
    """Resolve without calling into the dynamic linker: an IFUNC whose slot
    is not bound yet raises :class:`NotBoundYet` instead of running dlsym."""
    before = getattr(_no_dynamic_linker, "on", False)
    _no_dynamic_linker.on = True
    try:
        yield
    finally:
        _no_dynamic_linker.on = before


# --------------------------------------------------------------------------
# Symbols
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Symbol:
    """One function of a loaded object, at its address in this process."""

    name: str
    #: 1-based among same-named function symbols of the object, in
    #: symbol-table order (.symtab when present, else .dynsym); 0 for a
    #: place that is not the start of a symbol
    sympos: int
    #: absolute (for an IFUNC: the bound implementation)
    address: int
    #: relative to the load base
    offset: int
    size: int | None
    #: the resolver's address when ``name`` is an IFUNC
    ifunc_resolver: int | None = None
    #: "@@VER" (default) or "@VER" for a versioned .dynsym symbol
    version: str | None = None
    #: local binding or hidden visibility (see elf.FuncSym.local)
    local: bool = False


# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------

def resolve(obj: LoadedObject, name: str, sympos: int = 0) -> Symbol:
    """The function ``name`` of ``obj`` (``sympos`` picks among same-named ones).

    ``name`` may carry a symbol version (``memcpy@@GLIBC_2.14``) where the
    symbols come from ``.dynsym``.  With ``sympos`` 0, same-named symbols
    that all start at one address are not ambiguous.  An IFUNC resolves to
    the implementation bound in this process.  This may call ``dlopen`` /
    ``dlsym``: never call it from objects.inside the dynamic linker.
    """
    table = elf.table_of(obj, f"symbol '{name}'")
    bare, at, version = name.partition("@")
    candidates = table.named(bare)
    if at:
        candidates = [c for c in candidates
                      if c.version and c.version.lstrip("@") == version.lstrip("@")]
    if not candidates:
        raise SymbolNotFound(_not_found_message(obj, table, name))
    if sympos:
        chosen = next((c for c in candidates if c.sympos == sympos), None)
        if chosen is None:
            raise SymbolNotFound(
                f"{obj}: symbol '{name}' has no sympos {sympos}: "
                f"{_describe_candidates(obj, candidates)}")
    elif len({c.value for c in candidates}) > 1:
        raise AmbiguousSymbol(
            f"{obj}: symbol '{name}' is ambiguous: {len(candidates)} function "
            f"symbols have this name; pick one with old_sympos: "
            f"{_describe_candidates(obj, candidates)}")
    else:
        chosen = candidates[0]
    return _symbol(obj, table, chosen)


def _describe_candidates(obj: LoadedObject, candidates) -> str:
    return "; ".join(
        f"sympos {c.sympos}{f' ({c.name}{c.version})' if c.version else ''} "
        f"at {obj.base + c.value:#x} (offset {c.value:#x}, size {c.size or 'unknown'}"
        f"{', IFUNC' if c.ifunc else ''})"
        for c in candidates)


def _not_found_message(obj: LoadedObject, table: elf.SymbolTable, name: str) -> str:
    bare = name.partition("@")[0]
    clones = [n for n in table.by_name
              if n.startswith(bare + ".") and elf.CLONE_SUFFIX.match(n, len(bare))]
    close = [n for n in difflib.get_close_matches(bare, table.by_name, n=5, cutoff=0.8)
             if n not in clones]
    message = f"{obj}: symbol '{name}' not found"
    if clones or close:
        message += "; close names: " + ", ".join(
            [f"{n} (a compiler clone)" for n in sorted(clones)] + close)
    if table.stripped:
        message += (
            f"; {obj.path} has no .symtab and no separate debug file was found "
            f"(by build-id or .gnu_debuglink, under {':'.join(elf.debug_dirs())}), so "
            f"only its exported functions are visible: install its debug file "
            f"or use old_offset")
    return message


def _symbol(obj: LoadedObject, table: elf.SymbolTable, entry: elf.FuncSym) -> Symbol:
    if entry.ifunc:
        return _bound_ifunc(obj, table, entry)
    address = obj.base + entry.value
    _check_code(obj, address, f"symbol '{entry.name}'")
    return Symbol(entry.name, entry.sympos, address, entry.value, entry.size,
                  version=entry.version, local=entry.local)


def _check_code(obj: LoadedObject, address: int, what: str) -> None:
    if not objects.inside(obj.exec_ranges, address):
        segments = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in obj.exec_ranges) or "none"
        raise UnsafeToPatch(
            f"{obj}: {what} at {address:#x} is not code: it lies outside the "
            f"executable segments of {obj} ({segments})")


def _bound_ifunc(obj: LoadedObject, table: elf.SymbolTable, entry: elf.FuncSym) -> Symbol:
    """The implementation an IFUNC's resolver chose for this process.

    First the object's own R_X86_64_IRELATIVE slot for this resolver (what
    its calls use, read without running anything), else ``dlsym``, which
    runs the resolver as the dynamic linker does.
    """
    resolver = obj.base + entry.value
    slot = table.irelative.get(entry.value)
    bound = struct.unpack("<Q", objects.read_memory(obj.base + slot, 8))[0] if slot is not None else None
    if getattr(_no_dynamic_linker, "on", False) and not (bound and objects.inside(obj.exec_ranges, bound)):
        raise NotBoundYet(
            f"{obj}: symbol '{entry.name}' is an IFUNC whose implementation is bound only "
            f"when {obj} is relocated, after the dynamic linker's notification")
    if not bound and entry.exported:
        bound = _dlsym_in(obj, entry)
    if not bound or not objects.inside(obj.exec_ranges, bound):
        where = (f"it is bound to {bound:#x}, outside {obj}" if bound else
                 "no IRELATIVE slot and no dlsym result")
        raise UnsafeToPatch(
            f"{obj}: symbol '{entry.name}' is an IFUNC (STT_GNU_IFUNC): the "
            f"symbol is its resolver at {resolver:#x}, not the function, and the "
            f"implementation this process bound cannot be determined ({where}); "
            f"patch the implementation by its own name or with old_offset")
    offset = bound - obj.base
    implementation = table.function_at(offset)
    size = implementation.size if implementation and implementation.value == offset else None
    return Symbol(entry.name, entry.sympos, bound, offset, size,
                  ifunc_resolver=resolver, version=entry.version)


_dlopen = objects.libc_function("dlopen", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int)
_dlsym = objects.libc_function("dlsym", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
_dlvsym = objects.libc_function("dlvsym", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                 ctypes.c_char_p)
_dlclose = objects.libc_function("dlclose", ctypes.c_int, ctypes.c_void_p)


def _dlsym_in(obj: LoadedObject, entry: elf.FuncSym) -> int | None:
    """``dlsym`` of ``entry`` through a handle on the already loaded ``obj``."""
    if obj.name is None:
        handle = _dlopen(None, RTLD_LAZY)
    else:
        # RTLD_NOLOAD: only a reference to the loaded object, never a load;
        # closed again so the object can still be unloaded.
        handle = _dlopen(os.fsencode(obj.name), RTLD_LAZY | RTLD_NOLOAD)
    if not handle:
        return None
    try:
        symbol = entry.name.encode()
        if entry.version:
            return _dlvsym(handle, symbol, entry.version.lstrip("@").encode())
        return _dlsym(handle, symbol)
    finally:
        _dlclose(handle)


def resolve_offset(obj: LoadedObject, offset: int) -> Symbol:
    """The place at ``offset`` from ``obj``'s load base (``old_offset``).

    Named after the symbol starting there, else ``name+0x10`` objects.inside a
    symbol (size: the bytes left in it), else ``<offset 0x1234>``.  Outside
    an executable segment it is UnsafeToPatch ("not code").
    """
    what = f"offset {offset:#x}"
    address = obj.base + offset
    _check_code(obj, address, what)
    entry = elf.table_of(obj, what).function_at(offset)
    if entry is None:
        return Symbol(f"<offset {offset:#x}>", 0, address, offset, None)
    delta = offset - entry.value
    if delta == 0:
        return Symbol(entry.name, entry.sympos, address, offset, entry.size,
                      version=entry.version, local=entry.local)
    return Symbol(f"{entry.name}+{delta:#x}", 0, address, offset, entry.size - delta)


def callee_extent(obj: LoadedObject, address: int):
    """For :mod:`hotpatch.x86_64.clobbers`: what a call or jump of ``obj`` to
    ``address`` reaches: ``(start, size)`` of the sized function holding it,
    ``clobbers.ALL`` outside ``obj`` or in its PLT (gcc assumes nothing of
    those), None when unknown."""
    offset = address - obj.base
    table = elf.table_of(obj, f"the call target {address:#x}")
    if not objects.inside(obj.exec_ranges, address) or any(
            lo <= offset < lo + size for lo, size in table.plt_sections):
        return clobbers.ALL
    entry = table.function_at(offset)
    if entry is None or not entry.size:
        return None
    return obj.base + entry.value, entry.size




def resolve_any(obj: LoadedObject, name: str, sympos: int = 0) -> int:
    """The address of the function or data symbol ``name`` of ``obj``, static
    ones included (a klp relocation's target); ``sympos`` as for
    :func:`resolve`."""
    try:
        return resolve(obj, name, sympos).address
    except SymbolNotFound:
        candidates = elf.data_symbols(obj).get(name)
        if not candidates:
            raise
    if sympos:
        if sympos > len(candidates):
            raise SymbolNotFound(f"{obj}: data symbol '{name}' has no sympos {sympos}: "
                                 f"there are {len(candidates)}")
        return obj.base + candidates[sympos - 1][0]
    if len({offset for offset, _ in candidates}) > 1:
        raise AmbiguousSymbol(f"{obj}: data symbol '{name}' is ambiguous: " + "; ".join(
            f"sympos {i} at offset {offset:#x}" for i, (offset, _) in enumerate(candidates, 1)))
    return obj.base + candidates[0][0]


def containing_function(obj: LoadedObject, offset: int) -> tuple[str, int, int] | None:
    """``(name, start offset, size)`` of the sized function symbol holding
    ``offset``, or None where no sized symbol does."""
    entry = elf.table_of(obj, f"offset {offset:#x}").function_at(offset)
    if entry is None or not entry.size:
        return None
    return entry.name, entry.value, entry.size


class FunctionBefore:
    """:func:`function_before` of one object, as ``sites.prepare_batch`` and
    ``sites.redirect`` take it (a callable), with the same index in C
    memory (``native``: a ``struct hp_function_starts *``, built on first
    use, kept with the arrays it points to) for the C core to look the
    function before up itself, only for the entries whose hot-patch point
    needs a sweep from it (native/hop.c): a Python lookup for every entry
    asked about cost a first redirect 3-4 µs, a 1,000-site search 3 ms."""

    __slots__ = ("_obj", "_native", "_arrays")

    def __init__(self, obj: LoadedObject) -> None:
        self._obj = obj
        self._native = None
        self._arrays = None

    def __call__(self, address: int) -> int | None:
        return function_before(self._obj, address)

    @property
    def native(self):
        """The index for the C core; NULL where the object's symbol table
        cannot be read (no point then where only a sweep shows one, as
        without a function before: the entry's write takes the stop)."""
        if self._native is None:
            try:
                self._build(elf.table_of(self._obj, "the functions before entries"))
            except HotpatchError:
                self._native = ffi.NULL
        return self._native

    def _build(self, table: elf.SymbolTable) -> None:
        starts, sized_from, sized_to = table.start_index()
        self._arrays = [ffi.new("uint64_t[]", values or [0])
                        for values in (starts, sized_from, sized_to)]
        self._native = ffi.new("struct hp_function_starts *", {
            "base": self._obj.base, "starts": self._arrays[0], "nstarts": len(starts),
            "sized_from": self._arrays[1], "sized_to": self._arrays[2],
            "nsized": len(sized_from)})


def function_before_of(obj: LoadedObject) -> FunctionBefore:
    """The :class:`FunctionBefore` of ``obj``, made once (its index is
    built once)."""
    found = _function_befores.get(obj)
    if found is None:
        found = _function_befores[obj] = FunctionBefore(obj)
    return found


def function_before(obj: LoadedObject, address: int) -> int | None:
    """The start of the function symbol holding ``address``, else of the
    last one starting before it; None where none does.  Answered by the C
    core from :class:`FunctionBefore`'s index, the one its hot-patch point
    search asks."""
    table = elf.table_of(obj, f"the function before {address:#x}")
    found = function_before_of(obj)
    if not found._native:           # not built yet, or not when the table was unreadable
        found._build(table)
    return lib.hp_function_before(found._native, address) or None


def functions(obj: LoadedObject) -> list[Symbol]:
    """The patchable functions of ``obj`` by address (``hotpatch symbols``).

    IFUNCs appear at their bound implementation; an IFUNC whose
    implementation cannot be found, or a symbol outside code, is not
    patchable and is left out.
    """
    table = elf.table_of(obj, "its function listing")
    listing = []
    for entry in table.funcs:
        try:
            listing.append(_symbol(obj, table, entry))
        except UnsafeToPatch:
            continue
    listing.sort(key=lambda s: (s.address, s.name))
    return listing


def branched_to(obj: LoadedObject, address: int) -> bool:
    """Whether any direct branch (a call, a tail jump) of ``obj`` goes to
    ``address``: callers objects.inside the object, which the compiler may have
    bound to this very code (no PLT), so may rely on more than the ABI."""
    # Only whether: the branches found are not decoded again for their text
    # (capstone through Python, ~15 us each, per function of a big patch).
    # No bytes that could encode such a branch: no index to build (the
    # first patch of an exported function nothing in its object calls).
    if obj not in _branch_indexes and not could_branch_into(obj.exec_ranges,
                                                            [(address, address + 1)]):
        return False
    return _branch_index(obj, address).any_into(address, address + 1)


def describe_address(obj: LoadedObject, address: int) -> str:
    """``name+0x12 (0x7f...)`` for an address of ``obj``: the function
    symbol holding it (or the last before it) where there is one, else its
    offset in ``obj``."""
    offset = address - obj.base
    try:
        entry = elf.table_of(obj, f"the address {address:#x}").function_before(offset)
    except HotpatchError:
        entry = None
    if entry is None:
        return f"{obj}+{offset:#x} ({address:#x})"
    delta = offset - entry.value
    return f"{entry.name}{f'+{delta:#x}' if delta else ''} ({address:#x})"


def branches_into(obj: LoadedObject, lo: int, hi: int) -> list[tuple[int, str, int]]:
    """``(source, description, target)`` of every direct branch of ``obj``
    landing in [lo, hi).  The object's code is copied and prefiltered once
    (about a millisecond a megabyte), each function decoded when a query
    first needs it, and the index kept for the object's life."""
    return [(source, f"{describe_address(obj, source)}: {text}", target)
            for source, text, target in _branch_index(obj, lo).into(lo, hi)]


def branch_index(obj: LoadedObject):
    """The index of the direct branches of ``obj`` (see :func:`branches_into`),
    built on first need and kept."""
    return _branch_index(obj, obj.base)


#: Small batches of an object scan its code for bytes that could branch into
#: their entries (sites.prepare_batch) this many times; the next builds its
#: branch index instead, which costs about three scans and is kept.
SCANS_BEFORE_INDEX = 3


class BranchIndexOf:
    """:func:`branch_index` of one object as ``sites.prepare_batch`` takes it
    (a callable), with the choice a small batch makes before it: a scan of
    the object's code, or the index (:meth:`worth_a_scan`)."""

    __slots__ = ("_obj",)

    def __init__(self, obj: LoadedObject) -> None:
        self._obj = obj

    def __call__(self) -> BranchIndex:
        return branch_index(self._obj)

    def worth_a_scan(self) -> bool:
        """Whether a small batch should scan the object's code (counted)
        rather than ask the index: not once the index is built, nor after
        SCANS_BEFORE_INDEX scans, when building it costs less than scanning
        on (a service that patches one function at a time, again and again)."""
        if self._obj in _branch_indexes:
            return False
        scans = _branch_scans.get(self._obj, 0)
        if scans >= SCANS_BEFORE_INDEX:
            return False
        _branch_scans[self._obj] = scans + 1
        return True


def branch_index_of(obj: LoadedObject) -> BranchIndexOf:
    return BranchIndexOf(obj)


def _branch_index(obj: LoadedObject, lo: int):
    index = _branch_indexes.get(obj)
    if index is None:
        starts = {obj.base + start
                  for start in elf.table_of(obj, f"branches into {lo:#x}").functions.starts()}
        index = _branch_indexes[obj] = index_branches(objects.read_memory, obj.exec_ranges,
                                                      sorted(starts))
    return index


# --------------------------------------------------------------------------
# ftrace-style entry sites
# --------------------------------------------------------------------------

def fentry_sites(obj: LoadedObject) -> frozenset[int]:
    """Entry sites listed in ``__mcount_loc`` / ``__patchable_function_entries``.

    Read from the mapped image, where the dynamic linker has relocated the
    entries to absolute addresses; entries outside code (functions the
    linker discarded) are dropped.
    """
    table = elf.table_of(obj, "its fentry sites")
    sites = set()
    for offset, size in table.site_sections:
        raw = objects.read_memory(obj.base + offset, size & ~7)
        sites.update(a for (a,) in struct.iter_unpack("<Q", raw)
                     if objects.inside(obj.exec_ranges, a))
    return frozenset(sites)


def fentry_targets(obj: LoadedObject) -> frozenset[int]:
    """Addresses a ``call`` at a function entry of ``obj`` may target as an ftrace hook.

    The GOT slots ``obj`` uses for ``__fentry__`` / ``mcount`` (for
    ``call *__fentry__@GOTPCREL(%rip)``), what those slots are bound to,
    ``obj``'s own definitions of them, and its PLT entries that jump
    through those slots (for ``call __fentry__@PLT``).
    """
    table = elf.table_of(obj, "its fentry call targets")
    base = obj.base
    plt = [(base + offset, base + offset + size) for offset, size in table.plt_sections]
    slots = {base + offset for offset in table.fentry_slots}
    targets = set(slots)
    for slot in slots:
        bound = struct.unpack("<Q", objects.read_memory(slot, 8))[0]
        # A lazily bound slot still points back into our own PLT.
        if bound and not objects.inside(plt, bound):
            targets.add(bound)
    for name in elf.FENTRY_NAMES:
        targets.update(base + entry.value for entry in table.named(name))
    targets.update(_plt_entries_through(plt, slots))
    return frozenset(targets)


def _plt_entries_through(plt, slots) -> set[int]:
    """Start addresses of the PLT entries whose ``jmp *slot(%rip)`` uses ``slots``."""
    entries = set()
    for lo, hi in plt:
        code = objects.read_memory(lo, hi - lo)
        for match in _JMP_RIP.finditer(code, 0, len(code) - 5):
            at = match.start()
            displacement = struct.unpack_from("<i", code, at + 2)[0]
            if lo + at + 6 + displacement not in slots:
                continue
            if at >= 1 and code[at - 1] == 0xF2:  # bnd jmp
                at -= 1
            if at >= 4 and code[at - 4:at] == _ENDBR64:
                at -= 4
            entries.add(lo + at)
    return entries
