"""A short switch interval while hotpatch runs long stretches of Python.

A thread that runs Python keeps the GIL until it blocks, or until another
thread has waited for it a whole switch interval (5 ms by default).  The
import of the core (module bodies) and the first ``register()`` of a
process (describing the loaded objects, reading an ELF file, planning a
site) are such stretches: each of the service's Python threads that wakes
meanwhile waits up to the interval, and the service feels hotpatch.
While they run, the interval is :data:`SHORT_S`: a waiting thread gets the
GIL within about that, at the price of more switches for hotpatch's thread
(only when another thread wants the GIL).

The interval is the process's: it is set back only where nobody changed it
in the meantime, and nested or concurrent uses set it once.
"""
from __future__ import annotations

import _thread
import contextlib
import sys
from collections.abc import Iterator

SHORT_S = 0.001

# Re-entrant: a Python signal handler may start an operation between two
# bytecodes of this thread's own use.
_lock = _thread.RLock()
_users = 0
_before: float | None = None     # the interval to set back; None: leave it
_ours: float | None = None       # what getswitchinterval() says while ours is set


@contextlib.contextmanager
def short_switch_interval() -> Iterator[None]:
    global _users, _before, _ours
    with _lock:
        if _users == 0:
            current = sys.getswitchinterval()
            if current > SHORT_S:
                sys.setswitchinterval(SHORT_S)
                _before, _ours = current, sys.getswitchinterval()
            else:
                _before = _ours = None
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _before is not None and sys.getswitchinterval() == _ours:
                sys.setswitchinterval(_before)
