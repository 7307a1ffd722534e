/*
 * Shadow variables: data attached to an existing object's address, the
 * kernel's klp_shadow_* (kernel/livepatch/shadow.c,
 * Documentation/livepatch/shadow-vars.rst).
 *
 * A hash table keyed by (obj, id).  hp_shadow_get walks a bucket without a
 * lock: nodes are complete (zeroed, constructed) before a release store
 * publishes them at the bucket head.  Every change takes shadow_lock.  A
 * node unlinked by a free is not released while a reader may still be on
 * it: a reader counts itself in one of two slots, chosen by the epoch; the
 * freeing writer, still holding the lock, flips the epoch and waits until
 * the slot of the old epoch is empty.  Readers that came later use the
 * other slot and cannot reach the unlinked node.  The destructor runs and
 * the memory is released after the lock is dropped, so a destructor may
 * itself use shadow variables.
 */
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hotpatch_core.h"

#define SHADOW_BUCKETS 4096   /* the kernel's hash table has 1 << 12 too */

struct shadow_node {
    struct shadow_node *_Atomic next;
    void *obj;
    unsigned long id;
    size_t size;
    struct shadow_node *gone;  /* unlinked by the same free, the writer's only */
    _Alignas(16) char data[];  /* what callers get */
};

static struct shadow_node *_Atomic buckets[SHADOW_BUCKETS];
static pthread_mutex_t shadow_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic unsigned long epoch;
static _Atomic long readers[2];
static unsigned long live;    /* nodes in the table, shadow_lock held */

static inline size_t bucket_of(const void *obj, unsigned long id)
{
    uint64_t h = (uint64_t)(uintptr_t)obj * 0x9e3779b97f4a7c15ull ^ (id * 0xff51afd7ed558ccdull);
    h ^= h >> 29;
    return (size_t)(h % SHADOW_BUCKETS);
}

static struct shadow_node *find(void *obj, unsigned long id)
{
    struct shadow_node *n = atomic_load_explicit(&buckets[bucket_of(obj, id)], memory_order_acquire);
    for (; n; n = atomic_load_explicit(&n->next, memory_order_acquire))
        if (n->obj == obj && n->id == id)
            return n;
    return NULL;
}

/* klp_shadow_get: the data of (obj, id), or NULL.  Lock free. */
void *hp_shadow_get(void *obj, unsigned long id)
{
    unsigned long e;
    for (;;) {
        e = atomic_load(&epoch);
        atomic_fetch_add(&readers[e & 1], 1);
        if (atomic_load(&epoch) == e)
            break;
        atomic_fetch_sub(&readers[e & 1], 1);
    }
    struct shadow_node *n = find(obj, id);
    atomic_fetch_sub(&readers[e & 1], 1);
    return n ? n->data : NULL;
}

static void *alloc_locked(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                          void *ctor_data, int existing_ok)
{
    struct shadow_node *n = find(obj, id);
    if (n)
        return existing_ok ? n->data : NULL;
    if (size > SIZE_MAX - sizeof(*n))
        return NULL;
    n = calloc(1, sizeof(*n) + size);      /* zeroed before the constructor */
    if (!n)
        return NULL;
    n->obj = obj;
    n->id = id;
    n->size = size;
    if (ctor && ctor(obj, n->data, ctor_data)) {
        free(n);                           /* nothing published */
        return NULL;
    }
    struct shadow_node *_Atomic *head = &buckets[bucket_of(obj, id)];
    atomic_store_explicit(&n->next, atomic_load_explicit(head, memory_order_relaxed),
                          memory_order_relaxed);
    atomic_store_explicit(head, n, memory_order_release);
    live++;
    return n->data;
}

/* klp_shadow_alloc: new data of `size` bytes for (obj, id), zeroed, then
 * given to ctor (non-zero = failure, nothing is published).  NULL if
 * (obj, id) has data already, on failure of the allocation or the ctor. */
void *hp_shadow_alloc(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                      void *ctor_data)
{
    pthread_mutex_lock(&shadow_lock);
    void *data = alloc_locked(obj, id, size, ctor, ctor_data, 0);
    pthread_mutex_unlock(&shadow_lock);
    return data;
}

/* klp_shadow_get_or_alloc: the data of (obj, id), allocated as above if
 * there is none (the check and the allocation under one lock). */
void *hp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                             void *ctor_data)
{
    void *data = hp_shadow_get(obj, id);
    if (data)
        return data;
    pthread_mutex_lock(&shadow_lock);
    data = alloc_locked(obj, id, size, ctor, ctor_data, 1);
    pthread_mutex_unlock(&shadow_lock);
    return data;
}

/* Unlink the data of (obj, id) -- every obj's if `all` -- wait out the
 * readers that may be on it, then run dtor(obj, data, dtor_data) on each and
 * release it.  Returns how many were freed. */
int hp_shadow_free_each(void *obj, unsigned long id, int all, hp_shadow_dtor_with_t dtor,
                        void *dtor_data)
{
    struct shadow_node *gone = NULL;
    int count = 0;
    pthread_mutex_lock(&shadow_lock);
    size_t first = all ? 0 : bucket_of(obj, id), last = all ? SHADOW_BUCKETS : first + 1;
    for (size_t b = first; b < last; b++) {
        struct shadow_node *_Atomic *link = &buckets[b];
        struct shadow_node *n;
        while ((n = atomic_load_explicit(link, memory_order_relaxed))) {
            if (n->id == id && (all || n->obj == obj)) {
                /* n->next stays as it is, for readers still on n. */
                atomic_store(link, atomic_load_explicit(&n->next, memory_order_relaxed));
                n->gone = gone;
                gone = n;
                count++;
                live--;
            } else {
                link = &n->next;
            }
        }
    }
    if (count) {
        unsigned long old = atomic_fetch_add(&epoch, 1);
        /* A reader preempted inside a lookup holds its slot until it runs
         * again: after a few yields, sleep, which lets it have this core. */
        for (int spins = 0; atomic_load(&readers[old & 1]); spins++) {
            if (spins < 16)
                sched_yield();
            else
                nanosleep(&(struct timespec){ .tv_nsec = 20000 }, NULL);
        }
    }
    pthread_mutex_unlock(&shadow_lock);
    while (gone) {
        struct shadow_node *next = gone->gone;
        if (dtor)
            dtor(gone->obj, gone->data, dtor_data);
        free(gone);
        gone = next;
    }
    return count;
}

static void call_dtor(void *obj, void *data, void *dtor)
{
    ((hp_shadow_dtor_t)dtor)(obj, data);
}

/* klp_shadow_free: detach and release the data of (obj, id), after
 * dtor(obj, data) if dtor is not NULL. */
void hp_shadow_free(void *obj, unsigned long id, hp_shadow_dtor_t dtor)
{
    hp_shadow_free_each(obj, id, 0, dtor ? call_dtor : NULL, (void *)dtor);
}

/* klp_shadow_free_all: the same for the data of `id` of every object. */
void hp_shadow_free_all(unsigned long id, hp_shadow_dtor_t dtor)
{
    hp_shadow_free_each(NULL, id, 1, dtor ? call_dtor : NULL, (void *)dtor);
}

/* The bucket of (obj, id): the tests put variables in one bucket with it. */
unsigned long hp_shadow_bucket(void *obj, unsigned long id)
{
    return bucket_of(obj, id);
}

/* Shadow variables in the table, for the tests and the tree. */
unsigned long hp_shadow_live(void)
{
    pthread_mutex_lock(&shadow_lock);
    unsigned long n = live;
    pthread_mutex_unlock(&shadow_lock);
    return n;
}

/* The table a patch module reaches the core through (hotpatch.h's struct
 * hp_api): module.py stores its address in the module's hotpatch_api. */
static const struct hp_api api = {
    .version = HP_API_VERSION,
    .shadow_get = hp_shadow_get,
    .shadow_alloc = hp_shadow_alloc,
    .shadow_get_or_alloc = hp_shadow_get_or_alloc,
    .shadow_free = hp_shadow_free,
    .shadow_free_all = hp_shadow_free_all,
};

uintptr_t hp_api_table(void)
{
    return (uintptr_t)&api;
}

/* A child of fork has only the forking thread: a lock another thread held
 * and the reader counts of lookups under way stay behind with the parent's
 * threads.  Not taken before the fork: a Python constructor runs under the
 * lock and needs the GIL, which the forking thread holds.  Each change to
 * the table is one store, so the child's is whole; what another thread had
 * unlinked or not yet published leaks in the child. */
static void shadow_after_fork_in_child(void)
{
    pthread_mutex_init(&shadow_lock, NULL);
    atomic_store(&readers[0], 0);
    atomic_store(&readers[1], 0);
}

__attribute__((constructor)) static void shadow_init(void)
{
    pthread_atfork(NULL, NULL, shadow_after_fork_in_child);
}
