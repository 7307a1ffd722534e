"""Introspection (the kernel's /sys/kernel/livepatch tree, as data)."""
from __future__ import annotations

from . import core


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


def tree() -> dict:
    """``{"livepatch": {<patch>: {"enabled", "transition", "replace",
    "stack_order", <object>: {"patched", "<func>,<sympos>": {...}}}},
    "tainted": bool}``; the main program's object is named ``main``."""
    with core._mutex:
        return {"livepatch": {p.name: _patch_entry(p) for p in core.patches()},
                "tainted": core.tainted()}
