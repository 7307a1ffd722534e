/* Built with -fno-pic -pg -mfentry -mnop-mcount: a 5-byte NOP at the entry. */
__attribute__((noinline)) long fentry_nop(long x) { return x * 5; }
