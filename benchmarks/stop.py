"""Series 2c: what a stop of the world costs the other threads, for the
ptrace stopper and the signal stop side by side.

Every code write of hotpatch (installing, retargeting, restoring a redirect)
happens in a *stop*: every other thread of the process is held while the
bytes are written, by a ptrace helper process (the default) or by parking
each thread in a signal handler (``HOTPATCH_STOPPER=signals``, read at each
stop).  For each thread load (0, 2 or 8 busy threads; 8 or 100 idle ones)
fresh child processes run, and in each the two stoppers alternate stop by
stop (ABBA order, the first method swapped between the two children of a
load), so that both see the same machine at the same moment.

In each child (``benchmarks/stop_threads.c``):

- *busy* threads spin in C reading CLOCK_MONOTONIC and record every gap
  between two readings; the *pause* of a stop for them is the longest gap of
  any busy thread overlapping the stop (held, or descheduled meanwhile).
  After each stop the main thread spins for as long as the stop took, writing
  nothing: the same figure over that window is the *control* (on 2 cores, 8
  busy threads are descheduled for milliseconds anyway);
- *idle* threads block (half in ``pthread_cond_wait``, half in a
  ``nanosleep`` loop), and a 1 ms periodic *sleeper* (absolute deadlines,
  timer slack 1 ns) is in every load: the lateness of its wakeups due during
  a stop is what an idle thread sees; its lateness over quiet phases of the
  same child (nothing patched) is its control;
- the core's own counters (``hotpatch.tree()["core"]["stops"]``), read around
  each batch: the *stop time* (from asking for the stop to letting the
  threads go: no thread is held longer) and the *hold* (threads held while
  the code was checked and written).

Since a restore (and a retarget) replaces hotpatch's own ``jmp`` and needs
no stop (one atomic store, ``native/unstopped.c``), this series sends every
batch to the stop (``HOTPATCH_STOP=always``): it measures the stoppers; the
apply series shows the restore as it is.

Apply latency is the wall time of ``sites.redirect_batch`` of 1 site and of
1,000 sites (distinct ``-O2`` functions with generic prologues, generated C,
prepared beforehand: the analysis is the apply series' subject), and of
``sites.restore_batch`` of them; every apply is checked to be in effect.

``python -m benchmarks.stop PARAMS`` is the child.
"""
from __future__ import annotations

import os
import random
import re
import statistics
import time

from . import native
from .common import Options, child_params, emit, function_symbols, load_base, run_child

METHODS = ("ptrace", "signals")
#: (label, busy threads, idle threads); the 1 ms sleeper runs in every load.
LOADS = (("0 busy", 0, 0), ("2 busy", 2, 0), ("8 busy", 8, 0), ("8 idle", 0, 8),
         ("100 idle", 0, 100))
BIG = 1000
#: The targets of the issue: median pause of a stop, µs.
TARGETS = {"8 idle": 200.0, "8 busy": 2000.0}


def _plan(opts: Options) -> dict:
    """Children per load and, per child and method, repeats of 1 and of
    1,000 sites (the full run: 20 and 6 per method in all)."""
    if opts.quick:
        return {"children": 1, "one": 4, "big": 1, "quiet_ms": 100}
    return {"children": 2, "one": 10, "big": 3, "quiet_ms": 250}


# ---------------------------------------------------------------------------
# Parent


def run(opts: Options) -> dict:
    plan = _plan(opts)
    library = native.build_generated(BIG + 1)
    threads = native.build_stop_threads()
    raw = {label: [] for label, _, _ in LOADS}
    load_before = os.getloadavg()
    for child in range(plan["children"]):
        for label, busy, idle in LOADS:
            params = {"library": library, "threads": threads, "busy": busy, "idle": idle,
                      "first": METHODS[child % 2], "one": plan["one"], "big": plan["big"],
                      "quiet_ms": plan["quiet_ms"], "seed": child}
            raw[label].append(run_child("stop", params, timeout=300)[-1])
    return {"title": "Stopping the other threads", "methods": list(METHODS),
            "loads": [{"label": label, "busy": busy, "idle": idle} for label, busy, idle in LOADS],
            "children": plan["children"], "repeats": {"one": plan["one"] * plan["children"],
                                                      "big": plan["big"] * plan["children"]},
            "big": BIG, "targets_us": TARGETS,
            # the machine is shared: how loaded it was (1-minute load average)
            "loadavg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "results": {label: _summarize(runs) for label, runs in raw.items()}}


def pause_key(busy: int) -> str:
    """The figure that is a stop's pause for a load: with busy threads, the
    longest gap one of them saw; else the core's stop time (from asking for
    the stop to letting the threads go: no thread is held longer)."""
    return "gap_us" if busy else "stop_us"


def stats(values: list[float]) -> dict | None:
    """Median, p90 and max (and min, n) of some measurements."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    return {"median": statistics.median(values), "p90": p90, "max": values[-1],
            "min": values[0], "n": len(values)}


def _summarize(runs: list[dict]) -> dict:
    """Per method: latencies, pauses, the core's figures, over every child."""
    out = {}
    for method in METHODS:
        records = [r for run in runs for r in run["stops"] if r["method"] == method]

        def of(kinds, key):
            return [r[key] for r in records if r["kind"] in kinds]

        m = {"latency_us": {k: stats(of((k,), "wall_us"))
                            for k in ("apply1", "restore1", "apply1000", "restore1000")}}
        for size, kinds in (("one", ("apply1", "restore1")), ("big", ("apply1000", "restore1000"))):
            late = [max(r["late_us"]) for r in records if r["kind"] in kinds and r["late_us"]]
            m[size] = {
                "stops": len(of(kinds, "wall_us")),
                "gap_us": stats(of(kinds, "gap_us")),
                "control_gap_us": stats(of(kinds, "control_gap_us")),
                # each stop's gap less its own control window's
                "added_gap_us": stats([r.get("added_gap_us") for r in records if r["kind"] in kinds]),
                "stop_us": stats(of(kinds, "stop_us")),
                "hold_us": stats(of(kinds, "hold_us")),
                # the sleeper's worst wakeup per stop during which one was due
                "late_us": stats(late),
                "late_stops": len(late),
                "retries": sum(of(kinds, "retries")),
            }
        refused = [f for run in runs for f in run["refused"] if f["method"] == method]
        m["refused"] = len(refused)
        m["refused_messages"] = sorted({re.sub(r"thread \d+", "thread N", f["error"])
                                        for f in refused})
        m["first_us"] = stats([run["first"][method]["wall_us"] for run in runs])
        m["first_stop_us"] = stats([run["first"][method]["stop_us"] for run in runs])
        m["longest_hold_us"] = max((r["hold_us"] for r in records), default=None)
        out[method] = m
    out["sleeper_quiet_us"] = stats([v for run in runs for v in run["quiet_late_us"]])
    out["core"] = [run["core"] for run in runs]
    return out


# ---------------------------------------------------------------------------
# Child


def _load(params: dict):
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("""
        long f_0(long); long f_1000(long);
        int st_start(int busy, int idle);
        void st_stop(void);
        int64_t st_busy_max_gap(uint64_t t0, uint64_t t1);
        int st_sleeper_lateness(uint64_t t0, uint64_t t1, uint64_t *out, int max);
        void st_spin(uint64_t ns, uint64_t *t0, uint64_t *t1);
    """)
    return ffi, ffi.dlopen(params["library"]), ffi.dlopen(params["threads"])


class _Child:
    def __init__(self, params: dict):
        from hotpatch import sites, symbols
        self.params = params
        self.ffi, self.gen, self.st = _load(params)
        path = os.path.realpath(params["library"])
        table = {name: (off, size) for name, off, size in function_symbols(path)[0]}
        base = load_base(path)
        self.g = base + table["g"][0]
        ranges = symbols.find_object(os.path.basename(path)).exec_ranges

        def prepare(name):
            off, size = table[name]
            return sites.prepare(base + off, size=size, exec_ranges=ranges)

        # Prepared before the threads start: the analysis is not measured here.
        self.one = [prepare("f_0")]
        self.big = [prepare(f"f_{i}") for i in range(1, BIG + 1)]
        self.late_buf = self.ffi.new("uint64_t[]", 4096)
        self.t = self.ffi.new("uint64_t[2]")

    # -- the core's counters ------------------------------------------------

    @staticmethod
    def core() -> dict:
        import hotpatch
        return hotpatch.tree()["core"]

    # -- what the threads saw ----------------------------------------------

    def gap_us(self, t0: int, t1: int) -> float | None:
        if not self.params["busy"]:
            return None
        ns = self.st.st_busy_max_gap(t0, t1)
        if ns < 0:
            raise RuntimeError(f"st_busy_max_gap: {ns} (a busy thread did not run for a second, "
                               "or its ring wrapped)")
        return ns / 1e3

    def lateness_us(self, t0: int, t1: int) -> list[float]:
        n = self.st.st_sleeper_lateness(t0, t1, self.late_buf, 4096)
        if n < 0:
            raise RuntimeError("the sleeper did not wake for a second")
        return [self.late_buf[i] / 1e3 for i in range(n)]

    # -- one stop -----------------------------------------------------------

    def batch(self, method: str, kind: str) -> dict:
        from hotpatch import sites
        os.environ["HOTPATCH_STOPPER"] = method     # putenv: the core reads it at each stop
        # A restore replaces hotpatch's own jmp: one atomic store, no stop
        # (native/unstopped.c).  This series measures the stoppers, so every
        # batch is sent to the stop.
        os.environ["HOTPATCH_STOP"] = "always"
        chosen = self.one if kind.endswith("1") else self.big
        before = self.core()["stops"]
        t0 = time.monotonic_ns()
        if kind.startswith("apply"):
            sites.redirect_batch([(s, self.g) for s in chosen])
        else:
            sites.restore_batch(chosen)
        t1 = time.monotonic_ns()
        core = self.core()
        after = core["stops"]
        if core["stopper"]["method"] != method:
            raise RuntimeError(f"asked for the {method} stopper, the core used "
                               f"{core['stopper']['method']}: {core['stopper']['reason']}")
        self.check(kind)
        return {"method": method, "kind": kind, "t0": t0, "t1": t1,
                "wall_us": (t1 - t0) / 1e3,
                "stops": after["count"] - before["count"],
                "retries": after["retries"] - before["retries"],
                "stop_us": (after["stop_ms"] - before["stop_ms"]) * 1e3,
                "hold_us": (after["held_ms"] - before["held_ms"]) * 1e3}

    def check(self, kind: str) -> None:
        fn = self.gen.f_0 if kind.endswith("1") else self.gen.f_1000
        k = 1 if kind.endswith("1") else BIG + 1
        expected = 6 if kind.startswith("apply") else ((5 ^ (5 >> 7)) * 3) + k
        got = fn(5)
        if got != expected:
            raise AssertionError(f"{kind}: f(5) = {got}, expected {expected}")

    def measured(self, method: str, kind: str) -> dict:
        """One stop, what the threads saw during it, and the control window."""
        r = self.batch(method, kind)
        r["gap_us"] = self.gap_us(r["t0"], r["t1"])
        r["late_us"] = self.lateness_us(r["t0"], r["t1"])
        self.st.st_spin(r["t1"] - r["t0"], self.t, self.t + 1)
        r["control_gap_us"] = self.gap_us(self.t[0], self.t[1])
        if r["gap_us"] is not None:
            r["added_gap_us"] = r["gap_us"] - r["control_gap_us"]
        r["control_late_us"] = self.lateness_us(self.t[0], self.t[1])
        return r

    def quiet(self, ms: int) -> list[float]:
        """The sleeper's lateness over `ms` with nothing patched."""
        t0 = time.monotonic_ns()
        time.sleep(ms / 1e3)
        return self.lateness_us(t0, time.monotonic_ns() - 2_000_000)


def child() -> None:
    params = child_params()
    c = _Child(params)
    if c.st.st_start(params["busy"], params["idle"]):
        raise RuntimeError("cannot start the threads")
    try:
        emit(_measure(c, params))
    finally:
        c.st.st_stop()      # before the interpreter unloads the threads' code


def _measure(c: _Child, params: dict) -> dict:
    from hotpatch.errors import TransitionError
    rng = random.Random(params["seed"])
    refused = []

    def pair(method: str, size: str) -> list[dict]:
        """Apply then restore, each one stop; a stop the core refuses is
        recorded, a refused apply skips its restore, a refused restore is
        tried again (the next apply must find the sites restored)."""
        out = []
        for kind in (f"apply{size}", f"restore{size}"):
            for attempt in range(20):
                time.sleep(rng.uniform(0.5e-3, 2e-3))    # no phase lock with the sleeper
                try:
                    out.append(c.measured(method, kind))
                    break
                except TransitionError as e:
                    refused.append({"method": method, "kind": kind, "error": str(e)})
                    if kind.startswith("apply"):
                        return out
            else:
                raise RuntimeError(f"{method}: {kind} refused 20 times in a row: "
                                   f"{refused[-1]['error']}")
        return out

    time.sleep(0.05)
    first, other = params["first"], [m for m in METHODS if m != params["first"]][0]
    # The first stop of each method pays one-time costs (the ptrace helper is
    # started, the park handler installed): recorded apart.
    firsts = {}
    for method in (first, other):
        done = []
        while not done or done[0]["kind"] != "apply1":
            done = pair(method, "1")
            if len(refused) > 20:
                raise RuntimeError(f"first stops refused: {refused[-1]['error']}")
        firsts[method] = done[0]
    quiet = c.quiet(params["quiet_ms"])
    stops = []
    for r in range(max(params["one"], params["big"])):
        order = (first, other) if r % 2 == 0 else (other, first)
        for method in order:
            if r < params["one"]:
                stops += pair(method, "1")
            if r < params["big"]:
                stops += pair(method, str(BIG))
    quiet += c.quiet(params["quiet_ms"])
    core = c.core()
    return {"stops": stops, "first": firsts, "quiet_late_us": quiet, "refused": refused,
            "core": {"stopper": core["stopper"], "stops": core["stops"]}}


if __name__ == "__main__":
    child()
