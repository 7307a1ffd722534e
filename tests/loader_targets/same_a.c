/* Loaded, patched and unloaded; same_b.c has the same layout, so that it
 * lands at the same address with other_fn where fn was. */
long fn(long x) { return x + 2; }
long filler_a(long x) { return x * 3 + 1; }
