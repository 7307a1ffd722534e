/*
 * Writing code while other threads run it.
 *
 * A write to code that a thread may be running is either one atomic store
 * of one instruction (unstopped.c) or goes through a stop (stop.c): every
 * other thread stopped, none of them inside the bytes being replaced --
 * neither its program counter nor the program counter saved in a signal
 * frame on its stack --, then the writes, a core sync, and the threads let
 * go.  There is no int3 protocol: a thread that blocks SIGTRAP and meets
 * an int3 kills the process, and any thread may block any signal at any
 * moment, so no write may rely on a signal reaching a thread.
 *
 * Code is written through /proc/self/mem, which forces the write through a
 * read-only mapping (copy-on-write for file mappings, as a debugger's
 * breakpoint does), so no page is ever writable and executable.  Where the
 * kernel refuses that, an mprotect window adds write permission and restores
 * the page's own protection before returning.
 */
#include "hotpatch_core.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <linux/membarrier.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

pthread_mutex_t hp_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hp_kept_fd mem_file = HP_KEPT_FD_NONE;
static int mem_fd = -1;            /* /proc/self/mem of *this* process, for this batch */
static int sync_core_ready = -1;   /* membarrier SYNC_CORE registered for this mm; -1: not asked */

/* Whether the environment variable `name` is `value`, read once (the
 * first time a process asks): getenv walks the whole environment, a
 * thousand instructions a call here, twice in each first redirect.  The
 * switches below are for tests and diagnosis, set when a process starts. */
static int env_is(const char *name, const char *value, int *known)
{
    if (*known < 0) {
        const char *now = getenv(name);
        *known = now && strcmp(now, value) == 0;
    }
    return *known;
}

/* HOTPATCH_CODE_WRITES=mprotect selects the mprotect window even where
 * /proc/self/mem would work: what kernels that refuse /proc/self/mem writes
 * (proc_mem.force_override=never) get anyway, so that it can be tested. */
static void open_mem_fd(void)
{
    static int by_window = -1;
    if (!env_is("HOTPATCH_CODE_WRITES", "mprotect", &by_window))   /* self fails once the main thread exited */
        mem_fd = hp_kept_fd_open(&mem_file, "/proc/thread-self/mem", O_RDWR);
}

/* Registered for membarrier's SYNC_CORE, once per mm, before the first
 * batch (whose sync of the cores uses it); a write that syncs nothing (an
 * original stub in fresh pool memory) does not wait for it.  Registered
 * already, the kernel says so by making a sync (a few us): ahead.c's
 * thread may be done in the kernel and not scheduled since, with busy
 * cores.  Where that thread is in the kernel registering, its
 * registration is waited for: a second one would wait for an RCU grace
 * period of its own (5-25 ms of a first patch here).  Not under hp_lock:
 * that thread takes it to map the pool. */
static void ready_core_syncs(void)
{
    if (__atomic_load_n(&sync_core_ready, __ATOMIC_ACQUIRE) >= 0)
        return;
    int ready = hp_sys(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) == 0;
    if (!ready)
        ready = hp_ahead_registration();
    if (ready < 0)
        ready = hp_sys(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                       0, 0) == 0;
    __atomic_store_n(&sync_core_ready, ready, __ATOMIC_RELEASE);
}

/* Ready for this batch's code writes: the descriptor, or (without one)
 * the protections the mprotect window gives back.  hp_lock held. */
static void ready_code_writes(void)
{
    open_mem_fd();
    if (mem_fd < 0)
        hp_read_mappings();
}

/* --- the mprotect window ------------------------------------------- */

/* The window gives each page back exactly the protection it had (a JIT's
 * rwx page stays rwx): the mappings are read before each batch that uses it. */
HP_RAW static int page_prot(uintptr_t page)
{
    const struct hp_mapping *m = hp_mapping_of(page);
    return m ? m->prot : PROT_READ | PROT_EXEC;
}

HP_RAW static int write_through_window(uintptr_t addr, const uint8_t *src, size_t len)
{
    for (size_t done = 0; done < len;) {
        uintptr_t at = addr + done, page = at & ~(uintptr_t)4095;
        size_t chunk = page + 4096 - at < len - done ? page + 4096 - at : len - done;
        int prot = page_prot(page);
        if (!(prot & PROT_WRITE) &&
            hp_sys(SYS_mprotect, page, 4096, prot | PROT_READ | PROT_WRITE) < 0)
            return -1;
        for (size_t i = 0; i < chunk; i++)
            ((volatile uint8_t *)at)[i] = src[done + i];
        if (!(prot & PROT_WRITE))
            hp_sys(SYS_mprotect, page, 4096, prot);
        done += chunk;
    }
    return 0;
}

/* --- raw writes ------------------------------------------------------ */

/* Write bytes into mapped code; raw system calls only. */
HP_RAW static int write_code(uintptr_t addr, const void *src, size_t len)
{
    if (mem_fd >= 0 && hp_sys(SYS_pwrite64, mem_fd, src, len, addr) == (long)len)
        return 0;
    return write_through_window(addr, src, len);
}

/* Make every thread's instruction stream see the writes (serialize cores). */
HP_RAW void hp_sync_cores(void)
{
    if (sync_core_ready > 0 &&
        hp_sys(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0) == 0)
        return;
    /* No membarrier (kernels before 4.16): an mprotect that removes a
     * permission shoots down the TLB of every CPU running this mm with an
     * IPI, and an interrupt return is serializing.  Kernels that flush by
     * broadcast instead (AMD's INVLPGB, 6.15 and later) interrupt no CPU:
     * there this is no sync, where membarrier was built out or filtered
     * (docs/notes.md, session 11). */
    static char *page;
    if (!page) {
        long p = hp_sys(SYS_mmap, 0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        page = p < 0 ? NULL : (char *)p;
    }
    if (page) {
        page[0] = 1;
        hp_sys(SYS_mprotect, page, 4096, PROT_READ);
        hp_sys(SYS_mprotect, page, 4096, PROT_READ | PROT_WRITE);
    }
}

int hp_write_code_locked(uintptr_t addr, const void *src, size_t len)
{
    ready_code_writes();
    return write_code(addr, src, len);
}

/* Write code that no thread can be executing (fresh pool memory). */
int hp_write_code(uintptr_t addr, const void *src, size_t len)
{
    pthread_mutex_lock(&hp_lock);
    int rc = hp_write_code_locked(addr, src, len);
    pthread_mutex_unlock(&hp_lock);
    return rc ? -errno : 0;
}

void hp_store_slot(uint64_t *slot, uint64_t value)
{
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);
}

int hp_code_writes_use_proc_mem(void)
{
    pthread_mutex_lock(&hp_lock);
    open_mem_fd();
    int yes = mem_fd >= 0;
    pthread_mutex_unlock(&hp_lock);
    return yes;
}

int hp_core_sync_ready(void)
{
    ready_core_syncs();
    return sync_core_ready;
}

/* --- a batch: one stop ------------------------------------------------ */

HP_RAW static int put_code(void *ctx, uintptr_t address, const uint8_t *bytes, size_t len)
{
    return write_code(address, bytes, len);
}

/* With every other thread stopped: write, by spans (check.c), and on a
 * failed write put back the ones already written. */
HP_RAW int hp_write_stopped(const struct hp_check *c, char *err)
{
    return hp_write_spans(c, put_code, 0, err);
}

static int by_address(const void *a, const void *b)
{
    uintptr_t x = ((const struct hp_write *)a)->address, y = ((const struct hp_write *)b)->address;
    return x < y ? -1 : x > y;
}

/* A batch is sorted by address, its writes 1 to 16 bytes long and not
 * overlapping.  0, or -1 with `err`. */
static int check_batch(struct hp_write *w, size_t n, char *err)
{
    for (size_t i = 0; i < n; i++)
        if (w[i].len < 1 || w[i].len > sizeof w[i].bytes) {
            char *at = hp_fmt_str(err, err + HP_ERRLEN, "bad write length at ");
            hp_fmt_hex(at, err + HP_ERRLEN, w[i].address);
            return -1;
        }
    qsort(w, n, sizeof *w, by_address);
    for (size_t i = 1; i < n; i++)
        if (w[i].address < w[i - 1].address + w[i - 1].len) {
            char *at = hp_fmt_str(err, err + HP_ERRLEN, "writes at ");
            at = hp_fmt_hex(at, err + HP_ERRLEN, w[i - 1].address);
            at = hp_fmt_str(at, err + HP_ERRLEN, " and ");
            at = hp_fmt_hex(at, err + HP_ERRLEN, w[i].address);
            hp_fmt_str(at, err + HP_ERRLEN, " overlap");
            return -1;
        }
    return 0;
}

/* Is the calling thread the process's only one (hp_only_thread), asked
 * outside a batch?  Then no write needs a stop, and a hot-patch point
 * would spare none: it would only add a jump to every call. */
int hp_alone(void)
{
    pthread_mutex_lock(&hp_lock);
    int alone = hp_only_thread();
    pthread_mutex_unlock(&hp_lock);
    return alone;
}

/* HOTPATCH_STOP=always sends every batch to the stop, even one that needs
 * none (in a process of one thread, too): to test the stop, and to rule out
 * the other ways when diagnosing. */
int hp_stop_forced(void)
{
    static int forced = -1;
    return env_is("HOTPATCH_STOP", "always", &forced);
}

/* A copy of the `n` (> 0) writes of `w` that puts back what they replace
 * (the old bytes as the new, the new as the old), or NULL where memory is
 * short.  free() it. */
static struct hp_write *undoing(const struct hp_write *w, size_t n)
{
    struct hp_write *back = malloc(n * sizeof *back);
    for (size_t i = 0; back && i < n; i++) {
        back[i] = w[i];
        memcpy(back[i].old, w[i].bytes, sizeof back[i].old);
        memcpy(back[i].bytes, w[i].old, sizeof back[i].bytes);
    }
    return back;
}

/* The first `n` writes of a batch were made without a stop, then the next
 * one's bytes had changed: put them back.  The bytes they put there may be
 * several instructions (an entry restored), so this takes a stop. */
static void undo_unstopped(const struct hp_write *w, size_t n, uint64_t deadline)
{
    if (!n)
        return;
    struct hp_write *back = undoing(w, n);
    char ignored[HP_ERRLEN];
    if (back)
        hp_stop_write(back, n, deadline, mem_fd >= 0, ignored);
    free(back);
}

/* What every batch holds while it writes: the cores' sync registered,
 * the core's lock, the code writes ready. */
static void enter_batch(void)
{
    ready_core_syncs();
    pthread_mutex_lock(&hp_lock);
    ready_code_writes();
}

/* Every signal of this thread blocked while a batch writes, `mask` the
 * one to give back: a handler running here could otherwise run code being
 * written, or leave the batch (a longjmp) with the lock held and a page
 * of code writable. */
static void block_signals(uint64_t *mask)
{
    uint64_t all = ~0ull;
    hp_sys(SYS_rt_sigprocmask, SIG_SETMASK, &all, mask, 8);
}

static void unblock_signals(uint64_t mask)
{
    hp_sys(SYS_rt_sigprocmask, SIG_SETMASK, &mask, 0, 8);
}

/* When a stop that starts now must be over. */
static uint64_t deadline_in(int timeout_ms)
{
    return hp_now_ns() + (uint64_t)timeout_ms * 1000000ull;
}

/* The writes of a batch, safely while other threads run: without a stop
 * where the process has no other thread, or where every write replaces
 * one instruction by one atomic store (unstopped.c), else one stop.  Then
 * a sync of the cores: no thread runs an old instruction once a batch
 * returns (no sync where the process was alone: no other thread could
 * run one, and the ptrace helper, which shares the memory, runs only the
 * core's own code).  `others`: the caller has just seen other threads,
 * and they are not counted again (the ways of a process with others are
 * right for one without).  0, or -1 with `err` filled and no byte
 * changed.  hp_lock held, the code writes ready. */
static int write_batch_locked(struct hp_write *w, size_t n, int others, int timeout_ms,
                              char *err)
{
    uint64_t mask;
    block_signals(&mask);
    int rc, forced = hp_stop_forced(), alone = !forced && !others && hp_only_thread();
    size_t failed = 0;
    /* Alone first: one fstat tells, and a plain write is cheaper than the
     * atomic stores' mprotect window. */
    int how = forced || alone ? HP_UNSTOPPED_NEEDS_STOP : hp_write_unstopped(w, n, &failed);
    if (how == HP_UNSTOPPED_DONE) {
        hp_stats.unstopped++;
        rc = 0;
    } else if (how == HP_UNSTOPPED_CHANGED) {
        undo_unstopped(w, failed, deadline_in(timeout_ms));
        hp_fmt_code_changed(err, w[failed].address, 0);
        rc = -1;
    } else if (alone) {
        hp_stats.alone++;
        rc = hp_write_checked(w, n, err);
    } else {
        rc = hp_stop_write(w, n, deadline_in(timeout_ms), mem_fd >= 0, err);
    }
    if (!alone)
        hp_sync_cores();
    unblock_signals(mask);
    return rc;
}

/* Write a batch of sites safely while other threads run (see
 * write_batch_locked).  Returns 0, or -1 with `err` filled and no byte
 * changed. */
int hp_write_batch(struct hp_write *w, size_t n, int timeout_ms, char *err)
{
    return hp_write_dead_then_batch(w, 0, w, n, 0, timeout_ms, err);
}

/* The dead bytes of `w` back as they were (a batch after them failed):
 * no entry leads to them. */
static void put_back_dead(const struct hp_write *w, size_t n)
{
    struct hp_write *back = undoing(w, n);
    char ignored[HP_ERRLEN];
    if (back)
        hp_write_checked(back, n, ignored);
    free(back);
}

/* Write `dead`, bytes that no thread runs yet (hot-patch points' padding,
 * which no entry leads to), then the batch `w` as hp_write_batch does, in
 * one hold of the lock, the descriptor checked once: a first redirect
 * (first.c) and a batch of sites (sites.py), through their hot-patch
 * points or not.  The dead bytes go by spans (check.c), the bytes between
 * two writes written back as they are (a thread running them meanwhile
 * finds the same bytes), then one sync of the cores: a thread that takes
 * an entry's short jump once the entry is written must find the point's
 * jmp rel32, not what its core fetched before.  `others`: as
 * write_batch_locked's (the first redirect has just counted the threads,
 * to know whether to look for a point).  0, or -1 with `err` filled and
 * no byte changed (some dead write's old bytes were not there, or the
 * batch failed and the dead bytes were put back). */
int hp_write_dead_then_batch(struct hp_write *dead, size_t ndead, struct hp_write *w, size_t n,
                             int others, int timeout_ms, char *err)
{
    err[0] = 0;
    if (ndead + n == 0)
        return 0;
    if (check_batch(dead, ndead, err) || check_batch(w, n, err))
        return -1;
    enter_batch();
    int rc = ndead ? hp_write_checked(dead, ndead, err) : 0;
    if (rc == 0 && ndead)
        /* A thread that takes an entry's short jump must find the point's
         * jmp rel32, not what its core fetched before. */
        hp_sync_cores();
    if (rc == 0 && n) {
        rc = write_batch_locked(w, n, others, timeout_ms, err);
        if (rc && ndead)
            put_back_dead(dead, ndead);
    }
    pthread_mutex_unlock(&hp_lock);
    return rc;
}

/* One try of a batch under the stack model: the writes, then the stores
 * (retargets that need no code write), made only if no thread -- this one
 * included -- has code of `ranges` on its stack.  `timeout_ms` bounds the
 * stop itself; the caller retries, letting the threads run in between.
 * 0: written (with `force`, `hit` names a stack that was overridden, if
 * any); 1 (HP_STOP_BUSY): `hit` says which thread, nothing written; -1:
 * failed, -2: the model cannot run here (ptrace refused), `err` says why. */
int hp_write_batch_stack(struct hp_write *w, size_t n, const struct hp_store *stores, size_t nstores,
                         const struct hp_code_range *ranges, size_t nranges, int force,
                         int timeout_ms, struct hp_stack_hit *hit, char *err)
{
    err[0] = 0;
    memset(hit, 0, sizeof *hit);
    hit->range = -1;
    if (check_batch(w, n, err))
        return -1;
    pthread_mutex_lock(&hp_unwind_lock);
    int rc = hp_unwind_prepare(err) ? HP_STOP_REFUSED : HP_STOP_OK;
    if (rc == HP_STOP_OK && hp_unwind_check_self(ranges, nranges, hit) && !force)
        rc = HP_STOP_BUSY;
    if (rc == HP_STOP_OK) {
        uint64_t mask;
        enter_batch();
        block_signals(&mask);
        rc = hp_stop_stack_round(w, n, stores, nstores, ranges, nranges, force,
                                 deadline_in(timeout_ms), hit, err);
        hp_sync_cores();
        unblock_signals(mask);
        pthread_mutex_unlock(&hp_lock);
    }
    pthread_mutex_unlock(&hp_unwind_lock);
    return rc;
}

/* --- fork ------------------------------------------------------------ */

/* A fork waits for a batch in progress (no child inherits a half-written
 * site).  The child has a new mm: the inherited /proc/self/mem descriptor
 * still names the parent's memory, membarrier registration is per mm, and
 * the parent's stopper is not the child's. */
static void before_fork(void)
{
    pthread_mutex_lock(&hp_unwind_lock);   /* taken before hp_lock, as a stack batch does */
    pthread_mutex_lock(&hp_lock);
}

static void after_fork_in_parent(void)
{
    pthread_mutex_unlock(&hp_lock);
    pthread_mutex_unlock(&hp_unwind_lock);
}

static void after_fork_in_child(void)
{
    hp_kept_fd_forget(&mem_file);
    mem_fd = -1;
    hp_unstopped_after_fork();
    hp_proc_after_fork();
    sync_core_ready = -1;
    hp_ahead_after_fork();
    hp_stop_after_fork();
    pthread_mutex_init(&hp_lock, NULL);
    pthread_mutex_init(&hp_unwind_lock, NULL);
}

__attribute__((constructor)) static void hp_init(void)
{
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}
