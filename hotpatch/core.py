"""Patch / Object / Func and their lifecycle (the kernel's livepatch core.c).

A :class:`Patch` is one fix, enabled and disabled as a unit; an
:class:`Object` is one loaded ELF object (``None`` is the main program); a
:class:`Func` redirects one function.  The rules are the kernel's:

- enabling is all or nothing across every function of every loaded object;
- patches stack per function, the most recently enabled wins, and only the
  most recently enabled patch still enabled may be disabled;
- ``replace=True`` takes over every function of every older patch and
  disables those patches in the same step (without their unpatch callbacks);
- only a disabled patch may be unregistered, and new code stays pinned for
  the life of the process;
- callbacks run in the patch's object order: every ``pre_patch``, the code
  writes, every ``post_patch`` (and the same around disabling).

Every lifecycle operation runs under one lock (``klp_mutex``).  It is not
re-entrant: an operation started by a thread already inside one (from a
signal handler or a callback) is refused with :class:`PatchStateError`,
since it can neither wait for that operation nor safely run in its middle.
Queries (:func:`patches`, :func:`stack_order`, :func:`tainted`, the tree)
work from there too.
"""
from __future__ import annotations

import contextlib
import difflib          # at import: messages may be made in the loader's handling (loader.py)
import logging
import os
import sys
import time
from typing import Callable, Iterable, Sequence

from . import newcode, patch as stacks, plt, sites, symbols, thunks
from . import state as state_
from . import transition as transition_
from ._gil import short_switch_interval
from ._locks import OperationLock
from ._native import lib
from .errors import HotpatchError, PatchStateError, UnsafeToPatch
from .x86_64.decode import boundary_before


def _refused(what: str) -> PatchStateError:
    return PatchStateError(
        f"{what}: a hotpatch operation is already in progress in this thread (e.g. this "
        f"was called from a signal handler or a callback during it); it cannot wait for "
        f"it: retry after that operation returns")


_mutex = OperationLock(0, _refused)
# What the first code write asks of the kernel (an RCU grace period in a
# process with threads, the pool's first chunk) is asked by a thread of the
# C core's (native/ahead.c): at the start of the import, where it went
# through hotpatch.__getattr__ (_ahead.py), else now.
lib.hp_first_write_ahead()
#: Every enable, disable, COMING and GOING is logged at INFO, as the kernel
#: logs its transitions.
log = logging.getLogger("hotpatch")
#: How messages are logged: hotpatch.loader queues them while inside the
#: dynamic linker (a logging handler may do anything there, dlopen included)
#: and emits the queue, in order, before the next one outside it.
notify: Callable[..., None] = log.log
_patches: list["Patch"] = []          # registered, oldest first
_enabled: list["Patch"] = []          # enabled, in the order they were enabled
_pinned: dict[int, object] = {}       # new code kept alive for the process's life, by id
_tainted = False

CONSISTENCY_MODELS = ("immediate", "stack")


class Func:
    """One function to redirect (``struct klp_func``).

    ``old_name`` in the object's symbol tables (``old_sympos``: 1-based
    position among same-named symbols, 0 = must be unique), or ``old_offset``
    from the object's load base for a function without a symbol.  ``new`` is
    an address, a cffi or ctypes function pointer, or a Python callable with a
    C ``signature``."""

    def __init__(self, old_name: str, new, *, old_sympos: int = 0,
                 old_offset: int | None = None, signature: str | None = None):
        if not isinstance(old_name, str) or not old_name:
            raise TypeError("old_name must be a non-empty string")
        if not isinstance(old_sympos, int) or old_sympos < 0:
            raise ValueError(f"{old_name}: old_sympos must be an integer >= 0")
        self.old_name = old_name
        self.new = new
        self.old_sympos = old_sympos
        self.old_offset = old_offset
        self.signature = signature
        # Where the Func was made ("fix.py:12"), for errors about it.
        caller = sys._getframe(1)
        self.defined_at = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        self.object: Object | None = None
        self.old_addr: int | None = None      # resolved absolute address
        self.old_size: int | None = None
        self.new_addr: int | None = None
        self.errors = 0                       # failed calls of a Python `new`
        self.last_error: BaseException | None = None
        self._caller = (None, None)           # (original, cffi function calling it)
        self._local = False                   # only its object calls it (IPA-RA)
        self.thunk: thunks.Thunk | None = None  # where calls go when registers are kept
        # Called with the original's address before the redirect is written
        # (a C module's hp_func.original).
        self._publish_original: Callable[[int], None] | None = None
        self._site: sites.Site | None = None  # set while on a stack
        # Set before the redirect is written and kept after it is gone: a
        # wrapper running in another thread may call it at any moment.
        self._original: int | None = None

    @property
    def patched(self) -> bool:
        """True while this func is on its function's stack."""
        return self._site is not None

    @property
    def original(self) -> int | None:
        """Address that runs the old code (callable from C and, through cffi
        or ctypes, from Python).  None until the func is first enabled; set
        before any code is written, and still valid after disable (the stub
        is pinned for the life of the process)."""
        return self._original

    def call_original(self, *args):
        """Run the old code with ``args``, converted by the func's C
        ``signature`` (or by ``new``'s type, a cffi function pointer); returns
        its result as cffi converts it.  Valid from the moment the redirect
        can be live, from any thread, and after disable."""
        original = self._original
        if original is None:
            raise PatchStateError(f"{self.old_name}: the func was never enabled, so it has "
                                  f"no original yet")
        if self._caller[0] != original:
            self._caller = (original, newcode.original_caller(self))
        return self._caller[1](*args)

    def __repr__(self) -> str:
        where = f" at {self.old_addr:#x}" if self.old_addr is not None else ""
        return f"<Func {self.old_name},{self.old_sympos}{where} patched={self.patched}>"


def _no_callback(obj):
    return 0


class Object:
    """One loaded ELF object and the funcs patched in it (``struct klp_object``).

    ``name``: None for the main program, else a file name, soname or absolute
    path.  Callbacks take the Object: ``pre_patch`` may veto by returning
    non-zero or raising.  ``build_id`` (hex), when given, must be the loaded
    object's NT_GNU_BUILD_ID."""

    def __init__(self, name: str | None, funcs: Iterable[Func] = (), *,
                 pre_patch: Callable | None = None, post_patch: Callable | None = None,
                 pre_unpatch: Callable | None = None, post_unpatch: Callable | None = None,
                 build_id: str | None = None):
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError("an Object's name is None (the main program) or a non-empty string")
        self.name = name
        self.funcs = list(funcs)
        for func in self.funcs:
            if not isinstance(func, Func):
                raise TypeError(f"{self.label}: {func!r} is not a hotpatch.Func")
            if func.object is not None:
                raise PatchStateError(f"{self.label}: {func.old_name} belongs to another Object")
            func.object = self
        self.pre_patch = pre_patch or _no_callback
        self.post_patch = post_patch or _no_callback
        self.pre_unpatch = pre_unpatch or _no_callback
        self.post_unpatch = post_unpatch or _no_callback
        self.patch: Patch | None = None
        # The NT_GNU_BUILD_ID (hex) the patch was made for: another build is refused.
        self.build_id = build_id.lower() if build_id else None
        self.patched = False              # its funcs are redirected
        self._loaded: symbols.LoadedObject | None = None
        #: why it is not patched, or was patched late (for the tree); None
        self.note: str | None = None

    @property
    def label(self) -> str:
        """The name shown in messages and in the tree (``main`` for None)."""
        return "main" if self.name is None else self.name

    @property
    def loaded(self) -> bool:
        """True when the object is loaded in this process now."""
        return symbols.find_object(self.name) is not None

    def __repr__(self) -> str:
        return f"<Object {self.label} funcs={len(self.funcs)} patched={self.patched}>"


class Patch:
    """One fix, enabled and disabled as a unit (``struct klp_patch``).

    ``consistency``: ``"immediate"`` (a thread switches at its next call)
    or ``"stack"`` (kpatch's model: the code is written only when no thread
    has code of the patch on its stack, tried again until
    ``transition_timeout`` seconds have passed; see
    :mod:`hotpatch.transition`)."""

    def __init__(self, name: str, objects: Iterable[Object], *, replace: bool = False,
                 consistency: str = "immediate", states: Iterable[state_.State] = (),
                 transition_timeout: float = transition_.DEFAULT_TIMEOUT):
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"a patch name is a non-empty string without '/': {name!r}")
        if consistency not in CONSISTENCY_MODELS:
            raise ValueError(f"patch {name!r}: consistency {consistency!r} is not available; "
                             f"this version has {', '.join(CONSISTENCY_MODELS)}")
        self.name = name
        self.objects = list(objects)
        self.replace = bool(replace)
        self.consistency = consistency
        if not transition_timeout >= 0:
            raise ValueError(f"patch {name!r}: transition_timeout must be a number of "
                             f"seconds >= 0, not {transition_timeout!r}")
        self.transition_timeout = float(transition_timeout)
        self.states = state_.check_states(name, states)
        self.forced = False          # a transition went past a stack holding its code
        self._transition = False
        self.enabled = False
        self.enabled_at: float | None = None     # time.time() of the enable in effect
        self.registered = False
        self.module_path: str | None = None      # the patch module it came from, if any
        self.module_digest: str | None = None    # its SHA-256
        for obj in self.objects:
            if not isinstance(obj, Object):
                raise TypeError(f"patch {name!r}: {obj!r} is not a hotpatch.Object")
            if obj.patch is not None:
                raise PatchStateError(f"patch {name!r}: object {obj.label} belongs to another patch")
            obj.patch = self
        self._check_unique()

    @property
    def transition(self) -> bool:
        """True while a transition is in progress: under the stack model,
        while the stacks are checked (and checked again) before the switch;
        never with the immediate model."""
        return self._transition

    def state(self, id: int) -> "state_.State | None":
        """This patch's state ``id`` (``klp_get_state``), or None."""
        return state_.get_state(self, id)

    def prev_state(self, id: int) -> "state_.State | None":
        """State ``id`` of the newest patch enabled before this one
        (``klp_get_prev_state``): what a patch taking over a state finds, in
        its callbacks, to carry on the older patch's data."""
        with _mutex.query():
            return state_.prev_state(self, id, list(_enabled))

    def enable(self, *, force: bool = False) -> None:
        enable(self, force=force)

    def disable(self, *, force: bool = False) -> None:
        disable(self, force=force)

    def _check_unique(self) -> None:
        names, funcs = set(), set()
        for obj in self.objects:
            if obj.name in names:
                raise PatchStateError(f"patch {self.name!r}: object {obj.label} listed twice")
            names.add(obj.name)
            for func in obj.funcs:
                key = (obj.name, func.old_name, func.old_sympos, func.old_offset)
                if key in funcs:
                    raise PatchStateError(f"patch {self.name!r}: object {obj.label}: "
                                          f"{func.old_name} listed twice")
                funcs.add(key)

    def __repr__(self) -> str:
        return f"<Patch {self.name} enabled={self.enabled}>"


# ---------------------------------------------------------------------------
# Resolution: symbols and sites, nothing written


def _prefixed(error: HotpatchError, prefix: str) -> HotpatchError:
    """The same kind of error, its message prefixed with where it happened."""
    return type(error)(f"{prefix}: {error}")


def _check_instruction_boundary(loaded: symbols.LoadedObject, offset: int) -> None:
    """Refuse an ``old_offset`` in the middle of an instruction of the
    function holding it: the redirect would cut that instruction."""
    holder = symbols.containing_function(loaded, offset)
    if holder is None or holder[1] == offset:
        return      # a function's start, or no sized function to decode from
    name, start, size = holder
    address = loaded.base + offset
    code = sites.read_memory(loaded.base + start, size)
    at = boundary_before(code, loaded.base + start, address)
    if at != address:
        where = (f"inside the instruction at {name}+{at - loaded.base - start:#x} ({at:#x})"
                 if at is not None else f"past undecodable bytes of {name}")
        raise UnsafeToPatch(f"old_offset {offset:#x} ({address:#x}) is not on an instruction "
                            f"boundary of {name}: it lies {where}")


def _resolve_func(loaded: symbols.LoadedObject, func: Func) -> None:
    if func.old_offset is not None:
        symbol = symbols.resolve_offset(loaded, func.old_offset)
        _check_instruction_boundary(loaded, func.old_offset)
    else:
        symbol = symbols.resolve(loaded, func.old_name, func.old_sympos)
    func.old_addr, func.old_size, func._local = symbol.address, symbol.size, symbol.local


class _FentryTargets:
    """An object's :func:`symbols.fentry_targets`, read when the entry
    analysis first asks: only an entry that starts with a ``call`` does, so
    a patch of other entries reads none of the object's relocations and PLT
    (about 1 ms of a first ``register()``)."""

    __slots__ = ("_loaded", "_targets")

    def __init__(self, loaded: symbols.LoadedObject):
        self._loaded = loaded
        self._targets: frozenset[int] | None = None

    def __contains__(self, address: int) -> bool:
        if self._targets is None:
            self._targets = symbols.fentry_targets(self._loaded)
        return address in self._targets


def _prepare_object(patch: Patch, obj: Object, prepared: dict[int, sites.Site]) -> None:
    """Resolve the funcs of a loaded object and prepare their sites: the
    entries of all of them analysed in one batch (per function, the C core
    reads and decodes in one call what used to take several); a failure is
    reported for the first func, in the object's order, that has one."""
    loaded = obj._loaded
    failed: dict[int, HotpatchError] = {}     # by id(func)
    for func in obj.funcs:
        try:
            _resolve_func(loaded, func)
        except HotpatchError as e:
            failed[id(func)] = e
    new = [func for func in obj.funcs if id(func) not in failed
           and stacks.stack_of(func.old_addr) is None and func.old_addr not in prepared]
    made = sites.prepare_batch(
        [(func.old_addr, func.old_size) for func in new], exec_ranges=loaded.exec_ranges,
        fentry_targets=_FentryTargets(loaded),
        branches_into=lambda lo, hi: symbols.branches_into(loaded, lo, hi),
        branch_index=symbols.branch_index_of(loaded),
        function_before=symbols.function_before_of(loaded)) if new else []
    for func, site in zip(new, made):
        if isinstance(site, HotpatchError):
            failed[id(func)] = site
        else:
            prepared.setdefault(func.old_addr, site)
    for func in obj.funcs:
        try:
            if id(func) in failed:
                raise failed[id(func)]
            stack = stacks.stack_of(func.old_addr)
            site = stack.site if stack is not None else prepared[func.old_addr]
            _prepare_thunk(loaded, func, site)
        except HotpatchError as e:
            raise _prefixed(e, f"patch {patch.name!r}: object {obj.label}: {func.old_name}") from None


def _prepare_thunk(loaded: symbols.LoadedObject, func: Func, site: sites.Site) -> None:
    """Send calls through a thunk where the old function's callers may keep
    values in registers it never writes (see :mod:`hotpatch.thunks`)."""
    # Callers may rely on more than the ABI where the compiler saw the body:
    # a local or hidden function, any function of the main program (not
    # interposable), or one its object branches to directly (no PLT:
    # -fno-semantic-interposition, -Bsymbolic, LTO).
    assumed = func._local or loaded.name is None or symbols.branched_to(loaded, func.old_addr)
    preserve = thunks.preserved_registers(loaded, func.old_addr, func.old_size, assumed)
    func.thunk = thunks.thunk_for(func.old_addr, site.address, func.new_addr,
                                  preserve) if preserve else None


def _check_build_id(patch: Patch, obj: Object) -> None:
    if obj.build_id is None:
        return
    loaded = obj._loaded.build_id.hex() if obj._loaded.build_id else None
    if loaded != obj.build_id:
        raise UnsafeToPatch(f"patch {patch.name!r}: object {obj.label}: the patch was built "
                            f"for build-id {obj.build_id}, the loaded object is build-id "
                            f"{loaded or 'none'} ({obj._loaded.path}): another build")


def _loaded_objects(patch: Patch) -> list[Object]:
    """The objects of the patch loaded now (their ``_loaded`` set)."""
    present = []
    for obj in patch.objects:
        try:
            obj._loaded = symbols.find_object(obj.name)
        except HotpatchError as e:
            raise _prefixed(e, f"patch {patch.name!r}") from None
        if obj._loaded is not None:
            _check_build_id(patch, obj)
            present.append(obj)
    return present


def _check_addresses(funcs: Sequence[Func]) -> None:
    seen: dict[int, Func] = {}
    for func in funcs:
        other = seen.setdefault(func.old_addr, func)
        if other is not func:
            raise PatchStateError(f"patch {func.object.patch.name!r}: object {func.object.label}: "
                                  f"{func.old_name} and {other.old_name} are the same function "
                                  f"({func.old_addr:#x})")


# ---------------------------------------------------------------------------
# Callbacks


def _vetoed(obj: Object) -> str | None:
    """Run ``pre_patch``; the reason of a veto, or None."""
    try:
        result = obj.pre_patch(obj)
    except Exception as e:    # a veto, reported with its reason
        return f"{type(e).__name__}: {e}"
    return f"returned {result}" if result else None


def _run_callbacks(objects: Iterable[Object], name: str) -> None:
    for obj in objects:
        getattr(obj, name)(obj)


# ---------------------------------------------------------------------------
# Taint


def tainted() -> bool:
    """True once any patch was enabled in this process (``TAINT_LIVEPATCH``)."""
    return _tainted


def _update_crash_report() -> None:
    """Keep the text a fatal signal prints ready (a kernel oops shows K)."""
    if not _tainted:
        return
    names = ", ".join(f"{p.name} [{i}]" for i, p in enumerate(_enabled, 1)) or "none"
    text = f"hotpatch: this process is live patched (tainted); enabled patches: {names}\n"
    lib.hp_set_crash_report(text.encode())


# ---------------------------------------------------------------------------
# The lifecycle


def patches() -> list[Patch]:
    """The registered patches, oldest first."""
    with _mutex.query():
        return list(_patches)


def stack_order(patch: Patch) -> int:
    """Position among enabled patches, 1 = the oldest; 0 while disabled."""
    with _mutex.query():
        return _enabled.index(patch) + 1 if patch in _enabled else 0


def _stopper_ahead(patch: Patch, prepared: Iterable[sites.Site]) -> None:
    """Have the stopper's helper process start now (once per process) where
    the patch's write is likely to take a stop (the stack model, or an
    entry whose jmp needs one and has no hot-patch point): it gets ready
    while the patch's thunks, callbacks and writes are prepared, instead of
    inside the first stop, where its start is the service's wait (with busy
    cores, tens of milliseconds).  Where no stop comes (most first patches
    now), no process is spawned; a stop nobody foresaw starts it itself."""
    if patch.consistency == "stack" or sites.first_installs_stop(prepared):
        lib.hp_ptrace_start_ahead()


def _pin_new_code(patch: Patch) -> None:
    """Turn every ``new`` into an address, keeping what it needs alive."""
    for obj in patch.objects:
        for func in obj.funcs:
            where = f"patch {patch.name!r}: object {obj.label}"
            try:
                func.new_addr, keep = newcode.code_address(func)
            except HotpatchError as e:
                raise _prefixed(e, where) from None
            except TypeError as e:
                raise TypeError(f"{where}: {e}") from None
            if keep is not None:
                _pinned.setdefault(id(keep), keep)    # pinned once, however often registered


def register(patch: Patch, *, enable: bool = True, force: bool = False) -> Patch:
    """Register ``patch`` and (by default) enable it (``klp_enable_patch``).
    ``force``: as for :func:`enable`.

    A patch whose enabling fails is not left registered."""
    if not isinstance(patch, Patch):
        raise TypeError(f"register() takes a hotpatch.Patch, not {type(patch).__name__}")
    with _mutex.operation(f"register patch {patch.name!r}"), short_switch_interval():
        if patch.registered:
            raise PatchStateError(f"patch {patch.name!r} is already registered")
        if any(p.name == patch.name for p in _patches):
            raise PatchStateError(f"a patch named {patch.name!r} is already registered")
        _pin_new_code(patch)
        _patches.append(patch)
        patch.registered = True
        if any(obj.name is not None for obj in patch.objects):
            # The loader hook and its worker thread before any write of the
            # patch: a thread starting once the patch replaced libc's
            # syscall() with Python code would deadlock in it (CPython asks
            # syscall(SYS_gettid) for a new thread's id before the thread
            # has a thread state).
            loader.watch()
        if enable:
            try:
                _enable_across_unloads(patch, force)
            except BaseException:
                _patches.remove(patch)
                patch.registered = False
                raise
        _watch_loads(patch)
        return patch


def _watch_loads(patch: Patch) -> None:
    """Objects named by the patch and not loaded now are patched when they
    load (the loader hook, which register() has made sure of, the patch's
    names asked for): say so, with loaded objects of close names (a typo
    looks just like a library not loaded yet)."""
    loaded = None
    for obj in patch.objects:
        if obj.name is None or obj._loaded is not None or symbols.find_object(obj.name):
            continue
        if loaded is None:
            loaded = sorted({n for o in symbols.loaded_objects() for n in o.names})
        close = difflib.get_close_matches(os.path.basename(obj.name), loaded, n=5, cutoff=0.75)
        obj.note = "waiting for the object to load"
        notify(logging.WARNING, "patch '%s': object %s is not loaded: it will be patched when it loads%s",
                    patch.name, obj.label,
                    f" (loaded objects with close names: {', '.join(close)})" if close else "")


def unregister(patch: Patch) -> None:
    """Forget a disabled patch.  Its new code stays pinned: a thread may
    still be running it."""
    with _mutex.operation(f"unregister patch {patch.name!r}"):
        if not patch.registered:
            raise PatchStateError(f"patch {patch.name!r} is not registered")
        if patch.enabled:
            raise PatchStateError(f"patch {patch.name!r} is enabled; disable it first")
        _patches.remove(patch)
        patch.registered = False
        loader.update_names()


def enable(patch: Patch, *, force: bool = False) -> None:
    """Enable a registered, disabled patch: every function of every loaded
    object of the patch, or nothing.

    ``force`` (the stack model only; the kernel's ``force``): switch even
    though a thread has code of the patch on its stack.  The patch is then
    marked ``forced`` and a WARNING names what was overridden."""
    with _mutex.operation(f"enable patch {patch.name!r}"), short_switch_interval():
        if not patch.registered:
            raise PatchStateError(f"patch {patch.name!r} is not registered")
        _enable_across_unloads(patch, force)


#: Attempts of an enable or disable whose object another thread unloads.
_UNLOAD_RETRIES = 3


def _gone_behind_our_back(patch: Patch) -> bool:
    """Objects of ``patch`` another thread unloaded while we held the
    lifecycle lock: their GOING is queued, but the loader's worker waits for
    this lock.  An object is gone when it is no longer listed, or when an
    entry no longer holds what hotpatch wrote (it was unloaded and loaded
    again, at the same address).  Handle their GOING now (sites dropped
    unwritten, callbacks run; the queued GOING then finds nothing, and the
    queued COMING of a new load comes after it) and say whether there was any."""
    present = {(o.base, o.name) for o in symbols.loaded_objects()}
    gone = set()
    for obj in patch.objects:
        if obj.name is None or obj._loaded is None:
            continue
        where = (obj._loaded.base, obj._loaded.name)
        if where not in present or not all(sites.still_written(f._site) for f in obj.funcs
                                           if f.patched and f._site is not None):
            gone.add(where)
    for base, name in gone:
        _object_going(base, name)
    return bool(gone)


def _enable_across_unloads(patch: Patch, force: bool = False) -> None:
    """Enable; a failure because an object of the patch was unloaded meanwhile
    (nothing written: enabling is all or nothing) is retried without it."""
    for attempt in range(_UNLOAD_RETRIES):
        try:
            return _enable(patch, force)
        except HotpatchError:
            if attempt == _UNLOAD_RETRIES - 1 or not _gone_behind_our_back(patch):
                raise


def _transition_for(patch: Patch, push: Sequence[Func], pop: Sequence[Func],
                    force: bool) -> "transition_.StackTransition | None":
    """How the switch is made: under the stack model, a transition that
    waits for the stacks to be free of what ``push`` replaces and ``pop``
    removes; None for the immediate model."""
    if patch.consistency != "stack":
        return None
    try:
        return transition_.StackTransition(patch, transition_.code_ranges(push, pop), force)
    except HotpatchError as e:
        raise _prefixed(e, f"patch {patch.name!r}") from None


def _note_forced(patch: Patch, transition: "transition_.StackTransition | None",
                 what: str) -> None:
    if transition is not None and transition.overridden:
        patch.forced = True
        log.warning("patch %r: %s forced: %s; the patch is marked forced", patch.name, what,
                    transition.overridden)


def _enable(patch: Patch, force: bool = False) -> None:
    global _tainted
    if patch.enabled:
        raise PatchStateError(f"patch {patch.name!r} is already enabled")
    reason = state_.incompatibility(patch, [p for p in _enabled if p is not patch])
    if reason:
        raise PatchStateError(f"patch {patch.name!r} is not compatible with the enabled "
                              f"patches: {reason}; nothing was changed")
    notify(logging.INFO, "livepatch: enabling patch '%s'", patch.name)
    present = _loaded_objects(patch)
    prepared: dict[int, sites.Site] = {}
    for obj in present:
        _prepare_object(patch, obj, prepared)
    _stopper_ahead(patch, prepared.values())
    funcs = [func for obj in present for func in obj.funcs]
    _check_addresses(funcs)

    ready = []
    for obj in present:
        reason = _vetoed(obj)
        if reason:
            # callbacks.rst: objects whose pre_patch ran get post_unpatch.
            _run_callbacks(ready, "post_unpatch")
            raise PatchStateError(f"patch {patch.name!r}: object {obj.label}: pre_patch "
                                  f"vetoed the patch ({reason}); nothing was changed")
        ready.append(obj)

    replaced = [p for p in _enabled if p is not patch] if patch.replace else []
    pop = [f for p in replaced for obj in p.objects for f in obj.funcs if f.patched]
    try:
        transition = _transition_for(patch, funcs, pop, force)
        stacks.patch_funcs(push=funcs, pop=pop, prepared=prepared, transition=transition)
    except HotpatchError as e:
        _run_callbacks(present, "post_unpatch")
        raise _prefixed(e, f"patch {patch.name!r}") from None
    _note_forced(patch, transition, "enable")

    for old in replaced:
        _mark_disabled(old)
    for obj in present:
        obj.patched, obj.note = True, None
    patch.enabled = True
    patch.enabled_at = time.time()
    _enabled.append(patch)
    _tainted = True
    _update_crash_report()
    _run_callbacks(present, "post_patch")
    notify(logging.INFO, "livepatch: '%s': patching complete", patch.name)


def _mark_disabled(patch: Patch) -> None:
    patch.enabled = False
    patch.enabled_at = None
    _enabled.remove(patch)
    for obj in patch.objects:
        obj.patched = False


def disable(patch: Patch, *, force: bool = False) -> None:
    """Disable the most recently enabled patch still enabled.  ``force``:
    as for :func:`enable` (under the stack model, the new code being
    removed is what a stack may hold)."""
    with _mutex.operation(f"disable patch {patch.name!r}"), short_switch_interval():
        if not patch.registered:
            raise PatchStateError(f"patch {patch.name!r} is not registered")
        if not patch.enabled:
            raise PatchStateError(f"patch {patch.name!r} is not enabled")
        if _enabled[-1] is not patch:
            raise PatchStateError(f"patch {patch.name!r} is not the top of the stack: "
                                  f"disable {_enabled[-1].name!r} first")
        _gone_behind_our_back(patch)
        patched = [obj for obj in patch.objects if obj.patched]
        _run_callbacks(patched, "pre_unpatch")
        for attempt in range(_UNLOAD_RETRIES):
            pop = [f for obj in patched if obj.patched for f in obj.funcs if f.patched]
            transition = _transition_for(patch, (), pop, force)
            try:
                stacks.patch_funcs(pop=pop, transition=transition)
                break
            except HotpatchError as e:
                if attempt < _UNLOAD_RETRIES - 1 and _gone_behind_our_back(patch):
                    continue
                # The disable is taken back: as the kernel completes a reversed
                # unpatch transition, post_patch answers the pre_unpatch that ran.
                _run_callbacks([obj for obj in patched if obj.patched], "post_patch")
                raise _prefixed(e, f"patch {patch.name!r}") from None
        _note_forced(patch, transition, "disable")
        notify(logging.INFO, "livepatch: '%s': starting unpatching transition", patch.name)
        _mark_disabled(patch)
        _update_crash_report()
        _run_callbacks(patched, "post_unpatch")
        notify(logging.INFO, "livepatch: '%s': unpatching complete", patch.name)


# ---------------------------------------------------------------------------
# Objects loaded and unloaded later (the kernel's klp_module_coming/going);
# called by hotpatch.loader with the lifecycle lock held.


def _names_asked_for() -> set[str]:
    """Every object name of every registered patch (the main program aside)."""
    return {obj.name for p in _patches for obj in p.objects if obj.name is not None}


def _matches(obj: Object, loaded: symbols.LoadedObject) -> bool:
    if obj.name is None:
        return False
    if os.path.isabs(obj.name):
        return obj.name == loaded.name or os.path.realpath(obj.name) == loaded.path
    return obj.name in loaded.names


def _tracked_objects() -> set[tuple[int, str]]:
    """``(base, name)`` of every loaded object some patch's Object is bound to."""
    return {(obj._loaded.base, obj._loaded.name) for p in _patches for obj in p.objects
            if obj.name is not None and obj._loaded is not None}


def _waits_for(loaded: symbols.LoadedObject) -> bool:
    """Whether some patch's Object names ``loaded`` but is not bound to it."""
    return any(obj._loaded is None and _matches(obj, loaded) for p in _patches for obj in p.objects)


def _object_coming(loaded: symbols.LoadedObject, unreachable, late: str | None) -> None:
    """``loaded`` appeared: patch it for every enabled patch naming it, in the
    order they were enabled, each with its callbacks.  ``unreachable`` writes
    while the object cannot run yet; ``late`` says why it may have run."""
    for patch in list(_enabled):
        for obj in patch.objects:
            if _matches(obj, loaded) and not obj.patched:
                _patch_coming(patch, obj, loaded, unreachable, late)
    for patch in _patches:
        for obj in patch.objects:
            if _matches(obj, loaded):
                obj._loaded = loaded
                if not patch.enabled:
                    obj.note = None


def _patch_coming(patch: Patch, obj: Object, loaded, unreachable, late: str | None) -> None:
    notify(logging.INFO, "livepatch: applying patch '%s' to loading module '%s'", patch.name, obj.label)
    obj._loaded = loaded
    prepared: dict[int, sites.Site] = {}
    try:
        # Inside the notification nothing may call dlsym (see loader.py).
        with symbols.no_dynamic_linker() if unreachable else contextlib.nullcontext():
            _prepare_object(patch, obj, prepared)
        _check_addresses(obj.funcs)
    except HotpatchError as e:
        obj.note = f"not patched at load: {e}"
        notify(logging.WARNING, "livepatch: patch '%s' failed for module '%s': %s", patch.name, obj.label, e)
        if isinstance(e, symbols.NotBoundYet):
            raise
        return
    reason = _vetoed(obj)
    if reason:
        obj.note = f"not patched: pre_patch vetoed it at load ({reason})"
        notify(logging.WARNING, "livepatch: pre-patch callback failed for object '%s' (%s): patch '%s' "
                    "not applied to it; the load goes on", obj.label, reason, patch.name)
        return
    try:
        stacks.patch_funcs(push=obj.funcs, prepared=prepared, unreachable=unreachable)
    except HotpatchError as e:
        _run_callbacks([obj], "post_unpatch")
        obj.note = f"not patched at load: {e}"
        notify(logging.WARNING, "livepatch: patch '%s' failed for module '%s': %s", patch.name, obj.label, e)
        return
    obj.patched, obj.note = True, (f"patched late: {late}" if late else None)
    _run_callbacks([obj], "post_patch")


def _object_going(base: int, name: str) -> None:
    """The object loaded at ``base`` as ``name`` is gone: every patch that
    patched it, oldest registered first, runs pre_unpatch, drops its sites
    without writing (the memory is gone, or another object's) and runs
    post_unpatch.  Its Objects are marked not loaded."""
    gone = None
    for patch in _patches:
        for obj in patch.objects:
            if obj._loaded is None or obj._loaded.base != base or obj._loaded.name != name:
                continue
            gone = obj._loaded
            if obj.patched:
                _run_callbacks([obj], "pre_unpatch")
                notify(logging.INFO, "livepatch: reverting patch '%s' on unloading module '%s'",
                         patch.name, obj.label)
                stacks.drop_funcs(f for f in obj.funcs if f.patched)
                obj.patched = False
                _run_callbacks([obj], "post_unpatch")
            obj._loaded, obj.note = None, "unloaded; waiting for the object to load again"
            for func in obj.funcs:
                func.old_addr = func.old_size = None
    if gone is not None:
        symbols.forget(gone)
        thunks.forget(gone)
        plt.forget_object(gone)


# The loaded objects described now, within the core's import (a stretch the
# service's threads share the GIL with at the short switch interval), not in
# the first register(): describing the thirty-odd objects of a process is
# 1.5-3 ms of Python here, and the list stays valid until the next load or
# unload.
symbols.loaded_objects()

# The loader hook's module (it imports this one back, complete by now), here
# rather than in the first register(), which installs the hook: about a
# millisecond of it.
from . import loader  # noqa: E402
