/* Depends on libcoming.so: loading it loads that one as a dependency. */
long target(long x);
long use_target(long x) { return target(x) * 2; }
