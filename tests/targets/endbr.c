/* Built with -fcf-protection=full: endbr64 first. */
__attribute__((noinline)) long endbr_func(long x) { return x * 11 + (x > 3); }
__attribute__((noinline)) long endbr_fentry(long x) { return x * 13; }
