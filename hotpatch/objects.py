"""Loaded objects: the ELF images the dynamic linker has mapped in this process.

A *loaded object* is what ``dl_iterate_phdr`` reports: the main program
(object ``None``) and every shared object, described from its mapped image
(load base, executable segments, DT_SONAME, build-id), never from its file:
the file may have been replaced since.  Memory is read without faulting,
because another thread may unload the object meanwhile.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from hotpatch import _procfs
from hotpatch._locks import OperationLock
from hotpatch._native import ffi, lib
from hotpatch.errors import HotpatchError

__all__ = ["LoadedObject", "MemoryGone", "loaded_objects", "find_object",
           "read_memory", "inside", "libc_function", "mapped_file_identity"]

PT_LOAD, PT_NOTE = 1, 4
PF_X = 1
NT_GNU_BUILD_ID = 3
AT_SYSINFO_EHDR = 33


# --------------------------------------------------------------------------
# Loaded objects, described from their mapped images
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedObject:
    """One ELF object mapped in this process, as the dynamic linker lists it."""

    #: None for the main program, else the path as the dynamic linker has it
    name: str | None
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

    def __hash__(self) -> int:
        """The fields' hash, computed once: an object is a dictionary key
        for every symbol lookup in its table (hashing the fields each time
        was most of such a lookup)."""
        value = self.__dict__.get("_hash")
        if value is None:
            value = hash((self.name, self.base, self.exec_ranges, self.build_id))
            object.__setattr__(self, "_hash", value)
        return value

    @property
    def path(self) -> str:
        """The file (realpath); /proc/thread-self/exe resolved for the main
        program.  Resolved on first use: a process maps dozens of objects,
        a lookup reads one of them, and resolving every directory of every
        path took most of the time of describing them all."""
        path = self.__dict__.get("_path")
        if path is None:
            path = _realpath(self.name)
            object.__setattr__(self, "_path", path)
        return path

    def __str__(self) -> str:
        if self.name is None:
            return f"main program {self.basename}"
        return self.basename


class MemoryGone(HotpatchError):
    """Memory of a loaded object was unmapped while it was read: another
    thread unloaded the object."""


def read_memory(address: int, size: int) -> bytes:
    """Bytes of this process's memory, read without faulting: another thread
    may unload the object meanwhile."""
    buffer = ffi.new("char[]", size)
    got = lib.hp_read_memory(address, buffer, size)
    if got != size:
        raise MemoryGone(f"the memory at {address:#x} is no longer mapped "
                         "(its object was unloaded meanwhile?)")
    return ffi.buffer(buffer, size)[:]


def inside(ranges, address: int, size: int = 1) -> bool:
    # A plain loop: this is on the cached-lookup path, where any() over a
    # generator costs a third of the time.
    for lo, hi in ranges:
        if lo <= address and address + size <= hi:
            return True
    return False


_LIBC = ctypes.CDLL(None)


def libc_function(name: str, restype, *argtypes):
    function = getattr(_LIBC, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


_VDSO = libc_function("getauxval", ctypes.c_ulong, ctypes.c_ulong)(AT_SYSINFO_EHDR)


_described: tuple[int | None, tuple[LoadedObject, ...]] = (None, ())
# Only ever taken as a query: the list is a cache, and a thread that cannot
# wait for it (a signal handler that interrupted the describing) describes
# the objects again without it.
_described_lock = OperationLock(
    2, lambda what: HotpatchError(f"{what}: already listing loaded objects in this thread"))


def loaded_objects() -> list[LoadedObject]:
    """Every object mapped in the process, in the dynamic linker's order.

    The vdso is left out: it has no file, hence no symbol table to read.
    Describing every object costs about a millisecond, so the list is kept
    until the dynamic linker's load or unload count changes, and then only
    the objects not mapped before are described.
    """
    return list(_loaded())


def _loaded() -> tuple[LoadedObject, ...]:
    """:func:`loaded_objects`, as the tuple kept for this generation (the
    same object until a load or unload)."""
    global _described
    # Read before listing: a load in between makes the next call list again.
    generation = lib.hp_loaded_generation()
    # The common case without the lock (a query costs more than the rest of
    # this call; a patch of 1,000 functions asks once per function): the
    # pair is replaced as one tuple, so a snapshot for this generation is
    # the list for it.
    described = _described
    if described[0] == generation:
        return described[1]
    with _described_lock.query() as held:
        if not held:
            return tuple(_describe_loaded())
        if _described[0] != generation:
            _described = (generation, tuple(_describe_loaded(_described[1])))
        return _described[1]


def loaded_entries() -> Iterator:
    """The C core's ``struct hp_loaded_object`` of every object mapped now,
    in the dynamic linker's order (the raw list :func:`loaded_objects`
    describes).  A generator: its frame keeps the array alive while the
    entries are read."""
    capacity = 64
    while True:
        array = ffi.new("struct hp_loaded_object[]", capacity)
        count = lib.hp_loaded_objects(array, capacity)
        if count <= capacity:
            break
        capacity = count + 16
    for i in range(count):
        yield array[i]


def _describe_loaded(known: tuple[LoadedObject, ...] = ()) -> list[LoadedObject]:
    """Every loaded object described; an object of ``known`` (the last
    list) still mapped as it was is kept as it is: a load of one object (a
    patch module) then describes that one, not the process's dozens."""
    kept = {obj.__dict__["_identity"]: obj for obj in known}
    objects = []
    for entry in loaded_entries():
        # The vdso's program headers follow its ELF header, in its one page.
        if 0 <= entry.phdr_address - _VDSO < 4096:
            continue
        described = kept.get(_entry_identity(entry)) if kept else None
        if described is None:
            try:
                described = _describe(entry)
            except MemoryGone:
                continue    # unloaded while described: it is gone
        objects.append(described)
    return objects


def _entry_identity(entry) -> tuple:
    """What tells one mapping of one file from another: its name and where
    its image and program headers lie, and its build-id (an object unloaded
    and another build loaded at the same place differs in it)."""
    build_id = (ffi.buffer(entry.build_id, entry.build_id_len)[:]
                if entry.build_id_len >= 0 else entry.build_id_len)
    return (ffi.string(entry.name), int(entry.base), int(entry.phdr_address), build_id)


class _Phdr(NamedTuple):
    p_type: int
    p_flags: int
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    p_align: int


_PHDR = struct.Struct("<IIQQQQQQ")


def _describe(entry) -> LoadedObject:
    name = os.fsdecode(ffi.string(entry.name)) or None
    base = int(entry.base)
    # Copied out of cffi once: each field read through cdata costs as much
    # as unpacking the whole header.  Plain tuples (p_type, p_flags, p_offset,
    # p_vaddr, p_paddr, p_filesz, p_memsz, p_align): only the rare fallback
    # below names the fields.
    phdrs = list(_PHDR.iter_unpack(ffi.buffer(entry.phdr)[:entry.phnum * _PHDR.size]))
    path = None if name else _main_program_path()
    basename = os.path.basename(name or path)
    # The C core read both from the image under the dynamic linker's lock
    # (a tenth of the cost of reading them from here, object by object).
    soname = (os.fsdecode(ffi.buffer(entry.soname, entry.soname_len)[:])
              if entry.soname_len >= 0 else None)
    if entry.build_id_len >= 0:
        build_id = ffi.buffer(entry.build_id, entry.build_id_len)[:]
    elif entry.build_id_len == -2:      # too long for the C core's buffer
        named = [_Phdr._make(ph) for ph in phdrs]
        build_id = _mapped_build_id(base, named, [(base + ph.p_vaddr, base + ph.p_vaddr + ph.p_memsz)
                                                  for ph in named if ph.p_type == PT_LOAD])
    else:
        build_id = None
    described = LoadedObject(
        name=name,
        basename=basename,
        soname=soname,
        base=base,
        exec_ranges=tuple((base + vaddr, base + vaddr + memsz)
                          for kind, flags, _, vaddr, _, _, memsz, _ in phdrs
                          if kind == PT_LOAD and flags & PF_X),
        build_id=build_id,
        names=frozenset(n for n in (basename, _file_name(name) if name else basename, soname) if n),
    )
    if path is not None:
        object.__setattr__(described, "_path", path)
    object.__setattr__(described, "_identity", _entry_identity(entry))
    return described


def _file_name(name: str) -> str:
    """The base name of the file ``name`` resolves to (``libz.so.1.2.13``
    for ``/lib/x86_64-linux-gnu/libz.so.1``): ``basename(realpath(name))``
    at a readlink or two.  Only symbolic links in the last component change
    the base name, so the directories are left to the kernel."""
    path = name
    for _ in range(40):     # the kernel's limit on links in one lookup
        try:
            target = os.readlink(path)
        except OSError:     # not a link (or gone): its name is the file's
            break
        path = os.path.join(os.path.dirname(path), target)
    return os.path.basename(path)


_c_realpath = libc_function("realpath", ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
_c_free = libc_function("free", None, ctypes.c_void_p)


def _realpath(name: str) -> str:
    """``os.path.realpath``, by libc: the Python one costs 0.1 ms a path
    (a lstat and a string per component), a few ms for every object."""
    resolved = _c_realpath(os.fsencode(name), None)
    if not resolved:
        return os.path.realpath(name)   # gone meanwhile: resolve what is left
    try:
        return os.fsdecode(ctypes.string_at(resolved))
    finally:
        _c_free(resolved)


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
        if ph.p_type == PT_NOTE and inside(loads, address, ph.p_memsz):
            build_id = _build_id_in_notes(read_memory(address, ph.p_memsz),
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


# The list of objects find_object last answered from, and its answers by
# name: a patch of many functions, or one redirected function at a time,
# asks for its object again and again.
_found: tuple[tuple, dict] = ((), {})


def find_object(name: str | None) -> LoadedObject | None:
    """The loaded object an ``Object.name`` means, or None if it is not loaded.

    ``None`` is the main program; otherwise the exact basename (as the
    dynamic linker has it, or of the real file), the DT_SONAME, or an
    absolute path.  Two objects matching one name is a HotpatchError.
    """
    global _found
    objects = _loaded()
    found = _found
    if found[0] is objects and name in found[1]:
        return found[1][name]
    obj = _find_in(objects, name)
    if not (name and os.path.isabs(name)):    # a path is resolved each time: links change
        if found[0] is not objects:
            found = _found = (objects, {})
        found[1][name] = obj
    return obj


def _find_in(objects, name: str | None) -> LoadedObject | None:
    if name is None:
        return next((o for o in objects if o.name is None), None)
    if os.path.isabs(name):
        real = os.path.realpath(name)
        # By base name first: an object's own path is resolved only when
        # it can match.
        file_name = os.path.basename(real)
        matches = [o for o in objects
                   if name == o.name or (file_name in o.names and real == o.path)]
    else:
        matches = [o for o in objects if name in o.names]
    if len(matches) > 1:
        listed = "; ".join(f"{o.path} at {o.base:#x}" for o in matches)
        raise HotpatchError(
            f"{name}: {len(matches)} loaded objects match this name: {listed}; "
            f"name the object by its absolute path")
    return matches[0] if matches else None


def mapped_file_identity(obj: LoadedObject) -> tuple[int, int] | None:
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
