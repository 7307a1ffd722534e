"""The new code of a Func: whatever the user gave, as an address kept alive.

``new`` may be an integer address, a cffi function pointer (from any FFI),
a ctypes function pointer, or a Python callable together with a C
``signature`` such as ``"long(long)"``: that becomes a cffi callback, which
takes the GIL on entry.

A Python replacement fails safe: its signature is parsed and checked against
the callable's arity at ``register()``; at call time an exception, or a
result that cannot be converted to the C result type, runs the original
function with the same arguments instead, counts the error on the Func
(``errors``, ``last_error``) and logs the first one (logger ``hotpatch``).
One callback is made per callable, signature and target function, and
reused by every later ``register()``: cffi callbacks are never freed.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import inspect
import logging
import operator
import threading

import _cffi_backend

from . import objects, sites
from ._native import ffi
from .errors import HotpatchError, UnsafeToPatch

_log = logging.getLogger("hotpatch")


@functools.cache
def _parser_ffi() -> cffi.FFI:
    """The FFI that parses the signatures the C core's FFI cannot (see
    :func:`function_type`), made on first need: cffi.FFI() imports
    pycparser, 0.1 s of import (part of it with the GIL held in one piece)."""
    import cffi     # cffi's Python half, as pycparser: for those signatures only
    return cffi.FFI()


# (callable's id, signature, target) -> _Callback; holds them for the process's life
_callbacks: dict[tuple, "_Callback"] = {}
# The arguments of the Python replacement running in this thread, for
# onerror, which cffi calls without them when the result cannot be converted.
_running = threading.local()


def function_type(where: str, signature: str):
    """The cffi function-pointer type of a C ``signature``, or a HotpatchError.

    The C core's compiled FFI reads it with cffi's C parser; a signature it
    cannot read (a ``struct`` it does not know, a variadic or bad one) is
    read by ``cffi.FFI()``'s parser, which accepts an unknown ``struct`` as
    incomplete and says why it refuses the others."""
    if not isinstance(signature, str) or not signature.strip():
        raise HotpatchError(f"{where}: signature must be a C function type such as "
                            f"\"long(long)\", not {signature!r}")
    try:
        # The compiled FFI reads a function type as a pointer to it only
        # where it makes a callback: this one is never called, and freed.
        return ffi.typeof(ffi.callback(signature, _never_called))
    except Exception:
        pass
    import cffi     # its errors (imported by _parser_ffi() anyway)
    try:
        # A function type ("long(long)") read as a pointer to it, as
        # ffi.callback() reads its first argument.
        ftype = _parser_ffi()._typeof(signature, consider_function_as_funcptr=True)
    except (cffi.CDefError, cffi.FFIError, TypeError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise HotpatchError(f"{where}: bad signature {signature!r}: {reason}") from None
    if ftype.kind != "function":
        raise HotpatchError(f"{where}: bad signature {signature!r}: a {ftype.kind} type, "
                            f"not a function type such as \"long(long)\"")
    if ftype.ellipsis:
        raise HotpatchError(f"{where}: bad signature {signature!r}: a variadic function "
                            f"cannot be replaced by a Python callable")
    return ftype


def _never_called(*args):
    raise AssertionError("a callback made only for its type was called")


def _check_arity(where: str, new, ftype, signature: str) -> None:
    try:
        parameters = inspect.signature(new)
    except (TypeError, ValueError):
        return      # a builtin without introspection: cannot tell
    try:
        parameters.bind(*range(len(ftype.args)))
    except TypeError as e:
        raise HotpatchError(f"{where}: the Python replacement {_name(new)} cannot be called "
                            f"with the {len(ftype.args)} argument(s) of {signature!r}: "
                            f"{e}") from None


def _name(new) -> str:
    return getattr(new, "__qualname__", None) or repr(new)


class _Callback:
    """One cffi callback for a Python replacement; ``func`` is the Func it
    serves now (the latest registered for its target)."""

    def __init__(self, new, ftype):
        self.new = new           # keeps id(new) in the cache key unique
        self.func = None
        self.void = ftype.result.kind == "void"
        self.cdata = ffi.callback(ftype, self._call, onerror=self._unconvertible)
        self.address = int(ffi.cast("uintptr_t", self.cdata))

    def _call(self, *args):
        try:
            result = self.new(*args)
        except BaseException as e:   # anything, so that C gets the old behaviour
            return self._fall_back(e, args)
        # Nested replacements ran in between: these are the arguments
        # onerror needs if cffi cannot convert the result.
        _running.args = args
        return result

    def _unconvertible(self, exc_type, exc, tb):
        """cffi could not convert the result: run the original instead."""
        return self._fall_back(exc, getattr(_running, "args", ()))

    def _fall_back(self, error: BaseException, args):
        func = self.func
        func.errors += 1
        func.last_error = error
        if func.errors == 1:
            _log.error("the Python replacement of %s failed (%s: %s); running the original "
                       "function instead (this is logged once; func.errors counts them)",
                       _where(func), type(error).__name__, error,
                       exc_info=(type(error), error, error.__traceback__))
        try:
            return func.call_original(*args)
        except BaseException as e:
            _log.error("%s: calling the original failed too: %s", _where(func), e)
            return None      # cffi returns the zero value: nothing better left


def _where(func) -> str:
    obj = func.object.label if func.object is not None else "?"
    return f"object {obj}: {func.old_name}"


def _python_callback(func, new) -> int:
    where = f"{func.old_name} (Func at {func.defined_at})"
    if not func.signature:
        raise HotpatchError(f"{where}: a Python callable as new code needs a C "
                            "signature, e.g. signature=\"long(long)\"")
    ftype = function_type(where, func.signature)
    _check_arity(where, new, ftype, func.signature)
    target = (func.object.name if func.object else None, func.old_name, func.old_sympos,
              func.old_offset)
    key = (id(new), ftype.cname, target)
    callback = _callbacks.get(key)
    if callback is None or callback.new is not new:
        try:
            callback = _callbacks[key] = _Callback(new, ftype)
        except MemoryError:
            # cffi builds its callbacks in writable and executable memory,
            # which a process started with PR_SET_MDWE (systemd's
            # MemoryDenyWriteExecute) refuses; code compiled ahead of time
            # needs none.
            raise HotpatchError(
                f"{where}: a Python callable cannot be made callable from C in this process: "
                "it refuses writable and executable memory (PR_SET_MDWE, systemd's "
                "MemoryDenyWriteExecute); use a C patch module (hotpatch build) or a compiled "
                "function pointer") from None
    callback.func = func
    return callback.address


def original_caller(func):
    """The old code of ``func`` as a cffi function of its C signature (or of
    ``new``'s type when that is a cffi function pointer)."""
    if func.signature:
        ftype = function_type(func.old_name, func.signature)
    elif isinstance(func.new, _cffi_backend._CDataBase) and ffi.typeof(func.new).kind == "function":
        ftype = ffi.typeof(func.new)
    else:
        raise HotpatchError(f"{func.old_name}: call_original needs the func's C signature "
                            f"(Func(..., signature=\"long(long)\"))")
    return ffi.cast(ftype, func.original)


def _cdata_address(new) -> int:
    if ffi.typeof(new).kind not in ("pointer", "function"):
        raise TypeError(f"a cffi {ffi.typeof(new).cname} is not a function pointer")
    return int(ffi.cast("uintptr_t", new))


def code_address(func) -> tuple[int, object]:
    """``(address, what keeps it alive)`` for ``func.new``; a Python
    callable's callback is kept by this module (None is returned for it).
    An address given by the user must lie in executable memory."""
    new = func.new
    if isinstance(new, bool):
        raise TypeError(f"{func.old_name}: new must be code, not {new!r}")
    if isinstance(new, int):
        address, keep = new, None
    elif isinstance(new, _cffi_backend._CDataBase):
        address, keep = _cdata_address(new), new
    elif isinstance(new, ctypes._CFuncPtr):
        address, keep = ctypes.cast(new, ctypes.c_void_p).value or 0, new
    elif callable(new):
        return _python_callback(func, new), None    # cffi's own executable memory
    else:
        raise TypeError(f"{func.old_name}: new must be an address, a cffi or ctypes function "
                        f"pointer or a callable with a signature, not {type(new).__name__}")
    if not address:
        raise HotpatchError(f"{func.old_name}: new code at address 0")
    _check_executable(func, address)
    return address, keep


# The executable ranges of the loaded objects, sorted, with the objects they
# were read from: asked once per function of a patch, a walk over every
# object's ranges was 15 us.  The objects are held here, so that a list
# described again (new objects) never matches them.
_code_ranges: tuple = ([], [], [])    # (objects, starts, ends)


def _in_loaded_code(address: int) -> bool:
    global _code_ranges
    loaded = objects.loaded_objects()
    held = _code_ranges[0]
    if len(held) != len(loaded) or not all(map(operator.is_, held, loaded)):
        ranges = sorted(r for obj in loaded for r in obj.exec_ranges)
        _code_ranges = (loaded, [lo for lo, _ in ranges], [hi for _, hi in ranges])
    _, starts, ends = _code_ranges
    i = bisect.bisect_right(starts, address) - 1
    return i >= 0 and address < ends[i]


def _check_executable(func, address: int) -> None:
    """Refuse new code outside executable memory (a data buffer, a stale
    address): the first call through the redirect would crash."""
    # Code of a loaded object is the common case, answered from the cached
    # list of objects; reading the maps costs about a millisecond a call,
    # a second for a patch of 1,000 functions.
    if _in_loaded_code(address):
        return
    for lo, hi in sites.executable_ranges():
        if lo <= address < hi:
            return
    raise UnsafeToPatch(f"{func.old_name}: new code at {address:#x} is not in an "
                        f"executable mapping of this process (data, or not mapped)")
