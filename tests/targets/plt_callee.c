/* A library defining f, the function the PLT tests patch, and its
 * replacements.  f is default visibility: other objects, and this one, call
 * it through their PLTs. */
#define EXPORT __attribute__((noinline, visibility("default")))

EXPORT long f(long x) { return 2 * x + 1; }
EXPORT long f_new(long x) { return x + 1000; }
EXPORT long f_new2(long x) { return x + 2000; }

/* This object's own PLT call to f (f is interposable: -fsemantic-interposition). */
EXPORT long callee_calls_f(long x) { return f(x) + 0 * x; }

/* An observer of the call path (sites.add_observer): counts f's calls. */
EXPORT long observed_calls;
EXPORT void count_observer(void *data, unsigned long address, unsigned long *regs)
{
    (void)data, (void)address, (void)regs;
    __atomic_add_fetch(&observed_calls, 1, __ATOMIC_RELAXED);
}
