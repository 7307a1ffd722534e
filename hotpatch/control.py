"""Introspection (the kernel's /sys/kernel/livepatch tree, as data)."""
from __future__ import annotations

from . import core, loader, patch as stacks, plt, sites
from ._native import ffi, lib
from .errors import HotpatchError


def _func_entry(func: core.Func) -> dict:
    return {"old_addr": func.old_addr, "new_addr": func.new_addr,
            "patched": func.patched, "original": func.original,
            # failed calls of a Python replacement (the original ran instead)
            "errors": func.errors,
            "last_error": repr(func.last_error) if func.last_error is not None else None,
            # calls go through a thunk that keeps registers the callers rely on
            "thunk": ({"address": func.thunk.address, "preserves": list(func.thunk.preserves)}
                      if func.thunk is not None else None),
            # PLT slots of loaded objects pointed straight at this func's code
            "plt_slots": _plt_slots(func)}


def _plt_slots(func: core.Func) -> int:
    stack = stacks.stack_of(func.old_addr) if func.patched else None
    if stack is None or stack.top is not func:
        return 0
    return sum(1 for _obj, _slot, value in plt.redirected(func.old_addr) if value == func.new_addr)


def _loaded(obj: core.Object) -> bool:
    try:
        return obj.loaded
    except HotpatchError:     # two loaded objects match its name
        return True


def _patch_entry(patch: core.Patch) -> dict:
    # Attributes are plain values; objects are the dicts.  States: the
    # kernel has no sysfs file for them, the tree lists "id:version".
    entry = {"enabled": patch.enabled, "transition": patch.transition,
             "replace": patch.replace, "stack_order": core.stack_order(patch),
             "consistency": patch.consistency, "forced": patch.forced,
             "transition_timeout": patch.transition_timeout,
             "states": " ".join(f"{s.id}:{s.version}" for s in patch.states)}
    for obj in patch.objects:
        node = {"patched": obj.patched, "loaded": _loaded(obj), "note": obj.note}
        for func in obj.funcs:
            # sysfs names a func directory "<name>,<sympos>", with 0 shown as 1.
            node[f"{func.old_name},{func.old_sympos or 1}"] = _func_entry(func)
        entry[obj.label] = node
    return entry


def _stopper_entry() -> dict:
    uses_ptrace, helper_pid, park_signal = (ffi.new("int *") for _ in range(3))
    reason = ffi.new("char[256]")
    lib.hp_stopper_info(uses_ptrace, helper_pid, park_signal, reason)
    return {"method": "ptrace" if uses_ptrace[0] else "signals",
            "helper_pid": helper_pid[0] or None,
            "reason": ffi.string(reason).decode() or None,
            "park_signal": park_signal[0]}


def _core_entry() -> dict:
    """How this process's code is written, and what the writes cost so far."""
    counts = [ffi.new("uint64_t *") for _ in range(7)]
    lib.hp_stop_stats(*counts)
    stops, retries, stop_ns, hold_ns, hold_max_ns, unstopped, alone = (c[0] for c in counts)
    return {"pool": ffi.string(lib.hp_pool_backing()).decode(),
            "code_writes": "/proc/self/mem" if lib.hp_code_writes_use_proc_mem() else "mprotect window",
            "core_sync": "membarrier SYNC_CORE" if lib.hp_core_sync_ready() else "mprotect IPI",
            "stopper": _stopper_entry(),
            # the patches' sites; the loader's own (r_brk) is under "loader"
            "sites": len(sites.installed_sites()),
            "stops": {"count": stops, "retries": retries, "stop_ms": stop_ns / 1e6,
                      "held_ms": hold_ns / 1e6, "longest_hold_ms": hold_max_ns / 1e6,
                      "unstopped": unstopped, "alone": alone}}


def tree() -> dict:
    """``{"livepatch": {<patch>: {"enabled", "transition", "replace",
    "stack_order", "consistency" ("immediate" | "stack"), "forced" (a
    stack-model transition was forced past a busy stack), "transition_timeout"
    (seconds), "states" ("id:version ..."),
    <object>: {"patched", "<func>,<sympos>": {...}}}},
    "tainted": bool, "core": {...}}``; the main program's object is named
    ``main``.  ``core`` says how code is written in this process (the pool's
    backing, /proc/self/mem or an mprotect window, the core sync, which
    stopper holds the other threads during a write and why), how many sites
    are redirected, what the stops cost and how many batches needed none
    (``stops["unstopped"]``: one atomic store each; ``stops["alone"]``: written in a
    process of one thread, with no other thread to stop).  ``stopper`` is ``{"method":
    "ptrace" | "signals", "helper_pid", "reason" (why not ptrace, or None),
    "park_signal"}``.  An object's ``loaded`` says whether it is loaded now
    and ``note`` why it is not patched (waiting for it to load, a pre_patch
    veto at load) or that it was patched late, and why.  ``loader`` is
    :func:`hotpatch.loader.info`: which notifier reports loads and unloads."""
    with core._mutex.query():
        return {"livepatch": {p.name: _patch_entry(p) for p in core.patches()},
                "tainted": core.tainted(), "core": _core_entry(), "loader": loader.info()}
