/*
 * The stop: every thread but the calling one held where it is while code is
 * written, and a check that none of them is inside the bytes being replaced.
 *
 * The stopper is ptrace (stop_ptrace.c): it needs no cooperation from the
 * threads, whatever their signal masks, and a thread asleep in a system call
 * resumes it unaware.  Where ptrace is refused the fallback parks threads in
 * a signal handler (stop_signal.c), which works only when every thread takes
 * the park signal.  HOTPATCH_STOPPER=signals selects the fallback.
 */
#include "hotpatch_core.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>

struct hp_stopped_thread hp_stopped[HP_MAX_THREADS];
int hp_nstopped;

enum { METHOD_PTRACE, METHOD_SIGNALS };
static int method = -1;           /* of the current or last stop; -1 before any */
static int running;               /* which stopper holds the threads now */
static char why_not_ptrace[HP_ERRLEN];

static int signals_forced(void)
{
    const char *how = getenv("HOTPATCH_STOPPER");
    return how && strcmp(how, "signals") == 0;
}

/* --- signal frames --------------------------------------------------- */

/* A thread may be stopped inside a signal handler that interrupted the bytes
 * being replaced: it returns there through the signal frame on its stack.
 * The frame (struct rt_sigframe) begins with the handler's return address,
 * which is the sa_restorer of its action (glibc's __restore_rt for every
 * handler installed through sigaction()); the restorers are read from the
 * kernel's actions before each stop. */
#define MAX_RESTORERS 8
static uintptr_t restorers[MAX_RESTORERS];
static int nrestorers;

void hp_stop_prepare(void)
{
    nrestorers = 0;
    for (int sig = 1; sig <= 64; sig++) {
        struct { uintptr_t handler; unsigned long flags; uintptr_t restorer; uint64_t mask; } act;
        if (hp_sys(SYS_rt_sigaction, sig, 0, &act, 8) || act.handler <= 1 || !(act.flags & 0x04000000))
            continue;   /* no handler, or no SA_RESTORER */
        int known = 0;
        for (int i = 0; i < nrestorers; i++)
            known |= restorers[i] == act.restorer;
        if (!known && nrestorers < MAX_RESTORERS)
            restorers[nrestorers++] = act.restorer;
    }
}

/* Layout of the frame after its return address, x86-64: ucontext's
 * uc_flags, uc_link, uc_stack (24 bytes), then mcontext's 23 gregs and the
 * fpstate pointer. */
#define FRAME_GREGS 48
#define FRAME_RSP (FRAME_GREGS + 15 * 8)
#define FRAME_RIP (FRAME_GREGS + 16 * 8)
#define FRAME_CSGSFS (FRAME_GREGS + 18 * 8)
#define FRAME_FPSTATE (FRAME_GREGS + 23 * 8)
#define FRAME_SIZE (FRAME_FPSTATE + 8)
#define USER_CS 0x33

HP_RAW static int inside(const struct hp_write *w, size_t n, uintptr_t pc)
{
    for (size_t i = 0; i < n; i++)
        if (pc > w[i].address && pc < w[i].address + w[i].len)
            return 1;
    return 0;
}

HP_RAW static int is_restorer(uint64_t word)
{
    for (int i = 0; i < nrestorers; i++)
        if (word == restorers[i])
            return 1;
    return 0;
}

/* Is `at` a signal frame?  Its interrupted pc and sp if so.  Checked so that
 * a stale copy of a restorer's address in a dead frame is not taken for one:
 * user code segment, fpstate just above the frame. */
HP_RAW static int signal_frame(int pid, uintptr_t at, uintptr_t *pc, uintptr_t *sp)
{
    uint64_t f[FRAME_SIZE / 8];
    if (hp_read_own(pid, f, at, sizeof f) != (long)sizeof f)
        return 0;
    uint64_t fpstate = f[FRAME_FPSTATE / 8];
    if ((f[FRAME_CSGSFS / 8] & 0xffff) != USER_CS ||
        (fpstate && (fpstate <= at || fpstate > at + 65536)))
        return 0;
    *pc = f[FRAME_RIP / 8];
    *sp = f[FRAME_RSP / 8];
    return 1;
}

/* Walk up the stack from `sp` to the end of its mapping (at most 8 MiB) for
 * signal frames whose interrupted pc is inside a write; a frame on an
 * alternate stack leads to the interrupted stack, walked in turn. */
static uint64_t stack_words[8192];

HP_RAW static int frames_inside(int pid, uintptr_t sp, const struct hp_write *w, size_t n,
                                uintptr_t *found)
{
    uintptr_t todo[4] = { sp & ~(uintptr_t)7 };
    int ntodo = 1;
    for (int region = 0; region < ntodo; region++) {
        uintptr_t at = todo[region], end = at + (8u << 20);
        const struct hp_mapping *m = hp_mapping_of(at);
        if (m && m->hi < end)
            end = m->hi;
        while (at < end) {
            size_t want = end - at < sizeof stack_words ? end - at : sizeof stack_words;
            long got = hp_read_own(pid, stack_words, at, want);
            if (got <= 0)
                break;
            for (long i = 0; i < got / 8; i++) {
                uintptr_t frame = at + (uintptr_t)i * 8, pc, frame_sp;
                /* sp + 8 is 16-byte aligned at a handler's entry */
                if ((frame & 15) != 8 || !is_restorer(stack_words[i]) ||
                    !signal_frame(pid, frame, &pc, &frame_sp))
                    continue;
                if (inside(w, n, pc)) {
                    *found = pc;
                    return 1;
                }
                if ((frame_sp < todo[region] || frame_sp > end) && ntodo < 4)
                    todo[ntodo++] = frame_sp & ~(uintptr_t)7;
            }
            at += (uintptr_t)got;
        }
    }
    return 0;
}

/* A stopped thread inside the bytes of a write -- its pc, or the pc a
 * signal handler it is running will return to: its tid, or 0. */
HP_RAW int hp_thread_inside(const struct hp_write *w, size_t n, uintptr_t *pc)
{
    int pid = hp_getpid();
    for (int t = 0; t < hp_nstopped; t++) {
        if (inside(w, n, hp_stopped[t].pc)) {
            *pc = hp_stopped[t].pc;
            return hp_stopped[t].tid;
        }
        if (nrestorers && frames_inside(pid, hp_stopped[t].sp, w, n, pc))
            return hp_stopped[t].tid;
    }
    return 0;
}

/* --- choosing the stopper ------------------------------------------- */

/* Stop every other thread: ptrace, or the signal stop where ptrace is
 * refused.  hp_stopped lists the threads held. */
HP_RAW int hp_stop_world(uint64_t deadline_ns, char *err)
{
    int rc = HP_STOP_REFUSED;
    if (!signals_forced()) {
        rc = hp_ptrace_stop(deadline_ns, err);
        if (rc != HP_STOP_REFUSED) {
            method = running = METHOD_PTRACE;
            why_not_ptrace[0] = 0;
            return rc == HP_STOP_OK ? 0 : -1;
        }
        hp_fmt_str(why_not_ptrace, why_not_ptrace + HP_ERRLEN, err);
    } else {
        hp_fmt_str(why_not_ptrace, why_not_ptrace + HP_ERRLEN, "HOTPATCH_STOPPER=signals");
    }
    method = running = METHOD_SIGNALS;
    return hp_signal_stop(deadline_ns, why_not_ptrace, err) == HP_STOP_OK ? 0 : -1;
}

HP_RAW void hp_release_world(void)
{
    if (running == METHOD_PTRACE)
        hp_ptrace_release();
    else
        hp_signal_release();
    hp_nstopped = 0;
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
    hp_ptrace_after_fork();
}
