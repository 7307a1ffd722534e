/*
 * samples/livepatch/livepatch-shadow-fix1.c, in user space: the new
 * dummy_alloc() keeps the leaked buffer as shadow data of the dummy
 * (SV_LEAK), the new dummy_free() frees it with the dummy.  Dummies
 * allocated before the patch have no shadow data: their buffers stay
 * leaked.  post_unpatch frees the buffers of the dummies still alive.
 */
#include <hotpatch.h>
#include <stdlib.h>

#define SV_LEAK 1

struct dummy {
    unsigned long jiffies_expire;
    unsigned long magic;
};

#define DUMMY_MAGIC 0xd0ed1e5ul

static long *live_leaks;    /* the target's dummy_live_leaks */

static int shadow_leak_ctor(void *obj, void *shadow_data, void *ctor_data)
{
    int **shadow_leak = shadow_data;
    int **leak = ctor_data;

    if (!ctor_data)
        return -1;
    *shadow_leak = *leak;
    return 0;
}

static void fix1_dummy_leak_dtor(void *obj, void *shadow_data)
{
    int **shadow_leak = shadow_data;

    free(*shadow_leak);
    __atomic_sub_fetch(live_leaks, 1, __ATOMIC_SEQ_CST);
}

static struct dummy *fix1_dummy_alloc(unsigned long expire)
{
    struct dummy *d = calloc(1, sizeof(*d));
    int *leak;

    if (!d)
        return NULL;
    d->jiffies_expire = expire;
    d->magic = DUMMY_MAGIC;
    /* Patch: save the extra memory location into a SV_LEAK shadow variable. */
    leak = calloc(1, sizeof(int));
    if (!leak) {
        free(d);
        return NULL;
    }
    __atomic_add_fetch(live_leaks, 1, __ATOMIC_SEQ_CST);
    if (!hp_shadow_alloc(d, SV_LEAK, sizeof(leak), shadow_leak_ctor, &leak)) {
        free(leak);
        __atomic_sub_fetch(live_leaks, 1, __ATOMIC_SEQ_CST);
    }
    return d;
}

static void fix1_dummy_free(struct dummy *d)
{
    /* Patch: fetch the saved SV_LEAK shadow variable, detach and free it.
     * (A dummy allocated before the patch has none: its buffer leaks.) */
    if (hp_shadow_get(d, SV_LEAK))
        hp_shadow_free(d, SV_LEAK, fix1_dummy_leak_dtor);
    d->magic = 0;
    free(d);
}

static void fix1_post_unpatch(struct hp_object *obj)
{
    hp_shadow_free_all(SV_LEAK, fix1_dummy_leak_dtor);
}

static struct hp_func funcs[] = {
    { .old_name = "dummy_alloc", .new_func = fix1_dummy_alloc },
    { .old_name = "dummy_free", .new_func = fix1_dummy_free },
    { }
};
static struct hp_object objs[] = {
    { .name = "libshadowdummy.so", .funcs = funcs,
      .callbacks = { .post_unpatch = fix1_post_unpatch } },
    { }
};
static struct hp_symbol symbols[] = {
    HP_SYMBOL(live_leaks, "libshadowdummy.so", "dummy_live_leaks", 0),
    { }
};
static struct hp_patch patch = { .name = "livepatch_shadow_fix1", .objs = objs,
                                 .symbols = symbols };
HP_PATCH(patch);
