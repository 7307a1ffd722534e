"""Series 1: the cost of one call through each kind of redirection.

The driver (``driver.c``) holds one target function per variant; a child
process redirects each target to ``new_fn`` (hotpatch's forms, stacks of
patches, a Python callable, a GOT write, and Frida's Interceptor attached to
the same process), then calls every variant by identical loops, through a
function pointer and by ``call rel32``, in alternating rounds.  Per round,
each variant's difference from its reference (the direct call to ``new_fn``,
the limit) is taken, so slow drifts of a shared machine cancel; the table
reports medians and quartiles.  A second child runs the same code under
callgrind for instructions per call, which noise does not move.

Run alone: ``python -m benchmarks --only overhead``.  ``python -m
benchmarks.overhead PARAMS`` is the child.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from . import frida_peer, native
from .common import (ChildFailed, Options, child_params, emit, exit_after_frida, finish_child,
                     function_symbols,
                     load_base, read_message, receive, run_child, send_message, start_child,
                     summary)

#: Retargets of one site before the "after many retargets" variant is measured.
RETARGETS = 1000
#: Patches stacked on one function.
STACKS = (1, 4, 16)
#: A measurement of an expensive variant takes about as long as one of a
#: cheap variant (calls x this many ns), instead of running all the calls.
CHEAP_NS_PER_CALL = 1.3


@dataclass(frozen=True)
class Variant:
    """One way a call reaches ``new_fn`` (or, for ``old`` variants, the old code)."""

    key: str
    label: str
    callee: str | None        #: driver function the rel32 loop calls (None: pointer only)
    reference: str = "limit"  #: the variant it is compared with, in the same round
    old: bool = False         #: runs the old code (checked against the unpatched function)
    ptr: bool = True          #: also measured through a function pointer
    peer: str | None = None   #: needs this peer tool


VARIANTS = (
    Variant("limit", "direct call to the new function (the limit)", "new_fn"),
    Variant("direct", "hotpatch direct path", "t_direct"),
    Variant("hop", "hotpatch direct path through a hot-patch point", "t_hop"),
    Variant("slot", "hotpatch slot path", "t_slot"),
    Variant("call", "hotpatch call path (no observer)", "t_call"),
    *(Variant(f"stack{n}", f"hotpatch, stack of {n} patch{'es' if n > 1 else ''}", f"t_stack{n}")
      for n in STACKS),
    Variant("retargets", f"hotpatch after {RETARGETS:,} retargets", "t_retargets"),
    Variant("python", "Python callable as the replacement", "t_python"),
    Variant("unpatched", "unpatched old function (for scale)", "t_plain", old=True),
    Variant("original", "hotpatch original stub (relocated prologue)", None,
            reference="unpatched", old=True),
    Variant("original_nop", "hotpatch original of a patchable-NOP entry", None,
            reference="unpatched", old=True),
    Variant("got", "GOT/PLT interposition", "peer_fn", ptr=False),
    Variant("frida_replace", "Frida Interceptor.replace", "t_frida", peer="frida"),
    Variant("frida_fast", "Frida Interceptor.replaceFast", "t_frida_fast", peer="frida"),
    # Calls through the PLT (a function pointer skips it: rel32 only).
    Variant("plt_limit", "through a PLT: unpatched, new_fn's body (the PLT reference)", "peer_new",
            ptr=False),
    Variant("plt_slot", "through a PLT: hotpatch, slot redirected", "peer_plt",
            reference="plt_limit", ptr=False),
    Variant("plt_entry", "through a PLT: hotpatch, slot left at the entry", "peer_entry",
            reference="plt_limit", ptr=False),
    Variant("frida_plt", "through a PLT: Frida Interceptor.replaceFast", "peer_frida",
            reference="plt_limit", ptr=False, peer="frida"),
)
BY_KEY = {v.key: v for v in VARIANTS}
METHODS = ("ptr", "rel32")


def measurements(keys) -> list[tuple[str, str]]:
    """Every (variant, method) pair measured for the variants ``keys``."""
    pairs = []
    for key in keys:
        v = BY_KEY[key]
        if v.ptr:
            pairs.append((key, "ptr"))
        if v.callee:
            pairs.append((key, "rel32"))
    return pairs


# ---------------------------------------------------------------------------
# Parent


def run(opts: Options) -> dict:
    """Measure every variant; returns the series' result (see report.py)."""
    driver = native.build_driver()
    timing = _timed_child(driver, opts)
    counts = _callgrind_child(driver, opts)
    return {"title": "Overhead per call", "timing": timing, "instructions": counts,
            "calls": opts.calls, "rounds": opts.rounds, "retargets": RETARGETS,
            "variants": [v.__dict__ for v in VARIANTS]}


def _timed_child(driver: str, opts: Options) -> dict:
    proc = start_child("overhead", {"driver": driver, "calls": opts.calls, "rounds": opts.rounds,
                                    "retargets": RETARGETS})
    try:
        ready = read_message(proc)
        frida_state, peer = _frida_install(ready)
        active = [v.key for v in VARIANTS if v.peer is None or frida_state.get(v.key) == "ok"]
        send_message(proc, {"active": active})
        result = read_message(proc)
        if peer is not None:
            peer.close()
        send_message(proc, {"exit": True})
        finish_child(proc)
    except Exception:
        proc.kill()
        raise
    result["setup"] = ready["setup"]
    result["frida"] = frida_state
    return result


def _frida_install(ready: dict):
    """Redirect the Frida variants' targets inside the child; returns
    ({variant: "ok" | why not}, the open session or None)."""
    if not frida_peer.available():
        return {key: frida_peer.MISSING for key in ("frida_replace", "frida_fast", "frida_plt")}, None
    addresses = ready["addresses"]
    peer = frida_peer.Peer(ready["pid"])
    state = {}
    for key, method, target in (("frida_replace", "replace", "t_frida"),
                                ("frida_fast", "replaceFast", "t_frida_fast"),
                                ("frida_plt", "replaceFast", "peer_frida")):
        try:
            peer.rpc.redirect(method, hex(addresses[target]), hex(addresses["new_fn"]))
            state[key] = "ok"
        except Exception as e:     # Frida refused: the table says why
            state[key] = f"Frida refused: {e}"
    return state, peer


def _callgrind_child(driver: str, opts: Options) -> dict:
    """Instructions per call of each variant, from callgrind dumps (one per
    measurement, labelled by the driver's client requests)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return {"skipped": "valgrind is not installed"}
    calls = 20_000 if opts.quick else 100_000
    with tempfile.TemporaryDirectory() as out:
        # The signal stop: valgrind cannot run the ptrace helper's start (a
        # clone with CLONE_VM and no thread flags: "Unsupported clone()").
        prefix = ["env", "HOTPATCH_STOPPER=signals",
                  valgrind, "--tool=callgrind", "--smc-check=all", "--collect-atstart=no",
                  f"--callgrind-out-file={out}/cg.out"]
        try:
            messages = run_child("overhead", {"driver": driver, "calls": calls, "rounds": 1,
                                              "retargets": RETARGETS, "callgrind": True},
                                 prefix=prefix, timeout=1800)
        except ChildFailed as e:
            return {"skipped": f"the driver failed under valgrind: {e}"}
        done = messages[-1]
        counts = _read_dumps(out)
    per_call = {}
    for label, n in done["calls"].items():
        if label in counts:
            per_call[label] = counts[label] / n
    return {"calls": done["calls"], "per_call": per_call, "checks": done["checks"],
            "valgrind": subprocess.run([valgrind, "--version"], capture_output=True,
                                       text=True).stdout.strip(),
            "options": "--smc-check=all, counted inside the loops only"}


def _read_dumps(directory: str) -> dict[str, int]:
    """{label: instructions} from callgrind dump files (label = the client
    request's description)."""
    counts = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as f:
            text = f.read()
        label = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
        total = re.search(r"^(?:totals|summary): (\d+)", text, re.M)
        if label and total:
            counts[label.group(1)] = int(total.group(1))
    return counts


# ---------------------------------------------------------------------------
# Child: redirect every target, then measure


def _load_driver(path: str):
    import cffi
    ffi = cffi.FFI()
    callees = sorted({v.callee for v in VARIANTS if v.callee})
    ffi.cdef("typedef long (*fn_t)(long);\n"
             "uint64_t bench_ptr(fn_t fn, long n, const char *label, long *checksum);\n"
             "void *driver_function(const char *name);\n"
             + "".join(f"uint64_t bench_rel32_{c}(long n, const char *label, long *checksum);\n"
                       for c in callees))
    return ffi, ffi.dlopen(path)


class Driver:
    """The driver library in this process, and the loops that call its variants."""

    def __init__(self, path: str):
        self.path = path
        self.ffi, self.lib = _load_driver(path)
        self.sizes = {name: size for name, _, size in function_symbols(path)[0]}
        self.pointers: dict[str, int] = {}
        self._checksum = self.ffi.new("long *")
        self._old_checksums: dict[int, int] = {}

    def address(self, name: str) -> int:
        return int(self.ffi.cast("uintptr_t", self.lib.driver_function(name.encode())))

    def call(self, key: str, method: str, n: int, label: str = "") -> tuple[int, int]:
        """Run one loop: (elapsed ns, checksum)."""
        label = label.encode()
        if method == "ptr":
            ns = self.lib.bench_ptr(self.ffi.cast("fn_t", self.pointers[key]), n, label,
                                    self._checksum)
        else:
            loop = getattr(self.lib, f"bench_rel32_{BY_KEY[key].callee}")
            ns = loop(n, label, self._checksum)
        return ns, self._checksum[0]

    def expected(self, key: str, n: int) -> int:
        """The checksum of n calls when the right code runs."""
        if not BY_KEY[key].old:
            return n * (n + 1) // 2     # new_fn(i) = i + 1
        if n not in self._old_checksums:
            self._old_checksums[n] = self.call("unpatched", "ptr", n)[1]
        return self._old_checksums[n]


def _stack_patches(d: "Driver", function: str, replacements: list[int]) -> None:
    """Enable one livepatch per replacement on ``function``, each on top of
    the last (the kernel's klp_ops stack): the last one is where calls go."""
    import hotpatch
    library = os.path.basename(d.path)
    for i, target in enumerate(replacements):
        hotpatch.register(hotpatch.Patch(f"{function}-{i}", [
            hotpatch.Object(library, [hotpatch.Func(function, target)])]))


def _redirect_hotpatch_variants(d: Driver, retargets: int) -> dict:
    """Redirect every hotpatch target; returns what was set up (forms chosen,
    retarget latencies).  A thread of the service waits meanwhile: in a
    process of one thread nothing needs a stop, so the core takes no
    hot-patch point, and the rows through one would measure the entry's
    jmp instead."""
    service = threading.Event()
    waiting = threading.Thread(target=service.wait)
    waiting.start()
    try:
        return _redirect_in_a_service(d, retargets)
    finally:
        service.set()
        waiting.join()


def _redirect_in_a_service(d: Driver, retargets: int) -> dict:
    from hotpatch import sites
    ranges = sites.executable_ranges()

    def prepare(name):
        return sites.prepare(d.address(name), size=d.sizes[name], exec_ranges=ranges)

    new = d.address("new_fn")
    alternates = [d.address(f"new_fn_{k}") for k in range(1, 16)]
    setup = {"forms": {}}
    for key, form in (("direct", "direct"), ("slot", "slot"), ("call", "call")):
        site = prepare(f"t_{key}")
        sites.redirect_batch([(site, new)], form=form)
        setup["forms"][key] = _form(site)
    # No form named: the entry (several instructions, padding before it)
    # goes through its hot-patch point, which spares the stop.
    site = prepare("t_hop")
    sites.redirect_batch([(site, new)])
    if not site.hopped:
        raise RuntimeError("t_hop was not patched through its hot-patch point")
    setup["forms"]["hop"] = _form(site)
    for n in STACKS:
        _stack_patches(d, f"t_stack{n}", alternates[:n - 1] + [new])
        setup["forms"][f"stack{n}"] = _form(sites.prepare(d.address(f"t_stack{n}")))
    setup["retarget_us"] = {
        "direct": _time_retargets(sites, prepare("t_retargets"), alternates[:2], new, retargets),
        "slot": _time_retargets(sites, sites.prepare(d.address("t_slot")), alternates[2:4], new,
                                retargets),
    }
    setup["forms"]["retargets"] = _form(sites.prepare(d.address("t_retargets")))
    original = sites.prepare(d.address("t_direct"))
    d.pointers["original"] = original.original
    nop_site = prepare("t_patchable")
    sites.redirect_batch([(nop_site, new)])
    d.pointers["original_nop"] = nop_site.original
    setup["original_nop_kind"] = nop_site.kind
    setup["original_kind"] = original.kind
    setup["forms"]["python"] = _redirect_to_python(d, sites, prepare("t_python"))
    return setup


def _form(site) -> str:
    return site.form + (", through the hot-patch point" if site.hopped else "")


def _time_retargets(sites, site, alternates, final: int, count: int) -> float:
    """Retarget ``site`` ``count`` times between two replacements, then to
    ``final``; returns the microseconds per retarget (site already installed
    or installed by the first)."""
    sites.redirect_batch([(site, alternates[0])])
    t0 = time.perf_counter()
    for i in range(count):
        sites.redirect_batch([(site, alternates[(i + 1) % 2])])
    elapsed = time.perf_counter() - t0
    sites.redirect_batch([(site, final)])
    return elapsed / count * 1e6


_keep_alive = []    # cffi callbacks must outlive every call into them


def _redirect_to_python(d: Driver, sites, site) -> str:
    """Send t_python to a Python function (a cffi callback); returns the form
    hotpatch picked for its address."""
    callback = d.ffi.callback("long(long)", lambda x: x + 1)
    _keep_alive.append(callback)
    sites.redirect_batch([(site, int(d.ffi.cast("uintptr_t", callback)))])
    return _form(site)


def _jump_slot(d: Driver, name: str) -> int:
    """The address of the driver's JUMP_SLOT slot of ``name``."""
    relocs = subprocess.run(["readelf", "-rW", d.path], capture_output=True, text=True,
                            check=True).stdout
    match = re.search(rf"^([0-9a-f]+)\s+\S+\s+R_X86_64_JUMP_SLO\w*\s+\S+\s+{name}\b",
                      relocs, re.M)
    return load_base(os.path.realpath(d.path)) + int(match.group(1), 16)


def _interpose_got(d: Driver) -> None:
    """Point the driver's GOT slot of peer_fn at new_fn: its PLT calls now
    land there (pointers to peer_fn and other objects' calls do not)."""
    d.ffi.cast("uintptr_t *", _jump_slot(d, "peer_fn"))[0] = d.address("new_fn")


def _patch_plt_variants(d: Driver) -> dict:
    """Patch peer_plt and peer_entry to new_fn with hotpatch, their driver
    slots bound first (the driver is linked -z lazy); then put the slot of
    peer_entry back at the entry: what a PLT call pays without the slot
    redirect (a slot bound lazily after the patch, or before this feature).
    Returns what the slots hold."""
    import hotpatch
    new = d.address("new_fn")
    for key in ("plt_slot", "plt_entry"):
        d.call(key, "rel32", 1)          # the dynamic linker binds the slot now
    hotpatch.register(hotpatch.Patch("plt-bench", [hotpatch.Object(
        "libbenchpeer.so", [hotpatch.Func("peer_plt", new), hotpatch.Func("peer_entry", new)])]))
    slots = {key: _jump_slot(d, f"peer_{name}") for key, name in (("plt_slot", "plt"),
                                                                   ("plt_entry", "entry"))}
    d.ffi.cast("uintptr_t *", slots["plt_entry"])[0] = d.address("peer_entry")
    read = lambda key: int(d.ffi.cast("uintptr_t *", slots[key])[0])
    return {"slot_is_new_fn": read("plt_slot") == new,
            "entry_slot_is_entry": read("plt_entry") == d.address("peer_entry")}


def _calibrate(d: Driver, pairs, calls: int) -> dict:
    """Calls per measurement: ``calls`` for cheap variants; for expensive ones
    as many as fit in the time of a cheap measurement (at least 10^4)."""
    budget_ns = calls * CHEAP_NS_PER_CALL
    n = {}
    for key, method in pairs:
        ns = min(d.call(key, method, 20_000)[0] for _ in range(2)) / 20_000
        n[f"{key}/{method}"] = int(min(calls, max(10_000, budget_ns / max(ns, 1e-3))))
    return n


def _measure(d: Driver, pairs, calls: dict, rounds: int) -> dict:
    """Alternating rounds, rotated so that each variant takes every place in
    the order; returns {label: [ns per call, one per round]} and checks every
    checksum (the redirection really was in effect)."""
    samples = {f"{k}/{m}": [] for k, m in pairs}
    for r in range(rounds):
        shift = r % len(pairs)
        for key, method in pairs[shift:] + pairs[:shift]:
            label = f"{key}/{method}"
            ns, checksum = d.call(key, method, calls[label], label)
            if checksum != d.expected(key, calls[label]):
                raise AssertionError(f"{label}: the checksum shows that the wrong code ran")
            samples[label].append(ns / calls[label])
    return samples


def _paired_deltas(samples: dict) -> dict:
    """Per round, each variant minus its reference (same method, same round)."""
    deltas = {}
    for label, values in samples.items():
        key, method = label.split("/")
        ref = samples.get(f"{BY_KEY[key].reference}/{method}")
        if ref is not None and BY_KEY[key].reference != key:
            deltas[label] = summary([v - r for v, r in zip(values, ref)])
    return deltas


def child() -> None:
    params = child_params()
    d = Driver(params["driver"])
    for v in VARIANTS:
        if v.ptr and v.key not in ("original", "original_nop"):
            d.pointers[v.key] = d.address(v.callee)
    setup = _redirect_hotpatch_variants(d, params["retargets"])
    _interpose_got(d)
    setup["plt"] = _patch_plt_variants(d)
    addresses = {name: d.address(name) for name in ("new_fn", "t_frida", "t_frida_fast",
                                                    "peer_frida")}
    if params.get("callgrind"):
        _callgrind_measure(d, params["calls"])
        return
    emit({"pid": os.getpid(), "addresses": addresses, "setup": setup})
    pairs = measurements(receive()["active"])
    calls = _calibrate(d, pairs, params["calls"])
    samples = _measure(d, pairs, calls, params["rounds"])
    emit({"calls": calls, "ns_per_call": {k: summary(v) for k, v in samples.items()},
          "delta_ns": _paired_deltas(samples), "samples": samples})
    receive()     # the parent has detached Frida
    exit_after_frida()


def _callgrind_measure(d: Driver, calls: int) -> None:
    """One labelled loop per measurement, each dumped by the driver."""
    counts, checks = {}, {}
    for key, method in measurements(v.key for v in VARIANTS if v.peer is None):
        label = f"{key}/{method}"
        n = calls if key != "python" else calls // 50    # Python runs thousands per call
        checks[label] = d.call(key, method, n, label)[1] == d.expected(key, n)
        counts[label] = n
    emit({"calls": counts, "checks": checks})


if __name__ == "__main__":
    child()
