/* Threads that a stop of the world must handle: callers that block every
 * signal, a SIGEV_THREAD timer, sleepers in read/poll/epoll_wait/nanosleep/
 * sem_timedwait, malloc and dlopen hammers, thread churn, a thread whose
 * signal handler is running, an outside tracer, and application handlers on
 * SIGRTMAX-2 and SIGTRAP.  Each records what it saw so that tests assert on
 * real results.  Built with -O2 -pthread next to shapes.c (replacement,
 * replacement2, calls_other), fentry.c and patchable.c. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <stdint.h>
#include <ucontext.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
typedef long (*fn_t)(long);

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void block_all(sigset_t *old)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, old);
}

/* Results a caller may see: the old one and the replacements'. */
static long allowed[8];
static int nallowed;
static long last_bad;
static void set_allowed(const long *ok, int nok)
{
    nallowed = nok < 8 ? nok : 8;
    for (int k = 0; k < nallowed; k++)
        allowed[k] = ok[k];
}
static int is_allowed(long r)
{
    for (int k = 0; k < nallowed; k++)
        if (r == allowed[k])
            return 1;
    last_bad = r;
    return 0;
}

/* A tiny function whose first five bytes (the replaced ones) are three
 * instructions, push 1 + pause 2 + pause 2: the slow pauses make a thread
 * often interrupted at +1 or +3, inside the bytes. */
__asm__(".text\n.p2align 4\n.globl st_tiny\n.type st_tiny,@function\n"
        "st_tiny:\n  push %rbp\n  pause\n  pause\n  lea 1(%rdi), %rax\n  pop %rbp\n  ret\n"
        ".size st_tiny, .-st_tiny\n");

/* ---- callers: mode 0 ordinary, 1 every signal blocked for life, 2 every
 * signal blocked around each call ---- */
#define MAXC 8
static volatile int callers_running;
static pthread_t callers[MAXC];
static int ncallers, callers_mode;
static fn_t volatile callers_fn;
static long ccalls[MAXC], cbad[MAXC];

static void *caller(void *arg)
{
    long me = (long)arg;
    sigset_t old;
    if (callers_mode == 1)
        block_all(&old);
    while (callers_running) {
        long r;
        if (callers_mode == 2) {
            block_all(&old);
            r = callers_fn(7);
            pthread_sigmask(SIG_SETMASK, &old, 0);
        } else {
            r = callers_fn(7);
        }
        cbad[me] += !is_allowed(r);
        ccalls[me]++;
    }
    return 0;
}

EXPORT void st_callers_start(fn_t f, int n, const long *ok, int nok, int mode)
{
    callers_fn = f;
    set_allowed(ok, nok);
    callers_mode = mode;
    callers_running = 1;
    ncallers = n < MAXC ? n : MAXC;
    for (long i = 0; i < ncallers; i++) {
        ccalls[i] = cbad[i] = 0;
        pthread_create(&callers[i], 0, caller, (void *)i);
    }
}

/* Calls made so far: callers that are left stopped make no progress. */
EXPORT long st_callers_calls(void)
{
    long total = 0;
    for (int i = 0; i < ncallers; i++)
        total += __atomic_load_n(&ccalls[i], __ATOMIC_RELAXED);
    return total;
}

/* Joins the callers; returns the bad results, the calls in *total. */
EXPORT long st_callers_stop(long *total, long *a_bad)
{
    callers_running = 0;
    long nbad = 0;
    *total = 0;
    for (int i = 0; i < ncallers; i++) {
        pthread_join(callers[i], 0);
        nbad += cbad[i];
        *total += ccalls[i];
    }
    *a_bad = last_bad;
    return nbad;
}

/* ---- a glibc SIGEV_THREAD timer calling the function ---- */
static timer_t timer;
static fn_t volatile timer_fn;
static long tcalls, tbad;

static void tick(union sigval v)
{
    (void)v;
    long r = timer_fn(7);
    if (!is_allowed(r))
        __atomic_add_fetch(&tbad, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&tcalls, 1, __ATOMIC_RELAXED);
}

EXPORT int st_timer_start(fn_t f, const long *ok, int nok, long interval_ns)
{
    timer_fn = f;
    set_allowed(ok, nok);
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD;
    sev.sigev_notify_function = tick;
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer))
        return -errno;
    struct itimerspec its = { { 0, interval_ns }, { 0, interval_ns } };
    return timer_settime(timer, 0, &its, 0) ? -errno : 0;
}

EXPORT long st_timer_stop(long *total)
{
    timer_delete(timer);
    struct timespec settle = { 0, 50000000 };   /* let running notifications end */
    nanosleep(&settle, 0);
    *total = __atomic_load_n(&tcalls, __ATOMIC_RELAXED);
    return __atomic_load_n(&tbad, __ATOMIC_RELAXED);
}

/* ---- sleepers: read, poll, epoll_wait (no timeout; woken by a byte),
 * nanosleep 1.5 s, sem_timedwait with a 2 s deadline ---- */
enum { S_READ, S_POLL, S_EPOLL, S_NANO, S_SEM, NSLEEP };
static int sleep_pipe[3][2];
static pthread_t sleepers[NSLEEP];
static sem_t never_posted;
/* per sleeper: rc, errno, data read (or -1), elapsed ns, end time */
static long sleep_out[NSLEEP][5];

static void *sleeper(void *arg)
{
    long k = (long)arg, rc = 0, data = -1, start = now_ns();
    int err = 0;
    char c;
    if (k == S_READ) {
        rc = read(sleep_pipe[0][0], &c, 1);
        err = errno;
        if (rc == 1)
            data = c;
    } else if (k == S_POLL) {
        struct pollfd p = { sleep_pipe[1][0], POLLIN, 0 };
        rc = poll(&p, 1, -1);
        err = errno;
        if (rc == 1 && read(sleep_pipe[1][0], &c, 1) == 1)
            data = c;
    } else if (k == S_EPOLL) {
        int ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event ev = { .events = EPOLLIN }, got;
        epoll_ctl(ep, EPOLL_CTL_ADD, sleep_pipe[2][0], &ev);
        rc = epoll_wait(ep, &got, 1, -1);
        err = errno;
        if (rc == 1 && read(sleep_pipe[2][0], &c, 1) == 1)
            data = c;
        close(ep);
    } else if (k == S_NANO) {
        struct timespec d = { 1, 500000000 };
        rc = nanosleep(&d, 0);
        err = errno;
    } else {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 2;
        rc = sem_timedwait(&never_posted, &deadline);
        err = errno;
    }
    long end = now_ns();
    sleep_out[k][0] = rc;
    sleep_out[k][1] = rc < 0 ? err : 0;
    sleep_out[k][2] = data;
    sleep_out[k][3] = end - start;
    sleep_out[k][4] = end;
    return 0;
}

EXPORT void st_sleepers_start(void)
{
    sem_init(&never_posted, 0, 0);
    for (int i = 0; i < 3; i++)
        pipe2(sleep_pipe[i], O_CLOEXEC);
    for (long k = 0; k < NSLEEP; k++)
        pthread_create(&sleepers[k], 0, sleeper, (void *)k);
}

/* Wakes read/poll/epoll with the bytes 'r', 'p', 'e', joins every sleeper
 * and copies NSLEEP x 5 longs into out. */
EXPORT void st_sleepers_finish(long *out)
{
    const char bytes[3] = { 'r', 'p', 'e' };
    for (int i = 0; i < 3; i++)
        write(sleep_pipe[i][1], &bytes[i], 1);
    for (int k = 0; k < NSLEEP; k++)
        pthread_join(sleepers[k], 0);
    memcpy(out, sleep_out, sizeof sleep_out);
    for (int i = 0; i < 3; i++) {
        close(sleep_pipe[i][0]);
        close(sleep_pipe[i][1]);
    }
}

EXPORT long st_now_ns(void) { return now_ns(); }

/* ---- malloc/free and dlopen/dlclose hammers ---- */
static volatile int hammer_running;
static pthread_t hammers[8];
static int nhammers, nmallocers;
static const char *dl_path;
static long hcount[8], dl_failures;

static void *mallocer(void *arg)
{
    long me = (long)arg;
    unsigned seed = (unsigned)me;
    while (hammer_running) {
        void *p[16];
        for (int i = 0; i < 16; i++)
            p[i] = malloc(16 + rand_r(&seed) % 4096);
        for (int i = 0; i < 16; i++)
            free(p[i]);
        hcount[me]++;
    }
    return 0;
}

static void *dlopener(void *arg)
{
    long me = (long)arg;
    while (hammer_running) {
        void *h = dlopen(dl_path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            __atomic_add_fetch(&dl_failures, 1, __ATOMIC_RELAXED);
            continue;
        }
        dlclose(h);
        hcount[me]++;
    }
    return 0;
}

EXPORT void st_hammer_start(const char *path, int nmalloc, int ndl)
{
    static char keep[4096];
    strncpy(keep, path, sizeof keep - 1);
    dl_path = keep;
    hammer_running = 1;
    nmallocers = nmalloc;
    nhammers = nmalloc + ndl;
    for (long i = 0; i < nhammers; i++) {
        hcount[i] = 0;
        pthread_create(&hammers[i], 0, i < nmalloc ? mallocer : dlopener, (void *)i);
    }
}

/* Joins the hammers: rounds in *mallocs and *dlopens; returns dlopen failures. */
EXPORT long st_hammer_stop(long *mallocs, long *dlopens)
{
    hammer_running = 0;
    *mallocs = *dlopens = 0;
    for (int i = 0; i < nhammers; i++) {
        pthread_join(hammers[i], 0);
        *(i < nmallocers ? mallocs : dlopens) += hcount[i];
    }
    return dl_failures;
}

/* ---- a thread that blocks every signal and sleeps; its tid ---- */
static volatile int blocker_running;
static pthread_t blocker;
static volatile pid_t blocker_tid;

static void *block_and_sleep(void *arg)
{
    (void)arg;
    sigset_t old;
    block_all(&old);
    blocker_tid = (pid_t)syscall(SYS_gettid);
    while (blocker_running) {
        struct timespec d = { 0, 5000000 };
        nanosleep(&d, 0);
    }
    return 0;
}

EXPORT int st_blocker_start(void)
{
    blocker_tid = 0;
    blocker_running = 1;
    pthread_create(&blocker, 0, block_and_sleep, 0);
    while (!blocker_tid)
        sched_yield();
    return blocker_tid;
}

EXPORT void st_blocker_stop(void)
{
    blocker_running = 0;
    pthread_join(blocker, 0);
}

/* ---- an outside tracer: a forked process that PTRACE_SEIZEs one thread of
 * this process and keeps it until released (or until this process exits) ---- */
static pid_t tracer_pid;
static int tracer_hold[2];

/* Returns 0 once the thread is seized, or -errno of the seize. */
EXPORT int st_tracer_attach(int tid)
{
    int status_pipe[2], go[2];
    if (pipe2(status_pipe, O_CLOEXEC) || pipe2(tracer_hold, O_CLOEXEC) || pipe2(go, O_CLOEXEC))
        return -errno;
    tracer_pid = fork();
    if (tracer_pid == 0) {
        char c;
        close(tracer_hold[1]);
        read(go[0], &c, 1);   /* wait for PR_SET_PTRACER */
        int rc = ptrace(PTRACE_SEIZE, tid, 0, 0) ? -errno : 0;
        write(status_pipe[1], &rc, sizeof rc);
        while (read(tracer_hold[0], &c, 1) < 0 && errno == EINTR)
            ;
        _exit(0);   /* exiting detaches */
    }
    close(tracer_hold[0]);
    close(status_pipe[1]);
    prctl(PR_SET_PTRACER, tracer_pid, 0, 0, 0);   /* Yama ptrace_scope 1; EINVAL without Yama */
    write(go[1], "g", 1);
    close(go[0]);
    close(go[1]);
    int rc = -EIO;
    read(status_pipe[0], &rc, sizeof rc);
    close(status_pipe[0]);
    return rc;
}

EXPORT int st_tracer_release(void)
{
    int status = 0;
    close(tracer_hold[1]);
    waitpid(tracer_pid, &status, 0);
    return status;
}

/* A caller thread signalled by a timer of its own (SIGEV_THREAD_ID): it
 * calls `fn` until `running` drops, counting its calls and bad results. */
struct signalled_caller {
    fn_t volatile fn;
    volatile int running;
    volatile pid_t tid;
    long calls, bad;
    pthread_t thread;
    timer_t timer;
};

static void *signalled_loop(void *arg)
{
    struct signalled_caller *c = arg;
    c->tid = (pid_t)syscall(SYS_gettid);
    while (c->running) {
        c->bad += !is_allowed(c->fn(7));
        c->calls++;
    }
    return 0;
}

/* Start `c` calling `f`, and its timer sending it `sig` every `period_ns`.
 * 0, or -errno. */
static int start_signalled_caller(struct signalled_caller *c, fn_t f, int sig, long period_ns)
{
    c->fn = f;
    c->calls = c->bad = 0;
    c->tid = 0;
    c->running = 1;
    pthread_create(&c->thread, 0, signalled_loop, c);
    while (!c->tid)
        sched_yield();
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = sig;
    sev._sigev_un._tid = c->tid;
    if (timer_create(CLOCK_MONOTONIC, &sev, &c->timer))
        return -errno;
    struct itimerspec its = { { 0, period_ns }, { 0, period_ns } };
    return timer_settime(c->timer, 0, &its, 0) ? -errno : 0;
}

/* Join `c` (its timer deleted already): its bad results, its calls in
 * `*calls`. */
static long stop_signalled_caller(struct signalled_caller *c, long *calls)
{
    c->running = 0;
    pthread_join(c->thread, 0);
    *calls = c->calls;
    return c->bad;
}

/* ---- item 7: a caller interrupted by a signal whose handler is still
 * running when the stop happens: SIGALRM every 1 ms delivered to the caller
 * thread itself, the handler busy-waits 300 us ---- */
static struct signalled_caller alarm_caller;
static long ahandled;

/* inside: the handler interrupted st_tiny strictly inside its first five
 * (replaced) bytes; changed: and those bytes changed while it ran, so it
 * returns into code that is not what it was interrupted in. */
static long ainside, achanged;
long st_tiny(long);

static void on_alarm(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)info;
    int saved = errno;
    uintptr_t pc = (uintptr_t)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP];
    uintptr_t entry = (uintptr_t)st_tiny;
    int inside = pc > entry && pc < entry + 5;
    long before = inside ? *(volatile long *)entry : 0;
    long until = now_ns() + 300000;
    while (now_ns() < until)
        ;
    if (inside) {
        ainside++;
        achanged += *(volatile long *)entry != before;
    }
    ahandled++;
    errno = saved;
}

EXPORT int st_alarm_start(fn_t f, const long *ok, int nok)
{
    set_allowed(ok, nok);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGALRM, &sa, 0);
    return start_signalled_caller(&alarm_caller, f, SIGALRM, 1000000);
}

/* ---- a thread held in its restorer: its handler returned, the
 * rt_sigreturn that resumes the interrupted code is still to come.  A
 * timer signals the caller thread until it interrupts st_tiny inside its
 * first five bytes; that handler run returns into a restorer that waits
 * until st_restorer_release().  Glibc's __restore_rt is two instructions,
 * so a stop lands there only now and then; this one waits there. ---- */
static volatile int restorer_hold, restorer_held;
static struct signalled_caller restorer_caller;

void st_slow_restorer(void);
__asm__(".text\n.type st_slow_restorer,@function\nst_slow_restorer:\n"
        "1: pause\n  cmpl $0, restorer_hold(%rip)\n  jne 1b\n"
        "  mov $15, %eax\n  syscall\n"
        ".size st_slow_restorer, .-st_slow_restorer\n");

static void on_restorer_signal(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)info;
    uintptr_t pc = (uintptr_t)((ucontext_t *)ctx)->uc_mcontext.gregs[REG_RIP];
    uintptr_t entry = (uintptr_t)st_tiny;
    if (!restorer_held && pc > entry && pc < entry + 5) {
        restorer_hold = 1;      /* the restorer waits: we return into it */
        restorer_held = 1;
    }
}

/* The kernel's struct sigaction: glibc's sigaction() sets its own
 * restorer, this one is ours. */
struct kernel_sigaction {
    void (*handler)(int, siginfo_t *, void *);
    unsigned long flags;
    void (*restorer)(void);
    uint64_t mask;
};

EXPORT int st_restorer_start(fn_t f, const long *ok, int nok)
{
    set_allowed(ok, nok);
    struct kernel_sigaction sa = { on_restorer_signal, SA_SIGINFO | SA_RESTART | 0x04000000,
                                   st_slow_restorer, 0 };
    if (syscall(SYS_rt_sigaction, SIGUSR2, &sa, 0, 8))
        return -errno;
    return start_signalled_caller(&restorer_caller, f, SIGUSR2, 200000);
}

static int restorer_timer_gone;

static void restorer_timer_stop(void)
{
    if (!restorer_timer_gone)
        timer_delete(restorer_caller.timer);
    restorer_timer_gone = 1;
}

/* Whether the caller thread waits in the restorer now (the timer is
 * stopped once it does). */
EXPORT int st_restorer_held(void)
{
    if (restorer_held)
        restorer_timer_stop();
    return restorer_held;
}

EXPORT void st_restorer_release(void) { restorer_hold = 0; }

/* Returns the bad results; out: calls. */
EXPORT long st_restorer_stop(long *out)
{
    restorer_timer_stop();
    restorer_hold = 0;
    return stop_signalled_caller(&restorer_caller, &out[0]);
}

/* Returns the bad results; out: calls, handler runs, runs that interrupted
 * st_tiny inside its first bytes, of those the ones whose bytes changed. */
EXPORT long st_alarm_stop(long *out)
{
    timer_delete(alarm_caller.timer);
    long bad = stop_signalled_caller(&alarm_caller, &out[0]);
    out[1] = ahandled;
    out[2] = ainside;
    out[3] = achanged;
    return bad;
}

/* ---- an application's own SA_SIGINFO handler on a signal ---- */
static volatile long app_hits;
static void app_handler(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)info;
    (void)ctx;
    app_hits++;
}

EXPORT int st_app_handler_install(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = app_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    return sigaction(sig, &sa, 0);
}

EXPORT int st_app_handler_installed(int sig)
{
    struct sigaction now;
    sigaction(sig, 0, &now);
    return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == app_handler;
}

/* Raises sig in this thread; returns the app handler's hits so far. */
EXPORT long st_raise(int sig)
{
    raise(sig);
    return app_hits;
}

/* ---- a chaining SIGTRAP handler: counts, then calls the one before ---- */
static struct sigaction trap_prev;
static volatile long trap_hits;
static void on_trap(int sig, siginfo_t *info, void *ctx)
{
    trap_hits++;
    if (trap_prev.sa_flags & SA_SIGINFO)
        trap_prev.sa_sigaction(sig, info, ctx);
    else if (trap_prev.sa_handler != SIG_DFL && trap_prev.sa_handler != SIG_IGN)
        trap_prev.sa_handler(sig);
}

EXPORT int st_trap_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    return sigaction(SIGTRAP, &sa, &trap_prev);
}

/* The C-level SIGTRAP disposition: 1 if it is still on_trap with the same
 * flags and mask as installed. */
EXPORT int st_trap_installed(void)
{
    struct sigaction now;
    sigaction(SIGTRAP, 0, &now);
    return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_trap && sigisemptyset(&now.sa_mask);
}

EXPORT long st_trap_raise(void)
{
    raise(SIGTRAP);
    return trap_hits;
}

/* ---- thread churn: spawners creating short-lived threads that call the
 * function a few times and exit ---- */
static volatile int churn_running;
static pthread_t spawners[4];
static int nspawners;
static fn_t volatile churn_fn;
static long churn_created, churn_bad, churn_failed;

static void *short_lived(void *arg)
{
    (void)arg;
    for (int i = 0; i < 20; i++)
        if (!is_allowed(churn_fn(7)))
            __atomic_add_fetch(&churn_bad, 1, __ATOMIC_RELAXED);
    return 0;
}

static void *spawner(void *arg)
{
    (void)arg;
    while (churn_running) {
        pthread_t t;
        if (pthread_create(&t, 0, short_lived, 0)) {
            __atomic_add_fetch(&churn_failed, 1, __ATOMIC_RELAXED);
            continue;
        }
        pthread_join(t, 0);
        __atomic_add_fetch(&churn_created, 1, __ATOMIC_RELAXED);
    }
    return 0;
}

EXPORT void st_churn_start(fn_t f, const long *ok, int nok, int n)
{
    churn_fn = f;
    set_allowed(ok, nok);
    churn_running = 1;
    nspawners = n < 4 ? n : 4;
    for (int i = 0; i < nspawners; i++)
        pthread_create(&spawners[i], 0, spawner, 0);
}

/* Returns bad results; threads created in *created, create failures in *failed. */
EXPORT long st_churn_stop(long *created, long *failed)
{
    churn_running = 0;
    for (int i = 0; i < nspawners; i++)
        pthread_join(spawners[i], 0);
    *created = churn_created;
    *failed = churn_failed;
    return churn_bad;
}
