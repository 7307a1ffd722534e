/*
 * Native readers of shadow variables: threads that hp_shadow_get() the
 * same (obj, id) pairs in a loop while the test allocates and frees them.
 * The data of a churned pair may be freed as soon as get returned it (as
 * in the kernel, the caller must know it is not freed while it uses it):
 * the readers only count what they get.  The stable pairs, which share
 * the churned ones' buckets behind them, must always be found, with their
 * magic: a lookup walks through nodes being unlinked and freed.
 */
#include <hotpatch.h>
#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

const struct hp_api *hotpatch_api;

#define MAX_READERS 16

static pthread_t threads[MAX_READERS];
static int nthreads;
static void **objs;
static const int *stable;
static int nobjs;
static unsigned long shadow_id, magic;
static volatile int stop;
static unsigned long gets, hits, bad;

static void *reader(void *arg)
{
    unsigned long my_gets = 0, my_hits = 0, my_bad = 0;
    /* Niced: the writer gets the cores it needs, and readers are still
     * preempted in the middle of lookups. */
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);
    for (unsigned long i = (unsigned long)arg; !stop; i++) {
        int k = i % nobjs;
        volatile unsigned long *data = hp_shadow_get(objs[k], shadow_id);
        my_gets++;
        if (stable[k])
            my_bad += !data || data[0] != magic || data[7] != magic;
        else
            my_hits += data != NULL;
    }
    __atomic_add_fetch(&gets, my_gets, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&hits, my_hits, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&bad, my_bad, __ATOMIC_SEQ_CST);
    return NULL;
}

int stress_start(const struct hp_api *api, void **objects, const int *is_stable, int n,
                 unsigned long id,
                 unsigned long expected, int readers)
{
    hotpatch_api = api;
    objs = objects;
    stable = is_stable;
    nobjs = n;
    shadow_id = id;
    magic = expected;
    stop = 0;
    for (nthreads = 0; nthreads < readers && nthreads < MAX_READERS; nthreads++)
        if (pthread_create(&threads[nthreads], NULL, reader, (void *)(unsigned long)nthreads))
            return -1;
    return 0;
}

void stress_stop(unsigned long *out)
{
    stop = 1;
    for (int i = 0; i < nthreads; i++)
        pthread_join(threads[i], NULL);
    out[0] = gets;
    out[1] = hits;
    out[2] = bad;
}
