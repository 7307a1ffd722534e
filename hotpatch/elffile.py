"""The ELF64 file format, read with :mod:`struct` from the file: the
sections, symbol tables (with GNU symbol versions), relocations and notes
that :mod:`hotpatch.elf` needs, nothing more.

Why not lief: importing it took 0.4 s to seconds on this machine, most of it
its module initialisation, with the GIL held -- a service's Python threads
stood still for 100 ms to most of a second at a patch's first use -- and its
parser holds the GIL for the whole file (70 ms for libpython).  These tables
are flat arrays of fixed-size records: ``struct.iter_unpack`` reads them in
microseconds a symbol, in Python code the interpreter can switch away from.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Iterator, NamedTuple

__all__ = ["ElfFile", "ElfSymbol", "Relocation", "Section", "SymbolRecords", "open_elf",
           "STT_OBJECT", "STT_FUNC", "STT_GNU_IFUNC", "STB_GLOBAL", "STB_WEAK",
           "STB_GNU_UNIQUE", "STV_DEFAULT", "STV_PROTECTED", "NT_GNU_BUILD_ID",
           "R_X86_64_64", "R_X86_64_GLOB_DAT", "R_X86_64_JUMP_SLOT", "R_X86_64_IRELATIVE"]

STT_OBJECT, STT_FUNC, STT_GNU_IFUNC = 1, 2, 10
STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE = 1, 2, 10
STV_DEFAULT, STV_PROTECTED = 0, 3
SHT_SYMTAB, SHT_RELA, SHT_NOTE, SHT_DYNSYM = 2, 4, 7, 11
SHT_GNU_VERDEF, SHT_GNU_VERNEED, SHT_GNU_VERSYM = 0x6FFFFFFD, 0x6FFFFFFE, 0x6FFFFFFF
SHF_ALLOC = 0x2
PT_NOTE = 4
NT_GNU_BUILD_ID = 3
R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT, R_X86_64_IRELATIVE = 1, 6, 7, 37
VERSYM_HIDDEN, VERSYM_INDEX = 0x8000, 0x7FFF

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = struct.Struct("<IIQQQQQQ")
_SYM = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
_VERDEF = struct.Struct("<HHHHIII")
_VERDAUX = struct.Struct("<II")
_VERNEED = struct.Struct("<HHIII")
_VERNAUX = struct.Struct("<IHHII")
_NOTE = struct.Struct("<III")


class Section(NamedTuple):
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    align: int


class ElfSymbol(NamedTuple):
    name: str
    value: int
    size: int
    type: int
    binding: int
    visibility: int
    #: st_shndx as the file has it (0: undefined)
    shndx: int
    #: "@@VER" (the default version) or "@VER" (hidden), from .gnu.version;
    #: None without a version (or for .symtab symbols)
    version: str | None = None


class Relocation(NamedTuple):
    type: int
    #: r_offset: the place relocated, as a file virtual address
    address: int
    addend: int
    #: the symbol's name, None for a relocation without symbol
    symbol: str | None


def open_elf(path: str) -> ElfFile | None:
    """The ELF64 little-endian file ``path``, or None if it is not one (or
    cannot be read)."""
    try:
        elf = ElfFile(path)
    except OSError:
        return None
    header = elf._bytes(0, _EHDR.size)
    if len(header) < _EHDR.size or header[:4] != b"\x7fELF" or header[4:6] != b"\x02\x01":
        return None     # not ELFCLASS64, ELFDATA2LSB
    elf.read_headers(header)
    return elf


class ElfFile:
    """One ELF file; tables are read when asked for.

    Read with ``pread``, each read opening the file again (or inside
    :meth:`held_open`): nothing stays open or mapped (a patch module refused
    before ``dlopen`` must not appear in the process's maps)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.stat(path).st_size
        self.sections: list[Section] = []
        self.phoff = self.phnum = 0
        self._read_tables: dict[tuple, list[ElfSymbol]] = {}
        self._fd: int | None = None      # while held_open

    def read_headers(self, header: bytes) -> None:
        (_, _, _, _, _, self.phoff, shoff, _, _, _, self.phnum, _, shnum,
         shstrndx) = _EHDR.unpack_from(header, 0)
        self.sections = self._sections(shoff, shnum, shstrndx)

    def _sections(self, shoff: int, shnum: int, shstrndx: int) -> list[Section]:
        if not shoff or shoff + _SHDR.size > self.size:
            return []
        first = _SHDR.unpack_from(self._bytes(shoff, _SHDR.size))
        if shnum == 0:      # more than 0xff00 sections: the count is in section 0
            shnum = first[5]
        if shstrndx == 0xFFFF:
            shstrndx = first[6]
        shnum = min(shnum, (self.size - shoff) // _SHDR.size)
        raw = list(_SHDR.iter_unpack(self._bytes(shoff, shnum * _SHDR.size)))
        names = self._bytes(raw[shstrndx][4], raw[shstrndx][5]) if shstrndx < len(raw) else b""
        return [Section(_string(names, h[0]), h[1], h[2], h[3], h[4], h[5], h[6], h[8])
                for h in raw]

    @contextlib.contextmanager
    def held_open(self) -> Iterator[None]:
        """Reads inside share one descriptor, closed on leaving: reading a
        file's tables is some twenty reads, each an open and a close
        otherwise."""
        if self._fd is not None:
            yield
            return
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _bytes(self, offset: int, size: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, max(0, min(size, self.size - offset)), offset)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, max(0, min(size, self.size - offset)), offset)
        finally:
            os.close(fd)

    def _content(self, section: Section) -> bytes:
        # SHT_NOBITS (.bss, or every stripped section of a debug file) has none.
        return b"" if section.type == 8 else self._bytes(section.offset, section.size)

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def section_content(self, name: str) -> bytes | None:
        section = self.section(name)
        return None if section is None else self._content(section)

    # -- symbols ----------------------------------------------------------

    def symtab_symbols(self, types: frozenset[int] | None = None) -> list[ElfSymbol]:
        """.symtab in table order (the null symbol left out); only the
        symbol types in ``types`` when given (names are decoded only for
        those: most of the cost)."""
        return self._symbols(SHT_SYMTAB, types)

    def dynamic_symbols(self, types: frozenset[int] | None = None) -> list[ElfSymbol]:
        """.dynsym as :meth:`symtab_symbols`, with the symbols' versions."""
        return self._symbols(SHT_DYNSYM, types)

    def _symbols(self, kind: int, types: frozenset[int] | None) -> list[ElfSymbol]:
        symbols = self._read_tables.get((kind, types))
        if symbols is None:
            symbols = self._read_tables[kind, types] = self.symbol_records(kind, types).decoded()
        return symbols

    def symbol_records(self, kind: int, types: frozenset[int] | None = None) -> SymbolRecords:
        """The symbols of the ``kind`` table (SHT_SYMTAB, SHT_DYNSYM) of the
        types in ``types`` (all when None), not decoded: looking one name up
        needs none of the others' names."""
        index = next((i for i, s in enumerate(self.sections) if s.type == kind), None)
        if index is None:
            return SymbolRecords(b"", [], ())
        table = self.sections[index]
        if table.type == 8 or table.link >= len(self.sections):
            return SymbolRecords(b"", [], ())
        strings = self._content(self.sections[table.link])
        raw = self._content(table)
        raw = raw[:len(raw) - len(raw) % _SYM.size]
        versions = (self._versions(index) if kind == SHT_DYNSYM else None) or ()
        unpacked = _SYM.iter_unpack(raw)
        next(unpacked, None)        # the null symbol
        if types is None:
            records = [(i, *fields) for i, fields in enumerate(unpacked, 1)]
        else:
            records = [(i, name, info, other, shndx, value, size)
                       for i, (name, info, other, shndx, value, size) in enumerate(unpacked, 1)
                       if info & 0xF in types]
        return SymbolRecords(strings, records, versions)

    def _versions(self, dynsym_index: int) -> list[str | None] | None:
        """Each dynamic symbol's version as "@@VER" or "@VER" (None: none)."""
        versym = next((s for s in self.sections if s.type == SHT_GNU_VERSYM
                       and s.link == dynsym_index), None)
        if versym is None:
            return None
        names = self._version_names()
        # A file uses a handful of distinct values: each spelled out once.
        spelled: dict[int, str | None] = {}

        def spell(value: int) -> str | None:
            name = names.get(value & VERSYM_INDEX) if value & VERSYM_INDEX >= 2 else None
            version = spelled[value] = (None if name is None else
                                        ("@" if value & VERSYM_HIDDEN else "@@") + name)
            return version
        return [spelled[value] if value in spelled else spell(value)
                for (value,) in struct.iter_unpack("<H", self._content(versym)[:versym.size & ~1])]

    def _version_names(self) -> dict[int, str]:
        """Version index -> name, from .gnu.version_d and .gnu.version_r."""
        names: dict[int, str] = {}
        for section in self.sections:
            if section.type not in (SHT_GNU_VERDEF, SHT_GNU_VERNEED):
                continue
            if section.link >= len(self.sections):
                continue
            strings = self._content(self.sections[section.link])
            content = self._content(section)
            if section.type == SHT_GNU_VERDEF:
                self._verdef_names(content, strings, names)
            else:
                self._verneed_names(content, strings, names)
        return names

    @staticmethod
    def _verdef_names(content: bytes, strings: bytes, names: dict[int, str]) -> None:
        at = 0
        while at + _VERDEF.size <= len(content):
            _, _, ndx, count, _, aux, following = _VERDEF.unpack_from(content, at)
            if count and at + aux + _VERDAUX.size <= len(content):
                names[ndx] = _string(strings, _VERDAUX.unpack_from(content, at + aux)[0])
            if not following:
                break
            at += following

    @staticmethod
    def _verneed_names(content: bytes, strings: bytes, names: dict[int, str]) -> None:
        at = 0
        while at + _VERNEED.size <= len(content):
            _, count, _, aux, following = _VERNEED.unpack_from(content, at)
            where = at + aux
            for _ in range(count):
                if where + _VERNAUX.size > len(content):
                    break
                _, _, other, name, following_aux = _VERNAUX.unpack_from(content, where)
                names[other] = _string(strings, name)
                if not following_aux:
                    break
                where += following_aux
            if not following:
                break
            at += following

    def has_dynamic_symbol(self, name: str) -> bool:
        # Asked of every file read, for the ftrace hooks that almost none
        # has (libc exports mcount): the table is not decoded.  A symbol has
        # this name when its name offset is where the name stands in the
        # dynamic string table, alone or as the tail of a longer string.
        dynsym = next((s for s in self.sections if s.type == SHT_DYNSYM), None)
        if dynsym is None or dynsym.type == 8 or dynsym.link >= len(self.sections):
            return False
        places = _places(self._content(self.sections[dynsym.link]), name)
        if not places:
            return False
        raw = self._content(dynsym)
        symbols = _SYM.iter_unpack(raw[:len(raw) - len(raw) % _SYM.size])
        next(symbols, None)     # the null symbol
        return any(symbol[0] in places for symbol in symbols)

    # -- relocations and notes --------------------------------------------

    def dynamic_relocations(self) -> Iterator[Relocation]:
        """The relocations the dynamic linker applies (.rela.dyn, .rela.plt:
        every allocated SHT_RELA section)."""
        dynsym = next((i for i, s in enumerate(self.sections) if s.type == SHT_DYNSYM), None)
        name_of = None
        for section in self.sections:
            if section.type != SHT_RELA or not section.flags & SHF_ALLOC:
                continue
            content = self._content(section)
            for offset, info, addend in _RELA.iter_unpack(content[:len(content) - len(content) % 24]):
                symbol = info >> 32
                name = None
                if symbol and section.link == dynsym:
                    if name_of is None:
                        name_of = self._symbol_names(dynsym)
                    name = name_of(symbol)
                yield Relocation(info & 0xFFFFFFFF, offset, addend, name)

    def _symbol_names(self, index: int):
        """Symbol number -> name (None past the end) of the symbol table at
        section ``index``, each name decoded when first asked: relocations
        name a few hundred symbols of libc's thousands, and decoding the
        whole table was a third of reading libc's tables."""
        table = self.sections[index]
        if table.type == 8 or table.link >= len(self.sections):
            return lambda number: None
        strings = self._content(self.sections[table.link])
        raw = self._content(table)
        count = len(raw) // _SYM.size
        names: dict[int, str] = {}

        def name_of(number: int) -> str | None:
            if number >= count:
                return None
            name = names.get(number)
            if name is None:
                name = names[number] = _string(strings, _SYM.unpack_from(raw, number * _SYM.size)[0])
            return name
        return name_of

    def build_id(self) -> bytes | None:
        """NT_GNU_BUILD_ID, from the note sections (else the PT_NOTE segments)."""
        places = [(s.offset, s.size, 8 if s.align == 8 else 4)
                  for s in self.sections if s.type == SHT_NOTE]
        if not self.sections:
            places = [(ph[2], ph[5], 8 if ph[7] == 8 else 4) for ph in self._phdrs()
                      if ph[0] == PT_NOTE]
        for offset, size, align in places:
            found = _build_id_in(self._bytes(offset, size), align)
            if found is not None:
                return found
        return None

    def _phdrs(self):
        count = min(self.phnum, max(0, self.size - self.phoff) // _PHDR.size)
        return list(_PHDR.iter_unpack(self._bytes(self.phoff, count * _PHDR.size)))


class SymbolRecords:
    """Symbols of one table as the file has them, ``(number, st_name,
    st_info, st_other, st_shndx, st_value, st_size)`` in table order, with
    the table's strings and versions: decoded as a whole or name by name."""

    def __init__(self, strings: bytes, records: list[tuple], versions) -> None:
        self.strings = strings
        self.records = records
        self.versions = versions

    def decoded(self) -> list[ElfSymbol]:
        """Every record as an :class:`ElfSymbol`, in table order."""
        # The hot loop of reading a file's tables (libc's debug file has
        # 30,000 symbols): the string read inline, the tuples made without
        # the named tuple's Python-level __new__.
        strings, versions = self.strings, self.versions
        symbols = []
        append, find, make = symbols.append, strings.find, tuple.__new__
        for i, name, info, other, shndx, value, size in self.records:
            end = find(b"\0", name)
            append(make(ElfSymbol, (
                strings[name:end if end >= 0 else len(strings)].decode("utf-8", "surrogateescape"),
                value, size, info & 0xF, info >> 4, other & 0x3, shndx,
                versions[i] if i < len(versions) else None)))
        return symbols

    def named(self, name: str) -> list[ElfSymbol]:
        """The symbols called ``name``, in table order, as :meth:`decoded`
        has them: those whose name offset is where ``name`` stands in the
        string table, alone or as the tail of a longer string."""
        places = _places(self.strings, name)
        if not places:
            return []
        return SymbolRecords(self.strings, [r for r in self.records if r[1] in places],
                             self.versions).decoded()


def _places(strings: bytes, name: str) -> set[int]:
    """The offsets in a string table at which a symbol's name reads ``name``
    (``name`` alone, or the tail of a longer string)."""
    try:
        wanted = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:      # no file's bytes decode to it
        return set()
    if b"\0" in wanted:
        return set()
    wanted += b"\0"
    places = set()
    at = strings.find(wanted)
    while at >= 0:
        places.add(at)
        at = strings.find(wanted, at + 1)
    return places


def _string(strings: bytes, offset: int) -> str:
    end = strings.find(b"\0", offset)
    return strings[offset:end if end >= 0 else len(strings)].decode("utf-8", "surrogateescape")


def _build_id_in(notes: bytes, align: int) -> bytes | None:
    def aligned(n: int) -> int:
        return (n + align - 1) & -align

    position = 0
    while position + _NOTE.size <= len(notes):
        namesz, descsz, kind = _NOTE.unpack_from(notes, position)
        name_at = position + _NOTE.size
        desc_at = name_at + aligned(namesz)
        if kind == NT_GNU_BUILD_ID and notes[name_at:name_at + namesz] == b"GNU\0":
            return bytes(notes[desc_at:desc_at + descsz])
        position = desc_at + aligned(descsz)
    return None

