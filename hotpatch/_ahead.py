"""What importing the core and its first code write would wait for, started
ahead: the shared objects the import maps, mapped with the GIL released,
and the C core's thread that asks the kernel for the first write's needs.

An import maps an extension module, and ``ctypes.CDLL`` a library, with the
GIL held (CPython 3.11): every Python thread of the service waits while the
dynamic linker reads, maps and relocates it.  Opened first by a ctypes call
of libc's ``dlopen`` (a foreign call releases the GIL), the object is
already mapped when the import or ``ctypes.CDLL`` opens it again, and that
second ``dlopen`` only counts a reference.  The reference taken here is
never dropped: these objects stay mapped for the life of the process anyway.
Only the modules' initialisation then runs with the GIL.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys


def _extension(name: str) -> str | None:
    """The file of extension module ``name`` (None if imported already, or
    not a file)."""
    if name in sys.modules:
        return None
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    return origin if origin and origin.endswith(".so") and os.path.isfile(origin) else None


def map_core_objects() -> None:
    """Map cffi's backend and the C core (1-3 ms of dynamic linking each
    here) before the core's import opens them.  capstone's C library is
    mapped by the C core itself, in a cffi call (``x86_64/decode.py``)."""
    paths = [path for path in (_extension("_cffi_backend"), _extension("hotpatch._native")) if path]
    if not paths:
        return
    dlopen = ctypes.CDLL(None).dlopen
    dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    for path in paths:
        # RTLD_NOW | RTLD_LOCAL, as imports (sys.getdlopenflags()) and
        # ctypes.CDLL open them.  A failure is the import's to report.
        dlopen(os.fsencode(path), os.RTLD_NOW)


def ask_first_write_ahead() -> None:
    """Start the C core's thread that asks the kernel, ahead, what the first
    code write needs (``native/ahead.c``): its membarrier registration waits
    for an RCU grace period (5-25 ms here) in a process with threads.
    Started before the core's modules are imported (55-85 ms), it is over
    by the first write of ``import hotpatch; hotpatch.register(patch)``;
    started where core.py asks (its modules imported), that write waited
    for the rest of it (6-14 ms of a first register() here)."""
    from ._native import lib
    lib.hp_first_write_ahead()
