"""Series 2b: reach, the share of real libraries' functions each tool can patch.

For each library (libz, libpython, libcrypto where installed, an extension
module), every function with a size that hotpatch's symbol layer lists
(``.symtab``, else ``.dynsym``; an IFUNC at its bound implementation) is
tried, at the same offsets by both tools:

- hotpatch: ``sites.prepare()`` (the whole analysis and the original stub;
  nothing is written), its ``UnsafeToPatch`` reasons bucketed by a short key;
- Frida: ``Interceptor.replace`` and ``replaceFast``, each reverted at once, in
  a throwaway process that only waits meanwhile; errors bucketed likewise.

``python -m benchmarks.reach PARAMS`` is the child.
"""
from __future__ import annotations

import collections
import ctypes
import importlib
import os
import re

from . import frida_peer
from .frida_peer import frida_reason
from .common import (ChildFailed, Options, child_params, emit, exit_after_frida, finish_child,
                     function_symbols, loaded_path, read_message, receive, run_child, send_message,
                     start_child)

#: (label, how to load it, what names it in /proc/self/maps)
LIBRARIES = (
    ("libz", ("cdll", "libz.so.1"), "libz.so"),
    ("libpython", ("loaded", None), "libpython3"),
    ("libcrypto", ("cdll", "libcrypto.so.3"), "libcrypto.so"),
    ("_decimal (extension module)", ("module", "_decimal"), "_decimal."),
)

#: Short keys for hotpatch's refusals, first match wins.
HOTPATCH_REASONS = (
    (r"^not code", "not code / outside its segment"),
    (r"falls through at its end", "shorter than 5 bytes, falls through"),
    (r"no padding follows", "shorter than 5 bytes, no padding after"),
    (r"crosses the end of the function", "instruction crosses the symbol's end"),
    (r"cannot decode", "undecodable bytes"),
    (r"a breakpoint is already", "int3 already at the entry"),
    (r"returns to .* inside the replaced bytes", "call inside the first 5 bytes"),
    (r"a branch lands inside the replaced bytes", "branch into the first 5 bytes"),
    (r"xbegin", "xbegin in the first bytes"),
    (r"inside the relocated bytes", "branch inside the relocated bytes"),
    (r"beyond ±2 GiB", "RIP-relative operand out of reach"),
    (r"no free memory", "no memory within ±2 GiB"),
)
_RPC_CHUNK = 500


def hotpatch_reason(message: str) -> str:
    for pattern, key in HOTPATCH_REASONS:
        if re.search(pattern, message):
            return key
    return " ".join(message.split()[:5])


# ---------------------------------------------------------------------------
# Parent


def run(opts: Options) -> dict:
    """Reach of each tool on each library."""
    params = {"limit": opts.reach_limit}
    result = {"title": "Reach", "limit": opts.reach_limit, "libraries": {}}
    try:
        hotpatch = run_child("reach", params)[-1]
    except ChildFailed as e:
        return {**result, "failures": [f"hotpatch: {e}"]}
    frida, failures = None, []
    if frida_peer.available():
        try:
            frida = _frida_reach(params, hotpatch["libraries"])
        except Exception as e:     # Frida failing is a result too
            failures.append(f"Frida: {e}")
    result["failures"] = failures
    for label, lib in hotpatch["libraries"].items():
        entry = {"path": lib.get("path"), "functions": lib.get("functions", 0),
                 "ifuncs": lib.get("ifuncs", 0), "symbols": lib.get("symbols")}
        if "missing" in lib:
            entry["missing"] = lib["missing"]
        else:
            entry["hotpatch"] = lib["outcome"]
            if frida is not None:
                entry.update(frida.get(label, {}))
        result["libraries"][label] = entry
    if not frida_peer.available():
        result["frida"] = {"skipped": frida_peer.MISSING}
    else:
        result["frida_version"] = frida_peer.version()
    return result


def _frida_reach(params: dict, libraries: dict) -> dict:
    """{library: {"frida_replace": outcome, "frida_replaceFast": outcome}}
    on the functions hotpatch tried (same offsets, another process)."""
    proc = start_child("reach", {**params, "frida": True})
    try:
        ready = read_message(proc)
        out = {}
        with frida_peer.Peer(ready["pid"]) as peer:
            for label, lib in libraries.items():
                if "missing" in lib:
                    continue
                for method in ("replace", "replaceFast"):
                    errors = []
                    for i in range(0, len(lib["offsets"]), _RPC_CHUNK):
                        errors += peer.rpc.reach(method, lib["module"],
                                                 lib["offsets"][i:i + _RPC_CHUNK])
                    out.setdefault(label, {})[f"frida_{method}"] = _outcome(
                        [frida_reason(e, size) if e else None
                         for e, size in zip(errors, lib["sizes"])])
        send_message(proc, {"exit": True})
        finish_child(proc)
    except Exception:
        proc.kill()
        raise
    return out


def _outcome(reasons: list[str | None]) -> dict:
    """{"ok": count, "total": count, "refused": {reason: count}} (None = ok)."""
    refused = collections.Counter(r for r in reasons if r is not None)
    return {"ok": reasons.count(None), "total": len(reasons), "refused": dict(refused.most_common())}


# ---------------------------------------------------------------------------
# Child


def _load(how) -> None:
    kind, name = how
    if kind == "cdll":
        ctypes.CDLL(name)
    elif kind == "module":
        importlib.import_module(name)


def _functions(fragment: str, limit: int | None):
    """(object, [(offset, size)], IFUNCs among them) of the loaded library,
    from hotpatch's symbol layer: sized functions, one per address (an IFUNC
    at its bound implementation); ``limit`` keeps an evenly spread sample."""
    from hotpatch import symbols
    path = loaded_path(fragment)
    obj = next(o for o in symbols.loaded_objects() if o.path == path)
    seen, functions, ifuncs = set(), [], 0
    for sym in symbols.functions(obj):
        if sym.size and sym.offset not in seen:
            seen.add(sym.offset)
            functions.append((sym.offset, sym.size))
            ifuncs += sym.ifunc_resolver is not None
    if limit and len(functions) > limit:
        step = len(functions) / limit
        functions = [functions[int(i * step)] for i in range(limit)]
    return obj, functions, ifuncs


def _hotpatch_outcome(obj, functions) -> dict:
    from hotpatch import sites, symbols
    from hotpatch._native import lib
    from hotpatch.errors import UnsafeToPatch
    reasons, unstopped = [], 0
    for offset, size in functions:
        try:
            site, = sites.prepare_batch(
                [(obj.base + offset, size)], exec_ranges=obj.exec_ranges,
                function_before=symbols.function_before_of(obj))
            if not isinstance(site, sites.Site):
                raise site
            reasons.append(None)
            # The C core's own rules for the entry write: one atomic store
            # (native/unstopped.c), or through a hot-patch point (native/hop.c).
            unstopped += (not lib.hp_write_needs_stop(site.address, len(site.plan.original_bytes))
                          or bool(sites.hot_patch_point(site)))
        except UnsafeToPatch as e:
            reasons.append(hotpatch_reason(str(e)))
        except Exception as e:     # not a refusal: a bug in hotpatch, counted apart
            reasons.append(f"error: {type(e).__name__}: {e}"[:120])
    return {**_outcome(reasons), "unstopped": unstopped}


def _library_report(fragment: str, limit: int | None) -> dict:
    obj, functions, ifuncs = _functions(fragment, limit)
    return {"path": obj.path, "module": os.path.basename(obj.path), "functions": len(functions),
            "ifuncs": ifuncs, "symbols": function_symbols(obj.path)[2],
            "offsets": [o for o, _ in functions], "sizes": [s for _, s in functions],
            "outcome": _hotpatch_outcome(obj, functions)}


def child() -> None:
    """hotpatch's reach; or, for Frida, a process with the same libraries
    loaded that waits while Frida works in it."""
    params = child_params()
    report = {}
    for label, how, fragment in LIBRARIES:
        try:
            _load(how)
        except (OSError, ImportError) as e:
            report[label] = {"missing": str(e)}
            continue
        if not params.get("frida"):
            report[label] = _library_report(fragment, params["limit"])
    if params.get("frida"):
        emit({"pid": os.getpid()})
        receive()
        exit_after_frida()
    emit({"libraries": report})


if __name__ == "__main__":
    child()
