"""hotpatch: live patching of native functions inside a running Python process.

Linux x86-64.  The kernel's livepatch model (patch / object / func), ftrace-style
redirection at function entries and safe code writes while other threads run.
See DESIGN.md in the source tree for the architecture.

The public names are imported on first use: the ``hotpatch`` command talks
to other processes and never needs the C core or the ELF reader here
(importing them costs seconds on a busy machine).  ``HOTPATCH_CONTROL=1``
in the environment opens the control socket at import (``serve()``).
"""
import importlib
import os

from .errors import (
    AmbiguousSymbol,
    HotpatchError,
    PatchStateError,
    SymbolNotFound,
    TransitionError,
    UnsafeToPatch,
)

# public name -> the module that defines it
_LAZY = {
    "Patch": "core", "Object": "core", "Func": "core", "register": "core",
    "unregister": "core", "enable": "core", "disable": "core", "patches": "core",
    "tainted": "core", "tree": "control", "load": "module", "serve": "server",
    "State": "state",
}

__all__ = [
    "Patch",
    "State",
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
    "serve",
    "shadow",      # a submodule (hotpatch.shadow.alloc, ...): __getattr__ imports it
    "HotpatchError",
    "SymbolNotFound",
    "AmbiguousSymbol",
    "UnsafeToPatch",
    "PatchStateError",
    "TransitionError",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:
        # `hotpatch.sites` and the like, as when every submodule was imported here.
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if os.environ.get("HOTPATCH_CONTROL") == "1":
    from .server import serve_from_environment
    serve_from_environment()
