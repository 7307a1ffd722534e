"""Series 5: what a running service feels while it is patched.

A fresh child process plays the service.  Before anything of hotpatch is
imported it starts

- a *Python ticker*: a thread that sleeps 1 ms in a loop and records every
  gap between two of its wakeups (a gap longer than a millisecond or so is
  time it could not run: the GIL held by someone else, or no CPU);
- a *native sleeper* (``benchmarks/stop_threads.c``): a C thread that wakes
  every millisecond on absolute deadlines and records how late each wakeup
  was (a thread held by a stop, or waiting for a CPU, is late);
- ``busy`` native threads spinning in C that record every gap in their
  readings of the clock (the load: 0, 2 or 8 on 2 cores).

Then it takes the steps a service takes, each timed (wall) with the longest
Python tick gap, the sleeper's worst lateness and the busy threads' longest
gap overlapping it:

1. ``import hotpatch``, then the first use of ``hotpatch.register``, which
   imports the core (the C core, cffi's backend and capstone's C library
   with it);
2. the first ``register()`` of the process: one libz function (``crc32``,
   redirected to libz's own ``adler32``, same signature): the loader hook
   installed, libz's symbol table read (one name looked up), its branch
   index built, the site planned and written through crc32's hot-patch
   point: no stop, so no ptrace helper spawned (the loaded objects were
   described, and the process registered for membarrier, at the import
   of the core);
3. disabling and enabling that patch again;
4. registering a patch of 1,000 functions of a generated library, disabling
   and enabling it;
5. loading a C patch module (``hotpatch.load``; built beforehand).

After each step the child sleeps as long as the step took and takes the same
figures over that quiet window: the *control*, what the machine does to the
threads with nothing happening (2 shared cores: busy threads beyond the cores
wait for a CPU whatever hotpatch does).

hotpatch runs from compiled bytecode, as an installed package does (pip
compiles it): the parent compiles the package's ``__pycache__`` first.
Without it (``PYTHONDONTWRITEBYTECODE``, a read-only tree) every module is
compiled at import, and ``compile()`` holds the GIL for a whole module
(15-45 ms for ``core.py`` on this machine).

``python -m benchmarks.service PARAMS`` is the child.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

from . import native
from .common import ChildFailed, Options, child_params, emit, run_child, summary

#: (label, busy native threads)
LOADS = (("idle", 0), ("2 busy", 2), ("8 busy", 8))
BIG = 1000
#: The series' targets: no step of a single-function patch may stall the
#: service's Python threads or pause its native threads longer than this;
#: the first patch of the process must take less than FIRST_PATCH_MS.
STALL_MS = 5.0
FIRST_PATCH_MS = 5.0
SINGLE_STEPS = ("import", "import_core", "first_register", "disable_1", "enable_1", "load_module")
STEPS = ("import", "import_core", "first_register", "disable_1", "enable_1", "register_1000",
         "disable_1000", "enable_1000", "load_module")
STEP_TITLES = {
    "import": "import hotpatch",
    "import_core": "first use of hotpatch.register (imports the core: the C core with capstone's "
                   "C library, cffi)",
    "first_register": "first register(): 1 libz function (symbols, index, loader hook)",
    "disable_1": "disable 1 function",
    "enable_1": "enable 1 function",
    "register_1000": "register 1,000 functions (first patch of that library)",
    "disable_1000": "disable 1,000 functions",
    "enable_1000": "enable 1,000 functions",
    "load_module": "load a C patch module (1 function)",
}

#: What a step of a single-function patch does with the GIL or the threads,
#: and what would bring it under STALL_MS: the verdicts of the report.
STEP_CAUSES = {
    "import": "`import hotpatch` runs Python only (the errors, the lazy names); a longer gap "
              "is the machine delaying the thread",
    "import_core": "about 65 modules imported (hotpatch's, typing, logging, ctypes, "
                   "difflib, dataclasses with inspect; no longer capstone's binding: "
                   "docs/notes.md) and the C core's and capstone's C libraries mapped: "
                   "hotpatch gives the GIL up between modules and runs them at a 1 ms switch "
                   "interval, but unmarshalling each module's bytecode and each extension's "
                   "initialisation hold it, and the step keeps a core busy for 20-160 ms; "
                   "with busy threads the scheduler takes the CPU from the importing "
                   "thread while it holds the GIL, for up to 5 ms at a time (perf sched: "
                   "runnable, waiting), and the ticker waits for it; with logging, typing, "
                   "dataclasses, inspect and difflib imported before (a third of the "
                   "import's time) the median gap moved by 0-1 ms, not the tail "
                   "(docs/notes.md, session 11); would close "
                   "it: a machine with a free core, or `import hotpatch.core` at the "
                   "service's start-up",
    "first_register": "Python run once (the loader hook installed, libz's tables read, "
                      "its raw bytes asked whether a branch lands in crc32's first bytes and, "
                      "as random bytes nearby could encode one, its branch index built, the "
                      "site planned in C and written through crc32's hot-patch point: no "
                      "stop, no helper spawned), at a 1 ms switch "
                      "interval, keeping a core busy for 3-5 ms idle; with busy threads the "
                      "loader's worker thread and the patching thread wait for a CPU; would "
                      "close it: less Python (libz's tables and the loaded objects read in "
                      "C), or a first patch at the service's start-up",
    "disable_1": "no stop (the entry's 2 bytes back: one atomic store); the patching "
                 "thread's Python competes with the busy threads for the 2 cores",
    "enable_1": "no stop (through crc32's hot-patch point: one atomic store); the patching "
                "thread's Python competes with the busy threads for the 2 cores",
    "load_module": "the module's ELF symbols read, its digest (CPython's own SHA-256, "
                   "not OpenSSL), the module described among the loaded objects (only it: "
                   "the others are kept), its registration (adler32's entry through its "
                   "hot-patch point: no stop), all at a 1 ms switch interval; the "
                   "patching thread's Python competes with the busy threads for the 2 cores",
}

_MODULE_SOURCE = r"""
#include <hotpatch.h>

static unsigned long adler32_one(unsigned long adler, const unsigned char *buf, unsigned len)
{
    return 1;
}

static struct hp_func funcs[] = {
    { .old_name = "adler32", .new_func = adler32_one },
    { }
};

static struct hp_object objs[] = {
    { .name = "libz.so.1", .funcs = funcs },
    { }
};

static struct hp_patch patch = { .name = "service-bench-module", .objs = objs };

HP_PATCH(patch);
"""


# ---------------------------------------------------------------------------
# Parent


def _build_module() -> str:
    """The C patch module of step 5, built once with ``hotpatch build``."""
    from hotpatch import module
    source = os.path.join(native.BUILD, "service_module.c")
    output = os.path.join(native.BUILD, "service_module.so")
    os.makedirs(native.BUILD, exist_ok=True)
    with open(source, "w") as f:
        f.write(_MODULE_SOURCE)
    return module.build(source, output)


def _children(opts: Options) -> int:
    return 2 if opts.quick else 5


def _compile_bytecode() -> None:
    """hotpatch's ``.pyc`` files, written even under ``PYTHONDONTWRITEBYTECODE``
    (the children read them; only writing is switched off)."""
    import compileall
    import hotpatch
    compileall.compile_dir(os.path.dirname(hotpatch.__file__), quiet=1)


def run(opts: Options) -> dict:
    _compile_bytecode()
    params = {"library": native.build_generated(BIG), "threads": native.build_stop_threads(),
              "module": _build_module()}
    raw = {label: [] for label, _ in LOADS}
    failures = []       # a child that failed is a result too
    load_before = os.getloadavg()
    # Loads interleaved child by child: the machine's load drifts.
    for _ in range(_children(opts)):
        for label, busy in LOADS:
            try:
                raw[label].append(run_child("service", {**params, "busy": busy}, timeout=300)[-1])
            except ChildFailed as e:
                lines = [line for line in str(e).splitlines() if line.strip()]
                failures.append({"load": label, "error": lines[-1] if lines else str(e)})
    return {"title": "What the service feels", "big": BIG, "children": _children(opts),
            "loads": [{"label": label, "busy": busy} for label, busy in LOADS],
            "steps": list(STEPS), "step_titles": STEP_TITLES,
            "targets_ms": {"stall": STALL_MS, "first_patch": FIRST_PATCH_MS},
            "switch_interval_ms": sys.getswitchinterval() * 1e3,
            "loadavg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "failures": failures,
            "results": {label: _summarize(runs) for label, runs in raw.items() if runs}}


def _summarize(runs: list[dict]) -> dict:
    """Per step: the median and spread over the children of every figure."""
    out = {}
    for step in STEPS:
        records = [run[step] for run in runs]
        out[step] = {}
        for key in records[0]:
            values = [r[key] for r in records if r.get(key) is not None]
            out[step][key] = summary(values) if values else None
    return out


# ---------------------------------------------------------------------------
# Child


class Ticker:
    """A Python thread that sleeps 1 ms in a loop and records its gaps."""

    def __init__(self) -> None:
        self.gaps: list[tuple[int, int]] = []      # (end ns, gap ns), gaps > 1.2 ms only
        self.last = time.monotonic_ns()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            time.sleep(0.001)
            now = time.monotonic_ns()
            if now - self.last > 1_200_000:
                self.gaps.append((now, now - self.last))
            self.last = now

    def longest(self, t0: int, t1: int) -> float:
        """The longest gap (ms) overlapping [t0, t1]; waits for the ticker
        to have moved past t1."""
        deadline = time.monotonic_ns() + 2_000_000_000
        while self.last <= t1 and time.monotonic_ns() < deadline:
            time.sleep(0.001)
        return max([gap for end, gap in self.gaps if end > t0 and end - gap < t1] or [0]) / 1e6


class NativeThreads:
    """The sleeper and the busy threads of ``stop_threads.c``."""

    def __init__(self, path: str, busy: int) -> None:
        self.lib = ctypes.CDLL(path)
        self.lib.st_now.restype = ctypes.c_uint64
        self.lib.st_busy_max_gap.restype = ctypes.c_int64
        self.lib.st_busy_max_gap.argtypes = [ctypes.c_uint64, ctypes.c_uint64]
        self.lib.st_sleeper_lateness.argtypes = [ctypes.c_uint64, ctypes.c_uint64,
                                                 ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        self.busy = busy
        if self.lib.st_start(busy, 0):
            raise RuntimeError("cannot start the native threads")

    def sleeper_late(self, t0: int, t1: int) -> float:
        """The sleeper's worst lateness (ms) over wakeups due in [t0, t1],
        and the one due next (a wakeup due in a stall is late by its rest)."""
        out = (ctypes.c_uint64 * 4096)()
        n = self.lib.st_sleeper_lateness(t0, t1 + 1_000_000, out, 4096)
        return max(out[i] for i in range(max(n, 0))) / 1e6 if n > 0 else 0.0

    def busy_gap(self, t0: int, t1: int) -> float | None:
        return self.lib.st_busy_max_gap(t0, t1) / 1e6 if self.busy else None


def _measure(ticker: Ticker, threads: NativeThreads, step) -> dict:
    """Run ``step``; its wall time and what the threads saw, and the same
    over a quiet window as long right after (the control)."""
    t0 = time.monotonic_ns()
    step()
    t1 = time.monotonic_ns()
    time.sleep(0.005)   # let the threads pass t1 before the control window
    c0 = time.monotonic_ns()
    time.sleep(max((t1 - t0) / 1e9, 0.005))
    c1 = time.monotonic_ns()
    return {"wall_ms": (t1 - t0) / 1e6,
            "tick_gap_ms": ticker.longest(t0, t1), "control_tick_gap_ms": ticker.longest(c0, c1),
            "sleeper_late_ms": threads.sleeper_late(t0, t1),
            "control_sleeper_late_ms": threads.sleeper_late(c0, c1),
            "busy_gap_ms": threads.busy_gap(t0, t1), "control_busy_gap_ms": threads.busy_gap(c0, c1)}


def child() -> None:
    p = child_params()
    ticker = Ticker()
    threads = NativeThreads(p["threads"], p["busy"])
    libz = ctypes.CDLL("libz.so.1")
    gen = ctypes.CDLL(p["library"])
    time.sleep(0.05)    # the threads running, the ticker in its rhythm
    results = {}
    results["import"] = _measure(ticker, threads, lambda: __import__("hotpatch"))
    import hotpatch
    # The public names are imported on first use (hotpatch/__init__.py):
    # this is where the C core and capstone are loaded.
    results["import_core"] = _measure(ticker, threads, lambda: hotpatch.register)
    from hotpatch import Func, Object, Patch

    adler32 = ctypes.cast(libz.adler32, ctypes.c_void_p).value
    one = Patch("service-one", [Object("libz.so.1", [Func("crc32", adler32)])])
    results["first_register"] = _measure(ticker, threads, lambda: hotpatch.register(one))
    results["disable_1"] = _measure(ticker, threads, lambda: hotpatch.disable(one))
    results["enable_1"] = _measure(ticker, threads, lambda: hotpatch.enable(one))

    g = ctypes.cast(gen.g, ctypes.c_void_p).value
    big = Patch("service-big", [Object(os.path.basename(p["library"]),
                                       [Func(f"f_{i}", g) for i in range(BIG)])])
    results["register_1000"] = _measure(ticker, threads, lambda: hotpatch.register(big))
    results["disable_1000"] = _measure(ticker, threads, lambda: hotpatch.disable(big))
    results["enable_1000"] = _measure(ticker, threads, lambda: hotpatch.enable(big))
    results["load_module"] = _measure(ticker, threads, lambda: hotpatch.load(p["module"]))
    # The patches really are in effect: crc32 runs adler32, which the
    # module made return 1; the generated functions run g.
    assert libz.adler32(0, b"abc", 3) == 1 and libz.crc32(0, b"abc", 3) == 1
    assert gen.f_7(41) == 42
    ticker.running = False
    emit(results)
    sys.stdout.flush()
    os._exit(0)     # the busy threads spin on: leave without joining them


if __name__ == "__main__":
    child()
