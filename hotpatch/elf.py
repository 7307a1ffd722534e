"""ELF symbol tables of files: what the file a loaded object came from says
about its functions.

:mod:`hotpatch.elffile` reads ``.symtab`` and ``.dynsym`` once per file (cache keyed by path,
inode and mtime), relocations only where they matter (IRELATIVE slots of
IFUNCs, the GOT slots of ftrace hooks), the PLT and entry-site sections, and
finds a separate debug file by build-id or ``.gnu_debuglink`` when the file is
stripped.  The function symbols are decoded when asked (:class:`FunctionSymbols`):
a lookup of one name decodes that name's symbols only.  :func:`table_of` hands a table out for a loaded object only once the
file is known to be the image that is mapped (same build-id; without
build-ids, the same inode).

Symbols are counted as kallsyms counts them: ``sympos`` is the 1-based
position among same-named function symbols in symbol-table order.
"""

from __future__ import annotations

import bisect
import os
import re
import struct
import zlib
from typing import NamedTuple

from hotpatch import _procfs, elffile, objects
from hotpatch.errors import HotpatchError, UnsafeToPatch
from hotpatch.objects import LoadedObject

VERSYM_HIDDEN = 0x8000

_FUNC = elffile.STT_FUNC
_IFUNC = elffile.STT_GNU_IFUNC
_FUNCTION_TYPES = frozenset({_FUNC, _IFUNC})
_DATA_TYPES = frozenset({elffile.STT_OBJECT})
_EXPORTED_BINDINGS = {elffile.STB_GLOBAL, elffile.STB_WEAK, elffile.STB_GNU_UNIQUE}
_EXPORTED_VISIBILITIES = {elffile.STV_DEFAULT, elffile.STV_PROTECTED}
_SLOT_RELOCATIONS = {elffile.R_X86_64_GLOB_DAT, elffile.R_X86_64_JUMP_SLOT, elffile.R_X86_64_64}

#: The ftrace hooks a ``-pg`` build calls at function entry.
FENTRY_NAMES = ("__fentry__", "mcount", "_mcount")
#: Sections that list patchable entry sites (ftrace's available_filter_functions).
_SITE_SECTIONS = ("__mcount_loc", "__patchable_function_entries")
_PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")

#: gcc and clang name the copies they make of a function ``foo.<kind>[.N]``.
CLONE_SUFFIX = re.compile(
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


class FuncSym(NamedTuple):
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


class FunctionSymbols:
    """The defined function symbols of one table, decoded when asked: all
    of them (a listing, the address index), or those of one name (a lookup:
    the first patch of a process looks up one name, and decoding libc's
    debug file whole took tens of milliseconds)."""

    #: Lookups by scanning the table before it is decoded whole instead.
    SCANS = 4

    def __init__(self, records: elffile.SymbolRecords) -> None:
        self._records = records
        self._all: list[FuncSym] | None = None
        self._by_name: dict[str, list[FuncSym]] | None = None
        self._scans = 0

    def __bool__(self) -> bool:
        return any(record[4] != 0 for record in self._records.records)   # 0: undefined

    def all(self) -> list[FuncSym]:
        """Every one, in table order."""
        if self._all is None:
            self._all = _function_entries(self._records.decoded())
        return self._all

    def by_name(self) -> dict[str, list[FuncSym]]:
        if self._by_name is None:
            by_name: dict[str, list[FuncSym]] = {}
            for entry in self.all():
                by_name.setdefault(entry.name, []).append(entry)
            self._by_name = by_name
        return self._by_name

    def named(self, name: str) -> list[FuncSym]:
        """Those called ``name``, in table order, each with its sympos (it
        counts same-named symbols only)."""
        if self._by_name is None and self._scans < self.SCANS:
            found = self._records.named(name)
            if found:       # an absent name costs one search of the strings
                self._scans += 1
            return _function_entries(found)
        return self.by_name().get(name, [])

    def starts(self) -> list[int]:
        """Where each one starts (offsets, in table order)."""
        return [record[5] for record in self._records.records if record[4] != 0]

    def sizes_by_start(self) -> dict[int, int]:
        """Each start and the size held there (0: unknown), by the address
        index's rule: the first symbol there with a size, in table order.
        From the records, no name decoded: libc's 6,800 in about 2 ms,
        where the index of FuncSym takes 20."""
        held: dict[int, int] = {}
        for record in self._records.records:
            if record[4] != 0 and not held.get(record[5]):   # 4: shndx, 0: undefined
                held[record[5]] = record[6]
        return held

    def any_ifunc(self) -> bool:
        return any(record[2] & 0xF == _IFUNC and record[4] != 0
                   for record in self._records.records)


class SymbolTable:
    """What one ELF file tells about its functions, as offsets from its base."""

    def __init__(self, build_id: bytes | None, source: str, functions: FunctionSymbols,
                 irelative: dict[int, int], fentry_slots: tuple[int, ...],
                 plt_sections: tuple[tuple[int, int], ...],
                 site_sections: tuple[tuple[int, int], ...]) -> None:
        self.build_id = build_id
        #: ".symtab", ".dynsym", or the path of the separate debug file used
        self.source = source
        self.functions = functions
        #: resolver offset -> GOT slot offset, from R_X86_64_IRELATIVE
        self.irelative = irelative
        #: GOT slots relocated against __fentry__ / mcount
        self.fentry_slots = fentry_slots
        #: (offset, size) of the PLT sections and of the entry-site lists
        self.plt_sections = plt_sections
        self.site_sections = site_sections
        # The address index, built on first use: only IFUNCs and old_offset need it.
        self._at_start: dict[int, FuncSym] | None = None
        self._sized: list[FuncSym] = []
        self._sized_starts: list[int] = []
        self._all_starts: list[int] = []

    @property
    def funcs(self) -> list[FuncSym]:
        """Every function symbol, in table order."""
        return self.functions.all()

    @property
    def by_name(self) -> dict[str, list[FuncSym]]:
        return self.functions.by_name()

    def named(self, name: str) -> list[FuncSym]:
        """The function symbols called ``name``, in table order."""
        return self.functions.named(name)

    @property
    def stripped(self) -> bool:
        return self.source == ".dynsym"

    def function_at(self, offset: int) -> FuncSym | None:
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
        at_start: dict[int, FuncSym] = {}
        for entry in self.funcs:
            held = at_start.get(entry.value)
            if held is None or (held.size is None and entry.size is not None):
                at_start[entry.value] = entry
        self._sized = sorted((e for e in at_start.values() if e.size),
                             key=lambda e: e.value)
        self._sized_starts = [e.value for e in self._sized]
        self._all_starts = sorted(at_start)
        self._at_start = at_start

    def start_index(self) -> tuple[list[int], list[int], list[int]]:
        """An index of the starts alone that tells where
        :meth:`function_before`'s function starts (the C core answers from
        it: hp_function_before, symbols.FunctionBefore): every start,
        sorted, and the starts and ends of the sized ones, by start (see
        FunctionSymbols.sizes_by_start)."""
        sizes = self.functions.sizes_by_start()
        starts = sorted(sizes)
        sized_from = [start for start in starts if sizes[start]]
        return starts, sized_from, [start + sizes[start] for start in sized_from]

    def function_before(self, offset: int) -> FuncSym | None:
        """The function holding ``offset``, else the last one starting before
        it (a symbol without size holds everything up to the next one)."""
        entry = self.function_at(offset)
        if entry is not None:
            return entry
        i = bisect.bisect_right(self._all_starts, offset) - 1
        return self._at_start[self._all_starts[i]] if i >= 0 else None


def parse_elf(path: str) -> elffile.ElfFile | None:
    """The ELF file ``path``, or None if it is not a readable ELF file."""
    return elffile.open_elf(path)


def parse_file(path: str) -> SymbolTable | None:
    """Read the function symbols of ``path`` (None if it is not ELF)."""
    binary = parse_elf(path)
    if binary is None:
        return None
    with binary.held_open():
        build_id = binary.build_id()
        functions = FunctionSymbols(binary.symbol_records(elffile.SHT_SYMTAB, _FUNCTION_TYPES))
        source = ".symtab"
        if not functions:
            debug = _debug_file(path, binary, build_id)
            if debug is not None:
                source, functions = debug
            else:
                source = ".dynsym"
                functions = FunctionSymbols(
                    binary.symbol_records(elffile.SHT_DYNSYM, _FUNCTION_TYPES))
        irelative, fentry_slots = _relocation_facts(binary, functions)
    return SymbolTable(
        build_id=build_id,
        source=source,
        functions=functions,
        irelative=irelative,
        fentry_slots=fentry_slots,
        plt_sections=_section_ranges(binary, _PLT_SECTIONS),
        site_sections=_section_ranges(binary, _SITE_SECTIONS),
    )


def _function_entries(symbols) -> list[FuncSym]:
    """Defined function symbols in table order, each with its sympos."""
    seen: dict[str, int] = {}
    entries = []
    append, make = entries.append, tuple.__new__     # see elffile._read_symbols
    for name, value, size, kind, binding, visibility, shndx, version in symbols:
        if (kind != _FUNC and kind != _IFUNC) or shndx == 0:  # 0: undefined
            continue
        sympos = seen[name] = seen.get(name, 0) + 1
        ifunc = kind == _IFUNC
        exported = binding in _EXPORTED_BINDINGS and visibility in _EXPORTED_VISIBILITIES
        append(make(FuncSym, (name, sympos, value, size or None, ifunc, version,
                              ifunc and exported, not exported)))
    return entries


def _relocation_facts(binary, functions: FunctionSymbols) -> tuple[dict[int, int], tuple[int, ...]]:
    """IRELATIVE slots by resolver, and the GOT slots of the ftrace hooks.

    Relocations are walked only when the file has an IFUNC or a dynamic
    symbol for an ftrace hook: libpython has tens of thousands.
    """
    wants_irelative = functions.any_ifunc()
    wants_fentry = any(binary.has_dynamic_symbol(n) for n in FENTRY_NAMES)
    irelative: dict[int, int] = {}
    slots = []
    if not (wants_irelative or wants_fentry):
        return irelative, ()
    for rel in binary.dynamic_relocations():
        kind = rel.type
        if kind == elffile.R_X86_64_IRELATIVE:
            irelative[rel.addend] = rel.address
        elif wants_fentry and kind in _SLOT_RELOCATIONS and rel.symbol in FENTRY_NAMES:
            slots.append(rel.address)
    return irelative, tuple(slots)


def _section_ranges(binary, names) -> tuple[tuple[int, int], ...]:
    return tuple((s.addr, s.size) for s in binary.sections
                 if s.name in names and s.flags & elffile.SHF_ALLOC)


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
        debug = parse_elf(candidate)
        if debug is None:
            continue
        if build_id is not None:
            if debug.build_id() != build_id:
                continue
        elif crc is None or _crc32(candidate) != crc:
            continue
        functions = FunctionSymbols(debug.symbol_records(elffile.SHT_SYMTAB, _FUNCTION_TYPES))
        if functions:
            return candidate, functions
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
    content = binary.section_content(".gnu_debuglink")
    if content is None:
        return None
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
_files: dict[tuple[str, int, int], SymbolTable] = {}
#: object -> its file's table, checked against the mapped image.  A mapping
#: never changes, so a checked object needs no further stat().
_objects: dict[LoadedObject, SymbolTable] = {}


def cache_clear() -> None:
    """Forget every symbol table read: the next lookup reads the files again."""
    _files.clear()
    _objects.clear()
    _data_tables.clear()


def forget(obj: LoadedObject) -> None:
    """Forget what was checked about ``obj`` (it was unloaded); its file's
    table stays, keyed by the file."""
    _objects.pop(obj, None)
    _data_tables.pop(obj, None)


def table_of(obj: LoadedObject, what: str) -> SymbolTable:
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
        table = parse_file(obj.path)
        if table is None:
            raise HotpatchError(
                f"{obj}: cannot resolve {what}: {obj.path} is not a readable ELF file")
        _files[key] = table
    _check_same_image(obj, table, st, what)
    _objects[obj] = table
    return table


def _check_same_image(obj: LoadedObject, table: SymbolTable, st: os.stat_result,
                      what: str) -> None:
    if obj.build_id is not None or table.build_id is not None:
        if obj.build_id == table.build_id:
            return
        reason = (f"build-id on disk {_hex(table.build_id)}, "
                  f"mapped {_hex(obj.build_id)}")
    else:
        if objects.mapped_file_identity(obj) == (st.st_dev, st.st_ino):
            return
        reason = "no build-id to compare, and the mapping is not of this inode"
    raise UnsafeToPatch(
        f"{obj}: cannot resolve {what}: the file on disk {obj.path} is not the "
        f"image mapped in this process ({reason}); it was replaced after loading "
        f"(an upgrade under a running process?): refusing to resolve against "
        f"the wrong file")


def _hex(build_id: bytes | None) -> str:
    return build_id.hex() if build_id is not None else "none"


_data_tables: dict[LoadedObject, dict[str, list[tuple[int, int]]]] = {}


def data_symbols(obj: LoadedObject) -> dict[str, list[tuple[int, int]]]:
    """name -> [(offset, size)] of the data symbols (STT_OBJECT), in table
    order, from the same table as the functions (.symtab, the debug file or
    .dynsym)."""
    data = _data_tables.get(obj)
    if data is None:
        table = table_of(obj, "its data symbols")
        if table.source == ".symtab":
            symbols = parse_elf(obj.path).symtab_symbols(_DATA_TYPES)
        elif table.source == ".dynsym":
            symbols = parse_elf(obj.path).dynamic_symbols(_DATA_TYPES)
        else:
            symbols = parse_elf(table.source).symtab_symbols(_DATA_TYPES)
        data = {}
        for sym in symbols:
            if sym.type == elffile.STT_OBJECT and sym.shndx != 0:
                data.setdefault(sym.name, []).append((sym.value, sym.size))
        _data_tables[obj] = data
    return data
