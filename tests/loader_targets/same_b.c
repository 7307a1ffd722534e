long other_fn(long x) { return x + 7; }
long filler_b(long x) { return x * 3 + 1; }
