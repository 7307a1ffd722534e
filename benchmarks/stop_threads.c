/*
 * The threads of the stop series (benchmarks/stop.py): what a stop of the
 * world does to the *other* threads of the process.
 *
 * - Busy threads spin in C reading CLOCK_MONOTONIC.  Every gap of at least
 *   GAP_MIN_NS between two consecutive readings (the thread was held by a
 *   stop, descheduled, or interrupted) goes into the thread's ring as
 *   (end, length).  st_busy_max_gap(t0, t1) is the longest gap of any busy
 *   thread that overlaps [t0, t1]: the longest time one of them did not run
 *   during that interval.
 * - Idle threads block: half in pthread_cond_wait (a futex), half in a
 *   nanosleep loop of IDLE_SLEEP_NS.
 * - The sleeper wakes every SLEEPER_PERIOD_NS on absolute deadlines
 *   (clock_nanosleep TIMER_ABSTIME, timer slack 1 ns) and records each
 *   wakeup's lateness; a deadline missed by more than a period is skipped, as
 *   cyclictest does, so that one long hold is one late wakeup.
 *
 * Rings are written by one thread each and read by the main thread after the
 * writer has moved past the interval asked about (st_* wait for that).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#define RING 65536u                 /* entries per thread (a power of two) */
#define GAP_MIN_NS 1000u            /* shorter gaps are not recorded */
#define MAX_BUSY 64
#define MAX_IDLE 1024
#define SLEEPER_PERIOD_NS 1000000ull
#define IDLE_SLEEP_NS 50000000l

struct record { uint64_t at, value; };   /* busy: (gap end, gap); sleeper: (deadline, lateness) */

struct ring {
    struct record *r;
    uint64_t n;                      /* records written (atomic) */
    uint64_t last;                   /* busy: latest reading; sleeper: latest deadline done (atomic) */
} __attribute__((aligned(64)));

static volatile int stopping;
static struct ring busy_rings[MAX_BUSY];
static pthread_t busy_threads[MAX_BUSY];
static int nbusy;
static struct ring sleeper_ring;
static pthread_t sleeper_thread;
static int sleeper_started;
static pthread_t idle_threads[MAX_IDLE];
static int nidle;
static pthread_mutex_t idle_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t idle_cond = PTHREAD_COND_INITIALIZER;

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void put(struct ring *g, uint64_t at, uint64_t value)
{
    uint64_t n = __atomic_load_n(&g->n, __ATOMIC_RELAXED);
    g->r[n & (RING - 1)] = (struct record){ at, value };
    __atomic_store_n(&g->n, n + 1, __ATOMIC_RELEASE);
}

static void *busy_main(void *arg)
{
    struct ring *g = arg;
    uint64_t prev = now_ns();
    while (!stopping) {
        uint64_t t = now_ns();
        if (t - prev >= GAP_MIN_NS)
            put(g, t, t - prev);
        __atomic_store_n(&g->last, t, __ATOMIC_RELEASE);
        prev = t;
    }
    return 0;
}

static void *sleeper_main(void *arg)
{
    (void)arg;
    prctl(PR_SET_TIMERSLACK, 1ul, 0, 0, 0);
    uint64_t deadline = now_ns() + SLEEPER_PERIOD_NS;
    while (!stopping) {
        struct timespec ts = { (time_t)(deadline / 1000000000ull), (long)(deadline % 1000000000ull) };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, 0) == EINTR)
            ;
        uint64_t t = now_ns();
        put(&sleeper_ring, deadline, t - deadline);
        __atomic_store_n(&sleeper_ring.last, deadline, __ATOMIC_RELEASE);
        deadline += SLEEPER_PERIOD_NS;
        if (deadline <= t)   /* missed periods: the next one in the future */
            deadline += ((t - deadline) / SLEEPER_PERIOD_NS + 1) * SLEEPER_PERIOD_NS;
    }
    return 0;
}

static void *idle_cond_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&idle_mutex);
    while (!stopping)
        pthread_cond_wait(&idle_cond, &idle_mutex);
    pthread_mutex_unlock(&idle_mutex);
    return 0;
}

static void *idle_sleep_main(void *arg)
{
    (void)arg;
    struct timespec ts = { 0, IDLE_SLEEP_NS };
    while (!stopping)
        nanosleep(&ts, 0);   /* EINTR (the signal stop) or not: sleep again */
    return 0;
}

static int start(pthread_t *t, void *(*fn)(void *), void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256u << 10);
    int rc = pthread_create(t, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    return rc;
}

/* Start `busy` spinning threads, `idle` blocked ones and the 1 ms sleeper. */
int st_start(int busy, int idle)
{
    stopping = 0;
    sleeper_ring.r = calloc(RING, sizeof(struct record));
    if (!sleeper_ring.r || start(&sleeper_thread, sleeper_main, 0))
        return -1;
    sleeper_started = 1;
    for (; nidle < idle && nidle < MAX_IDLE; nidle++)
        if (start(&idle_threads[nidle], nidle % 2 ? idle_sleep_main : idle_cond_main, 0))
            return -1;
    for (; nbusy < busy && nbusy < MAX_BUSY; nbusy++) {
        busy_rings[nbusy].r = calloc(RING, sizeof(struct record));
        busy_rings[nbusy].last = now_ns();
        if (!busy_rings[nbusy].r || start(&busy_threads[nbusy], busy_main, &busy_rings[nbusy]))
            return -1;
    }
    return 0;
}

void st_stop(void)
{
    stopping = 1;
    pthread_mutex_lock(&idle_mutex);
    pthread_cond_broadcast(&idle_cond);
    pthread_mutex_unlock(&idle_mutex);
    for (int i = 0; i < nbusy; i++)
        pthread_join(busy_threads[i], 0);
    for (int i = 0; i < nidle; i++)
        pthread_join(idle_threads[i], 0);
    if (sleeper_started)
        pthread_join(sleeper_thread, 0);
    nbusy = nidle = sleeper_started = 0;
}

/* Wait (sleeping) until the ring's writer has moved past `t`; 0, or -1 after
 * `timeout_ns`. */
static int wait_past(struct ring *g, uint64_t t, uint64_t timeout_ns)
{
    uint64_t give_up = now_ns() + timeout_ns;
    struct timespec pause = { 0, 50000 };
    while (__atomic_load_n(&g->last, __ATOMIC_ACQUIRE) <= t) {
        if (now_ns() > give_up)
            return -1;
        nanosleep(&pause, 0);
    }
    return 0;
}

/* The longest gap of any busy thread overlapping [t0, t1] in ns (0: none of
 * GAP_MIN_NS or more); -1 if a thread did not move past t1 within a second,
 * -2 if its ring wrapped over the interval. */
int64_t st_busy_max_gap(uint64_t t0, uint64_t t1)
{
    int64_t longest = 0;
    for (int i = 0; i < nbusy; i++) {
        struct ring *g = &busy_rings[i];
        if (wait_past(g, t1, 1000000000ull))
            return -1;
        uint64_t n = __atomic_load_n(&g->n, __ATOMIC_ACQUIRE), k = n;
        for (; k > 0 && n - k < RING; k--) {
            struct record e = g->r[(k - 1) & (RING - 1)];
            if (e.at < t0)
                break;
            if (e.at - e.value <= t1 && (int64_t)e.value > longest)
                longest = (int64_t)e.value;
        }
        if (k > 0 && n - k >= RING)
            return -2;
    }
    return longest;
}

/* Lateness (ns) of the sleeper's wakeups whose deadline lies in [t0, t1],
 * into out[0..max); returns how many (at most max), -1 if the sleeper did
 * not move past t1 within a second. */
int st_sleeper_lateness(uint64_t t0, uint64_t t1, uint64_t *out, int max)
{
    struct ring *g = &sleeper_ring;
    if (wait_past(g, t1, 1000000000ull))
        return -1;
    uint64_t n = __atomic_load_n(&g->n, __ATOMIC_ACQUIRE);
    int count = 0;
    for (uint64_t k = n; k > 0 && n - k < RING; k--) {
        struct record e = g->r[(k - 1) & (RING - 1)];
        if (e.at < t0)
            break;
        if (e.at <= t1 && count < max)
            out[count++] = e.value;
    }
    return count;
}

/* Spin for `ns` (the control window: this thread takes a CPU as a patching
 * one would, but writes nothing); its bounds into *t0, *t1. */
void st_spin(uint64_t ns, uint64_t *t0, uint64_t *t1)
{
    uint64_t start = now_ns(), t;
    while ((t = now_ns()) - start < ns)
        ;
    *t0 = start;
    *t1 = t;
}

/* The clock the rings use, for the patching thread's timestamps. */
uint64_t st_now(void)
{
    return now_ns();
}
