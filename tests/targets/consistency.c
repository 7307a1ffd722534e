/* Functions a stack-model transition must wait for: one that sleeps in
 * read() from inside (work after the call keeps it from being a tail
 * call), its replacement that does the same, a spinning function that a
 * blocking signal handler can interrupt, and a replacement for libc's
 * sleep(), and code without unwind tables (as a JIT's) calling a reader.
 * Built with -O2. */
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

static long finish(long n, char c, long base)
{
    return n * 1000 + c + base;
}

/* The old function: blocks in read(), then computes with what it read. */
EXPORT long cs_read_byte(int fd)
{
    char c = 0;
    long n = read(fd, &c, 1);
    __asm__ volatile("" ::: "memory");
    return finish(n, c, 1);
}

/* Its replacement: the same, told apart by the result. */
EXPORT long cs_read_byte_v2(int fd)
{
    char c = 0;
    long n = read(fd, &c, 1);
    __asm__ volatile("" ::: "memory");
    return finish(n, c, 2);
}

/* Spins until cs_spin_stop is set; the signal handler below interrupts it. */
static volatile int spin_stop, spinning;
EXPORT long cs_spin(long x)
{
    long i = 0;
    spinning = 1;
    while (!spin_stop)
        i++;
    return x + (i & 1) * 0 + 1;
}

EXPORT long cs_spin_v2(long x)
{
    return x + 2;
}

EXPORT int cs_spinning(void) { return spinning; }
EXPORT void cs_spin_stop(void) { spin_stop = 1; }

/* A handler that blocks in read() until a byte comes: while it waits, the
 * function it interrupted is on the stack only through the signal frame. */
static int handler_fd = -1;
static volatile int in_handler;
static void blocking_handler(int sig)
{
    char c;
    in_handler = 1;
    ssize_t n = read(handler_fd, &c, 1);
    (void)n;
    in_handler = 2;
}

EXPORT int cs_install_blocking_handler(int sig, int fd)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = blocking_handler;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    handler_fd = fd;
    return sigaction(sig, &sa, 0);
}

EXPORT int cs_in_handler(void) { return in_handler; }

/* A replacement for libc's sleep(): does not sleep. */
EXPORT unsigned int cs_sleep(unsigned int seconds)
{
    return 4242;
}

/* A reader that no patch here replaces. */
EXPORT long cs_wait(int fd)
{
    char c = 0;
    long n = read(fd, &c, 1);
    __asm__ volatile("" ::: "memory");
    return finish(n, c, 3);
}

/* Call fn(fd) from code in an anonymous mapping, which has no unwind
 * table: sub $8,%rsp; mov %rdi,%rax; mov %esi,%edi; call *%rax;
 * add $8,%rsp; ret. */
EXPORT long cs_call_from_anonymous_code(long (*fn)(int), int fd)
{
    static const unsigned char code[] = {
        0x48, 0x83, 0xec, 0x08, 0x48, 0x89, 0xf8, 0x89, 0xf7, 0xff, 0xd0,
        0x48, 0x83, 0xc4, 0x08, 0xc3,
    };
    void *page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return -1;
    memcpy(page, code, sizeof code);
    if (mprotect(page, 4096, PROT_READ | PROT_EXEC))
        return -1;
    return ((long (*)(long (*)(int), int))page)(fn, fd);
}

/* A hidden leaf function: its callers may rely on the registers it never
 * writes (IPA-RA), so a patch of it goes through a preserving thunk. */
__attribute__((noinline, visibility("hidden"))) long cs_hidden_leaf(long x)
{
    return x * 3 + 1;
}

/* Its caller, exported: the frame above the thunk's. */
EXPORT long cs_call_hidden(long x)
{
    long r = cs_hidden_leaf(x);
    __asm__ volatile("" ::: "memory");
    return r + 100;
}

/* A replacement for it that sleeps in read() on fd x (not a tail call:
 * it stays on the stack). */
EXPORT long cs_hidden_leaf_reads(long x)
{
    long r = cs_wait((int)x);
    __asm__ volatile("" ::: "memory");
    return r + 10000;
}

/* Code far from every library (16 TiB up), out of reach of a rel32 jmp:
 * a patch to it takes the slot form.  Each call adds a function
 * `mov $value, %rax; ret` and returns its address. */
EXPORT void *cs_far_code(int value)
{
    static unsigned char *page;
    static int used;
    if (!page) {
        void *p = mmap((void *)0x100000000000ul, 4096, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == MAP_FAILED)
            return 0;
        page = p;
    }
    if (used + 8 > 4096 || mprotect(page, 4096, PROT_READ | PROT_WRITE))
        return 0;
    unsigned char *f = page + used;
    unsigned char code[8] = { 0x48, 0xc7, 0xc0, 0, 0, 0, 0, 0xc3 };
    memcpy(code + 3, &value, 4);
    memcpy(f, code, sizeof code);
    used += 8;
    return mprotect(page, 4096, PROT_READ | PROT_EXEC) ? 0 : f;
}
