/*
 * Raw system calls.
 *
 * The code that runs while other threads are stopped, and the ptrace
 * helper process (which keeps no libc state of its own), must not call libc:
 * a stopped thread may hold a libc lock, and any libc function -- getpid,
 * pwrite, syscall -- may itself have been replaced by a patch whose new code
 * needs the GIL that a stopped thread holds.  These wrappers are the
 * `syscall` instruction and nothing else; they return -errno on failure.
 */
#ifndef HOTPATCH_SYS_H
#define HOTPATCH_SYS_H

#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>

static inline long hp_sys6(long nr, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

#define hp_sys(nr, ...) hp_sys_n(nr, __VA_ARGS__, 0, 0, 0, 0, 0, 0)
#define hp_sys_n(nr, a, b, c, d, e, f, ...) \
    hp_sys6(nr, (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), (long)(f))

static inline int hp_gettid(void) { return (int)hp_sys(SYS_gettid, 0); }
static inline int hp_getpid(void) { return (int)hp_sys(SYS_getpid, 0); }

static inline uint64_t hp_now_ns(void)
{
    struct timespec ts;
    hp_sys(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void hp_sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    hp_sys(SYS_nanosleep, &ts, 0);
}

/* Read `len` bytes of this process's memory at `address` without faulting:
 * the number of bytes read (short or -errno where the memory is unmapped). */
static inline long hp_read_own(int pid, void *dst, uintptr_t address, size_t len)
{
    struct { void *base; size_t len; } local = { dst, len }, remote = { (void *)address, len };
    return hp_sys(SYS_process_vm_readv, pid, &local, 1, &remote, 1, 0);
}

#endif
