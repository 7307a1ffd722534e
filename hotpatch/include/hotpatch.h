/*
 * hotpatch.h -- the C API for hotpatch patch modules.
 *
 * A patch module is a shared object shaped like the kernel's
 * samples/livepatch/livepatch-sample.c, with hp_ for klp_:
 *
 *     #include <hotpatch.h>
 *
 *     static unsigned long (*old_crc)(unsigned long, const unsigned char *, unsigned);
 *     static unsigned long fixed_crc(unsigned long c, const unsigned char *b, unsigned n)
 *     { return n ? old_crc(c, b, n) : c; }
 *
 *     static struct hp_func funcs[] = {
 *         { .old_name = "crc32", .new_func = fixed_crc, .original = (void **)&old_crc },
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
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HP_ABI_VERSION 3    /* 2: hp_func.original, hp_object.build_id, hp_patch.symbols;
                               3: hotpatch_api (the module uses the core's API) */

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
    /* Optional: where hotpatch stores the address that runs the old
     * function, before the redirect is live (so new_func may call it from
     * its first call on); it stays valid after the patch is disabled. */
    void **original;
};

struct hp_object {
    const char *name;          /* file name, soname or path; NULL = main program */
    struct hp_func *funcs;
    struct hp_callbacks callbacks;
    /* Optional: the NT_GNU_BUILD_ID (hex) of the build this module was made
     * for; another build of the object is refused, naming both. */
    const char *build_id;
};

/* A reference to a symbol of a target object, static ones included,
 * resolved when the module is loaded (the kernel's klp relocations):
 * *address = the symbol's address.  See HP_SYMBOL. */
struct hp_symbol {
    void **address;
    const char *object;        /* as hp_object.name; NULL = main program */
    const char *name;          /* a function or a variable */
    unsigned long sympos;      /* as hp_func.old_sympos */
};

struct hp_patch {
    const char *name;
    struct hp_object *objs;
    bool replace;              /* atomic replace of every older patch */
    struct hp_symbol *symbols; /* optional, ends with { }: see HP_SYMBOL */
};
/* hp-declarations-end */

/* One element of hp_patch.symbols: `ptr` (a pointer variable of the module,
 * to a function or to data) gets the address of `name` in `object`:
 *
 *     static long (*scale)(long);
 *     static int *calls;
 *     static struct hp_symbol symbols[] = {
 *         HP_SYMBOL(scale, "libfoo.so", "scale", 0),    (a static function)
 *         HP_SYMBOL(calls, "libfoo.so", "calls", 0),    (a static variable)
 *         { }
 *     };
 *
 * All are resolved before the patch is registered; one that cannot be is
 * an error that names it, and nothing is patched.  The object must be
 * loaded when the module is. */
#define HP_SYMBOL(ptr, object_name, symbol_name, position)                    \
    { .address = (void **)&(ptr), .object = (object_name),                    \
      .name = (symbol_name), .sympos = (position) }

/* Shadow variables (Documentation/livepatch/shadow-vars.rst): data that a
 * patch attaches to an existing object, by the object's address and an id
 * the patch chooses.
 *
 *   hp_shadow_get(obj, id)         the data, or NULL; lock free
 *   hp_shadow_alloc(obj, id, size, ctor, ctor_data)
 *                                  new data, zeroed, then ctor(obj, data,
 *                                  ctor_data) (non-zero = failure: nothing is
 *                                  attached); NULL if (obj, id) has data
 *                                  already or on failure
 *   hp_shadow_get_or_alloc(obj, id, size, ctor, ctor_data)
 *                                  the data, allocated as above if none
 *   hp_shadow_free(obj, id, dtor)  dtor(obj, data) (if not NULL), then
 *                                  the data is released
 *   hp_shadow_free_all(id, dtor)   the same for every object's `id`
 *
 * Thread safe.  ctor runs under the table's lock (it must not use shadow
 * variables itself); dtor runs once no hp_shadow_get can still return the
 * data, outside the lock.  The data is aligned to 16 bytes.  As in the
 * kernel, what hp_shadow_get returns stays valid until it is freed: the
 * caller must know no other thread frees it meanwhile (typically it goes
 * with its object).
 *
 * They call the core through hotpatch_api, which hotpatch.load() fills
 * after it opened the module and before it registers the patch: callbacks
 * and new functions may use them, the module's constructors (run by
 * dlopen) may not. */
typedef int (*hp_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*hp_shadow_dtor_t)(void *obj, void *shadow_data);

#define HP_API_VERSION 1

/* The core's functions for patch modules.  Fields are only ever added at
 * the end (version says how many there are). */
struct hp_api {
    unsigned long version;
    void *(*shadow_get)(void *obj, unsigned long id);
    void *(*shadow_alloc)(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                          void *ctor_data);
    void *(*shadow_get_or_alloc)(void *obj, unsigned long id, size_t size,
                                 hp_shadow_ctor_t ctor, void *ctor_data);
    void (*shadow_free)(void *obj, unsigned long id, hp_shadow_dtor_t dtor);
    void (*shadow_free_all)(unsigned long id, hp_shadow_dtor_t dtor);
};

#ifndef HP_CORE
extern const struct hp_api *hotpatch_api;

static inline void *hp_shadow_get(void *obj, unsigned long id)
{
    return hotpatch_api->shadow_get(obj, id);
}

static inline void *hp_shadow_alloc(void *obj, unsigned long id, size_t size,
                                    hp_shadow_ctor_t ctor, void *ctor_data)
{
    return hotpatch_api->shadow_alloc(obj, id, size, ctor, ctor_data);
}

static inline void *hp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size,
                                           hp_shadow_ctor_t ctor, void *ctor_data)
{
    return hotpatch_api->shadow_get_or_alloc(obj, id, size, ctor, ctor_data);
}

static inline void hp_shadow_free(void *obj, unsigned long id, hp_shadow_dtor_t dtor)
{
    hotpatch_api->shadow_free(obj, id, dtor);
}

static inline void hp_shadow_free_all(unsigned long id, hp_shadow_dtor_t dtor)
{
    hotpatch_api->shadow_free_all(id, dtor);
}

/* Exported under fixed names that hotpatch.load() looks up; hotpatch_api
 * is written by it (see above). */
#define HP_PATCH(patch)                                                         \
    __attribute__((visibility("default"), used))                                \
    struct hp_patch *const hotpatch_patch_descriptor = &(patch);                \
    __attribute__((visibility("default"), used))                                \
    const unsigned int hotpatch_abi_version = HP_ABI_VERSION;                   \
    __attribute__((visibility("default"), used))                                \
    const struct hp_api *hotpatch_api
#endif

#ifdef __cplusplus
}
#endif

#endif /* HOTPATCH_H */
