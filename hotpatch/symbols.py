"""Loaded objects and their ELF symbol tables: the kallsyms of hotpatch.

A *loaded object* is what ``dl_iterate_phdr`` reports: the main program
(object ``None``) and every shared object, described from its mapped image
(load base, executable segments, DT_SONAME, build-id).  Its functions come
from the symbol tables of the file it was loaded from, read with lief once
per file: ``.symtab`` when the file has one, else a separate debug file found
by build-id or ``.gnu_debuglink``, else ``.dynsym`` (exported functions only).

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

import bisect
import contextlib
import ctypes
import difflib
import os
import re
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import lief

from hotpatch import _procfs
from hotpatch._locks import OperationLock
from hotpatch._native import ffi, lib
from hotpatch.x86_64 import clobbers
from hotpatch.x86_64.xrefs import BranchIndex, index_branches
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
    "resolve_any",
    "branches_into",
]

PT_LOAD, PT_DYNAMIC, PT_NOTE = 1, 2, 4
PF_X = 1
DT_NULL, DT_STRTAB, DT_SONAME = 0, 5, 14
NT_GNU_BUILD_ID = 3
AT_SYSINFO_EHDR = 33
RTLD_LAZY, RTLD_NOLOAD = 0x1, 0x4
VERSYM_HIDDEN = 0x8000

_FUNC = lief.ELF.Symbol.TYPE.FUNC
_IFUNC = lief.ELF.Symbol.TYPE.GNU_IFUNC
_EXPORTED_BINDINGS = {lief.ELF.Symbol.BINDING.GLOBAL, lief.ELF.Symbol.BINDING.WEAK,
                      lief.ELF.Symbol.BINDING.GNU_UNIQUE}
_EXPORTED_VISIBILITIES = {lief.ELF.Symbol.VISIBILITY.DEFAULT,
                          lief.ELF.Symbol.VISIBILITY.PROTECTED}
_R = lief.ELF.Relocation.TYPE
_SLOT_RELOCATIONS = {_R.X86_64_GLOB_DAT, _R.X86_64_JUMP_SLOT, _R.X86_64_64}

#: The ftrace hooks a ``-pg`` build calls at function entry.
_FENTRY_NAMES = ("__fentry__", "mcount", "_mcount")
#: Sections that list patchable entry sites (ftrace's available_filter_functions).
_SITE_SECTIONS = ("__mcount_loc", "__patchable_function_entries")
_PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")
_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_JMP_RIP = re.compile(rb"\xff\x25")  # jmp *disp32(%rip): a PLT entry

#: gcc and clang name the copies they make of a function ``foo.<kind>[.N]``.
_CLONE_SUFFIX = re.compile(
    r"\.(?:isra|constprop|part|cold|lto_priv|localalias|specialized|llvm)(?:\.|$)")


# --------------------------------------------------------------------------
# Where separate debug files are searched
# --------------------------------------------------------------------------

def _dirs_from_environment() -> list[str]:
    dirs = [d for d in os.environ.get("HOTPATCH_DEBUG_DIRS", "").split(":") if d]
    return dirs or ["/usr/lib/debug"]


_debug_dirs: list[str] = _dirs_from_environment()


def set_debug_dirs(dirs: list[str]) -> None:
    """Search separate debug files under ``dirs`` (default ``["/usr/lib/debug"]``).

    Each directory is searched as gdb does: ``<dir>/.build-id/ab/cdef….debug``
    and ``<dir>/<directory of the object>/<.gnu_debuglink name>``.  Tables
    read with the old directories are forgotten.
    """
    global _debug_dirs
    _debug_dirs = list(dirs)
    cache_clear()


def debug_dirs() -> list[str]:
    """The directories searched for separate debug files."""
    return list(_debug_dirs)


# --------------------------------------------------------------------------
# Loaded objects, described from their mapped images
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedObject:
    """One ELF object mapped in this process, as the dynamic linker lists it."""

    #: None for the main program, else the path as the dynamic linker has it
    name: str | None
    #: the file (realpath); /proc/thread-self/exe resolved for the main program
    path: str
    basename: str
    soname: str | None
    #: load bias (l_addr): file virtual address + base = address in memory
    base: int
    #: absolute [lo, hi) of the PT_LOAD segments with PF_X
    exec_ranges: tuple[tuple[int, int], ...]
    #: NT_GNU_BUILD_ID read from the mapped image
    build_id: bytes | None
    #: what a relative Object.name may say: the basenames and the soname
    names: frozenset = frozenset()

    def __str__(self) -> str:
        if self.name is None:
            return f"main program {self.basename}"
        return self.basename


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


class MemoryGone(HotpatchError):
    """Memory of a loaded object was unmapped while it was read: another
    thread unloaded the object."""


def _read(address: int, size: int) -> bytes:
    """Bytes of this process's memory, read without faulting: another thread
    may unload the object meanwhile."""
    buffer = ffi.new("char[]", size)
    got = lib.hp_read_memory(address, buffer, size)
    if got != size:
        raise MemoryGone(f"the memory at {address:#x} is no longer mapped "
                         "(its object was unloaded meanwhile?)")
    return ffi.buffer(buffer, size)[:]


def _inside(ranges, address: int, size: int = 1) -> bool:
    # A plain loop: this is on the cached-lookup path, where any() over a
    # generator costs a third of the time.
    for lo, hi in ranges:
        if lo <= address and address + size <= hi:
            return True
    return False


_LIBC = ctypes.CDLL(None)


def _libc_function(name: str, restype, *argtypes):
    function = getattr(_LIBC, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


_VDSO = _libc_function("getauxval", ctypes.c_ulong, ctypes.c_ulong)(AT_SYSINFO_EHDR)


_described: tuple[tuple[int, int] | None, tuple[LoadedObject, ...]] = (None, ())
# Only ever taken as a query: the list is a cache, and a thread that cannot
# wait for it (a signal handler that interrupted the describing) describes
# the objects again without it.
_described_lock = OperationLock(
    2, lambda what: HotpatchError(f"{what}: already listing loaded objects in this thread"))


def _generation() -> tuple[int, int]:
    adds, subs = ffi.new("unsigned long long *"), ffi.new("unsigned long long *")
    lib.hp_loaded_generation(adds, subs)
    return adds[0], subs[0]


def loaded_objects() -> list[LoadedObject]:
    """Every object mapped in the process, in the dynamic linker's order.

    The vdso is left out: it has no file, hence no symbol table to read.
    Describing every object costs about a millisecond, so the list is kept
    until the dynamic linker's load or unload count changes.
    """
    global _described
    # Read before listing: a load in between makes the next call list again.
    generation = _generation()
    with _described_lock.query() as held:
        if not held:
            return _describe_loaded()
        if _described[0] != generation:
            _described = (generation, tuple(_describe_loaded()))
        return list(_described[1])


def _describe_loaded() -> list[LoadedObject]:
    capacity = 64
    while True:
        array = ffi.new("struct hp_loaded_object[]", capacity)
        count = lib.hp_loaded_objects(array, capacity)
        if count <= capacity:
            break
        capacity = count + 16
    objects = []
    for i in range(count):
        entry = array[i]
        # The vdso's program headers follow its ELF header, in its one page.
        if 0 <= entry.phdr_address - _VDSO < 4096:
            continue
        try:
            objects.append(_describe(entry))
        except MemoryGone:
            continue    # unloaded while described: it is gone
    return objects


def _describe(entry) -> LoadedObject:
    name = os.fsdecode(ffi.string(entry.name)) or None
    base = int(entry.base)
    phdrs = [entry.phdr[i] for i in range(entry.phnum)]
    loads = [(base + ph.p_vaddr, base + ph.p_vaddr + ph.p_memsz)
             for ph in phdrs if ph.p_type == PT_LOAD]
    path = os.path.realpath(name) if name else _main_program_path()
    basename = os.path.basename(name or path)
    soname = _mapped_soname(base, phdrs, loads)
    return LoadedObject(
        name=name,
        path=path,
        basename=basename,
        soname=soname,
        base=base,
        exec_ranges=tuple(
            (base + ph.p_vaddr, base + ph.p_vaddr + ph.p_memsz)
            for ph in phdrs if ph.p_type == PT_LOAD and ph.p_flags & PF_X),
        build_id=_mapped_build_id(base, phdrs, loads),
        names=frozenset(n for n in (basename, os.path.basename(path), soname) if n),
    )


def _main_program_path() -> str:
    """The main program's file.  Read through the calling thread: the main
    thread may have exited, and /proc/self/exe with it."""
    exe = f"{_procfs.SELF}/exe"
    try:
        return os.path.realpath(os.readlink(exe))
    except OSError:
        # Describing every other object goes on; resolving in the main
        # program then fails on this path, with the reason.
        return exe


def _mapped_build_id(base: int, phdrs, loads) -> bytes | None:
    for ph in phdrs:
        address = base + ph.p_vaddr
        if ph.p_type == PT_NOTE and _inside(loads, address, ph.p_memsz):
            build_id = _build_id_in_notes(_read(address, ph.p_memsz),
                                          8 if ph.p_align == 8 else 4)
            if build_id is not None:
                return build_id
    return None


def _build_id_in_notes(notes: bytes, align: int) -> bytes | None:
    def aligned(n: int) -> int:
        return (n + align - 1) & -align

    position = 0
    while position + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, position)
        name_at = position + 12
        desc_at = name_at + aligned(namesz)
        if kind == NT_GNU_BUILD_ID and notes[name_at:name_at + namesz] == b"GNU\0":
            return notes[desc_at:desc_at + descsz]
        position = desc_at + aligned(descsz)
    return None


def _mapped_soname(base: int, phdrs, loads) -> str | None:
    dynamic = next((ph for ph in phdrs if ph.p_type == PT_DYNAMIC), None)
    if dynamic is None or not _inside(loads, base + dynamic.p_vaddr, dynamic.p_memsz):
        return None
    strtab = soname = None
    for tag, value in struct.iter_unpack("<qQ", _read(base + dynamic.p_vaddr,
                                                      dynamic.p_memsz & ~15)):
        if tag == DT_NULL:
            break
        if tag == DT_STRTAB:
            strtab = value
        elif tag == DT_SONAME:
            soname = value
    if strtab is None or soname is None:
        return None
    # glibc relocates d_ptr in place where PT_DYNAMIC is writable, not in a
    # read-only one: accept both forms.
    if not _inside(loads, strtab):
        strtab += base
    if not _inside(loads, strtab + soname):
        return None
    name = b""
    for lo, hi in loads:
        if lo <= strtab + soname < hi:
            name = _read(strtab + soname, min(256, hi - strtab - soname))
    return os.fsdecode(name.split(b"\0", 1)[0])


def find_object(name: str | None) -> LoadedObject | None:
    """The loaded object an ``Object.name`` means, or None if it is not loaded.

    ``None`` is the main program; otherwise the exact basename (as the
    dynamic linker has it, or of the real file), the DT_SONAME, or an
    absolute path.  Two objects matching one name is a HotpatchError.
    """
    objects = loaded_objects()
    if name is None:
        return next((o for o in objects if o.name is None), None)
    if os.path.isabs(name):
        real = os.path.realpath(name)
        matches = [o for o in objects if name == o.name or real == o.path]
    else:
        matches = [o for o in objects if name in o.names]
    if len(matches) > 1:
        listed = "; ".join(f"{o.path} at {o.base:#x}" for o in matches)
        raise HotpatchError(
            f"{name}: {len(matches)} loaded objects match this name: {listed}; "
            f"name the object by its absolute path")
    return matches[0] if matches else None


# --------------------------------------------------------------------------
# Symbol tables of files
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
    #: local binding or hidden visibility (see _FuncSym.local)
    local: bool = False


class _FuncSym(NamedTuple):
    """A function symbol as the file has it."""

    name: str
    sympos: int
    value: int              # st_value: the offset from the load base
    size: int | None        # None where st_size is 0 (unknown)
    ifunc: bool
    version: str | None
    exported: bool          # dlsym can find it (only computed for IFUNCs)
    #: local binding or hidden/internal visibility: only this object calls
    #: it directly, and its callers may rely on more than the ABI (IPA-RA)
    local: bool = False


@dataclass
class _SymbolTable:
    """What one ELF file tells about its functions, as offsets from its base."""

    build_id: bytes | None
    #: ".symtab", ".dynsym", or the path of the separate debug file used
    source: str
    funcs: list[_FuncSym]
    #: resolver offset -> GOT slot offset, from R_X86_64_IRELATIVE
    irelative: dict[int, int]
    #: GOT slots relocated against __fentry__ / mcount
    fentry_slots: tuple[int, ...]
    #: (offset, size) of the PLT sections and of the entry-site lists
    plt_sections: tuple[tuple[int, int], ...]
    site_sections: tuple[tuple[int, int], ...]
    by_name: dict[str, list[_FuncSym]] = field(init=False, repr=False)
    # The address index, built on first use: only IFUNCs and old_offset need it.
    _at_start: dict[int, _FuncSym] | None = field(default=None, init=False, repr=False)
    _sized: list[_FuncSym] = field(default_factory=list, init=False, repr=False)
    _sized_starts: list[int] = field(default_factory=list, init=False, repr=False)
    _all_starts: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name = {}
        for entry in self.funcs:
            self.by_name.setdefault(entry.name, []).append(entry)

    @property
    def stripped(self) -> bool:
        return self.source == ".dynsym"

    def function_at(self, offset: int) -> _FuncSym | None:
        """The function symbol starting at ``offset``, else the one containing it."""
        if self._at_start is None:
            self._index_by_address()
        entry = self._at_start.get(offset)
        if entry is not None:
            return entry
        i = bisect.bisect_right(self._sized_starts, offset) - 1
        if i >= 0 and offset < self._sized[i].value + self._sized[i].size:
            return self._sized[i]
        return None

    def _index_by_address(self) -> None:
        # Aliases share a start: the first sized one in table order names it.
        at_start: dict[int, _FuncSym] = {}
        for entry in self.funcs:
            held = at_start.get(entry.value)
            if held is None or (held.size is None and entry.size is not None):
                at_start[entry.value] = entry
        self._sized = sorted((e for e in at_start.values() if e.size),
                             key=lambda e: e.value)
        self._sized_starts = [e.value for e in self._sized]
        self._all_starts = sorted(at_start)
        self._at_start = at_start

    def function_before(self, offset: int) -> _FuncSym | None:
        """The function holding ``offset``, else the last one starting before
        it (a symbol without size holds everything up to the next one)."""
        entry = self.function_at(offset)
        if entry is not None:
            return entry
        i = bisect.bisect_right(self._all_starts, offset) - 1
        return self._at_start[self._all_starts[i]] if i >= 0 else None


def _parse_elf(path: str, config: lief.ELF.ParserConfig | None = None):
    """lief's parse of ``path``, or None if it is not a readable ELF file."""
    with lief.logging.level_scope(lief.logging.LEVEL.OFF):
        if not lief.is_elf(path):
            return None
        return lief.ELF.parse(path, config) if config else lief.ELF.parse(path)


def _debug_parser_config() -> lief.ELF.ParserConfig:
    # A debug file only contributes .symtab and its build-id.
    config = lief.ELF.ParserConfig()
    config.parse_dyn_symbols = False
    config.parse_relocations = False
    config.parse_symbol_versions = False
    config.parse_overlay = False
    return config


_DEBUG_CONFIG = _debug_parser_config()


def _file_build_id(binary) -> bytes | None:
    for note in binary.notes:
        if note.type == lief.ELF.Note.TYPE.GNU_BUILD_ID:
            return bytes(note.description)
    return None


def _parse_file(path: str) -> _SymbolTable | None:
    """Read the function symbols of ``path`` (None if it is not ELF)."""
    binary = _parse_elf(path)
    if binary is None:
        return None
    build_id = _file_build_id(binary)
    funcs = _function_entries(binary.symtab_symbols, versioned=False)
    source = ".symtab"
    if not funcs:
        debug = _debug_file(path, binary, build_id)
        if debug is not None:
            source, funcs = debug
        else:
            source = ".dynsym"
            funcs = _function_entries(binary.dynamic_symbols, versioned=True)
    irelative, fentry_slots = _relocation_facts(binary, funcs)
    return _SymbolTable(
        build_id=build_id,
        source=source,
        funcs=funcs,
        irelative=irelative,
        fentry_slots=fentry_slots,
        plt_sections=_section_ranges(binary, _PLT_SECTIONS),
        site_sections=_section_ranges(binary, _SITE_SECTIONS),
    )


def _function_entries(symbols, versioned: bool) -> list[_FuncSym]:
    """Defined function symbols in table order, each with its sympos."""
    seen: dict[str, int] = {}
    entries = []
    for sym in symbols:
        kind = sym.type
        if (kind != _FUNC and kind != _IFUNC) or sym.shndx == 0:  # 0: undefined
            continue
        name = sym.name
        sympos = seen[name] = seen.get(name, 0) + 1
        ifunc = kind == _IFUNC
        entries.append(_FuncSym(
            name, sympos, sym.value, sym.size or None, ifunc,
            _version_of(sym) if versioned else None,
            ifunc and sym.binding in _EXPORTED_BINDINGS
            and sym.visibility in _EXPORTED_VISIBILITIES,
            sym.binding not in _EXPORTED_BINDINGS
            or sym.visibility not in _EXPORTED_VISIBILITIES))
    return entries


def _version_of(sym) -> str | None:
    if not sym.has_version:
        return None
    version = sym.symbol_version
    if not version.has_auxiliary_version:
        return None
    marker = "@" if version.value & VERSYM_HIDDEN else "@@"
    return marker + version.symbol_version_auxiliary.name


def _relocation_facts(binary, funcs) -> tuple[dict[int, int], tuple[int, ...]]:
    """IRELATIVE slots by resolver, and the GOT slots of the ftrace hooks.

    Relocations are walked only when the file has an IFUNC or a dynamic
    symbol for an ftrace hook: libpython has tens of thousands.
    """
    wants_irelative = any(entry.ifunc for entry in funcs)
    wants_fentry = any(binary.has_dynamic_symbol(n) for n in _FENTRY_NAMES)
    irelative: dict[int, int] = {}
    slots = []
    if not (wants_irelative or wants_fentry):
        return irelative, ()
    for relocations in (binary.dynamic_relocations, binary.pltgot_relocations):
        for rel in relocations:
            kind = rel.type
            if kind == _R.X86_64_IRELATIVE:
                irelative[rel.addend] = rel.address
            elif (wants_fentry and kind in _SLOT_RELOCATIONS and rel.has_symbol
                  and rel.symbol.name in _FENTRY_NAMES):
                slots.append(rel.address)
    return irelative, tuple(slots)


def _section_ranges(binary, names) -> tuple[tuple[int, int], ...]:
    return tuple((s.virtual_address, s.size) for s in binary.sections
                 if s.name in names and s.has(lief.ELF.Section.FLAGS.ALLOC))


# --------------------------------------------------------------------------
# Separate debug files
# --------------------------------------------------------------------------

def _debug_file(path: str, binary, build_id: bytes | None):
    """(path, function symbols) of the separate debug file of ``path``, if installed.

    Searched as gdb does: by build-id under each debug directory, then by
    ``.gnu_debuglink`` beside the file, in ``.debug/`` beside it, and under
    each debug directory.  A candidate counts only if its build-id matches
    (or, where the file has none, the CRC the debuglink records).
    """
    for candidate, crc in _debug_candidates(path, binary, build_id):
        if not os.path.isfile(candidate) or os.path.realpath(candidate) == path:
            continue
        debug = _parse_elf(candidate, _DEBUG_CONFIG)
        if debug is None:
            continue
        if build_id is not None:
            if _file_build_id(debug) != build_id:
                continue
        elif crc is None or _crc32(candidate) != crc:
            continue
        funcs = _function_entries(debug.symtab_symbols, versioned=False)
        if funcs:
            return candidate, funcs
    return None


def _debug_candidates(path: str, binary, build_id: bytes | None):
    """(candidate path, expected CRC or None), in search order."""
    if build_id is not None:
        hexid = build_id.hex()
        for directory in _debug_dirs:
            yield os.path.join(directory, ".build-id", hexid[:2], hexid[2:] + ".debug"), None
    link = _debuglink(binary)
    if link is None:
        return
    name, crc = link
    directory = os.path.dirname(path)
    yield os.path.join(directory, name), crc
    yield os.path.join(directory, ".debug", name), crc
    for debug_dir in _debug_dirs:
        yield os.path.join(debug_dir, directory.lstrip("/"), name), crc


def _debuglink(binary) -> tuple[str, int] | None:
    """The file name and CRC-32 recorded in ``.gnu_debuglink``."""
    section = binary.get_section(".gnu_debuglink")
    if section is None:
        return None
    content = bytes(section.content)
    end = content.find(b"\0")
    crc_at = (end + 4) & ~3  # the name, its NUL, padding to 4 bytes
    if end <= 0 or crc_at + 4 > len(content):
        return None
    return os.fsdecode(content[:end]), struct.unpack_from("<I", content, crc_at)[0]


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


# --------------------------------------------------------------------------
# The cache, and the check that the file is the mapped image
# --------------------------------------------------------------------------

#: (path, st_ino, st_mtime_ns) -> the file's table (its build-id inside)
_files: dict[tuple[str, int, int], _SymbolTable] = {}
#: object -> its file's table, checked against the mapped image.  A mapping
#: never changes, so a checked object needs no further stat().
_objects: dict[LoadedObject, _SymbolTable] = {}
# The direct branches of each loaded object, swept once (see x86_64.xrefs).
_branch_indexes: dict[LoadedObject, BranchIndex] = {}


def forget(obj: LoadedObject) -> None:
    """Forget what was read and checked about ``obj``: it was unloaded (an
    object loaded at its place later is read afresh)."""
    _objects.pop(obj, None)
    _branch_indexes.pop(obj, None)
    _data_tables.pop(obj, None)


def cache_clear() -> None:
    """Forget every symbol table read: the next lookup reads the files again."""
    _files.clear()
    _objects.clear()
    _branch_indexes.clear()
    _data_tables.clear()


def _table(obj: LoadedObject, what: str) -> _SymbolTable:
    """The symbol table of ``obj``'s file, refused if it is not the mapped image."""
    table = _objects.get(obj)
    if table is not None:
        return table
    try:
        st = os.stat(obj.path)
    except OSError as error:
        raise HotpatchError(
            f"{obj}: cannot resolve {what}: cannot read {obj.path}: {error.strerror}"
            f"{_procfs.exited_main_thread_note()}") from None
    key = (obj.path, st.st_ino, st.st_mtime_ns)
    table = _files.get(key)
    if table is None:
        table = _parse_file(obj.path)
        if table is None:
            raise HotpatchError(
                f"{obj}: cannot resolve {what}: {obj.path} is not a readable ELF file")
        _files[key] = table
    _check_same_image(obj, table, st, what)
    _objects[obj] = table
    return table


def _check_same_image(obj: LoadedObject, table: _SymbolTable, st: os.stat_result,
                      what: str) -> None:
    if obj.build_id is not None or table.build_id is not None:
        if obj.build_id == table.build_id:
            return
        reason = (f"build-id on disk {_hex(table.build_id)}, "
                  f"mapped {_hex(obj.build_id)}")
    else:
        if _mapped_file_identity(obj) == (st.st_dev, st.st_ino):
            return
        reason = "no build-id to compare, and the mapping is not of this inode"
    raise UnsafeToPatch(
        f"{obj}: cannot resolve {what}: the file on disk {obj.path} is not the "
        f"image mapped in this process ({reason}); it was replaced after loading "
        f"(an upgrade under a running process?): refusing to resolve against "
        f"the wrong file")


def _hex(build_id: bytes | None) -> str:
    return build_id.hex() if build_id is not None else "none"


def _mapped_file_identity(obj: LoadedObject) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file mapped at ``obj``'s code, from the maps."""
    if not obj.exec_ranges:
        return None
    address = obj.exec_ranges[0][0]
    with open(f"{_procfs.SELF}/maps") as maps:    # /proc/self/maps: see _procfs
        for line in maps:
            span, _perms, _offset, device, inode = line.split(maxsplit=5)[:5]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                major, minor = (int(x, 16) for x in device.split(":"))
                return os.makedev(major, minor), int(inode)
    return None


# --------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------

def resolve(obj: LoadedObject, name: str, sympos: int = 0) -> Symbol:
    """The function ``name`` of ``obj`` (``sympos`` picks among same-named ones).

    ``name`` may carry a symbol version (``memcpy@@GLIBC_2.14``) where the
    symbols come from ``.dynsym``.  With ``sympos`` 0, same-named symbols
    that all start at one address are not ambiguous.  An IFUNC resolves to
    the implementation bound in this process.  This may call ``dlopen`` /
    ``dlsym``: never call it from inside the dynamic linker.
    """
    table = _table(obj, f"symbol '{name}'")
    bare, at, version = name.partition("@")
    candidates = table.by_name.get(bare, ())
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


def _not_found_message(obj: LoadedObject, table: _SymbolTable, name: str) -> str:
    bare = name.partition("@")[0]
    clones = [n for n in table.by_name
              if n.startswith(bare + ".") and _CLONE_SUFFIX.match(n, len(bare))]
    close = [n for n in difflib.get_close_matches(bare, table.by_name, n=5, cutoff=0.8)
             if n not in clones]
    message = f"{obj}: symbol '{name}' not found"
    if clones or close:
        message += "; close names: " + ", ".join(
            [f"{n} (a compiler clone)" for n in sorted(clones)] + close)
    if table.stripped:
        message += (
            f"; {obj.path} has no .symtab and no separate debug file was found "
            f"(by build-id or .gnu_debuglink, under {':'.join(_debug_dirs)}), so "
            f"only its exported functions are visible: install its debug file "
            f"or use old_offset")
    return message


def _symbol(obj: LoadedObject, table: _SymbolTable, entry: _FuncSym) -> Symbol:
    if entry.ifunc:
        return _bound_ifunc(obj, table, entry)
    address = obj.base + entry.value
    _check_code(obj, address, f"symbol '{entry.name}'")
    return Symbol(entry.name, entry.sympos, address, entry.value, entry.size,
                  version=entry.version, local=entry.local)


def _check_code(obj: LoadedObject, address: int, what: str) -> None:
    if not _inside(obj.exec_ranges, address):
        segments = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in obj.exec_ranges) or "none"
        raise UnsafeToPatch(
            f"{obj}: {what} at {address:#x} is not code: it lies outside the "
            f"executable segments of {obj} ({segments})")


def _bound_ifunc(obj: LoadedObject, table: _SymbolTable, entry: _FuncSym) -> Symbol:
    """The implementation an IFUNC's resolver chose for this process.

    First the object's own R_X86_64_IRELATIVE slot for this resolver (what
    its calls use, read without running anything), else ``dlsym``, which
    runs the resolver as the dynamic linker does.
    """
    resolver = obj.base + entry.value
    slot = table.irelative.get(entry.value)
    bound = struct.unpack("<Q", _read(obj.base + slot, 8))[0] if slot is not None else None
    if getattr(_no_dynamic_linker, "on", False) and not (bound and _inside(obj.exec_ranges, bound)):
        raise NotBoundYet(
            f"{obj}: symbol '{entry.name}' is an IFUNC whose implementation is bound only "
            f"when {obj} is relocated, after the dynamic linker's notification")
    if not bound and entry.exported:
        bound = _dlsym_in(obj, entry)
    if not bound or not _inside(obj.exec_ranges, bound):
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


_dlopen = _libc_function("dlopen", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int)
_dlsym = _libc_function("dlsym", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
_dlvsym = _libc_function("dlvsym", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                         ctypes.c_char_p)
_dlclose = _libc_function("dlclose", ctypes.c_int, ctypes.c_void_p)


def _dlsym_in(obj: LoadedObject, entry: _FuncSym) -> int | None:
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

    Named after the symbol starting there, else ``name+0x10`` inside a
    symbol (size: the bytes left in it), else ``<offset 0x1234>``.  Outside
    an executable segment it is UnsafeToPatch ("not code").
    """
    what = f"offset {offset:#x}"
    address = obj.base + offset
    _check_code(obj, address, what)
    entry = _table(obj, what).function_at(offset)
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
    table = _table(obj, f"the call target {address:#x}")
    if not _inside(obj.exec_ranges, address) or any(
            lo <= offset < lo + size for lo, size in table.plt_sections):
        return clobbers.ALL
    entry = table.function_at(offset)
    if entry is None or not entry.size:
        return None
    return obj.base + entry.value, entry.size


_data_tables: dict[LoadedObject, dict[str, list[tuple[int, int]]]] = {}


def _data_symbols(obj: LoadedObject) -> dict[str, list[tuple[int, int]]]:
    """name -> [(offset, size)] of the data symbols (STT_OBJECT), in table
    order, from the same table as the functions (.symtab, the debug file or
    .dynsym)."""
    data = _data_tables.get(obj)
    if data is None:
        table = _table(obj, "its data symbols")
        if table.source == ".symtab":
            symbols = _parse_elf(obj.path).symtab_symbols
        elif table.source == ".dynsym":
            symbols = _parse_elf(obj.path).dynamic_symbols
        else:
            symbols = _parse_elf(table.source, _DEBUG_CONFIG).symtab_symbols
        data = {}
        for sym in symbols:
            if sym.type == lief.ELF.Symbol.TYPE.OBJECT and sym.shndx != 0:
                data.setdefault(sym.name, []).append((sym.value, sym.size))
        _data_tables[obj] = data
    return data


def resolve_any(obj: LoadedObject, name: str, sympos: int = 0) -> int:
    """The address of the function or data symbol ``name`` of ``obj``, static
    ones included (a klp relocation's target); ``sympos`` as for
    :func:`resolve`."""
    try:
        return resolve(obj, name, sympos).address
    except SymbolNotFound:
        candidates = _data_symbols(obj).get(name)
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
    entry = _table(obj, f"offset {offset:#x}").function_at(offset)
    if entry is None or not entry.size:
        return None
    return entry.name, entry.value, entry.size


def functions(obj: LoadedObject) -> list[Symbol]:
    """The patchable functions of ``obj`` by address (``hotpatch symbols``).

    IFUNCs appear at their bound implementation; an IFUNC whose
    implementation cannot be found, or a symbol outside code, is not
    patchable and is left out.
    """
    table = _table(obj, "its function listing")
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
    ``address``: callers inside the object, which the compiler may have
    bound to this very code (no PLT), so may rely on more than the ABI."""
    return bool(branches_into(obj, address, address + 1))


def describe_address(obj: LoadedObject, address: int) -> str:
    """``name+0x12 (0x7f...)`` for an address of ``obj``: the function
    symbol holding it (or the last before it) where there is one, else its
    offset in ``obj``."""
    offset = address - obj.base
    try:
        entry = _table(obj, f"the address {address:#x}").function_before(offset)
    except HotpatchError:
        entry = None
    if entry is None:
        return f"{obj}+{offset:#x} ({address:#x})"
    delta = offset - entry.value
    return f"{entry.name}{f'+{delta:#x}' if delta else ''} ({address:#x})"


def branches_into(obj: LoadedObject, lo: int, hi: int) -> list[tuple[int, str, int]]:
    """``(source, description, target)`` of every direct branch of ``obj``
    landing in [lo, hi).  The object's code is swept once (about a second
    for libc) and the index kept for its life."""
    index = _branch_indexes.get(obj)
    if index is None:
        index = _branch_indexes[obj] = index_branches(_read, obj.exec_ranges)
    return [(source, f"{describe_address(obj, source)}: {text}", target)
            for source, text, target in index.into(lo, hi)]


# --------------------------------------------------------------------------
# ftrace-style entry sites
# --------------------------------------------------------------------------

def fentry_sites(obj: LoadedObject) -> frozenset[int]:
    """Entry sites listed in ``__mcount_loc`` / ``__patchable_function_entries``.

    Read from the mapped image, where the dynamic linker has relocated the
    entries to absolute addresses; entries outside code (functions the
    linker discarded) are dropped.
    """
    table = _table(obj, "its fentry sites")
    sites = set()
    for offset, size in table.site_sections:
        raw = _read(obj.base + offset, size & ~7)
        sites.update(a for (a,) in struct.iter_unpack("<Q", raw)
                     if _inside(obj.exec_ranges, a))
    return frozenset(sites)


def fentry_targets(obj: LoadedObject) -> frozenset[int]:
    """Addresses a ``call`` at a function entry of ``obj`` may target as an ftrace hook.

    The GOT slots ``obj`` uses for ``__fentry__`` / ``mcount`` (for
    ``call *__fentry__@GOTPCREL(%rip)``), what those slots are bound to,
    ``obj``'s own definitions of them, and its PLT entries that jump
    through those slots (for ``call __fentry__@PLT``).
    """
    table = _table(obj, "its fentry call targets")
    base = obj.base
    plt = [(base + offset, base + offset + size) for offset, size in table.plt_sections]
    slots = {base + offset for offset in table.fentry_slots}
    targets = set(slots)
    for slot in slots:
        bound = struct.unpack("<Q", _read(slot, 8))[0]
        # A lazily bound slot still points back into our own PLT.
        if bound and not _inside(plt, bound):
            targets.add(bound)
    for name in _FENTRY_NAMES:
        targets.update(base + entry.value for entry in table.by_name.get(name, ()))
    targets.update(_plt_entries_through(plt, slots))
    return frozenset(targets)


def _plt_entries_through(plt, slots) -> set[int]:
    """Start addresses of the PLT entries whose ``jmp *slot(%rip)`` uses ``slots``."""
    entries = set()
    for lo, hi in plt:
        code = _read(lo, hi - lo)
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
