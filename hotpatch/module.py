"""Patch modules: ``hotpatch.load(path)`` and ``hotpatch build`` (the kernel's
livepatch .ko, in user space).

A C patch module is a shared object built against ``hotpatch/include/hotpatch.h``
that exports its ``struct hp_patch`` through ``HP_PATCH(patch)``.  It is opened
with ``RTLD_NOW | RTLD_NODELETE`` -- its code must stay mapped for the life of
the process, since a thread may still run it -- turned into a
:class:`~hotpatch.Patch` and registered.  A Python patch module is a ``.py``
file that defines ``patch``.
"""
from __future__ import annotations

import functools
import os
import runpy
import sys
import traceback

from . import core, elf, symbols
from ._gil import short_switch_interval
from ._native import ffi as _ffi, lib as _lib
from .errors import HotpatchError

INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
ABI_VERSION = 3
# Version 3 added hotpatch_api (a module that calls the core, as hp_shadow_*
# does, is refused by an older hotpatch instead of calling through NULL);
# its structures are version 2's.  Version 1 had no hp_func.original,
# hp_object.build_id, hp_patch.symbols: its arrays have a shorter stride, so
# its modules are read as struct hp_v1_patch.  Both sets of structures are
# compiled into the core (hotpatch/_build.py reads hotpatch.h's): nothing is
# parsed here, where cffi's cdef held the GIL for milliseconds.
_PATCH_TYPE = {1: "struct hp_v1_patch *", 2: "struct hp_patch *", ABI_VERSION: "struct hp_patch *"}


def _field(cdata, name: str):
    """A field that version 1 structures do not have: NULL there."""
    try:
        return getattr(cdata, name)
    except AttributeError:
        return _ffi.NULL


def build(source: str, output: str, extra_args: list[str] = ()) -> str:
    """Compile a C patch module with the system ``cc``: position independent,
    shared, with ``hotpatch.h`` on the include path.  Returns ``output``."""
    # Imported here: a service's first load() would otherwise import it
    # (with selectors, locale and signal: 3-7 ms, the GIL held) for nothing.
    import subprocess
    command = ["cc", "-O2", "-fPIC", "-shared", "-I", INCLUDE_DIR, source, "-o", output,
               *extra_args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise HotpatchError(f"building {source} failed:\n{result.stderr.strip()}")
    return output


def _callback(c_object, function):
    """A Python callback for the Object that calls the module's C callback."""
    if function == _ffi.NULL:
        return None
    return lambda obj: function(c_object)


def _string(ffi, pointer) -> str | None:
    return None if pointer == ffi.NULL else ffi.string(pointer).decode()


def _c_funcs(ffi, c_object) -> list[core.Func]:
    funcs = []
    if c_object.funcs == ffi.NULL:
        return funcs
    for i in range(1 << 16):
        c_func = c_object.funcs[i]
        if c_func.old_name == ffi.NULL:
            return funcs
        func = core.Func(ffi.string(c_func.old_name).decode(),
                         int(ffi.cast("uintptr_t", c_func.new_func)),
                         old_sympos=int(c_func.old_sympos))
        slot = _field(c_func, "original")
        if slot != ffi.NULL:
            # Filled before the redirect is written (see core.Func.original).
            func._publish_original = lambda address, slot=slot: slot.__setitem__(
                0, ffi.cast("void *", address))
        funcs.append(func)
    raise HotpatchError("a funcs array has no terminating { } element")


def _is_terminator(ffi, c_object) -> bool:
    callbacks = c_object.callbacks
    return (c_object.name == ffi.NULL and c_object.funcs == ffi.NULL
            and all(getattr(callbacks, n) == ffi.NULL
                    for n in ("pre_patch", "post_patch", "pre_unpatch", "post_unpatch")))


def _c_objects(ffi, c_patch) -> list[core.Object]:
    objects = []
    for i in range(1 << 16):
        c_object = c_patch.objs + i      # callbacks take a struct hp_object *
        if _is_terminator(ffi, c_object):
            return objects
        cb = c_object.callbacks
        objects.append(core.Object(
            _string(ffi, c_object.name), _c_funcs(ffi, c_object),
            pre_patch=_callback(c_object, cb.pre_patch),
            post_patch=_callback(c_object, cb.post_patch),
            pre_unpatch=_callback(c_object, cb.pre_unpatch),
            post_unpatch=_callback(c_object, cb.post_unpatch),
            build_id=_string(ffi, _field(c_object, "build_id"))))
    raise HotpatchError("the objs array has no terminating { } element")


def _resolve_symbols(path: str, c_patch) -> None:
    """Store the address of every hp_symbol of the module (klp relocations);
    all are resolved before any is written."""
    table = _field(c_patch, "symbols")
    if table == _ffi.NULL:
        return
    resolved = []
    for i in range(1 << 16):
        ref = table[i]
        if ref.name == _ffi.NULL:
            break
        object_name, name = _string(_ffi, ref.object), _ffi.string(ref.name).decode()
        where = f"{path}: symbols[{i}]: object {object_name or 'main'}: symbol '{name}'"
        try:
            if ref.address == _ffi.NULL:
                raise HotpatchError("its address to fill is NULL (use HP_SYMBOL(ptr, ...))")
            loaded = symbols.find_object(object_name)
            if loaded is None:
                raise HotpatchError("the object is not loaded")
            resolved.append((ref.address, symbols.resolve_any(loaded, name, int(ref.sympos))))
        except HotpatchError as e:
            raise type(e)(f"{where}: {e}") from None
    else:
        raise HotpatchError(f"{path}: the symbols array has no terminating {{ }} element")
    for address, value in resolved:
        address[0] = _ffi.cast("void *", value)


def _fill_api(path: str, handle) -> None:
    """Point the module's ``hotpatch_api`` at the core's table of functions
    (``struct hp_api``), before its patch is registered: its callbacks and
    new functions call the core through it (not its constructors, which
    dlopen ran)."""
    address = _lib.hp_dlsym(handle, b"hotpatch_api")
    if not address:
        raise HotpatchError(f"{path}: built for hotpatch ABI 3 but does not export "
                            f"hotpatch_api (HP_PATCH(...) defines it)")
    _ffi.cast("uintptr_t *", address)[0] = _lib.hp_api_table()


_DESCRIPTOR_SYMBOLS = ("hotpatch_patch_descriptor", "hotpatch_abi_version")


def _check_descriptor(path: str) -> None:
    """Refuse a file that does not export the descriptor, read from its
    dynamic symbols before it is opened: dlopen runs its constructors, and
    RTLD_NODELETE would keep it mapped for life."""
    binary = elf.parse_elf(path)
    if binary is None:
        raise HotpatchError(f"{path}: not a patch module: not an ELF file (a C patch module "
                            f"is a shared object built with `hotpatch build`, a Python one "
                            f"ends in .py)")
    defined = {sym.name for sym in binary.dynamic_symbols() if sym.shndx != 0}
    missing = [name for name in _DESCRIPTOR_SYMBOLS if name not in defined]
    if missing:
        raise HotpatchError(f"{path}: not a hotpatch patch module: it does not export "
                            f"{' or '.join(missing)} (no HP_PATCH(...) descriptor); it was "
                            f"not opened")


def _open(path: str):
    """dlopen the module (``RTLD_NOW | RTLD_NODELETE``) from the core, with
    the GIL released: mapping, relocating and running its constructors
    stalls no Python thread (cffi's ``ffi.dlopen`` and ``ctypes.CDLL``
    keep the GIL)."""
    err = _ffi.new("char[]", 256)
    handle = _lib.hp_dlopen(os.fsencode(path), _lib.RTLD_NOW | _lib.RTLD_NODELETE, err)
    if handle == _ffi.NULL:
        raise HotpatchError(f"{path}: cannot load the patch module: "
                            f"{_ffi.string(err).decode(errors='replace')}")
    return handle


def _patch_from_library(path: str) -> core.Patch:
    _check_descriptor(path)
    handle = _open(path)
    version_at = _lib.hp_dlsym(handle, b"hotpatch_abi_version")
    descriptor_at = _lib.hp_dlsym(handle, b"hotpatch_patch_descriptor")
    if not version_at or not descriptor_at:
        raise HotpatchError(f"{path}: not a hotpatch patch module (no HP_PATCH(...) "
                            "descriptor)")
    version = _ffi.cast("unsigned int *", version_at)[0]
    if version not in _PATCH_TYPE:
        raise HotpatchError(f"{path}: built for hotpatch ABI {version}, this is {ABI_VERSION}")
    c_patch = _ffi.cast(_PATCH_TYPE[version] + "*", descriptor_at)[0]
    if c_patch == _ffi.NULL or c_patch.name == _ffi.NULL or c_patch.objs == _ffi.NULL:
        raise HotpatchError(f"{path}: the patch descriptor has no name or no objs")
    try:
        objects = _c_objects(_ffi, c_patch)
    except HotpatchError as e:
        raise HotpatchError(f"{path}: {e}") from None
    _resolve_symbols(path, c_patch)
    if version >= 3:
        _fill_api(path, handle)
    patch = core.Patch(_ffi.string(c_patch.name).decode(), objects,
                       replace=bool(c_patch.replace))
    patch.module = handle      # the module's dlopen handle (RTLD_NODELETE: mapped for life)
    return patch


def _module_line(path: str, error: BaseException) -> str:
    """``:LINE`` of the deepest frame of ``error`` in the module ``path``."""
    line = ""
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if os.path.abspath(frame.f_code.co_filename) == path:
            line = f":{lineno}"
    return line


def _patch_from_python(path: str) -> core.Patch:
    try:
        namespace = runpy.run_path(path, run_name=f"hotpatch_module_{os.path.basename(path)[:-3]}")
    except SyntaxError as e:
        raise HotpatchError(f"{path}:{e.lineno}: the Python patch module does not compile: "
                            f"{type(e).__name__}: {e.msg}") from None
    except Exception as e:
        raise HotpatchError(f"{path}{_module_line(path, e)}: the Python patch module raised "
                            f"{type(e).__name__}: {e}") from e
    patch = namespace.get("patch")
    if not isinstance(patch, core.Patch):
        raise HotpatchError(f"{path}: a Python patch module must define `patch`, a hotpatch.Patch")
    return patch


#: CPython's own SHA-256 extension, by the name each version gives it
#: (``_sha2`` from 3.12, ``_sha256`` before).
_BUILTIN_SHA256 = ("_sha2", "_sha256")


@functools.cache
def _sha256():
    """A SHA-256 constructor that costs the service no stall: CPython's own
    extension (``_sha2``/``_sha256``), its file mapped first by the core with
    the GIL released so that the import's own dlopen (GIL held) finds it
    mapped.  hashlib would initialise OpenSSL (libcrypto) with the GIL held:
    2-6 ms at the first load of a process.  hashlib where neither exists.
    Found once: the search for the name a version lacks reads directories."""
    import importlib.util
    for name in _BUILTIN_SHA256:
        if name not in sys.modules:
            spec = importlib.util.find_spec(name)
            if spec is None:
                continue
            if spec.origin and os.path.isabs(spec.origin):
                # A failure here is the import's to report.
                _lib.hp_dlopen(os.fsencode(spec.origin), sys.getdlopenflags(),
                               _ffi.new("char[]", 256))
        return importlib.import_module(name).sha256
    import hashlib
    return hashlib.sha256


def digest(path: str) -> str:
    """SHA-256 of a patch module's file: what tells that the same module is
    loaded again."""
    with open(path, "rb") as f:
        return _sha256()(f.read()).hexdigest()


def load(path: str, *, enable: bool = True) -> core.Patch:
    """Load a patch module (a C ``.so`` or a ``.py`` file) and register it
    (enabled by default).  Returns the :class:`~hotpatch.Patch`, whose
    ``module_path`` and ``module_digest`` name the file it came from."""
    path = os.path.abspath(path)
    # Refused before the module is opened: its constructors must not run
    # for a load that register() would refuse.
    core._mutex.check(f"load {path}")
    if not os.path.exists(path):
        raise HotpatchError(f"{path}: no such patch module")
    # The whole load, not only its register(), is Python the service's
    # threads would wait a whole switch interval for (see _gil).
    with short_switch_interval():
        module_digest = digest(path)
        patch = _patch_from_python(path) if path.endswith(".py") else _patch_from_library(path)
        patch.module_path, patch.module_digest = path, module_digest
        try:
            return core.register(patch, enable=enable)
        except HotpatchError as e:
            raise core._prefixed(e, path) from None
