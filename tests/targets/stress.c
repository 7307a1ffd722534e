/* C threads that call a function in a tight loop and count any result that
 * is neither the old nor the new one; and a thread blocked in read(). */
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

typedef long (*fn_t)(long);

#define MAX_CALLERS 16
static volatile int running;
static pthread_t callers[MAX_CALLERS];
static int ncallers;
static fn_t volatile target;
static long allowed[8];
static int nallowed;
static long calls[MAX_CALLERS], bad[MAX_CALLERS], last_bad;

static void *call_loop(void *arg)
{
    long me = (long)arg;
    while (running) {
        long r = target(7);
        int ok = 0;
        for (int k = 0; k < nallowed; k++)
            ok |= r == allowed[k];
        if (!ok) {
            bad[me]++;
            last_bad = r;
        }
        calls[me]++;
    }
    return 0;
}

void stress_start(fn_t f, int n, const long *ok, int nok)
{
    target = f;
    nallowed = nok;
    for (int k = 0; k < nok; k++)
        allowed[k] = ok[k];
    running = 1;
    ncallers = n;
    for (long i = 0; i < n; i++) {
        calls[i] = bad[i] = 0;
        pthread_create(&callers[i], 0, call_loop, (void *)i);
    }
}

/* Stop the callers; returns the bad results, total calls in *total. */
long stress_stop(long *total, long *a_bad_result)
{
    running = 0;
    long nbad = 0;
    *total = 0;
    for (int i = 0; i < ncallers; i++) {
        pthread_join(callers[i], 0);
        nbad += bad[i];
        *total += calls[i];
    }
    *a_bad_result = last_bad;
    return nbad;
}

/* A thread blocked in read() on a pipe. */
static int pipe_fds[2];
static pthread_t reader;
static long read_result = -100;
static void *read_one(void *arg)
{
    char c;
    read_result = read(pipe_fds[0], &c, 1) == 1 ? c : -1;
    return 0;
}
void reader_start(void)
{
    pipe(pipe_fds);
    pthread_create(&reader, 0, read_one, 0);
}
long reader_finish(void)
{
    char c = 42;
    write(pipe_fds[1], &c, 1);
    pthread_join(reader, 0);
    return read_result;
}

/* A thread that blocks every signal and spins: it can never be parked. */
static volatile int deaf_running;
static pthread_t deaf;
static void *spin_deaf(void *arg)
{
    while (deaf_running)
        ;
    return 0;
}
void deaf_start(void)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    deaf_running = 1;
    pthread_create(&deaf, 0, spin_deaf, 0);
    pthread_sigmask(SIG_SETMASK, &old, 0);
}
void deaf_stop(void)
{
    deaf_running = 0;
    pthread_join(deaf, 0);
}
