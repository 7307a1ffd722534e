"""hotpatch: live patching of native functions inside a running Python process.

Linux x86-64.  The kernel's livepatch model (patch / object / func), ftrace-style
redirection at function entries and safe code writes while other threads run.
See DESIGN.md in the source tree for the architecture.

The public names are imported on first use: the ``hotpatch`` command talks
to other processes and never needs the C core or the ELF reader here
(importing them costs seconds on a busy machine).  While that import runs,
the importing thread gives the GIL up between modules (``_GivingUp``), and
within a module's body at a short switch interval (``_gil``).  ``HOTPATCH_CONTROL=1``
in the environment opens the control socket at import (``serve()``).
"""
import _thread
import importlib
import os
import sys
import time

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


class _GivingUp:
    """A ``sys.meta_path`` finder that finds nothing.  While a thread imports
    hotpatch's modules on first use (the core: about 60 modules, its own and
    the standard library's), it is asked first about each module
    that thread imports, nested ones too, and gives the GIL up
    (``time.sleep(0)``, which hands it to a thread waiting for it) when the
    importing thread has run ``SLICE_S`` since it last did.  Without it the
    service's other Python threads wait for the interpreter's switch interval
    (5 ms) at each turn; with it, mostly for one module body.

    Once inserted it stays, asking the clock nothing unless an import of
    hotpatch's is under way: removing an entry of ``sys.meta_path`` while
    another thread walks the list would make that thread skip a finder."""

    SLICE_S = 0.002

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.thread = None          # the thread importing for hotpatch, if any
        self.since = 0.0

    def find_spec(self, name, path=None, target=None):
        if self.thread is not None and self.thread == _thread.get_ident():
            if time.monotonic() - self.since >= self.SLICE_S:
                time.sleep(0)
                self.since = time.monotonic()
        return None

    def import_module(self, name: str):
        """``importlib.import_module(name)``, giving the GIL up as it goes
        (when no other thread is already importing through this).  Before
        the core, the shared objects its import would map with the GIL held
        are mapped with it released, and what its first code write asks of
        the kernel is asked (``_ahead``)."""
        if not self.lock.acquire(False):
            return importlib.import_module(name, __name__)
        try:
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)
            self.thread, self.since = _thread.get_ident(), time.monotonic()
            from ._gil import short_switch_interval     # not at `import hotpatch`: 0.6 ms
            with short_switch_interval():
                if name in _NEEDS_THE_CORE and f"{__name__}.core" not in sys.modules:
                    from ._ahead import ask_first_write_ahead, map_core_objects
                    map_core_objects()
                    ask_first_write_ahead()
                return importlib.import_module(name, __name__)
        finally:
            self.thread = None
            self.lock.release()


_giving_up = _GivingUp()
# The lazy modules whose import imports the core (and the C core with it).
_NEEDS_THE_CORE = {".core", ".module", ".server", ".control", ".loader", ".sites", ".symbols",
                   ".transition", ".thunks", ".plt", ".patch"}


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _LAZY:
        value = getattr(_giving_up.import_module(f".{_LAZY[name]}"), name)
    else:
        # `hotpatch.sites` and the like, as when every submodule was imported here.
        try:
            value = _giving_up.import_module(f".{name}")
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
