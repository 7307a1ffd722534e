/* New code for the loader tests. */
long replacement(long x) { return x + 1000; }
long replacement2(long x) { return x + 2000; }
