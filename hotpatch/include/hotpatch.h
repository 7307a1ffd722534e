/*
 * hotpatch.h -- the C API for hotpatch patch modules.
 *
 * A patch module is a shared object shaped like the kernel's
 * samples/livepatch/livepatch-sample.c, with hp_ for klp_:
 *
 *     #include <hotpatch.h>
 *
 *     static long fixed_crc(long x) { ... }
 *
 *     static struct hp_func funcs[] = {
 *         { .old_name = "crc32", .new_func = fixed_crc },
 *         { }
 *     };
 *     static struct hp_object objs[] = {
 *         { .name = "libz.so.1", .funcs = funcs },     (NULL name = the main program)
 *         { }
 *     };
 *     static struct hp_patch patch = { .name = "crc-fix", .objs = objs };
 *     HP_PATCH(patch);
 *
 * Build it with `hotpatch build fix.c -o fix.so` and apply it with
 * `hotpatch.load("fix.so")` (or `hotpatch load PID fix.so`).  The module is
 * opened with RTLD_NOW | RTLD_NODELETE: its code stays mapped for the life
 * of the process, since a thread may still be running it.
 *
 * Arrays end with an empty element { }.  More fields may be added at the end
 * of these structures in later versions; the names here stay.
 */
#ifndef HOTPATCH_H
#define HOTPATCH_H

#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HP_ABI_VERSION 1

/* hp-declarations-begin: hotpatch.load() reads the declarations from here
 * to hp-declarations-end, so this header is their one definition. */
struct hp_object;

/* Documentation/livepatch/callbacks.rst: pre_patch may veto (non-zero)
 * and then nothing of the patch is applied; post_patch runs after the
 * object's functions are redirected; pre_unpatch and post_unpatch around
 * the disabling.  For an object loaded later they run at load time. */
struct hp_callbacks {
    int (*pre_patch)(struct hp_object *obj);
    void (*post_patch)(struct hp_object *obj);
    void (*pre_unpatch)(struct hp_object *obj);
    void (*post_unpatch)(struct hp_object *obj);
};

struct hp_func {
    const char *old_name;      /* the function to replace */
    void *new_func;            /* its replacement */
    unsigned long old_sympos;  /* 1-based among same-named symbols; 0 = unique */
};

struct hp_object {
    const char *name;          /* file name, soname or path; NULL = main program */
    struct hp_func *funcs;
    struct hp_callbacks callbacks;
};

struct hp_patch {
    const char *name;
    struct hp_object *objs;
    bool replace;              /* atomic replace of every older patch */
};
/* hp-declarations-end */

/* Exported under fixed names that hotpatch.load() looks up. */
#define HP_PATCH(patch)                                                         \
    __attribute__((visibility("default"), used))                                \
    struct hp_patch *const hotpatch_patch_descriptor = &(patch);                \
    __attribute__((visibility("default"), used))                                \
    const unsigned int hotpatch_abi_version = HP_ABI_VERSION

#ifdef __cplusplus
}
#endif

#endif /* HOTPATCH_H */
