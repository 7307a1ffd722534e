/* The peer library of the GOT/PLT variant: driver.c calls peer_fn through its
 * PLT, and the benchmark redirects that call by rewriting the GOT slot. */
long peer_fn(long x) { return ((x ^ (x >> 7)) * 3) + 5; }
