/* Functions that gcc -O2 copies under clone names: weigh.isra.0,
 * scale.constprop.0, cache_fill.part.0 and checked.cold. */
#include <stdio.h>
#include <string.h>

struct record { long key; long weight; long spare[16]; };

/* IPA-SRA passes the one field used instead of the pointer: weigh.isra.0 */
static __attribute__((noinline)) long weigh(const struct record *r)
{
    return r->weight * 3 + 1;
}

long clones_weigh(const struct record *r) { return weigh(r) + weigh(r + 1); }

/* IPA-CP specialises for the constant argument: scale.constprop.0 */
static __attribute__((noinline)) long scale(long x, long factor)
{
    return x * factor + (x >> 3);
}

long clones_scale(long x) { return scale(x, 7) + scale(x + 1, 7); }

/* Partial inlining keeps the cheap test inline and the loop out of line:
 * cache_fill.part.0 */
void clones_sink(const char *text, long n) { (void)text; (void)n; }

static char buffer[64];

static long cache_fill(long n)
{
    if (__builtin_expect(n < 16, 1))
        return n;
    long total = 0;
    for (long i = 0; i < n; i++) {
        snprintf(buffer, sizeof buffer, "%ld:%ld", i, total);
        total += (long)strlen(buffer) * i;
        clones_sink(buffer, total);
    }
    for (long i = 0; i < n; i++) {
        snprintf(buffer, sizeof buffer, "%lx", total ^ i);
        total -= (long)strlen(buffer);
        clones_sink(buffer, i);
    }
    return total;
}

long clones_fill1(long n) { return cache_fill(n) + 1; }
long clones_fill2(long n) { return cache_fill(n * 2) + 2; }
long clones_fill3(long n) { return cache_fill(n * 3) + 3; }

/* The path through a cold function moves to a separate part: checked.cold */
static __attribute__((cold, noinline)) void complain(long x)
{
    fprintf(stderr, "negative: %ld\n", x);
}

long checked(long x)
{
    if (x < 0) {
        complain(x);
        return -1;
    }
    return x * 2;
}
