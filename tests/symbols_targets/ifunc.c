/* IFUNCs: symbols whose value is a resolver that returns the implementation.
 *   pick        exported: bound through dlsym
 *   local_pick  static, called: the library's own R_X86_64_IRELATIVE slot
 *   orphan      static, never called: no slot, so it cannot be resolved */

typedef int (*int_fn)(int);

static volatile int prefer_slow;  /* 0: resolvers choose the fast version */

static __attribute__((noinline)) int pick_fast(int x) { return x * 2; }
static __attribute__((noinline)) int pick_slow(int x) { return x + x + prefer_slow; }
static int_fn resolve_pick(void) { return prefer_slow ? pick_slow : pick_fast; }
int pick(int) __attribute__((ifunc("resolve_pick")));

static __attribute__((noinline)) int local_impl(int x) { return x + 40; }
static int_fn resolve_local(void) { return local_impl; }
static int local_pick(int) __attribute__((ifunc("resolve_local")));
int call_local(int x) { return local_pick(x) + 1; }

static __attribute__((noinline)) int orphan_impl(int x) { return x - 1; }
static int_fn resolve_orphan(void) { return orphan_impl; }
static int orphan(int) __attribute__((ifunc("resolve_orphan"), used));
