/* Built with -fpatchable-function-entry=5: five 1-byte NOPs at the entry. */
__attribute__((noinline)) long patchable(long x) { return x * 7; }
