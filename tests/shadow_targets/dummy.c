/*
 * The target of the kernel's samples/livepatch/livepatch-shadow-mod.c, in
 * user space: dummy_alloc() allocates a struct dummy and a buffer it
 * leaks; dummy_free() frees only the struct.  dummy_live_leaks counts the
 * leaked buffers still allocated (whoever frees one decrements it).
 */
#include <stdlib.h>

struct dummy {
    unsigned long jiffies_expire;
    unsigned long magic;
};

#define DUMMY_MAGIC 0xd0ed1e5ul

long dummy_live_leaks;

__attribute__((noinline)) struct dummy *dummy_alloc(unsigned long expire)
{
    struct dummy *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    d->jiffies_expire = expire;
    d->magic = DUMMY_MAGIC;
    /* Oops, forgot to save leak! */
    int *leak = calloc(1, sizeof(int));
    if (!leak) {
        free(d);
        return NULL;
    }
    __atomic_add_fetch(&dummy_live_leaks, 1, __ATOMIC_SEQ_CST);
    return d;
}

__attribute__((noinline)) void dummy_free(struct dummy *d)
{
    d->magic = 0;
    free(d);
}

__attribute__((noinline)) int dummy_check(struct dummy *d, unsigned long jiffies)
{
    return jiffies > d->jiffies_expire;
}
