/*
 * samples/livepatch/livepatch-shadow-fix2.c, in user space, stacked on
 * fix1: the new dummy_check() counts its calls in a SV_COUNTER shadow
 * variable (hp_shadow_get_or_alloc), the new dummy_free() frees both
 * shadow variables; post_unpatch frees every counter.
 */
#include <hotpatch.h>
#include <stdlib.h>

#define SV_LEAK 1
#define SV_COUNTER 2

struct dummy {
    unsigned long jiffies_expire;
    unsigned long magic;
};

static long *live_leaks;

static int fix2_dummy_check(struct dummy *d, unsigned long jiffies)
{
    unsigned long *shadow_count;

    /* Patch: handle in-flight dummy structures, if they do not already
     * have a SV_COUNTER shadow variable, then attach a new one. */
    shadow_count = hp_shadow_get_or_alloc(d, SV_COUNTER, sizeof(*shadow_count), NULL, NULL);
    if (shadow_count)
        *shadow_count += 1;
    return jiffies > d->jiffies_expire;
}

static void fix2_dummy_leak_dtor(void *obj, void *shadow_data)
{
    int **shadow_leak = shadow_data;

    free(*shadow_leak);
    __atomic_sub_fetch(live_leaks, 1, __ATOMIC_SEQ_CST);
}

static void fix2_dummy_free(struct dummy *d)
{
    if (hp_shadow_get(d, SV_LEAK))
        hp_shadow_free(d, SV_LEAK, fix2_dummy_leak_dtor);
    hp_shadow_free(d, SV_COUNTER, NULL);
    d->magic = 0;
    free(d);
}

static void fix2_post_unpatch(struct hp_object *obj)
{
    hp_shadow_free_all(SV_COUNTER, NULL);
}

static struct hp_func funcs[] = {
    { .old_name = "dummy_check", .new_func = fix2_dummy_check },
    { .old_name = "dummy_free", .new_func = fix2_dummy_free },
    { }
};
static struct hp_object objs[] = {
    { .name = "libshadowdummy.so", .funcs = funcs,
      .callbacks = { .post_unpatch = fix2_post_unpatch } },
    { }
};
static struct hp_symbol symbols[] = {
    HP_SYMBOL(live_leaks, "libshadowdummy.so", "dummy_live_leaks", 0),
    { }
};
static struct hp_patch patch = { .name = "livepatch_shadow_fix2", .objs = objs,
                                 .symbols = symbols };
HP_PATCH(patch);
