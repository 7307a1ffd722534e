"""Introspection (the kernel's /sys/kernel/livepatch tree, as data)."""
from __future__ import annotations

from . import core, sites
from ._native import ffi, lib


def _func_entry(func: core.Func) -> dict:
    return {"old_addr": func.old_addr, "new_addr": func.new_addr,
            "patched": func.patched, "original": func.original}


def _patch_entry(patch: core.Patch) -> dict:
    entry = {"enabled": patch.enabled, "transition": patch.transition,
             "replace": patch.replace, "stack_order": core.stack_order(patch)}
    for obj in patch.objects:
        node = {"patched": obj.patched}
        for func in obj.funcs:
            # sysfs names a func directory "<name>,<sympos>", with 0 shown as 1.
            node[f"{func.old_name},{func.old_sympos or 1}"] = _func_entry(func)
        entry[obj.label] = node
    return entry


def _core_entry() -> dict:
    """How this process's code is written, and what the writes cost so far."""
    proc_mem, membarrier, park_signal = (ffi.new("int *") for _ in range(3))
    lib.hp_core_info(proc_mem, membarrier, park_signal)
    stops, retries, park_ns = (ffi.new("uint64_t *") for _ in range(3))
    lib.hp_stop_stats(stops, retries, park_ns)
    return {"pool": ffi.string(lib.hp_pool_backing()).decode(),
            "code_writes": "/proc/self/mem" if proc_mem[0] else "mprotect window",
            "core_sync": "membarrier SYNC_CORE" if membarrier[0] else "mprotect IPI",
            "park_signal": park_signal[0],
            "sites": len(sites.installed_sites()),
            "stops": {"count": stops[0], "retries": retries[0], "park_ms": park_ns[0] / 1e6}}


def tree() -> dict:
    """``{"livepatch": {<patch>: {"enabled", "transition", "replace",
    "stack_order", <object>: {"patched", "<func>,<sympos>": {...}}}},
    "tainted": bool, "core": {...}}``; the main program's object is named
    ``main``.  ``core`` says how code is written in this process (the pool's
    backing, /proc/self/mem or an mprotect window, the core sync, the park
    signal), how many sites are redirected and what stopping the world cost."""
    with core._mutex.query():
        return {"livepatch": {p.name: _patch_entry(p) for p in core.patches()},
                "tainted": core.tainted(), "core": _core_entry()}
