/*
 * The stop: every thread but the calling one held where it is while code is
 * written, none of them inside the bytes being replaced (check.c).
 *
 * The stopper is ptrace (stop_ptrace.c): it needs no cooperation from the
 * threads, whatever their signal masks, and a thread asleep in a system call
 * resumes it unaware.  Where /proc/PID/mem writes work, the helper does the
 * whole round itself -- stop, check, write, let go -- so that the threads
 * are held for no longer than that takes, without waiting for this thread to
 * be scheduled in between.  Where ptrace is refused the fallback parks
 * threads in a signal handler (stop_signal.c), which works only when every
 * thread takes the park signal.  HOTPATCH_STOPPER=signals selects it.
 */
#include "hotpatch_core.h"

#include <stdlib.h>
#include <string.h>

struct hp_stopped_thread hp_stopped[HP_MAX_THREADS];
int hp_nstopped;
struct hp_stop_stats hp_stats;

enum { METHOD_PTRACE, METHOD_SIGNALS };
static int method = -1;           /* of the last stop; -1 before any */
static char why_not_ptrace[HP_ERRLEN];
static uint64_t stack_words[8192];

static int signals_forced(void)
{
    const char *how = getenv("HOTPATCH_STOPPER");
    return how && strcmp(how, "signals") == 0;
}

HP_RAW static void count_hold(uint64_t hold)
{
    hp_stats.hold_ns += hold;
    if (hold > hp_stats.hold_max_ns)
        hp_stats.hold_max_ns = hold;
}

HP_RAW static void release(int kind)
{
    if (kind == METHOD_PTRACE)
        hp_ptrace_release();
    else
        hp_signal_release();
    hp_nstopped = 0;
}

/* A stop with this thread doing the check and the writes: the signal stop,
 * or ptrace where the helper cannot write.  Retried while a thread is
 * inside the bytes, until the deadline. */
HP_RAW static int stopped_round(const struct hp_check *c, int kind, uint64_t deadline, char *err)
{
    for (;;) {
        int rc = kind == METHOD_PTRACE ? hp_ptrace_stop(deadline, err)
                                       : hp_signal_stop(deadline, why_not_ptrace, err);
        if (rc != HP_STOP_OK)
            return rc;
        hp_stats.stops++;
        uint64_t stopped = hp_now_ns();
        uintptr_t pc = 0;
        int tid = 0;
        for (int t = 0; t < hp_nstopped && !tid; t++)
            if (hp_check_thread(c, hp_stopped[t].pc, hp_stopped[t].sp, &pc))
                tid = hp_stopped[t].tid;
        if (!tid) {
            rc = hp_check_old_bytes(c, err) ? HP_STOP_FAILED
                 : hp_write_stopped(c, err) ? HP_STOP_FAILED : HP_STOP_OK;
            hp_sync_cores();        /* write, sync, let go: in that order */
            release(kind);
            count_hold(hp_now_ns() - stopped);
            return rc;
        }
        release(kind);
        hp_stats.retries++;
        if (hp_now_ns() > deadline) {
            char *at = hp_fmt_str(err, err + HP_ERRLEN, "thread ");
            at = hp_fmt_num(at, err + HP_ERRLEN, tid);
            at = hp_fmt_str(at, err + HP_ERRLEN, " stayed inside the bytes being replaced (pc ");
            at = hp_fmt_hex(at, err + HP_ERRLEN, pc);
            hp_fmt_str(at, err + HP_ERRLEN, "); nothing was written");
            return HP_STOP_FAILED;
        }
        hp_sleep_ns(200000);
    }
}

/* Write a batch (sorted by address) with nothing to stop: in a process
 * where the calling thread is the only one (hp_only_thread), or bytes that
 * no thread runs (hot-patch points' padding, hp_write_dead_then_batch).
 * The old bytes checked, then written by spans.  0, or -1 with `err`
 * filled and nothing written.  hp_lock held. */
HP_RAW int hp_write_checked(struct hp_write *w, size_t n, char *err)
{
    struct hp_check c = { .pid = hp_gettid(), .writes = w, .nwrites = n,
                          .scratch = stack_words, .scratch_bytes = sizeof stack_words };
    return hp_check_old_bytes(&c, err) || hp_write_stopped(&c, err) ? -1 : 0;
}

/* Write a batch (sorted by address) with every other thread stopped:
 * ptrace, or the signal stop where ptrace is refused.  0, or -1 with `err`
 * filled and nothing written.  hp_lock held. */
HP_RAW int hp_stop_write(struct hp_write *w, size_t n, uint64_t deadline, int helper_may_write,
                         char *err)
{
    uintptr_t restorers[HP_MAX_RESTORERS];
    struct hp_check c = {
        .pid = hp_gettid(), .writes = w, .nwrites = n,   /* tid: see hp_read_memory */
        .restorers = restorers, .nrestorers = hp_collect_restorers(restorers, HP_MAX_RESTORERS),
        .scratch = stack_words, .scratch_bytes = sizeof stack_words,
    };
    uint64_t start = hp_now_ns();
    int rc = HP_STOP_REFUSED;
    if (!signals_forced()) {
        rc = helper_may_write ? hp_ptrace_write(&c, deadline, err) : HP_STOP_CANNOT_WRITE;
        if (rc == HP_STOP_CANNOT_WRITE)
            rc = stopped_round(&c, METHOD_PTRACE, deadline, err);
        if (rc != HP_STOP_REFUSED) {
            method = METHOD_PTRACE;
            why_not_ptrace[0] = 0;
        } else {
            hp_fmt_str(why_not_ptrace, why_not_ptrace + HP_ERRLEN, err);
        }
    } else {
        hp_fmt_str(why_not_ptrace, why_not_ptrace + HP_ERRLEN, "HOTPATCH_STOPPER=signals");
    }
    if (rc == HP_STOP_REFUSED) {
        method = METHOD_SIGNALS;
        rc = stopped_round(&c, METHOD_SIGNALS, deadline, err);
    }
    hp_stats.stop_ns += hp_now_ns() - start;
    return rc == HP_STOP_OK ? 0 : -1;
}

/* --- the stack consistency model --------------------------------------- */

/* Does any stopped thread run code of the patch (or sit inside the bytes
 * being replaced)?  1 with `hit` filled if so.  With `force`, only the
 * bytes count: the first stack found is reported in `hit`, not obeyed. */
HP_RAW static int stacks_busy(const struct hp_check *c, const struct hp_code_range *ranges,
                              size_t nranges, int force, struct hp_stack_hit *hit)
{
    for (int t = 0; t < hp_nstopped; t++) {
        const struct hp_stopped_thread *th = &hp_stopped[t];
        uintptr_t pc;
        if (hp_check_thread(c, th->pc, th->sp, &pc)) {
            *hit = (struct hp_stack_hit){ .tid = th->tid, .pc = pc, .range = -1, .inside = 1 };
            return 1;
        }
    }
    hp_unwind_forget_memory();      /* what was read before this stop may have changed */
    for (int t = 0; t < hp_nstopped; t++) {
        const struct hp_stopped_thread *th = &hp_stopped[t];
        struct hp_stack_hit found = { .tid = th->tid };
        if (!hp_unwind_check(&th->regs, c->pid, ranges, nranges, &found))
            continue;
        if (!force || !hit->tid)        /* forced: the first one is reported */
            hp_copy_words(hit, &found, sizeof found);
        if (!force)
            return 1;
    }
    return 0;
}

HP_RAW static void store_targets(const struct hp_store *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        __atomic_store_n(s[i].slot, s[i].value, __ATOMIC_RELEASE);
}

/* One try of the stack model (kpatch's): every other thread stopped with
 * ptrace and its stack unwound; if none runs code of the patch, write,
 * make the retargets, sync and let go.  HP_STOP_OK (with `force`, `hit`
 * names a stack that was overridden), HP_STOP_BUSY (`hit` says who;
 * nothing written, the threads let go: the caller retries), or
 * HP_STOP_FAILED / HP_STOP_REFUSED with `err`.  Only ptrace gives every
 * thread's registers without its cooperation: under the signal stop the
 * model is refused.  hp_lock and hp_unwind_lock held. */
HP_RAW int hp_stop_stack_round(struct hp_write *w, size_t n, const struct hp_store *stores,
                               size_t nstores, const struct hp_code_range *ranges, size_t nranges,
                               int force, uint64_t deadline, struct hp_stack_hit *hit, char *err)
{
    struct hp_check c = {
        .pid = hp_gettid(), .writes = w, .nwrites = n,   /* tid: see hp_read_memory */
        .scratch = stack_words, .scratch_bytes = sizeof stack_words,
    };
    uintptr_t restorers[HP_MAX_RESTORERS];
    c.restorers = restorers;
    c.nrestorers = hp_collect_restorers(restorers, HP_MAX_RESTORERS);
    uint64_t start = hp_now_ns();
    int rc = signals_forced() ? HP_STOP_REFUSED : hp_ptrace_stop(deadline, err);
    if (rc == HP_STOP_REFUSED) {
        const char *why = signals_forced() ? "HOTPATCH_STOPPER=signals" : err;
        char reason[HP_ERRLEN];
        hp_fmt_str(reason, reason + HP_ERRLEN, why);
        hp_fmt_str(why_not_ptrace, why_not_ptrace + HP_ERRLEN, reason);
        char *at = hp_fmt_str(err, err + HP_ERRLEN, "consistency=\"stack\" needs the ptrace "
                              "stopper to read every thread's registers, and ptrace cannot be "
                              "used here: ");
        hp_fmt_str(at, err + HP_ERRLEN, reason);
        return HP_STOP_REFUSED;
    }
    if (rc != HP_STOP_OK)
        return rc;
    method = METHOD_PTRACE;
    why_not_ptrace[0] = 0;
    hp_stats.stops++;
    uint64_t stopped = hp_now_ns();
    if (stacks_busy(&c, ranges, nranges, force, hit)) {
        release(METHOD_PTRACE);
        hp_stats.retries++;
        count_hold(hp_now_ns() - stopped);
        hp_stats.stop_ns += hp_now_ns() - start;
        return HP_STOP_BUSY;
    }
    rc = hp_check_old_bytes(&c, err) || hp_write_stopped(&c, err) ? HP_STOP_FAILED : HP_STOP_OK;
    if (rc == HP_STOP_OK)
        store_targets(stores, nstores);
    hp_sync_cores();        /* write, sync, let go: in that order */
    release(METHOD_PTRACE);
    count_hold(hp_now_ns() - stopped);
    hp_stats.stop_ns += hp_now_ns() - start;
    return rc;
}

/* Stop counters since the process started (or forked): stops, stops
 * retried because a thread was inside the bytes, the time from asking for
 * a stop to letting the threads go, how long threads were held while the
 * code was checked and written (total and longest), the batches that
 * needed no stop, and those written with no other thread in the process. */
void hp_stop_stats(uint64_t *stops, uint64_t *retries, uint64_t *stop_ns, uint64_t *hold_ns,
                   uint64_t *hold_max_ns, uint64_t *unstopped, uint64_t *alone)
{
    pthread_mutex_lock(&hp_lock);
    *stops = hp_stats.stops;
    *retries = hp_stats.retries;
    *stop_ns = hp_stats.stop_ns;
    *hold_ns = hp_stats.hold_ns;
    *hold_max_ns = hp_stats.hold_max_ns;
    *unstopped = hp_stats.unstopped;
    *alone = hp_stats.alone;
    pthread_mutex_unlock(&hp_lock);
}

/* Which stopper runs (1 = ptrace, 0 = signals), its helper's pid, the park
 * signal, and why ptrace is not used ("" when it is). */
void hp_stopper_info(int *uses_ptrace, int *helper_pid, int *park_signal, char *reason)
{
    pthread_mutex_lock(&hp_lock);
    int forced = signals_forced();
    *uses_ptrace = method < 0 ? !forced : method == METHOD_PTRACE;
    *helper_pid = hp_ptrace_helper_pid();
    *park_signal = hp_park_signal();
    const char *why = method < 0 && forced ? "HOTPATCH_STOPPER=signals" : why_not_ptrace;
    hp_fmt_str(reason, reason + HP_ERRLEN, *uses_ptrace ? "" : why);
    pthread_mutex_unlock(&hp_lock);
}

void hp_stop_after_fork(void)
{
    method = -1;
    why_not_ptrace[0] = 0;
    hp_nstopped = 0;
    memset(&hp_stats, 0, sizeof hp_stats);
    hp_ptrace_after_fork();
}
