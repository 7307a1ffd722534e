/*
 * modload.c -- opening shared objects for Python without the GIL.
 *
 * cffi releases the GIL around calls into the core, but not around its own
 * ffi.dlopen or a cffi library's first attribute lookup (dlsym), and
 * ctypes.CDLL keeps it too (CPython 3.11): the dynamic linker then maps,
 * relocates and runs constructors while every Python thread of the service
 * waits.  hotpatch.load() opens a C patch module here instead, and reads
 * its descriptor's addresses with hp_dlsym.  Its first import of CPython's
 * SHA-256 extension (the module's digest) is preceded by hp_dlopen of the
 * extension's file, so that the import's own dlopen (with the GIL) finds it
 * mapped.
 *
 * Called from a Python thread with the GIL released, a load runs the loader
 * hook's handling in hotpatch's worker (native/loader.c), as for a native
 * thread.
 */
#include <dlfcn.h>
#include <stdio.h>

#include "hotpatch_core.h"

/* dlopen(path, flags); NULL with dlerror()'s text in err (HP_ERRLEN). */
void *hp_dlopen(const char *path, int flags, char *err)
{
    void *handle = dlopen(path, flags);
    if (!handle) {
        const char *why = dlerror();
        snprintf(err, HP_ERRLEN, "%s", why ? why : "dlopen failed");
    }
    return handle;
}

/* The address of `name` in `handle` (0: not defined). */
uintptr_t hp_dlsym(void *handle, const char *name)
{
    dlerror();
    return (uintptr_t)dlsym(handle, name);
}
