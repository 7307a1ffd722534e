/* A library that takes f's address (a GLOB_DAT slot) and calls it: a function
 * pointer must still compare equal to f once f is patched.  ld makes the
 * call here jump through that same GOT slot (.plt.got), not a JUMP_SLOT. */
#define EXPORT __attribute__((noinline, visibility("default")))

extern long f(long x);

EXPORT void *f_address(void) { return (void *)&f; }
EXPORT long pointer_calls_f(long x) { return f(x) + 0 * x; }
