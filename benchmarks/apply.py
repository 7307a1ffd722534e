"""Series 2: how long applying and reverting a patch of N functions takes.

A generated library holds one distinct function per patched function (the
counts use disjoint ranges of it, so every apply is a first apply, with
analysis and original stubs built).  In each fresh child process busy
threads call every function of the library while the main thread patches
them in one batch, for each count in turn (the order rotated between
repeats).  hotpatch is timed in phases:

- ``prepare``: analysis of every entry and its original stub (nothing written);
- ``write``: the batch write (one stop of the world for these prologues);
- ``apply`` = prepare + write; ``revert``: the original bytes back;
- ``reapply``: applying the same functions again (sites cached) and
  ``retarget``: moving every installed site to another replacement.

Frida's ``Interceptor.replace`` and ``replaceFast`` install and revert the
same functions in a child of the same shape, timed inside the process.

The generated functions' entries are several instructions, so their first
patch takes a stop of the other threads.  After the counts, each hotpatch
child also patches, one at a time, functions whose entry needs no stop
(``u_*``: one atomic store), checked to have taken none.  Last, it
redirects functions of both kinds, never patched before, one at a time by
the one-call path (``sites.redirect``, ``native/first.c``): what Frida's
``replace`` of one function is, an address and a replacement.  Then the
livepatch model's way, what a user calls: ``hotpatch.register()`` of a
patch of one function, never patched before, and its ``disable()``.
Frida's child, before its counts, replaces the same one-call functions
one at a time, timed the same way: the figure those two compare with.

``python -m benchmarks.apply PARAMS`` is the child.
"""
from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import time

from . import frida_peer, native
from .common import (Options, child_params, emit, exit_after_frida, finish_child, function_symbols,
                     load_base, read_message, receive, run_child, send_message, start_child,
                     summary)
from .frida_peer import frida_reason

HOTPATCH_PHASES = ("prepare", "write", "apply", "revert", "reapply", "retarget")
#: The one-call path's functions: f_* (several instructions at the entry:
#: through its hot-patch point where other threads run) and u_* (one
#: atomic store); each also with an idle thread in the process, as real
#: services have (faulthandler's watchdog, a pool's idle worker): where
#: the process would otherwise have one thread, the write is no longer
#: alone.
ONE_CALL_KINDS = ("hop", "unstopped", "hop_idle", "unstopped_idle")
#: Timed beside each one-call redirect (see _one_call).
ONE_CALL_BESIDE = ("control", "kernel_floor", "lookup")
#: The livepatch model's steps for a patch of one function (see _model),
#: without and with an idle thread in the process.
MODEL_STEPS = ("register", "disable", "register_idle", "disable_idle")
FRIDA_METHODS = ("replace", "replaceFast")


def _f_layout(counted: int) -> dict[str, int]:
    """Where the f_* functions of each series start, after the ``counted``
    ones of the counts' ranges: the one-call kinds' (ONE_CALL without an
    idle thread, ONE_CALL with one), then the model's (the same); ``end``:
    how many f_* the library needs."""
    n = native.ONE_CALL
    return {"one_call": counted, "model": counted + 2 * n, "end": counted + 4 * n}


def _one_call_names(first_f: int) -> dict[str, list[str]]:
    """The functions of each one-call kind (see ONE_CALL_KINDS), never
    patched before: ONE_CALL of each, the f_* from ``first_f`` on."""
    n = native.ONE_CALL
    return {"hop": [f"f_{first_f + i}" for i in range(n)],
            "unstopped": [f"u_{native.UNSTOPPED + i}" for i in range(n)],
            "hop_idle": [f"f_{first_f + n + i}" for i in range(n)],
            "unstopped_idle": [f"u_{native.UNSTOPPED + n + i}" for i in range(n)]}


def _ranges(counts) -> dict[int, int]:
    """First function index of each count's disjoint range."""
    starts, start = {}, 0
    for count in counts:
        starts[count] = start
        start += count
    return starts


# ---------------------------------------------------------------------------
# Parent


def run(opts: Options) -> dict:
    """Every count under every number of busy threads, hotpatch and Frida
    alternating, each in fresh processes."""
    counts = opts.counts
    library = native.build_generated(_f_layout(sum(counts))["end"])
    starts = _ranges(counts)
    runs = {"hotpatch": {t: [] for t in opts.threads}, "frida": {t: [] for t in opts.threads}}
    failures = []      # a run that crashed or failed is a result too
    tools = [("hotpatch", lambda p: run_child("apply", p)[-1])]
    if frida_peer.available():
        tools.append(("frida", _frida_child))
    for repeat in range(opts.repeats):
        order = list(counts[repeat % len(counts):] + counts[:repeat % len(counts)])
        for threads in opts.threads:
            params = {"library": library, "threads": threads, "order": order, "starts": starts}
            for tool, measure in tools:
                try:
                    runs[tool][threads].append(measure(params))
                except Exception as e:
                    failures.append({"tool": tool, "threads": threads,
                                     "error": str(e).splitlines()[0]})
    result = {"title": "Apply and revert latency", "counts": list(counts),
              "threads": list(opts.threads), "repeats": opts.repeats, "failures": failures,
              "hotpatch": _summarize(runs["hotpatch"], HOTPATCH_PHASES),
              "hotpatch_first": _summarize_first(runs["hotpatch"]),
              "hotpatch_unstopped": {str(t): {phase: summary([r["unstopped"][phase] for r in rs])
                                              for phase in HOTPATCH_PHASES}
                                     for t, rs in runs["hotpatch"].items() if rs},
              "hotpatch_one_call": {str(t): {kind: summary([r["one_call"][kind] for r in rs])
                                             for kind in ONE_CALL_KINDS + ONE_CALL_BESIDE}
                                    for t, rs in runs["hotpatch"].items() if rs},
              "hotpatch_model": {str(t): {step: summary([r["model"][step] for r in rs])
                                          for step in MODEL_STEPS}
                                 for t, rs in runs["hotpatch"].items() if rs}}
    if frida_peer.available():
        result["frida"] = _summarize(runs["frida"], [f"{m}_{s}" for m in FRIDA_METHODS
                                                    for s in ("install", "revert")])
        result["frida_first"] = _summarize_first(runs["frida"])
        result["frida_one_call"] = {str(t): {kind: summary([r["one_call"][kind] for r in rs
                                                            if "one_call" in r])
                                             for kind in ONE_CALL_KINDS}
                                    for t, rs in runs["frida"].items()
                                    if any("one_call" in r for r in rs)}
        result["frida_refused"] = sorted({f"{k}: {v}" for rs in runs["frida"].values()
                                          for r in rs for k, v in r["refused"].items()})
        result["frida_crashes"] = [{"threads": t, "what": r["crashed"]}
                                   for t, rs in runs["frida"].items() for r in rs if "crashed" in r]
        result["frida_version"] = frida_peer.version()
    else:
        result["frida"] = {"skipped": frida_peer.MISSING}
    return result


def _summarize(runs: dict, phases) -> dict:
    """{threads: {phase: {count: summary of µs}}} over the repeats."""
    out = {}
    for threads, results in runs.items():
        if results:
            out[str(threads)] = {}
            for phase in phases:
                counts = sorted({c for r in results for c in r["us"][phase]}, key=int)
                out[str(threads)][phase] = {
                    c: summary([r["us"][phase][c] for r in results if c in r["us"][phase]])
                    for c in counts}
    return out


def _summarize_first(runs: dict) -> dict:
    """The first patch of a process (one-time costs included), by threads:
    {threads: {phase: summary of µs}}."""
    out = {}
    for threads, results in runs.items():
        if results:
            flat = [_flatten(r["first"]) for r in results]
            out[str(threads)] = {k: summary([f[k] for f in flat]) for k in flat[0]}
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        else:
            out[prefix + k] = v
    return out


def _frida_child(params: dict) -> dict:
    """Frida installs in a fresh child with the same library and busy threads.
    Frida writes code while those threads run it: when that kills the
    process, the counts measured so far are kept and the crash recorded."""
    proc = start_child("apply", {**params, "frida": True})
    us = {f"{m}_{s}": {} for m in FRIDA_METHODS for s in ("install", "revert")}
    out = {"us": us, "refused": {}}
    step = "attaching"
    try:
        ready = read_message(proc)
        with frida_peer.Peer(ready["pid"]) as peer:
            step = "the first install"
            first = {m: peer.rpc.installmany(m, ready["module"], [ready["warm"]], ready["g"],
                                             "gen_now_ns") for m in FRIDA_METHODS}
            out["first"] = {m: {"install": r["install_ns"] / 1e3, "revert": r["revert_ns"] / 1e3}
                            for m, r in first.items()}
            step = "replace of one function at a time"
            out["one_call"] = _frida_one_call(peer, proc, ready)
            for count in params["order"]:
                offsets = ready["offsets"][params["starts"][count]:][:count]
                sizes = ready["sizes"][params["starts"][count]:][:count]
                for method in FRIDA_METHODS:
                    step = f"{method} of {count:,} functions"
                    r = peer.rpc.installmany(method, ready["module"], offsets, ready["g"],
                                             "gen_now_ns")
                    us[f"{method}_install"][str(count)] = r["install_ns"] / 1e3
                    us[f"{method}_revert"][str(count)] = r["revert_ns"] / 1e3
                    if r["refused"]:
                        reason = frida_reason(r["reason"], min(sizes))
                        out["refused"][step] = f"{r['refused']} ({reason})"
        send_message(proc, {"exit": True})
        finish_child(proc)
    except Exception:
        signal_name = _death(proc)
        if signal_name is None or "first" not in out:
            proc.kill()
            raise
        out["crashed"] = f"the process died of {signal_name} during {step}"
    return out


def _frida_one_call(peer, proc, ready: dict) -> dict:
    """Frida's ``replace`` of one function at a time, timed as _one_call
    times hotpatch's ``sites.redirect``: the same functions of each kind
    (see ONE_CALL_KINDS), never patched before, each installed (with its
    ``flush``) and reverted, the median µs over the second half, the first
    warming the path up (its first replace in a process is twice its
    later ones); the idle thread started for the ``_idle`` kinds.  Before
    the counts, so that a crash there does not lose them, and with the
    idle thread stopped again for them."""
    out = {}
    idle = False
    for kind, offsets in ready["one_call"].items():
        if kind.endswith("_idle") != idle:
            idle = not idle
            send_message(proc, {"idle": idle})
            read_message(proc)
        times = []
        for offset in offsets:
            r = peer.rpc.installmany("replace", ready["module"], [offset], ready["g"], "gen_now_ns")
            if r["refused"]:
                raise RuntimeError(f"Frida refused a one-call function ({kind}): {r['reason']}")
            times.append(r["install_ns"] / 1e3)
        out[kind] = statistics.median(times[len(times) // 2:])
    if idle:
        send_message(proc, {"idle": False})
        read_message(proc)
    return out


def _death(proc) -> str | None:
    """The signal that killed the child, if it died of one."""
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        return None
    return signal.Signals(-proc.returncode).name if proc.returncode < 0 else None


def growth(us_by_count: dict[str, float]) -> float | None:
    """The exponent k of time ~ count^k, fitted on the counts >= 10 (a count
    of 1 is dominated by fixed costs); 1.0 is linear."""
    points = [(math.log(int(c)), math.log(v)) for c, v in us_by_count.items()
              if int(c) >= 10 and v > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return (sum((x - mx) * (y - my) for x, y in points)
            / sum((x - mx) ** 2 for x, _ in points))


# ---------------------------------------------------------------------------
# Child


def _load(library: str):
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("int gen_start_callers(int n); void gen_stop_callers(void); "
             "long gen_kernel_floor_ns(void);")
    lib = ffi.dlopen(library)
    symbols = {name: (offset, size) for name, offset, size in function_symbols(library)[0]}
    return ffi, lib, symbols


def child() -> None:
    params = child_params()
    ffi, lib, symbols = _load(params["library"])
    total = max(start + int(count) for count, start in params["starts"].items())
    functions = [symbols[f"f_{i}"] for i in range(total)]
    if lib.gen_start_callers(params["threads"]):
        raise RuntimeError("cannot start the caller threads")
    if params.get("frida"):
        emit({"pid": os.getpid(), "module": os.path.basename(params["library"]),
              "offsets": [off for off, _ in functions], "sizes": [size for _, size in functions],
              "g": symbols["g"][0],
              "warm": symbols["warm"][0],
              "one_call": {kind: [symbols[name][0] for name in names]
                           for kind, names in
                           _one_call_names(_f_layout(total)["one_call"]).items()}})
        _serve_frida_run()
        lib.gen_stop_callers()
        exit_after_frida()
    emit(_patch_counts(ffi, lib, params, functions, symbols))
    lib.gen_stop_callers()


def _serve_frida_run() -> None:
    """While Frida works in this process: start or stop the idle thread as
    the parent asks ({"idle": true/false}, answered once done), until it
    says {"exit": true}."""
    idle = None
    while "idle" in (message := receive()):
        if message["idle"] and idle is None:
            idle = _IdleThread()
        elif not message["idle"] and idle is not None:
            idle.stop()
            idle = None
        emit({"idle": idle is not None})
    if idle is not None:
        idle.stop()


def _patch_counts(ffi, lib, params, functions, symbols) -> dict:
    from hotpatch import sites
    base = load_base(os.path.realpath(params["library"]))
    g, g2 = base + symbols["g"][0], base + symbols["g2"][0]
    us = {phase: {} for phase in HOTPATCH_PHASES}
    library = os.path.basename(params["library"])
    layout = _f_layout(len(functions))
    first = _patch_once(sites, library, [(base + symbols["warm"][0], symbols["warm"][1])], g, g2,
                        ffi)
    for count in params["order"]:
        start = params["starts"][str(count)]
        chosen = [(base + off, size) for off, size in functions[start:start + count]]
        for phase, value in _patch_once(sites, library, chosen, g, g2, ffi).items():
            us[phase][str(count)] = value
    return {"us": us, "first": first,
            "unstopped": _unstopped(sites, library, symbols, base, g, g2, ffi),
            "one_call": _one_call(sites, library, symbols, base, g, ffi, lib, layout["one_call"]),
            "model": _model(library, symbols, base, g, ffi, layout["model"])}


def _unstopped(sites, library: str, symbols, base: int, g: int, g2: int, ffi) -> dict:
    """One function at a time whose entry needs no stop (u_*): the median
    of each phase over them, checked to have taken no stop."""
    import hotpatch
    stops = hotpatch.tree()["core"]["stops"]["count"]
    runs = [_patch_once(sites, library, [(base + symbols[f"u_{i}"][0], symbols[f"u_{i}"][1])],
                        g, g2, ffi) for i in range(native.UNSTOPPED)]
    if hotpatch.tree()["core"]["stops"]["count"] != stops:
        raise RuntimeError("a u_* function took a stop: its entry is not the shape expected")
    return {phase: statistics.median(r[phase] for r in runs) for phase in HOTPATCH_PHASES}


def _one_call(sites, library: str, symbols, base: int, g: int, ffi, lib, first_f: int) -> dict:
    """Functions never patched before, each redirected by one call of
    ``sites.redirect`` (its object's segments and the symbol table's
    function before given, as the livepatch model gives them, looked up
    just before), checked to take effect, then restored: the median µs of
    each kind (see ONE_CALL_KINDS) over the second half of its functions:
    the call alone, as Frida's timed region is its ``replace`` alone (its
    addresses and module resolved before; see frida_peer.py).  The first half warms the path up:
    Python's adaptive interpreter specializes a function's bytecode over
    its first calls, the first call of a path is twice its later ones.
    Every redirect is checked to have taken no stop.  ``control``: the
    median of :func:`_control`, timed after each redirect: the same work
    takes longer when the machine is slow.  ``kernel_floor``: the median
    of ``gen_kernel_floor_ns`` (the system calls that serialize a write
    through a hot-patch point, on a page nothing runs), timed after each
    redirect too: what no redirect that syncs the cores can go under.
    ``lookup``: the median of the object's lookup before each call
    (``find_object`` by name and its ``function_before_of``), the part of
    a user's redirect that the call's figure leaves out."""
    import hotpatch
    from hotpatch import symbols as loaded
    clock = time.perf_counter
    out, controls, floors, lookups = {}, [], [], []
    idle = None
    for kind, names in _one_call_names(first_f).items():
        if kind.endswith("_idle") and idle is None:
            idle = _IdleThread()
        stops = hotpatch.tree()["core"]["stops"]["count"]
        times = []
        for name in names:
            entry, size = base + symbols[name][0], symbols[name][1]
            t0 = clock()
            obj = loaded.find_object(library)
            function_before = loaded.function_before_of(obj)
            t1 = clock()
            site = sites.redirect(entry, g, size=size, exec_ranges=obj.exec_ranges,
                                  function_before=function_before)
            t2 = clock()
            _check(ffi, entry, lambda x: x + 1)
            sites.restore(site)
            lookups.append((t1 - t0) * 1e6)
            times.append((t2 - t1) * 1e6)
            controls.append(_control())
            floors.append(lib.gen_kernel_floor_ns() / 1e3)
        if hotpatch.tree()["core"]["stops"]["count"] != stops:
            raise RuntimeError(f"a {names[0][0]}_* function took a stop ({kind}): its entry is "
                               "not the shape expected")
        out[kind] = statistics.median(times[len(times) // 2:])
    idle.stop()
    out["control"] = statistics.median(controls)
    out["kernel_floor"] = statistics.median(floors)
    out["lookup"] = statistics.median(lookups)
    return out


def _model(library: str, symbols, base: int, g: int, ffi, first_f: int) -> dict:
    """What a user calls: ``hotpatch.register()`` of a patch of one
    function never patched before (its object's symbols read by the patches
    before), checked to take effect, then its ``disable()``; the median µs
    of each (see MODEL_STEPS) over the second half of ONE_CALL functions,
    the first half warming the path up, as in :func:`_one_call`.  Then the
    same with an idle thread in the process."""
    import hotpatch
    from hotpatch import Func, Object, Patch
    clock = time.perf_counter
    n = native.ONE_CALL
    out = {}
    for suffix, start in (("", first_f), ("_idle", first_f + n)):
        idle = _IdleThread() if suffix else None
        registers, disables = [], []
        for i in range(start, start + n):
            patch = Patch(f"model-{i}", [Object(library, [Func(f"f_{i}", g)])])
            t0 = clock()
            hotpatch.register(patch)
            t1 = clock()
            _check(ffi, base + symbols[f"f_{i}"][0], lambda x: x + 1)
            t2 = clock()
            hotpatch.disable(patch)
            t3 = clock()
            hotpatch.unregister(patch)
            registers.append((t1 - t0) * 1e6)
            disables.append((t3 - t2) * 1e6)
        if idle is not None:
            idle.stop()
        out["register" + suffix] = statistics.median(registers[n // 2:])
        out["disable" + suffix] = statistics.median(disables[n // 2:])
    return out


class _IdleThread:
    """A thread that blocks every signal and sleeps, as faulthandler's
    watchdog and glibc's timer thread do."""

    def __init__(self) -> None:
        import signal
        import threading
        self._wake = threading.Event()
        ready = threading.Event()

        def sleep() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            ready.set()
            self._wake.wait()

        self._thread = threading.Thread(target=sleep, name="idle", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        self._wake.set()
        self._thread.join()


def _control() -> float:
    """µs of a fixed piece of work: system calls and Python, about a third
    of one redirect's on a quiet machine here."""
    t0 = time.perf_counter()
    for _ in range(12):
        os.getppid()
    sum(i * i for i in range(200))
    return (time.perf_counter() - t0) * 1e6


def _patch_once(sites, library: str, chosen, g: int, g2: int, ffi) -> dict:
    """Apply, check, revert, reapply, retarget, revert: µs for each phase."""
    from hotpatch import symbols
    clock = time.perf_counter
    t0 = clock()
    # The object's executable segments, as the livepatch model passes them.
    ranges = symbols.find_object(library).exec_ranges
    # As the livepatch model does: the entries of a batch analysed in one call.
    prepared = sites.prepare_batch(chosen, exec_ranges=ranges)
    if not all(isinstance(site, sites.Site) for site in prepared):
        raise next(site for site in prepared if not isinstance(site, sites.Site))
    t1 = clock()
    sites.redirect_batch([(s, g) for s in prepared])
    t2 = clock()
    _check(ffi, chosen[-1][0], lambda x: x + 1)
    sites.restore_batch(prepared)
    t3 = clock()
    sites.redirect_batch([(s, g) for s in prepared])
    t4 = clock()
    sites.redirect_batch([(s, g2) for s in prepared])
    t5 = clock()
    sites.restore_batch(prepared)
    return {"prepare": (t1 - t0) * 1e6, "write": (t2 - t1) * 1e6, "apply": (t2 - t0) * 1e6,
            "revert": (t3 - t2) * 1e6, "reapply": (t4 - t3) * 1e6, "retarget": (t5 - t4) * 1e6}


def _check(ffi, entry: int, expected) -> None:
    got = ffi.cast("long(*)(long)", entry)(5)
    if got != expected(5):
        raise AssertionError(f"{entry:#x} returned {got}: the patch is not in effect")


if __name__ == "__main__":
    child()
