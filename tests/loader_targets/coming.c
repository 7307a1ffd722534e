/* An object patched when it loads: its constructor calls the function
 * being patched, and one of its functions is an IFUNC. */
#include <stdio.h>
#include <stdlib.h>

long seen_at_init = -1;

__attribute__((noinline)) long target(long x) { return x + 1; }

static long impl_a(long x) { return x + 10; }
static long impl_b(long x) { return x + 10; }
static void *pick(void) { return getenv("HOTPATCH_NEVER_SET") ? (void *)impl_b : (void *)impl_a; }
long chosen(long x) __attribute__((ifunc("pick")));

__attribute__((constructor)) static void init(void) { seen_at_init = target(1); }
