/* A library with a static function, to strip and find again through its
 * separate debug file; VARIANT changes the code, hence the build-id. */

#ifndef VARIANT
#define VARIANT 1
#endif

static __attribute__((noinline, noclone)) int secret(int x) { return x * VARIANT + 11; }

int debugme_call(int x) { return secret(x) - 1; }

int debugme_variant(void) { return VARIANT; }
