/* The second static `helper` (see dup_a.c), with a different body. */

static __attribute__((noinline, noclone)) int helper(int x) { return x * 7 - 3; }

int dup_b(int x) { return helper(x) + 5; }
