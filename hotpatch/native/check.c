/*
 * What a stopped thread may not be doing while code is written: running
 * inside the bytes being replaced, or running a signal handler that
 * interrupted those bytes (it would return into the middle of the new
 * instruction).
 *
 * The same code runs in the service (the signal stop) and in the ptrace
 * helper, which reads the service's memory with process_vm_readv: every
 * input is a parameter, nothing global.
 *
 * A signal frame (struct rt_sigframe) begins with the handler's return
 * address, the sa_restorer of its action (glibc's __restore_rt for every
 * handler installed through sigaction()).  The restorers are read from the
 * kernel's actions before each stop.  The kernel puts a handler's frame
 * just below the stack pointer it interrupted, so a running handler's frame
 * lies above the thread's sp by as much stack as the handler has used: the
 * walk reads HP_FRAME_WINDOW bytes up from sp for a word equal to a
 * restorer, at a frame's alignment, followed by a user code segment and an
 * fpstate pointer just above; from each frame found it walks on from the
 * stack pointer that frame interrupted (nested handlers, alternate stacks).
 * A thread stopped in the restorer itself (its handler has returned, the
 * rt_sigreturn is still to come) has popped the frame's first word: the
 * walk starts one word lower then.
 * Not covered: a handler that has used more than HP_FRAME_WINDOW of stack
 * when the stop comes, and a frame whose action has since been changed to
 * one with another restorer.
  */
#include "hotpatch_core.h"

#define SA_RESTORER_FLAG 0x04000000

/* The distinct sa_restorer of every handled signal now. */
int hp_collect_restorers(uintptr_t *out, int max)
{
    int n = 0;
    for (int sig = 1; sig <= 64; sig++) {
        struct { uintptr_t handler; unsigned long flags; uintptr_t restorer; uint64_t mask; } act;
        if (hp_sys(SYS_rt_sigaction, sig, 0, &act, 8) || act.handler <= 1 ||
            !(act.flags & SA_RESTORER_FLAG))
            continue;
        int known = 0;
        for (int i = 0; i < n; i++)
            known |= out[i] == act.restorer;
        if (!known && n < max)
            out[n++] = act.restorer;
    }
    return n;
}

/* Is `pc` strictly inside a write?  (At its first byte the thread runs the
 * new instruction whole.)  The writes are sorted by address. */
HP_RAW static int inside(const struct hp_check *c, uintptr_t pc)
{
    size_t lo = 0, hi = c->nwrites;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const struct hp_write *w = &c->writes[mid];
        if (pc <= w->address)
            hi = mid;
        else if (pc >= w->address + w->len)
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

HP_RAW static int is_restorer(const struct hp_check *c, uint64_t word)
{
    for (int i = 0; i < c->nrestorers; i++)
        if (word == c->restorers[i])
            return 1;
    return 0;
}

/* Layout after the frame's return address, x86-64: ucontext's uc_flags,
 * uc_link, uc_stack (24 bytes), then mcontext's 23 gregs and the fpstate
 * pointer. */
#define FRAME_GREGS 48
#define FRAME_RSP (FRAME_GREGS + 15 * 8)
#define FRAME_RIP (FRAME_GREGS + 16 * 8)
#define FRAME_CSGSFS (FRAME_GREGS + 18 * 8)
#define FRAME_FPSTATE (FRAME_GREGS + 23 * 8)
#define FRAME_SIZE (FRAME_FPSTATE + 8)
#define USER_CS 0x33

/* Is `at` a signal frame?  Its interrupted pc and sp if so. */
HP_RAW static int signal_frame(const struct hp_check *c, uintptr_t at, uintptr_t *pc, uintptr_t *sp)
{
    uint64_t f[FRAME_SIZE / 8];
    if (hp_read_own(c->pid, f, at, sizeof f) != (long)sizeof f)
        return 0;
    uint64_t fpstate = f[FRAME_FPSTATE / 8];
    if ((f[FRAME_CSGSFS / 8] & 0xffff) != USER_CS ||
        (fpstate && (fpstate <= at || fpstate > at + 65536)))
        return 0;
    *pc = f[FRAME_RIP / 8];
    *sp = f[FRAME_RSP / 8];
    return 1;
}

/* Walk up from `sp` for signal frames whose interrupted pc is inside a
 * write, and on from each frame's interrupted sp. */
HP_RAW static int frames_inside(const struct hp_check *c, uintptr_t sp, uintptr_t *found)
{
    uintptr_t todo[8] = { sp & ~(uintptr_t)7 };
    int ntodo = 1;
    size_t chunk = c->scratch_bytes & ~(size_t)7;
    for (int region = 0; region < ntodo; region++) {
        uintptr_t at = todo[region], end = at + HP_FRAME_WINDOW;
        while (at < end) {
            size_t want = end - at < chunk ? end - at : chunk;
            long got = hp_read_own(c->pid, c->scratch, at, want);
            if (got <= 0)
                break;      /* the end of the stack's mapping */
            for (long i = 0; i < got / 8; i++) {
                uintptr_t frame = at + (uintptr_t)i * 8, pc, frame_sp;
                /* sp + 8 is 16-byte aligned at a handler's entry */
                if ((frame & 15) != 8 || !is_restorer(c, c->scratch[i]) ||
                    !signal_frame(c, frame, &pc, &frame_sp))
                    continue;
                if (inside(c, pc)) {
                    *found = pc;
                    return 1;
                }
                if (ntodo < 8)
                    todo[ntodo++] = frame_sp & ~(uintptr_t)7;
            }
            at += (uintptr_t)got;
        }
    }
    return 0;
}

/* Bytes of a restorer a thread may be in before its rt_sigreturn (glibc's
 * __restore_rt is 9: mov $15, %rax; syscall). */
#define RESTORER_BYTES 16

/* Is `pc` in a restorer: a handler returned, its frame just below sp? */
HP_RAW static int in_restorer(const struct hp_check *c, uintptr_t pc)
{
    for (int i = 0; i < c->nrestorers; i++)
        if (pc - c->restorers[i] < RESTORER_BYTES)
            return 1;
    return 0;
}

/* May a thread stopped at (pc, sp) stay stopped while the writes are made?
 * 0 if so; else 1 and the pc that is inside. */
HP_RAW int hp_check_thread(const struct hp_check *c, uintptr_t pc, uintptr_t sp, uintptr_t *found)
{
    if (inside(c, pc)) {
        *found = pc;
        return 1;
    }
    if (!c->nrestorers)
        return 0;
    return frames_inside(c, in_restorer(c, pc) ? sp - 8 : sp, found);
}

/* --- spans ------------------------------------------------------------

 * Writes close together are read, checked and written as one span: with
 * every thread held, a batch of 1,000 adjacent entries was 1,000 reads and
 * 1,000 writes of /proc/PID/mem (about 3 ms of threads held); the bytes
 * between the writes are written back as they were.  A span holds at most
 * `max` bytes (the scratch buffer's). */
#define SPAN_GAP 64

HP_RAW static size_t span_end(const struct hp_write *w, size_t n, size_t i, size_t max)
{
    uintptr_t lo = w[i].address, hi = w[i].address + w[i].len;
    size_t j = i + 1;
    while (j < n && w[j].address - hi <= SPAN_GAP && w[j].address + w[j].len - lo <= max) {
        hi = w[j].address + w[j].len;
        j++;
    }
    return j;
}

/* Where a span's bytes go: the scratch buffer, or one write's own room
 * when there is none. */
HP_RAW static uint8_t *span_buffer(const struct hp_check *c, uint8_t *own, size_t *max)
{
    if (c->scratch && c->scratch_bytes >= 16) {
        *max = c->scratch_bytes;
        return (uint8_t *)c->scratch;
    }
    *max = 16;
    return own;
}

/* Why a write was refused: its code is gone, or not what was expected. */
HP_RAW void hp_fmt_code_changed(char *err, uintptr_t address, int unmapped)
{
    char *at = hp_fmt_str(err, err + HP_ERRLEN, "the code at ");
    at = hp_fmt_hex(at, err + HP_ERRLEN, address);
    hp_fmt_str(at, err + HP_ERRLEN, unmapped ? " is no longer mapped"
               : " is not what it was expected to be (changed by someone else?)");
}

/* The bytes at each write are what the caller expects: read without
 * faulting (the object may have been unmapped), compared byte by byte. */
HP_RAW int hp_check_old_bytes(const struct hp_check *c, char *err)
{
    const struct hp_write *w = c->writes;
    uint8_t own[16];
    size_t max;
    uint8_t *buf = span_buffer(c, own, &max);
    for (size_t i = 0; i < c->nwrites;) {
        size_t j = span_end(w, c->nwrites, i, max);
        uintptr_t lo = w[i].address;
        long got = hp_read_own(c->pid, buf, lo, w[j - 1].address + w[j - 1].len - lo);
        for (size_t k = i; k < j; k++) {
            size_t at = w[k].address - lo;
            int same = got >= (long)(at + w[k].len);
            for (uint32_t b = 0; same && b < w[k].len; b++)
                same = buf[at + b] == w[k].old[b];
            if (!same) {
                hp_fmt_code_changed(err, w[k].address, got < (long)(at + w[k].len));
                return -1;
            }
        }
        i = j;
    }
    return 0;
}

/* Write every span of the batch with `put` (0 on success): each span read,
 * the writes' `bytes` laid over it (their `old` when undoing), written
 * whole.  On a failure the spans already written get their old bytes back
 * and -1 is returned with `err`.  The threads are stopped, and the old
 * bytes were checked just before. */
HP_RAW static int put_spans(const struct hp_check *c, size_t upto, int undo, hp_span_writer put,
                            void *ctx, size_t *failed)
{
    const struct hp_write *w = c->writes;
    uint8_t own[16];
    size_t max;
    uint8_t *buf = span_buffer(c, own, &max);
    for (size_t i = 0; i < upto;) {
        size_t j = span_end(w, upto, i, max);
        uintptr_t lo = w[i].address;
        size_t len = w[j - 1].address + w[j - 1].len - lo;
        /* A span of one write is all its bytes: nothing around them to read. */
        if (j > i + 1 && hp_read_own(c->pid, buf, lo, len) != (long)len) {
            *failed = i;
            return -1;
        }
        for (size_t k = i; k < j; k++)
            hp_copy_bytes(buf + (w[k].address - lo), undo ? w[k].old : w[k].bytes, w[k].len);
        if (put(ctx, lo, buf, len)) {
            *failed = i;
            return -1;
        }
        i = j;
    }
    return 0;
}

HP_RAW int hp_write_spans(const struct hp_check *c, hp_span_writer put, void *ctx, char *err)
{
    size_t failed = 0;
    if (!put_spans(c, c->nwrites, 0, put, ctx, &failed))
        return 0;
    size_t ignored;
    put_spans(c, failed, 1, put, ctx, &ignored);     /* the spans before the one that failed */
    char *at = hp_fmt_str(err, err + HP_ERRLEN, "writing code at ");
    at = hp_fmt_hex(at, err + HP_ERRLEN, c->writes[failed].address);
    hp_fmt_str(at, err + HP_ERRLEN, " failed");
    return -1;
}
