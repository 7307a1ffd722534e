"""The errors of hotpatch.

Every error is a :class:`HotpatchError`; its message names the object, the
symbol and the reason, so that a failed ``register()`` or ``hotpatch load``
tells the user what to fix without a debugger.
"""


class HotpatchError(Exception):
    """Base of every error raised by hotpatch."""


class SymbolNotFound(HotpatchError, LookupError):
    """A function named by a patch is not in the object's symbol tables."""


class AmbiguousSymbol(HotpatchError, LookupError):
    """Several symbols share the name and ``old_sympos`` does not pick one."""


class UnsafeToPatch(HotpatchError):
    """The code at a function's entry cannot be redirected safely."""


class PatchStateError(HotpatchError):
    """An operation is not allowed in the patch's current state."""


class TransitionError(HotpatchError):
    """A code write or a consistency transition could not complete."""
