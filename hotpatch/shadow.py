"""Shadow variables (the kernel's ``klp_shadow_*``, kernel/livepatch/shadow.c).

A patch that needs a field an existing structure does not have attaches it
as a shadow variable: data of its own, found by the structure's address and
an id the patch chooses (Documentation/livepatch/shadow-vars.rst).  The
table is the C core's (``native/shadow.c``), shared with C patch modules,
which use ``hp_shadow_*`` from ``hotpatch.h``: data attached from C is found
from Python and the other way round.

``obj`` is an address: an int, or a cffi or ctypes pointer; ``id`` an int.
Data is returned as its address (an int).  ``ctor(obj, data)`` runs on the
zeroed data before anyone can find it (it fails -- nothing is attached --
if it raises or returns a non-zero int); ``dtor(obj, data)`` runs on data
no reader can find any more, before it is released.
"""
from __future__ import annotations

import ctypes
from typing import Callable, Optional

from ._native import ffi, lib
from .errors import HotpatchError

Ctor = Callable[[int, int], Optional[int]]
Dtor = Callable[[int, int], None]


class _Call:
    """A Python ctor or dtor on its way through the C core, and what it raised."""

    def __init__(self, function):
        self.function = function
        self.error: BaseException | None = None

    def raise_error(self):
        if self.error is not None:
            error, self.error = self.error, None
            raise error


@ffi.def_extern()
def _hotpatch_shadow_ctor(obj, data, handle):
    call = ffi.from_handle(handle)
    try:
        result = call.function(int(ffi.cast("uintptr_t", obj)), int(ffi.cast("uintptr_t", data)))
        return 0 if result is None else int(result)
    except BaseException as e:      # re-raised by the caller, once the table is unlocked
        call.error = e
        return -1


@ffi.def_extern()
def _hotpatch_shadow_dtor(obj, data, handle):
    call = ffi.from_handle(handle)
    try:
        call.function(int(ffi.cast("uintptr_t", obj)), int(ffi.cast("uintptr_t", data)))
    except BaseException as e:
        if call.error is None:       # the first one; the other data is released all the same
            call.error = e


def _address(obj) -> int:
    if isinstance(obj, bool):
        raise TypeError(f"a shadow variable's object is an address, not {obj!r}")
    if isinstance(obj, int):
        address = obj
    elif isinstance(obj, ffi.CData):
        address = int(ffi.cast("uintptr_t", obj))
    elif isinstance(obj, ctypes.c_void_p):
        address = obj.value or 0
    elif isinstance(obj, (ctypes._Pointer, ctypes._CFuncPtr)):
        address = ctypes.cast(obj, ctypes.c_void_p).value or 0
    else:
        raise TypeError(f"a shadow variable's object is an address (an int, a cffi or ctypes "
                        f"pointer), not {obj!r}")
    if not 0 <= address < 1 << 64:
        raise ValueError(f"{address:#x} is no address")
    return address


def _id(id) -> int:
    if not isinstance(id, int) or isinstance(id, bool) or not 0 <= id < 1 << 64:
        raise TypeError(f"a shadow variable's id is an integer of 64 bits, not {id!r}")
    return id


def _data(pointer) -> int | None:
    return None if pointer == ffi.NULL else int(ffi.cast("uintptr_t", pointer))


def _allocate(function, obj, id, size: int, ctor: Ctor | None):
    obj, id = _address(obj), _id(id)
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"a shadow variable's size is an int >= 0, not {size!r}")
    if ctor is None:
        return _data(function(ffi.cast("void *", obj), id, size, ffi.NULL, ffi.NULL)), None
    call = _Call(ctor)
    handle = ffi.new_handle(call)
    data = function(ffi.cast("void *", obj), id, size, lib._hotpatch_shadow_ctor, handle)
    call.raise_error()
    return _data(data), call


def get(obj, id: int) -> int | None:
    """The address of the data of (obj, id), or None (``klp_shadow_get``)."""
    return _data(lib.hp_shadow_get(ffi.cast("void *", _address(obj)), _id(id)))


def alloc(obj, id: int, size: int, ctor: Ctor | None = None) -> int:
    """Attach ``size`` zeroed bytes to (obj, id), given to ``ctor(obj, data)``
    before they can be found; returns their address (``klp_shadow_alloc``).
    Raises HotpatchError if (obj, id) has data already or the ctor failed
    (then nothing is attached), or what the ctor raised."""
    data, call = _allocate(lib.hp_shadow_alloc, obj, id, size, ctor)
    if data is None:
        if get(obj, id) is not None:
            raise HotpatchError(f"shadow variable {id} of {_address(obj):#x} exists already")
        raise HotpatchError(f"shadow variable {id} of {_address(obj):#x}: "
                            + ("its constructor failed" if call else "out of memory"))
    return data


def get_or_alloc(obj, id: int, size: int, ctor: Ctor | None = None) -> int:
    """The data of (obj, id), attached as by :func:`alloc` if there is none
    (``klp_shadow_get_or_alloc``)."""
    data, call = _allocate(lib.hp_shadow_get_or_alloc, obj, id, size, ctor)
    if data is None:
        raise HotpatchError(f"shadow variable {id} of {_address(obj):#x}: "
                            + ("its constructor failed" if call else "out of memory"))
    return data


def _free(obj, id, all: bool, dtor: Dtor | None) -> int:
    if dtor is None:
        return lib.hp_shadow_free_each(ffi.cast("void *", obj), id, all, ffi.NULL, ffi.NULL)
    call = _Call(dtor)
    handle = ffi.new_handle(call)
    count = lib.hp_shadow_free_each(ffi.cast("void *", obj), id, all,
                                    lib._hotpatch_shadow_dtor, handle)
    call.raise_error()
    return count


def free(obj, id: int, dtor: Dtor | None = None) -> bool:
    """Detach the data of (obj, id) and release it, after ``dtor(obj, data)``
    (``klp_shadow_free``).  Returns whether there was any."""
    return _free(_address(obj), _id(id), False, dtor) > 0


def free_all(id: int, dtor: Dtor | None = None) -> int:
    """The same for the data of ``id`` of every object
    (``klp_shadow_free_all``).  Returns how many were freed."""
    return _free(0, _id(id), True, dtor)


def count() -> int:
    """Shadow variables attached now, of every id."""
    return lib.hp_shadow_live()
