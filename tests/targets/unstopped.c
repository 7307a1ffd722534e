/* Entries whose first instruction covers every byte a patch writes there,
 * so that writing them needs no stop: at -O2 a load of a volatile static is
 * one 7-byte rip-relative mov.  Built next to stopper.c, shapes.c and
 * patchable.c. */
#define NOINLINE __attribute__((noinline, noipa, visibility("default")))

static volatile long base = 3;

NOINLINE long us_long_first(long x) { return x + base; }
