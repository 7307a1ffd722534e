/*
 * The overhead driver: tiny functions to redirect and the loops that call them.
 *
 * Every variant of the benchmark is one *target* function whose calls end in
 * `new_fn` (by hotpatch, by a GOT write, by Frida...), so that all variants
 * run the same body and differ only in how the call gets there.  Each target
 * is called two ways, by identical loops:
 *   - bench_ptr(fn, n): through a volatile function pointer (a `call *%reg`);
 *   - bench_rel32_<target>(n): a direct `call rel32` to the hidden target
 *     (the build checks with objdump that it is not a PLT call).
 * The loops time themselves with CLOCK_MONOTONIC and, under callgrind,
 * collect instructions only inside the loop and dump one profile per call,
 * labelled with the variant.
 *
 * Compiled with -fvisibility=hidden: only the BENCH_API functions are
 * exported; the targets are found with driver_function(name).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#endif
#endif
#ifndef CALLGRIND_TOGGLE_COLLECT
#define CALLGRIND_TOGGLE_COLLECT
#define CALLGRIND_DUMP_STATS_AT(label) ((void)(label))
#endif

#define BENCH_API __attribute__((visibility("default")))
/* noipa: no inlining, no clones, no assumptions about the body in callers:
 * every call stays a real call with the plain ABI. */
#define FUNC __attribute__((noipa))

typedef long (*fn_t)(long);

/* The new code every variant ends in: as small as a function gets, so that
 * the redirection is as large a share of the time as it can be. */
FUNC long new_fn(long x) { return x + 1; }

/* Further replacements, for stacks of patches and retargets (same body). */
#define REPLACEMENT(k) FUNC long new_fn_##k(long x) { return x + 1; }
REPLACEMENT(1) REPLACEMENT(2) REPLACEMENT(3) REPLACEMENT(4) REPLACEMENT(5)
REPLACEMENT(6) REPLACEMENT(7) REPLACEMENT(8) REPLACEMENT(9) REPLACEMENT(10)
REPLACEMENT(11) REPLACEMENT(12) REPLACEMENT(13) REPLACEMENT(14) REPLACEMENT(15)

/* The old code: a straight-line prologue of several instructions and at
 * least 16 bytes (Frida's replaceFast refuses shorter functions), whose
 * result differs from new_fn's so that a checksum shows which code ran. */
#define TARGET(name) FUNC long name(long x) { return ((x ^ (x >> 7)) * 3) + 5; }
TARGET(t_plain)          /* never patched: the unpatched baseline */
TARGET(t_direct)
TARGET(t_hop)            /* patched through its hot-patch point */
TARGET(t_slot)
TARGET(t_call)
TARGET(t_stack1)
TARGET(t_stack4)
TARGET(t_stack16)
TARGET(t_retargets)
TARGET(t_python)
TARGET(t_frida)
TARGET(t_frida_fast)
/* A function with a patchable NOP entry: its original is its own body. */
__attribute__((patchable_function_entry(5))) TARGET(t_patchable)

/* In libbenchpeer.so: reached through this library's PLT and GOT. */
extern long peer_fn(long x);
extern long peer_plt(long x);
extern long peer_entry(long x);
extern long peer_frida(long x);
extern long peer_new(long x);

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Calls `fn` n times through a function pointer; returns the elapsed ns and
 * the sum of the results in *checksum.  The pointer is volatile so that the
 * compiler cannot see the callee. */
BENCH_API uint64_t bench_ptr(fn_t fn, long n, const char *label, long *checksum)
{
    fn_t volatile f = fn;
    long acc = 0;
    uint64_t t0 = now_ns();
    CALLGRIND_TOGGLE_COLLECT;
    for (long i = 0; i < n; i++)
        acc += f(i);
    CALLGRIND_TOGGLE_COLLECT;
    uint64_t t1 = now_ns();
    CALLGRIND_DUMP_STATS_AT(label);
    *checksum = acc;
    return t1 - t0;
}

/* The same loop with a direct call to `callee` (a call rel32). */
#define REL32_LOOP(callee)                                                     \
    BENCH_API uint64_t bench_rel32_##callee(long n, const char *label,         \
                                            long *checksum)                    \
    {                                                                          \
        long acc = 0;                                                          \
        uint64_t t0 = now_ns();                                                \
        CALLGRIND_TOGGLE_COLLECT;                                              \
        for (long i = 0; i < n; i++)                                           \
            acc += callee(i);                                                  \
        CALLGRIND_TOGGLE_COLLECT;                                              \
        uint64_t t1 = now_ns();                                                \
        CALLGRIND_DUMP_STATS_AT(label);                                        \
        *checksum = acc;                                                       \
        return t1 - t0;                                                        \
    }

REL32_LOOP(new_fn)
REL32_LOOP(t_plain)
REL32_LOOP(t_direct)
REL32_LOOP(t_hop)
REL32_LOOP(t_slot)
REL32_LOOP(t_call)
REL32_LOOP(t_stack1)
REL32_LOOP(t_stack4)
REL32_LOOP(t_stack16)
REL32_LOOP(t_retargets)
REL32_LOOP(t_python)
REL32_LOOP(t_frida)
REL32_LOOP(t_frida_fast)
REL32_LOOP(t_patchable)
REL32_LOOP(peer_fn)      /* a call rel32 to peer_fn@plt */
REL32_LOOP(peer_plt)     /* and the other peer_* through their PLT entries */
REL32_LOOP(peer_entry)
REL32_LOOP(peer_frida)
REL32_LOOP(peer_new)

/* The address of a driver function by name (the targets are hidden). */
BENCH_API void *driver_function(const char *name)
{
    static const struct { const char *name; fn_t fn; } table[] = {
#define ENTRY(f) { #f, f },
        ENTRY(new_fn) ENTRY(t_plain) ENTRY(t_direct) ENTRY(t_hop) ENTRY(t_slot) ENTRY(t_call)
        ENTRY(t_stack1) ENTRY(t_stack4) ENTRY(t_stack16) ENTRY(t_retargets)
        ENTRY(t_python) ENTRY(t_frida) ENTRY(t_frida_fast) ENTRY(t_patchable)
        ENTRY(peer_fn) ENTRY(peer_plt) ENTRY(peer_entry) ENTRY(peer_frida) ENTRY(peer_new)
        ENTRY(new_fn_1) ENTRY(new_fn_2) ENTRY(new_fn_3) ENTRY(new_fn_4) ENTRY(new_fn_5)
        ENTRY(new_fn_6) ENTRY(new_fn_7) ENTRY(new_fn_8) ENTRY(new_fn_9) ENTRY(new_fn_10)
        ENTRY(new_fn_11) ENTRY(new_fn_12) ENTRY(new_fn_13) ENTRY(new_fn_14) ENTRY(new_fn_15)
#undef ENTRY
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(table[i].name, name))
            return (void *)table[i].fn;
    return 0;
}

/* A monotonic clock for timing from Frida scripts (double: no UInt64 boxing). */
BENCH_API double bench_now_ns(void)
{
    return (double)now_ns();
}
