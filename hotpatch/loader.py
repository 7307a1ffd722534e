"""COMING and GOING from the dynamic linker: the kernel's module notifiers.

A patch may name objects that are not loaded yet, and loaded objects may
be unloaded.  The notifier tells the lifecycle (``core``) about both:

* COMING: an object named by a registered patch appeared.  Every enabled
  patch naming it patches it, with its ``pre_patch``/``post_patch``, before
  any of its code runs (when the notifier is ``r_brk``, see below).
* GOING: a tracked object disappeared.  Its sites are dropped without a
  write (its memory is gone, or already another object's), with
  ``pre_unpatch``/``post_unpatch``, and its Objects are marked not loaded.

The notifier is ``r_brk``: the function the dynamic linker calls on every
change of its list (``_dl_debug_state``) is redirected with the site
machinery to the C core's ``hp_loader_brk`` (``native/loader.c``), which
diffs the link maps at ``RT_CONSISTENT`` -- for a load, after mapping and
before relocation and constructors.  Where ``r_brk`` is not ``[endbr64;]
ret`` (a debugger's ``int3`` there, an unknown layout), the fallback
interposes ``dlopen``/``dlmopen``/``dlclose`` instead; it sees a load only
after it returned, so every object is then patched late (after its
constructors ran), and the tree says so.

Who runs the Python side of an event, and what it may do:

* the loading thread holds the GIL (an ``import``, ``ctypes.CDLL``): the
  handler runs right there, inside the dynamic linker's lock;
* otherwise the loading thread waits at most :data:`WAIT_MS` for the worker
  thread here.  It cannot wait much longer: the worker needs the GIL, whose
  holder may be waiting for the dynamic linker's lock.  Once it went on,
  the object may run, and be unloaded again at any time.  So an event the
  worker has already taken keeps its loading thread (and the object mapped)
  until it is handled, unless another thread waits for the dynamic
  linker's lock (the GIL's holder may: ``tree()["loader"]["held_given_up"]``
  counts those); and one the worker takes after its loading thread went on
  is handled with a reference on the object (``dlopen(RTLD_NOLOAD)``), or
  not at all if it is gone.  Writes into the new object go without a stop
  only while its loading thread still waits (``hp_loader_write_unreachable``);
  after that through a stop, and the object is noted as patched late.

Inside the notification the handler calls no dlopen/dlsym (an IFUNC whose
slot is not bound yet makes its object patched late, from the worker, with a
reference on the object held by ``dlopen(RTLD_NOLOAD)``), waits for
hotpatch's lifecycle lock at most :data:`WAIT_MS` (else the event is handled
late by the worker), and queues its log records for the worker to emit (a
logging handler may do anything, dlopen included).
"""
from __future__ import annotations

import _thread
import atexit
import collections
import ctypes
import logging
import os
import sys
import threading
import time

from . import core, plt, symbols
from . import sites as _sites
from ._native import ffi, lib
from .errors import HotpatchError
from .x86_64.decode import decode_one

#: How long a loading thread without the GIL waits for the worker.
WAIT_MS = 1000
#: How long a Python thread about to call the dynamic linker waits, at most,
#: for a load that runs hotpatch's Python inside the linker's lock.
STEP_ASIDE_S = 10.0
#: Audit events CPython raises right before it calls the dynamic linker with
#: the GIL held ("import" with a file: an extension module's dlopen).
_DYNAMIC_LINKER_EVENTS = frozenset({"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle"})

COMING, GOING = 1, 2
_RTLD_LAZY, _RTLD_NOLOAD = 0x1, 0x4

_state = {"notifier": None, "reason": None, "sites": []}
_install_lock = threading.Lock()
_draining = threading.local()        # this thread is handling events now
_consume = threading.Lock()          # events are handled in order, by one thread at a time
_deferred: collections.deque = collections.deque()   # (event, why late), for the worker
_records: collections.deque = collections.deque()    # log records queued inside the hook
_late: list[str] = []                # objects patched late, and why (for the tree)
_plt_due: collections.deque = collections.deque()    # objects patched at COMING, PLT slots to follow
_worker: int | None = None      # the worker's thread id, once started
_callback = None


# ---------------------------------------------------------------------------
# Installing the notifier


def watch() -> None:
    """Make sure objects loaded and unloaded from now on are notified, and
    that the names of every registered patch are asked for."""
    with _install_lock:
        if _state["notifier"] is None and _state["reason"] is None:
            _install()
            _start_worker()
    update_names()


def update_names() -> None:
    """Tell the C hook which object names to report (registered patches')."""
    names = b"".join(os.fsencode(n) + b"\0" for n in sorted(core._names_asked_for()))
    if lib.hp_loader_set_wanted(names, len(names)):
        raise HotpatchError("too many object names for the loader hook (64 KiB)")


def _object_at(address: int) -> symbols.LoadedObject | None:
    return next((o for o in symbols.loaded_objects()
                 if any(lo <= address < hi for lo, hi in o.exec_ranges)), None)


_ENDBR64 = bytes.fromhex("f30f1efa")
_RET = b"\xc3"


def _brk_shape(brk: int) -> tuple[str | None, int]:
    """Why ``r_brk`` cannot carry the hook (None if it can: it must be
    ``ret``, after an ``endbr64`` on CET builds), and the size of the
    function it starts: a function whose entry returns has no other
    reachable byte, so that size is its ``[endbr64;] ret`` -- read here
    instead of from the dynamic linker's symbol tables (a file read, and a
    search for its debug file, in the first patch of a process).  Compared
    as bytes (both have one encoding): decoding is only for saying what is
    there instead."""
    code = _sites.read_memory(brk, 16)
    size = len(_ENDBR64) if code.startswith(_ENDBR64) else 0
    if code[size:size + 1] == _RET:
        return None, size + 1
    first = decode_one(code[size:], brk + size)
    what = f"{first.mnemonic} {first.op_str}".strip() if first else f"undecodable {code[size:size + 4].hex()}"
    hint = " (a debugger's breakpoint?)" if first is not None and first.mnemonic == "int3" else ""
    return f"r_brk ({brk:#x}) starts with {what}{hint}, not [endbr64;] ret", 0


def _install() -> None:
    """Redirect r_brk to the hook, or fall back to interposing dlopen."""
    brk = lib.hp_loader_brk_site()
    reason, size = _brk_shape(brk) if brk else ("the dynamic linker has no r_brk", 0)
    if reason is None:
        try:
            _redirect([(brk, 0, size)])
            _state["notifier"] = "r_brk"
            return
        except HotpatchError as e:
            reason = f"r_brk ({brk:#x}) cannot be patched: {e}"
    try:
        libc = ctypes.CDLL(None)
        entries = [(ctypes.cast(getattr(libc, name), ctypes.c_void_p).value, which, None)
                   for which, name in ((1, "dlopen"), (2, "dlmopen"), (3, "dlclose"))]
        _redirect(entries)
        _state.update(notifier="dlopen interposition", reason=reason)
        core.log.warning("hotpatch: loader notifier: %s; interposing dlopen/dlmopen/dlclose "
                         "instead: objects loaded later are patched after their constructors ran",
                         reason)
    except HotpatchError as e:
        _state.update(reason=f"{reason}; interposing dlopen failed too: {e}")
        core.log.warning("hotpatch: no loader notifier: %s", _state["reason"])


def _redirect(entries: list[tuple[int, int, int | None]]) -> None:
    """Redirect each ``(address, which, size)`` to the C core's entry
    ``which``; a size of None is the symbol's."""
    prepared = []
    for address, which, size in entries:
        obj = _object_at(address)
        if obj is None:
            raise HotpatchError(f"{address:#x} lies in no loaded object")
        if size is None:
            # The symbol's size tells its padding from the next function.
            size = symbols.resolve_offset(obj, address - obj.base).size
        # A batch of one: the C core plans r_brk's `ret` and padding itself.
        site, = _sites.prepare_batch([(address, size)], exec_ranges=obj.exec_ranges)
        if isinstance(site, HotpatchError):
            raise site
        lib.hp_loader_set_original(which, site.original)
        prepared.append((site, lib.hp_loader_entry(which)))
    _sites.redirect_batch(prepared)
    for site, _ in prepared:
        _sites.mark_machinery(site)
    _state["sites"] = [site for site, _ in prepared]


def _start_worker() -> None:
    global _worker, _callback
    core.notify = _say
    _callback = lib.hp_loader_py_callback     # compiled in: no W+X memory needed (MDWE)
    if not _state.get("audit"):
        sys.addaudithook(_before_dynamic_linker)    # for the life of the process: hooks stay
        _state["audit"] = True
    lib.hp_loader_start(_callback, WAIT_MS)
    # Not threading.Thread: its start() waits until the new thread has run,
    # 0.4-0.8 ms of the first register() on 2 loaded cores, and nothing here
    # needs it running yet (the hook queues events for it).  Like a daemon
    # thread, it is not joined at exit.
    _worker = _thread.start_new_thread(_work, ())


@atexit.register
def _at_exit() -> None:
    lib.hp_loader_stop()     # no call into a finalising interpreter


def _after_fork_in_child() -> None:
    # The worker did not survive the fork; the child's loads need one.
    if _worker is not None:
        _start_worker()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# Never hold the GIL in a wait for the dynamic linker's lock while a load
# runs hotpatch's Python under that lock.


def _before_dynamic_linker(event: str, args: tuple) -> None:
    """Audit hook: this thread holds the GIL and is about to call the dynamic
    linker.  While another thread runs (or waits for) hotpatch's Python inside
    the linker's lock, step aside with the GIL released: calling in now would
    wait for that lock with the GIL held, and the thread inside needs the GIL
    back.  The last check is the last thing before the call: between it and
    the dynamic linker CPython runs no bytecode, so the GIL cannot change
    hands there."""
    if lib.hp_loader_busy and (event in _DYNAMIC_LINKER_EVENTS
                               or (event == "import" and len(args) > 1 and args[1] is not None)):
        _step_aside()


def _step_aside() -> None:
    # Not the hook's own thread: it holds the linker's lock, its load waits
    # for nothing else.  The worker steps aside too, in the middle of an
    # event (an import of the decoder's binding, or of the modules behind a
    # message, may come then): the loading thread waits for the worker's
    # event lock only so long, then goes on and leaves its event to it.
    if getattr(_draining, "in_hook", False):
        return
    worker = getattr(_draining, "busy", False)
    if worker:      # the event it holds must not hold its loading thread now
        lib.hp_loader_worker_aside(1)
    try:
        deadline = time.monotonic() + STEP_ASIDE_S
        while lib.hp_loader_busy and time.monotonic() < deadline:
            time.sleep(0.0002)      # releases the GIL
    finally:
        if worker:
            lib.hp_loader_worker_aside(0)


# ---------------------------------------------------------------------------
# Handling events


def _say(level: int, message: str, *args) -> None:
    """Log now, or later from the worker when inside the dynamic linker."""
    if getattr(_draining, "in_hook", False):
        _records.append((level, message, args))
    else:
        _flush()
        core.log.log(level, message, *args)


def _flush() -> None:
    while _records:
        level, message, args = _records.popleft()
        core.log.log(level, message, *args)


@ffi.def_extern(name="hp_loader_py_callback")
def _in_hook() -> None:
    """The C hook's callback: this loading thread holds the GIL."""
    try:
        _draining.in_hook = True
        _drain(in_hook=True)
    except BaseException as e:       # nothing may escape into the dynamic linker
        _records.append((logging.ERROR, "hotpatch: loader hook: %r", (e,)))
    finally:
        _draining.in_hook = False


def _work() -> None:
    # It inherited the mask of the thread that registered the first patch,
    # which may block every signal: the signal stop must still park it.
    lib.hp_unblock_park_signal()
    while True:
        lib.hp_loader_wait(200)
        try:
            _drain(in_hook=False)
            _flush()
            _redirect_new_plt_slots()
        except Exception as e:       # the worker must outlive any one event
            core.log.error("hotpatch: loader worker: %r", e)


def _drain(in_hook: bool) -> None:
    """Handle queued events in order; late ones (and everything after them)
    are left to the worker when this is the hook."""
    if getattr(_draining, "busy", False):
        return      # a load from inside our own handling: the outer loop takes it
    # In the hook this waits up to WAIT_MS, releasing the GIL: a thread that
    # takes it and calls dlopen with it held deadlocks with this one (open,
    # see docs/notes.md).  Not waiting (timeout 0) made loads late even in
    # a single-threaded process.
    if not _consume.acquire(timeout=WAIT_MS / 1000):
        return
    _draining.busy = True
    try:
        if not in_hook:
            _handle_deferred()
        event = ffi.new("struct hp_loader_event *")
        while lib.hp_loader_take(event):
            copy = (event.kind, event.seq, event.base, os.fsdecode(ffi.string(event.name)))
            if _deferred:
                _deferred.append((copy, "an earlier event was handled late"))
            else:
                _handle(copy, in_hook)
            lib.hp_loader_done(event.seq)
        if not in_hook:
            if lib.hp_loader_take_resync():
                _resync()
            _handle_deferred()
    finally:
        _draining.busy = False
        _consume.release()


def _handle(event, in_hook: bool) -> None:
    kind, seq, base, name = event
    try:
        with core._mutex.try_operation("handle a load", WAIT_MS / 1000) as held:
            if not held:
                _deferred.append((event, f"hotpatch's lifecycle lock was busy for {WAIT_MS} ms"))
                return
            if kind == GOING:
                _say(logging.INFO, "hotpatch: GOING %s at %#x", name, base)
                core._object_going(base, name)
                return
            if not in_hook and lib.hp_loader_went_on(seq):
                # Its loading thread went on before the worker took the
                # event: the object may be unloaded while it is read, so
                # it is handled with a reference on it.
                _deferred.append((event, f"its loading thread stopped waiting after {WAIT_MS} ms"))
                return
            loaded = _loaded_at(base, name)
            if loaded is None:      # unloaded again meanwhile: its GOING follows
                return
            _say(logging.INFO, "hotpatch: COMING %s at %#x", name, base)

            went_on = []

            def unreachable(batch, n, err):
                rc = lib.hp_loader_write_unreachable(batch, n, seq, err)
                went_on.append(rc == 1)
                return rc
            late = _late_reason()
            if late:
                _late.append(f"{name}: {late}")
            try:
                core._object_coming(loaded, unreachable, late)
            except symbols.NotBoundYet as e:
                _deferred.append((event, str(e)))
                return
            _plt_due.append((base, name))
            if any(went_on):
                _noted_late(loaded, f"its loading thread stopped waiting after {WAIT_MS} ms "
                                    f"(the GIL was busy): written through a stop")
    except core.PatchStateError as e:    # a load from inside an operation (a callback)
        _deferred.append((event, str(e)))


def _handle_deferred() -> None:
    """Events the hook could not handle in time, from the worker: the object
    may be running, so writes go through a stop, with a reference held."""
    while _deferred:
        (kind, seq, base, name), why = _deferred.popleft()
        with core._mutex.operation("handle a late load"):
            if kind == GOING:
                core._object_going(base, name)
                continue
            handle = symbols._dlopen(os.fsencode(name), _RTLD_LAZY | _RTLD_NOLOAD)
            if not handle:      # gone already: it may have run unpatched
                _late.append(f"{name}: {why}; unloaded again before it could be patched")
                continue
            try:
                loaded = _loaded_at(base, name)
                if loaded is not None:
                    core.log.warning("hotpatch: %s patched late: %s", name, why)
                    _late.append(f"{name}: {why}")
                    core._object_coming(loaded, None, why)
                    _plt_due.append((base, name))
            finally:
                symbols._dlclose(handle)


def _redirect_new_plt_slots() -> None:
    """PLT slots of objects that came since the worker last ran, pointed at
    patched functions' new code.  Not at COMING itself: at RT_CONSISTENT the
    new object is not relocated yet, its slots are still empty.  Until then
    (and for slots bound lazily later, until the next enable or disable)
    its calls go through the patched entry: right, one jmp more."""
    while _plt_due:
        base, name = _plt_due.popleft()
        loaded = _loaded_at(base, name)
        if loaded is not None:
            try:
                plt.redirect_object(loaded)
            except HotpatchError as e:
                core.log.warning("hotpatch: PLT slots of %s not redirected: %s", name, e)


def _resync() -> None:
    """Events were dropped on a full queue: compare what the patches track
    with the loaded list.  A tracked object no longer loaded is GOING; an
    object asked for and loaded but not tracked is COMING (late: it ran)."""
    core.log.warning("hotpatch: loader events were dropped (queue full); "
                     "resynchronising from the loaded objects")
    loaded = symbols.loaded_objects()
    present = {(o.base, o.name) for o in loaded}
    with core._mutex.operation("resynchronise loaded objects"):
        for base, name in core._tracked_objects():
            if (base, name) not in present:
                _deferred.append(((GOING, 0, base, name), "events were dropped"))
        for o in loaded:
            if core._waits_for(o):
                _deferred.append(((COMING, 0, o.base, o.name), "events were dropped (queue full)"))


def _late_reason() -> str | None:
    if _state["notifier"] == "r_brk":
        return None
    return f"the notifier is dlopen interposition ({_state['reason']}): after its constructors ran"


def _noted_late(loaded: symbols.LoadedObject, why: str) -> None:
    name = loaded.name
    _late.append(f"{name}: {why}")
    _say(logging.WARNING, "hotpatch: %s patched late: %s", name, why)
    for patch in core._patches:
        for obj in patch.objects:
            if obj.patched and obj._loaded == loaded and not obj.note:
                obj.note = f"patched late: {why}"


def _loaded_at(base: int, name: str) -> symbols.LoadedObject | None:
    return next((o for o in symbols.loaded_objects() if o.base == base and o.name == name), None)


def settle(timeout: float) -> bool:
    """Wait until every event queued so far, late ones included, has been
    handled (at most ``timeout`` seconds): whether it was.  For tests and
    tools that read ``tree()["loader"]`` after loads from other threads."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        if _consume.acquire(timeout=max(0.0, min(0.05, deadline - time.monotonic()))):
            try:
                idle = lib.hp_loader_wait(0) == 0 and not _deferred
            finally:
                _consume.release()
            if idle:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# The tree


def sites() -> list:
    """The sites the notifier itself redirected (r_brk, or the dl* entries)."""
    return list(_state["sites"])


def info() -> dict:
    """``{"notifier": "r_brk" | "dlopen interposition" | None, "reason",
    "calls", "events", "waits_abandoned", "held_given_up", "dropped", "late": [...]}``."""
    counts = [ffi.new("uint64_t *") for _ in range(5)]
    lib.hp_loader_stats(*counts)
    calls, events, abandoned, held_given_up, dropped = (c[0] for c in counts)
    return {"notifier": _state["notifier"], "reason": _state["reason"], "calls": calls,
            "events": events, "waits_abandoned": abandoned, "held_given_up": held_given_up,
            "dropped": dropped,
            "late": list(_late)}
