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

``os.fork()`` from one thread while another holds a lock would leave the
child with a lock held by a thread it does not have, and possibly a site
half written.  Before a fork every lock is taken in that order, so the fork
waits for the operation in progress to end; the parent releases them after,
and the child gets fresh ones.
"""
from __future__ import annotations

import contextlib
import os
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
        self._held_before_fork = False
        self._open = False      # the holder waits on a transition: queries need not
        _locks.append(self)
        _locks.sort(key=lambda lock: lock.rank)

    def held_here(self) -> bool:
        """True when the calling thread holds this lock."""
        return self._lock._is_owned()

    def _blocked_here(self) -> bool:
        """True when the calling thread must not wait for this lock: it
        holds it or one taken after it."""
        for lock in _locks:
            if lock.rank >= self.rank and lock._lock._is_owned():
                return True
        return False

    def check(self, what: str) -> None:
        """Refuse ``what`` if the calling thread is inside an operation (the
        refusal is :meth:`operation`'s)."""
        self.operation(what)

    def operation(self, what: str, address: int | None = None) -> "threading.RLock":
        """Hold the lock for an operation that changes state (``with
        lock.operation(what):``); refused, the error naming ``what``, when
        this thread is already inside one (``address`` formatted in where
        given: ``what % address``, made only for the refusal; a one-site
        redirect's message cost it 0.1-0.3 us).  The lock itself is the
        context manager: a generator around it cost more than the rest of a
        one-site batch's Python.  The refusal is made here, and
        :meth:`check` asks this: a cold redirect pays for each Python
        function it enters."""
        if self._blocked_here():
            raise self._refusal(what if address is None else what % address)
        return self._lock

    @contextlib.contextmanager
    def try_operation(self, what: str, timeout: float) -> Iterator[bool]:
        """:meth:`operation`, waiting at most ``timeout`` seconds: yields
        whether the lock is held (False: do the work later)."""
        self.check(what)
        got = self._lock.acquire(timeout=timeout)
        try:
            yield got
        finally:
            if got:
                self._lock.release()

    @contextlib.contextmanager
    def query(self) -> Iterator[bool]:
        """Hold the lock to read state, unless this thread is inside an
        operation, or the operation holding it waits on a transition (see
        :func:`open_to_queries`): then read as things are.  Yields whether
        it holds it."""
        if self._blocked_here() or not self._acquire_unless_open():
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()

    def _acquire_unless_open(self) -> bool:
        """Take the lock for a query; False, without it, once the holder
        opens it to queries (a query that was already waiting must see that
        too, not wait for the whole transition)."""
        while not self._open:
            if self._lock.acquire(timeout=0.02):
                return True
        return False

    # fork ------------------------------------------------------------------

    def _before_fork(self) -> None:
        self._held_before_fork = self.held_here()
        # A thread that forks from inside an operation (a callback, a signal
        # handler) holds this lock or a later one: it cannot wait here, and
        # the child gets this lock fresh.
        if self._held_before_fork or not self._blocked_here():
            self._lock.acquire()

    def _after_fork_in_parent(self) -> None:
        if self.held_here():
            self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The forking thread is the child's only thread.  It keeps the hold
        # it had before the fork (it may be inside an operation that will
        # release it); nothing else carries over.
        depth = self._lock._release_save()[0] if self.held_here() else 0
        self._lock = threading.RLock()
        if self._held_before_fork:
            for _ in range(depth - 1):
                self._lock.acquire()


def _before_fork() -> None:
    for lock in _locks:
        lock._before_fork()


def _after_fork_in_parent() -> None:
    for lock in reversed(_locks):
        lock._after_fork_in_parent()


def _after_fork_in_child() -> None:
    for lock in _locks:
        lock._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def open_to_queries() -> Iterator[None]:
    """While the calling thread, inside an operation, waits for a
    transition (the stack model retrying until no thread runs the patch's
    code), let other threads' queries read the state without waiting for
    it, as the kernel's sysfs shows a transition in progress.  The state
    does not change during the wait; a query still reading when it ends
    may see the operation's first changes (it reads as things are, as a
    query from inside an operation does).  Operations still wait."""
    held = [lock for lock in _locks if lock.held_here()]
    for lock in held:
        lock._open = True
    try:
        yield
    finally:
        for lock in held:
            lock._open = False
