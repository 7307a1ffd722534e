/* One of two translation units that each define a static `helper`: in the
 * linked library the name is ambiguous and old_sympos picks one. */

static __attribute__((noinline, noclone)) int helper(int x) { return x + 1; }

int dup_a(int x) { return helper(x) * 2; }
