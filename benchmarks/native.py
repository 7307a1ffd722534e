"""Builds the native parts of the suite into ``benchmarks/build/``.

- ``driver.so`` (``driver.c``) and ``libbenchpeer.so`` (``peer.c``): the
  overhead driver and the library it reaches through its PLT;
- ``libgen<N>.so``: N generated functions for the apply, reach and stop
  series, with a table of their addresses and busy threads that call them;
- ``libstopthreads.so`` (``stop_threads.c``): the busy, idle and sleeping
  threads of the stop series, which record how long they were held.

Outputs are rebuilt only when their source or flags change.  The build checks
with objdump that the driver's direct loops really are ``call rel32`` to the
hidden target and not PLT calls: otherwise the "rel32" column would measure
something else.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build")

CC = os.environ.get("CC", "cc")
CFLAGS = ["-O2", "-fPIC", "-Wall", "-Wextra"]
# Every function starts on its own 64-byte line, so that no variant gains or
# loses from where the linker happened to place its target or loop.
DRIVER_FLAGS = ["-fvisibility=hidden", "-falign-functions=64"]


def _fresh(output: str, stamp: str) -> bool:
    stamp_file = output + ".stamp"
    if os.path.exists(output) and os.path.exists(stamp_file):
        with open(stamp_file) as f:
            return f.read() == stamp
    return False


def _stamp(output: str, stamp: str) -> None:
    with open(output + ".stamp", "w") as f:
        f.write(stamp)


def _compile(output: str, source_text: str, args: list[str]) -> str:
    """Compile ``args`` into the shared object ``output`` unless it is up to date."""
    stamp = hashlib.sha256((source_text + repr(args) + CC).encode()).hexdigest()
    if not _fresh(output, stamp):
        os.makedirs(BUILD, exist_ok=True)
        subprocess.run([CC, *CFLAGS, "-shared", "-o", output, *args], check=True)
        _stamp(output, stamp)
    return output


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def build_driver() -> str:
    """Build the driver and its peer library; returns the driver's path."""
    peer_src = os.path.join(HERE, "peer.c")
    _compile(os.path.join(BUILD, "libbenchpeer.so"), _read(peer_src), [peer_src])
    driver_src = os.path.join(HERE, "driver.c")
    driver = _compile(os.path.join(BUILD, "driver.so"), _read(driver_src),
                      [*DRIVER_FLAGS, driver_src, f"-L{BUILD}", "-lbenchpeer",
                       "-Wl,-rpath,$ORIGIN", "-Wl,-z,lazy"])
    check_rel32_loops(driver)
    return driver


def _disassemble(path: str) -> str:
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                          capture_output=True, text=True, check=True).stdout


def check_rel32_loops(driver: str) -> None:
    """Fail unless each ``bench_rel32_<f>`` calls ``<f>`` with a direct call
    (the ``peer_*`` functions by their PLT entries, which is those variants' point)."""
    listing = _disassemble(driver)
    for match in re.finditer(r"<bench_rel32_(\w+)>:\n(.*?)\n\n", listing, re.S):
        callee, body = match.groups()
        expected = f"<{callee}@plt>" if callee.startswith("peer_") else f"<{callee}>"
        calls = re.findall(r"\scall\s+([0-9a-f]+ <[^>]+>|\*\S+)", body)
        if not any(c.endswith(expected) for c in calls):
            raise RuntimeError(f"bench_rel32_{callee} does not call {expected} directly: {calls}")


def build_stop_threads() -> str:
    """Build the threads of the stop series; returns the library's path."""
    source = os.path.join(HERE, "stop_threads.c")
    return _compile(os.path.join(BUILD, "libstopthreads.so"), _read(source),
                    ["-pthread", source])


# ---------------------------------------------------------------------------
# The generated library


#: Functions of the generated library whose first patch needs no stop.
UNSTOPPED = 8
#: Functions of each kind (f_*, u_*) redirected by the one-call path
#: (``sites.redirect``) in the apply series, after the others, once alone
#: and once with an idle thread: the first half warms the path up, the
#: second is timed.
ONE_CALL = 16


def _generated_source(count: int) -> str:
    """C source of ``count`` distinct functions f_0.. (each at least 16 bytes,
    so that Frida's replaceFast takes them too), ``warm`` of the same shape
    (patched first, to take the one-time costs), the replacements ``g`` and
    ``g2``, UNSTOPPED + 2 * ONE_CALL functions u_0.. whose entry needs no stop
    to patch (their first instruction, a load of a volatile, covers the
    write), the table ``gen_functions`` and busy caller threads."""
    parts = [
        "#include <pthread.h>\n#include <stdint.h>\n#include <time.h>\n#include <unistd.h>\n"
        "#include <linux/membarrier.h>\n#include <sys/mman.h>\n#include <sys/syscall.h>\n",
        "#define FUNC __attribute__((noipa))\n",
        "FUNC long g(long x) { return x + 1; }\n",
        "FUNC long g2(long x) { return x + 1; }\n",
        "FUNC long warm(long x) { return ((x ^ (x >> 7)) * 3) - 1; }\n",
    ]
    parts += [f"FUNC long f_{i}(long x) {{ return ((x ^ (x >> 7)) * 3) + {i + 1}; }}\n"
              for i in range(count)]
    parts.append("static volatile long ubase = 0;\n")
    parts += [f"FUNC long u_{i}(long x) {{ long b = ubase; return b + x + {i + 2}; }}\n"
              for i in range(UNSTOPPED + 2 * ONE_CALL)]
    parts.append("long (*const gen_functions[])(long) = {\n")
    parts += [f"f_{i},\n" for i in range(count)]
    parts.append("};\n")
    parts.append(f"const long gen_count = {count};\n")
    parts.append(_GENERATED_RUNTIME)
    return "".join(parts)


_GENERATED_RUNTIME = r"""
/* Busy threads: each calls every generated function in turn until stopped,
 * so that patching happens while the patched code runs. */
static volatile int gen_stop;
static pthread_t gen_threads[64];
static int gen_nthreads;
static volatile long gen_sink;

static void *gen_caller(void *arg)
{
    long acc = 0, i = (long)(intptr_t)arg;
    while (!gen_stop) {
        acc += gen_functions[i](i);
        if (++i == gen_count)
            i = 0;
    }
    gen_sink = acc;
    return 0;
}

int gen_start_callers(int n)
{
    gen_stop = 0;
    for (gen_nthreads = 0; gen_nthreads < n && gen_nthreads < 64; gen_nthreads++)
        if (pthread_create(&gen_threads[gen_nthreads], 0, gen_caller,
                           (void *)(intptr_t)(gen_nthreads * 997 % gen_count)))
            return -1;
    return 0;
}

void gen_stop_callers(void)
{
    gen_stop = 1;
    for (int i = 0; i < gen_nthreads; i++)
        pthread_join(gen_threads[i], 0);
    gen_nthreads = 0;
}

/* A page of code that nothing runs, aligned: gen_kernel_floor_ns() writes it. */
__attribute__((aligned(4096), noipa, used)) void gen_unrun_page(void)
{
    __asm__ volatile(".fill 4096, 1, 0xcc");
}

/* ns of what a first redirect through a hot-patch point asks of the kernel
 * to serialize, besides reading and writing bytes: a core sync after the
 * point's jmp (membarrier SYNC_CORE), the mprotect window of the entry's
 * atomic store, a core sync after it; made here on a page nothing runs.
 * With other threads of the process running, each is an interrupt of
 * their CPUs that this thread waits for. */
long gen_kernel_floor_ns(void)
{
    char *page = (char *)gen_unrun_page;
    struct timespec a, b;
    syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
    clock_gettime(CLOCK_MONOTONIC, &a);
    syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
    mprotect(page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC);
    ((volatile char *)page)[2048] = (char)0xcc;
    mprotect(page, 4096, PROT_READ | PROT_EXEC);
    syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec);
}

/* A monotonic clock for Frida scripts (double: no UInt64 boxing). */
double gen_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}
"""


def build_generated(count: int) -> str:
    """Build (once) the library of ``count`` generated functions; returns its path."""
    output = os.path.join(BUILD, f"libgen{count}.so")
    source = _generated_source(count)
    source_path = os.path.join(BUILD, f"libgen{count}.c")
    stamp = hashlib.sha256((source + repr(CFLAGS) + CC).encode()).hexdigest()
    if not _fresh(output, stamp):
        os.makedirs(BUILD, exist_ok=True)
        with open(source_path, "w") as f:
            f.write(source)
        subprocess.run([CC, *CFLAGS, "-shared", "-pthread", "-o", output, source_path],
                       check=True)
        _stamp(output, stamp)
    return output
