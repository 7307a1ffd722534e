"""The locks of hotpatch: one per layer, each knowing which thread holds it.

A thread can enter hotpatch a second time while it is already inside an
operation: a Python signal handler runs between two bytecodes of whatever
the thread was doing, and a callback runs in the middle of an enable.  A
re-entrant lock would let that second operation change stacks and memory
under the first one, which then goes on from a state that no longer holds.
So an *operation* (anything that changes state) entered by a thread that
already holds this layer's lock, or a later one, is refused with an error
that says so; it cannot wait for the operation in progress, which is its
own.  A *query* (reading state) never refuses: it takes the lock, or reads
as things are when the thread already holds a lock (waiting there could
deadlock against a thread that takes the locks in order).

The layers, in the order a thread takes their locks: the lifecycle
(``core``), the code writes (``sites``), the list of loaded objects
(``symbols``).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from .errors import HotpatchError

_locks: list["OperationLock"] = []     # by rank


class OperationLock:
    """One layer's lock.  Underneath is an ``RLock``: it records its owner
    atomically with respect to Python signal handlers (a handler cannot run
    between the acquisition and the record), which a plain ``Lock`` and an
    owner attribute could not.  Only queries ever take it twice."""

    def __init__(self, rank: int, refusal: Callable[[str], HotpatchError]):
        self.rank = rank
        self._refusal = refusal
        self._lock = threading.RLock()
        _locks.append(self)
        _locks.sort(key=lambda lock: lock.rank)

    def held_here(self) -> bool:
        """True when the calling thread holds this lock."""
        return self._lock._is_owned()

    def _blocked_here(self) -> bool:
        """True when the calling thread must not wait for this lock: it
        holds it or one taken after it."""
        return any(lock.held_here() for lock in _locks if lock.rank >= self.rank)

    def check(self, what: str) -> None:
        """Refuse ``what`` if the calling thread is inside an operation."""
        if self._blocked_here():
            raise self._refusal(what)

    @contextlib.contextmanager
    def operation(self, what: str) -> Iterator[None]:
        """Hold the lock for an operation that changes state; refused (the
        error names ``what``) when this thread is already inside one."""
        self.check(what)
        with self._lock:
            yield

    @contextlib.contextmanager
    def query(self) -> Iterator[bool]:
        """Hold the lock to read state, unless this thread is inside an
        operation: then read as things are.  Yields whether it holds it."""
        if self._blocked_here():
            yield False
            return
        with self._lock:
            yield True
