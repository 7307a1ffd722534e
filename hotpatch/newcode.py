"""The new code of a Func: whatever the user gave, as an address kept alive.

``new`` may be an integer address, a cffi function pointer (from any FFI),
a ctypes function pointer, or a Python callable together with a C
``signature`` such as ``"long(long)"``: that becomes a cffi callback, which
takes the GIL on entry.  An exception raised in the callable is printed,
recorded on the Func, and the call returns 0 (or NULL) to the C caller.
"""
from __future__ import annotations

import ctypes
import sys
import traceback

import _cffi_backend
from cffi import FFI, CDefError, FFIError

from ._native import ffi
from .errors import HotpatchError

_callback_ffi = FFI()   # parses the signatures of Python callables


def _cdata_address(new) -> int:
    if ffi.typeof(new).kind not in ("pointer", "function"):
        raise TypeError(f"a cffi {ffi.typeof(new).cname} is not a function pointer")
    return int(ffi.cast("uintptr_t", new))


def _callback(func, new, signature: str):
    def report(exc_type, exc, tb):
        func.errors += 1
        func.last_error = exc
        sys.stderr.write(f"hotpatch: exception in the replacement of {func.old_name}:\n")
        traceback.print_exception(exc_type, exc, tb)
        return None     # cffi then returns the zero value of the result type

    try:
        return _callback_ffi.callback(signature, new, onerror=report)
    except (CDefError, FFIError, TypeError) as e:
        reason = str(e).splitlines()[0]
        raise HotpatchError(f"{func.old_name}: bad signature {signature!r}: {reason}") from None
    except MemoryError:
        # cffi's callbacks are built in writable and executable memory, which a
        # process started with PR_SET_MDWE (systemd's MemoryDenyWriteExecute)
        # refuses; code compiled ahead of time needs none.
        raise HotpatchError(
            f"{func.old_name}: a Python callable cannot be made callable from C in this "
            f"process: it refuses writable and executable memory (PR_SET_MDWE, systemd's "
            f"MemoryDenyWriteExecute); use a C patch module (hotpatch build) or a compiled "
            f"function pointer") from None


def code_address(func) -> tuple[int, object]:
    """``(address, what keeps it alive)`` for ``func.new``."""
    new = func.new
    if isinstance(new, bool):
        raise TypeError(f"{func.old_name}: new must be code, not {new!r}")
    if isinstance(new, int):
        keep = None
    elif isinstance(new, _cffi_backend._CDataBase):
        new, keep = _cdata_address(new), new
    elif isinstance(new, ctypes._CFuncPtr):
        new, keep = ctypes.cast(new, ctypes.c_void_p).value, new
    elif callable(new):
        if not func.signature:
            raise HotpatchError(f"{func.old_name}: a Python callable as new code needs a C "
                                "signature, e.g. signature=\"long(long)\"")
        keep = _callback(func, new, func.signature)
        new = int(_callback_ffi.cast("uintptr_t", keep))
    else:
        raise TypeError(f"{func.old_name}: new must be an address, a cffi or ctypes function "
                        f"pointer or a callable with a signature, not {type(new).__name__}")
    if not new:
        raise HotpatchError(f"{func.old_name}: new code at address 0")
    return new, keep
