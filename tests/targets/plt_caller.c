/* A library calling f of libcallee.so through its PLT (a JUMP_SLOT), and
 * threads that call f in a loop and count results that are none of the
 * allowed ones.  It never takes f's address: ld would then make its PLT
 * entry jump through the GLOB_DAT slot (.plt.got) instead of a JUMP_SLOT. */
#include <pthread.h>
#include <stdatomic.h>

#define EXPORT __attribute__((noinline, visibility("default")))

extern long f(long x);

EXPORT long call_f(long x) { return f(x) + 0 * x; }

#define MAX_THREADS 8
static pthread_t threads[MAX_THREADS];
static int nthreads;
static atomic_int running;
static atomic_long calls, bad;
static long allowed[4];
static int nallowed;

static void *call_loop(void *arg)
{
    long x = (long)arg;
    while (atomic_load(&running)) {
        long r = f(x);
        int ok = 0;
        for (int i = 0; i < nallowed; i++)
            ok |= r == allowed[i];
        if (!ok)
            atomic_fetch_add(&bad, 1);
        atomic_fetch_add(&calls, 1);
    }
    return 0;
}

/* Start n threads calling f(x), which must return one of the `count` values. */
EXPORT int start_callers(int n, long x, const long *values, int count)
{
    nallowed = count < 4 ? count : 4;
    for (int i = 0; i < nallowed; i++)
        allowed[i] = values[i];
    atomic_store(&running, 1);
    for (nthreads = 0; nthreads < n && nthreads < MAX_THREADS; nthreads++)
        if (pthread_create(&threads[nthreads], 0, call_loop, (void *)x))
            break;
    return nthreads;
}

EXPORT long stop_callers(void)
{
    atomic_store(&running, 0);
    for (int i = 0; i < nthreads; i++)
        pthread_join(threads[i], 0);
    nthreads = 0;
    return atomic_load(&bad);
}

EXPORT long caller_calls(void) { return atomic_load(&calls); }
