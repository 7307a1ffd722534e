/*
 * The fallback stopper, where ptrace is refused: park every other thread in
 * a handler of the park signal (SIGRTMAX-2), as a garbage collector does.
 *
 * It works only when every thread takes the signal: a thread that blocks it
 * is named in a TransitionError before anything is signalled.  Masks change
 * at any moment, so a thread that still does not park in time is an error
 * too, never a guess.  Unlike ptrace it is visible: a thread asleep in
 * poll(), epoll_wait(), select() or nanosleep() returns EINTR.
 *
 * Stops are numbered.  A stop is in progress while released_gen < stop_gen.
 * A parked thread records its pc and sp, then (generation, tid) as one key,
 * in a slot; only keys of the current generation count, so the patcher never
 * waits for threads to leave the handler: one still on its way out of an
 * earlier stop is harmless, and the signal of the next stop waits, blocked,
 * until it has left.  The key is one store: written as two fields, a thread
 * back in the slot it had in the last stop could be matched by its new
 * generation beside its old tid before writing the tid.
 */
#include "hotpatch_core.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <string.h>
#include <ucontext.h>

static int park_signal;
static int stop_gen;              /* atomic */
static int released_gen;          /* futex: = stop_gen once released */
static int parked;                /* atomic: next free slot */
static int arrivals;              /* futex: bumped by each thread once parked */
static struct {
    uint64_t key;                 /* park_key(gen, tid), written last, atomically */
    uintptr_t pc, sp;
} parked_at[HP_MAX_THREADS];
static int signalled[HP_MAX_THREADS];
static int nsignalled;

static uint64_t park_key(int gen, int tid)
{
    return (uint64_t)(uint32_t)gen << 32 | (uint32_t)tid;
}

HP_RAW static long futex(int *word, int op, int value, const struct timespec *timeout)
{
    return hp_sys(SYS_futex, word, op, value, timeout, 0, 0);
}

/* Runs in every other thread: record where it was, wait to be released. */
HP_RAW static void on_park(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)info;
    int gen = __atomic_load_n(&stop_gen, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&released_gen, __ATOMIC_SEQ_CST) < gen) {
        int slot = __atomic_fetch_add(&parked, 1, __ATOMIC_SEQ_CST);
        if (slot < HP_MAX_THREADS) {
            greg_t *regs = ((ucontext_t *)context)->uc_mcontext.gregs;
            parked_at[slot].pc = (uintptr_t)regs[REG_RIP];
            parked_at[slot].sp = (uintptr_t)regs[REG_RSP];
            __atomic_store_n(&parked_at[slot].key, park_key(gen, hp_gettid()), __ATOMIC_SEQ_CST);
        }
        __atomic_add_fetch(&arrivals, 1, __ATOMIC_SEQ_CST);
        futex(&arrivals, FUTEX_WAKE_PRIVATE, 1, NULL);
        int released;
        while ((released = __atomic_load_n(&released_gen, __ATOMIC_SEQ_CST)) < gen)
            futex(&released_gen, FUTEX_WAIT_PRIVATE, released, NULL);
    }
    /* errno is untouched: only raw system calls above */
}

int hp_park_signal(void)
{
    return park_signal ? park_signal : SIGRTMAX - 2;
}

/* Our handler on the park signal, checked before every stop: an
 * application's handler there is refused, never replaced; one reset to the
 * default (which would kill at the next stop) is replaced. */
static int ensure_park_handler(char *err)
{
    int sig = SIGRTMAX - 2;
    struct sigaction now, sa;
    sigaction(sig, NULL, &now);
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_park) {
        park_signal = sig;
        return 0;
    }
    if (now.sa_flags & SA_SIGINFO || now.sa_handler != SIG_DFL) {
        char *at = hp_fmt_str(err, err + HP_ERRLEN, "signal ");
        at = hp_fmt_num(at, err + HP_ERRLEN, sig);
        hp_fmt_str(at, err + HP_ERRLEN, " (SIGRTMAX-2), used to park threads, has another handler");
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_park;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL)) {
        hp_fmt_str(err, err + HP_ERRLEN, "cannot install the park handler");
        return -1;
    }
    park_signal = sig;
    return 0;
}

/* Threads signalled in this stop; one found gone is kept as -tid. */
static int was_signalled(int tid)
{
    for (int i = 0; i < nsignalled; i++)
        if (signalled[i] == tid || signalled[i] == -tid)
            return 1;
    return 0;
}

/* The slot of `tid` parked in the current stop, or -1. */
HP_RAW static int parked_slot(int tid)
{
    int count = __atomic_load_n(&parked, __ATOMIC_SEQ_CST);
    uint64_t key = park_key(stop_gen, tid);
    for (int i = 0; i < count && i < HP_MAX_THREADS; i++)
        if (__atomic_load_n(&parked_at[i].key, __ATOMIC_SEQ_CST) == key)
            return i;
    return -1;
}

HP_RAW void hp_signal_release(void)
{
    __atomic_store_n(&released_gen, stop_gen, __ATOMIC_SEQ_CST);
    futex(&released_gen, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL);
}

HP_RAW static int refuse(char *err, int tid, const char *name, const char *what, const char *why_not_ptrace)
{
    char *end = err + HP_ERRLEN;
    char *at = hp_fmt_str(err, end, "thread ");
    at = hp_fmt_num(at, end, tid);
    at = hp_fmt_str(at, end, " (");
    at = hp_fmt_str(at, end, name);
    at = hp_fmt_str(at, end, ") ");
    at = hp_fmt_str(at, end, what);
    at = hp_fmt_str(at, end, " and ptrace cannot stop it (");
    at = hp_fmt_str(at, end, why_not_ptrace);
    hp_fmt_str(at, end, "); nothing was written");
    return HP_STOP_FAILED;
}

#define BLOCKED_GRACE_NS 200000000ull

/* The calling thread takes the park signal whatever mask it inherited:
 * every thread hotpatch starts calls this first, so that none of them makes
 * the signal stop impossible.  Raw system call: a patch may have replaced
 * libc's pthread_sigmask. */
int hp_unblock_park_signal(void)
{
    uint64_t set = 1ull << (hp_park_signal() - 1);
    return (int)hp_sys(SYS_rt_sigprocmask, SIG_UNBLOCK, &set, NULL, sizeof set);
}

/* Park every other thread.  Every thread must take the park signal: one
 * that blocks it is refused before anything is signalled.  Threads started
 * meanwhile are found by listing again until every listed thread has
 * parked; zombies (a main thread gone with pthread_exit) are skipped. */
HP_RAW int hp_signal_stop(uint64_t deadline, const char *why_not_ptrace, char *err)
{
    static int tids[HP_MAX_THREADS];
    int self = hp_gettid(), pid = hp_getpid();
    struct hp_thread_status st;
    hp_nstopped = 0;
    if (ensure_park_handler(err))
        return HP_STOP_FAILED;
    /* A thread held in the last stop may still be on its way out of the
     * handler, every signal blocked: the new signal waits for it there. */
    /* glibc blocks every signal in a thread while it starts (until
     * start_thread sets its creator's mask) and again on its way out (a
     * thread just joined or cancelled, faulthandler's watchdog): such a
     * thread is waited for up to BLOCKED_GRACE_NS before it is refused. */
    uint64_t grace = hp_now_ns() + BLOCKED_GRACE_NS;
    if (grace > deadline)
        grace = deadline;
    for (;;) {
        int blocker = 0;
        int n = hp_list_threads(tids, HP_MAX_THREADS);
        for (int i = 0; i < n && !blocker; i++) {
            if (tids[i] == self || was_signalled(tids[i]))
                continue;
            hp_read_thread_status(pid, tids[i], &st);
            if (!hp_thread_gone(&st) && (st.blocked >> (park_signal - 1) & 1))
                blocker = tids[i];
        }
        if (!blocker)
            break;
        if (hp_now_ns() > grace)
            return refuse(err, blocker, st.name, "blocks the park signal", why_not_ptrace);
        struct timespec pause = { 0, 1000000 };
        hp_sys(SYS_nanosleep, &pause, NULL);
    }
    int n;
    nsignalled = 0;
    __atomic_store_n(&parked, 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&stop_gen, 1, __ATOMIC_SEQ_CST);
    /* Signal every listed thread; then, while some have not parked, sleep
     * until the next arrival.  The thread list is read again only once
     * every thread signalled has parked (a thread started meanwhile is
     * signalled then), and a thread's status only when no thread parked
     * for a whole interval (to tell an exited thread or a zombie from a
     * late one): a stop costs a system call or two per thread, not per
     * thread and arrival. */
    int check_status = 0;
    for (;;) {
        int arrived = __atomic_load_n(&arrivals, __ATOMIC_SEQ_CST), waiting = 0, late = 0;
        for (int i = 0; i < nsignalled; i++) {
            int tid = signalled[i];
            if (tid <= 0 || parked_slot(tid) >= 0)
                continue;
            if (check_status) {
                hp_read_thread_status(pid, tid, &st);
                if (hp_thread_gone(&st)) {
                    signalled[i] = -tid;        /* gone: nothing to wait for */
                    continue;
                }
            }
            waiting++;
            late = tid;
        }
        if (!waiting) {
            int added = 0;
            n = hp_list_threads(tids, HP_MAX_THREADS);
            for (int i = 0; i < n; i++) {
                int tid = tids[i];
                if (tid == self || was_signalled(tid))
                    continue;
                if (nsignalled == HP_MAX_THREADS) {
                    hp_signal_release();
                    hp_fmt_str(err, err + HP_ERRLEN, "too many threads");
                    return HP_STOP_FAILED;
                }
                signalled[nsignalled++] = tid;
                if (hp_sys(SYS_tgkill, pid, tid, park_signal) == -ESRCH)
                    signalled[nsignalled - 1] = -tid;   /* it exited */
                else
                    added++;
            }
            if (!added)
                break;      /* listed again and nothing new: every thread is parked */
            continue;
        }
        if (hp_now_ns() > deadline) {
            hp_signal_release();
            hp_read_thread_status(pid, late, &st);
            return refuse(err, late, st.name, (st.blocked >> (park_signal - 1) & 1)
                          ? "blocks the park signal" : "did not park in time", why_not_ptrace);
        }
        /* Sleep until the next thread parks: the CPU goes to the threads
         * that must run their handler.  An interval with no arrival: look
         * at the stragglers' status next time round. */
        struct timespec interval = { 0, 1000000 };
        check_status = futex(&arrivals, FUTEX_WAIT_PRIVATE, arrived, &interval) == -ETIMEDOUT;
    }
    for (int i = 0; i < nsignalled; i++) {
        int slot = signalled[i] > 0 ? parked_slot(signalled[i]) : -1;
        if (slot >= 0 && hp_nstopped < HP_MAX_THREADS) {
            hp_stopped[hp_nstopped].tid = signalled[i];
            hp_stopped[hp_nstopped].pc = parked_at[slot].pc;
            hp_stopped[hp_nstopped].sp = parked_at[slot].sp;
            hp_nstopped++;
        }
    }
    return HP_STOP_OK;
}
