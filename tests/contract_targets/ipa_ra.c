/* Callers that keep values in call-clobbered registers across a call to a
 * static function that never writes them (gcc -O2, -fipa-ra). */
#define NOINLINE __attribute__((noinline, noclone))

/* Writes only %eax (and reads %edi): line_total may keep qty*price in %esi. */
static NOINLINE int clamp_qty(int qty)
{
    return qty > 1000 ? 1000 : qty < 0 ? 0 : qty;
}

long line_total(int price, int qty, int discount)
{
    int q = clamp_qty(qty);
    long gross = (long)price * q;
    int d = clamp_qty(discount);
    return gross + (long)price * (q + d) / 7 - q * d;
}

/* The SSE variant: a static function that writes only %xmm0. */
static NOINLINE double half(double x)
{
    return x * 0.5;
}

double blend(double a, double b, double c)
{
    double h = half(a);
    return h + b * c + half(b) * c + half(c) * a;
}

/* A static function that calls out of its object: it clobbers everything
 * already, so its callers assume nothing and no thunk is needed. */
#include <unistd.h>
static NOINLINE long via_libc(long x)
{
    return x + 1 + (getpid() < 0);
}

long call_via_libc(long x, long y)
{
    return via_libc(x) * y + via_libc(y);
}

/* Replacements that behave the same but write every call-clobbered register. */
#define CLOBBER_ALL() __asm__ volatile("" ::: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", \
    "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
    "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory")
#define SCRIBBLE() __asm__ volatile( \
    "mov $0x5a5a, %%eax; mov %%eax, %%ecx; mov %%eax, %%edx; mov %%eax, %%esi; mov %%eax, %%edi\n" \
    "mov %%rax, %%r8; mov %%rax, %%r9; mov %%rax, %%r10; mov %%rax, %%r11\n" \
    "pcmpeqd %%xmm1, %%xmm1; pcmpeqd %%xmm2, %%xmm2; pcmpeqd %%xmm3, %%xmm3\n" \
    "pcmpeqd %%xmm4, %%xmm4; pcmpeqd %%xmm5, %%xmm5; pcmpeqd %%xmm8, %%xmm8\n" \
    ::: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm1", "xmm2", \
        "xmm3", "xmm4", "xmm5", "xmm8")

int clamp_qty_scribbling(int qty)
{
    SCRIBBLE();
    CLOBBER_ALL();
    return qty > 1000 ? 1000 : qty < 0 ? 0 : qty;
}

double half_scribbling(double x)
{
    double r;
    SCRIBBLE();
    r = x * 0.5;
    return r;
}
