"""hotpatch: live patching of native functions inside a running Python process.

Linux x86-64.  The kernel's livepatch model (patch / object / func), ftrace-style
redirection at function entries and safe code writes while other threads run.
See DESIGN.md in the source tree for the architecture.
"""
from .control import tree
from .core import (Func, Object, Patch, disable, enable, patches, register, tainted,
                   unregister)
from .errors import (
    AmbiguousSymbol,
    HotpatchError,
    PatchStateError,
    SymbolNotFound,
    TransitionError,
    UnsafeToPatch,
)
from .module import load

__all__ = [
    "Patch",
    "Object",
    "Func",
    "register",
    "unregister",
    "enable",
    "disable",
    "patches",
    "tainted",
    "tree",
    "load",
    "HotpatchError",
    "SymbolNotFound",
    "AmbiguousSymbol",
    "UnsafeToPatch",
    "PatchStateError",
    "TransitionError",
]
__version__ = "0.1.0"
