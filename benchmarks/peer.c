/* The peer library of the PLT variants: driver.c calls these through its PLT.
 * peer_fn is redirected by rewriting the driver's GOT slot by hand (GOT/PLT
 * interposition); peer_plt and peer_entry are patched by hotpatch (the
 * driver's slot of peer_entry is then put back at the entry, as a slot bound
 * lazily after the patch is); peer_frida is replaced by Frida; peer_new,
 * never patched, has new_fn's body: an unpatched PLT call running the same
 * code, the reference of the PLT rows. */
long peer_fn(long x) { return ((x ^ (x >> 7)) * 3) + 5; }
long peer_plt(long x) { return ((x ^ (x >> 7)) * 3) + 5; }
long peer_entry(long x) { return ((x ^ (x >> 7)) * 3) + 5; }
long peer_frida(long x) { return ((x ^ (x >> 7)) * 3) + 5; }
long peer_new(long x) { return x + 1; }
