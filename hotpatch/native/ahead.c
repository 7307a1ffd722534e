/*
 * What the first code write of a process asks of the kernel, asked ahead.
 *
 * codewrite.c serializes the cores after a write with membarrier's
 * SYNC_CORE command, which a process must register for first.  The
 * registration of a process with more than one thread (every service; the
 * ptrace helper, which shares the memory, counts too) waits for an RCU grace
 * period: 5-25 ms on this machine, inside the first register(), where the
 * patching thread waits.  Registered here at the import of the core instead,
 * from a thread of its own that ends once it is done: nothing waits for it
 * but a first batch that comes sooner (`from hotpatch import sites`, then a
 * redirect), which waits for the rest of it (codewrite.c's
 * ready_core_syncs): registering again would wait for a grace period of
 * its own.
 *
 * The same thread maps the first chunk of the pool (pool.c: the maps read
 * for a free gap, a memfd, two mappings; 0.6 ms of the first register())
 * near libc, where the dynamic linker maps shared objects: the loader
 * hook's site in ld.so and the functions of most first patches are within
 * its reach.  A patch of the main program, mapped elsewhere, still maps a
 * chunk of its own.  So a process that imports the core has a "hotpatch"
 * mapping even before it patches (1 MiB of code and 64 KiB of data
 * reserved, no memory used until written).
 */
#include "hotpatch_core.h"

#include <linux/membarrier.h>
#include <signal.h>
#include <stdlib.h>

/* Where the thread's registration stands: a first batch that comes while
 * it is in the kernel waits for it (hp_ahead_registration) rather than
 * registering again, which would wait for a grace period of its own.
 * AHEAD_ASKING only around the system call: a thread still mapping the
 * pool, or not scheduled yet (busy cores), is not waited for. */
enum { AHEAD_NONE, AHEAD_ASKING, AHEAD_ASKED };
static pthread_mutex_t ahead_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ahead_done = PTHREAD_COND_INITIALIZER;
static int ahead_state = AHEAD_NONE;
static int ahead_registered;

static void ahead_now(int state, int registered)
{
    pthread_mutex_lock(&ahead_lock);
    ahead_state = state;
    ahead_registered = registered;
    pthread_cond_broadcast(&ahead_done);
    pthread_mutex_unlock(&ahead_lock);
}

static void *ask_ahead(void *unused)
{
    /* A stop may come while this thread is in the kernel: the signal stop
     * must be able to park it, whatever mask it inherited. */
    hp_unblock_park_signal();
    hp_alloc_code((uintptr_t)&malloc, 0);       /* the pool's first chunk; see above */
    ahead_now(AHEAD_ASKING, 0);
    ahead_now(AHEAD_ASKED, hp_sys(SYS_membarrier,
                                  MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                                  0, 0) == 0);
    return NULL;
}

/* Whether this thread registered the process for membarrier's SYNC_CORE
 * (1) or the kernel refused it (0), waiting for it where it is in the
 * kernel asking; -1 where no thread has asked or asks (none started, not
 * there yet, or a forked child). */
int hp_ahead_registration(void)
{
    pthread_mutex_lock(&ahead_lock);
    while (ahead_state == AHEAD_ASKING)
        pthread_cond_wait(&ahead_done, &ahead_lock);
    int registered = ahead_state == AHEAD_ASKED ? ahead_registered : -1;
    pthread_mutex_unlock(&ahead_lock);
    return registered;
}

/* A forked child has no such thread, and a new mm to register. */
void hp_ahead_after_fork(void)
{
    pthread_mutex_init(&ahead_lock, NULL);
    pthread_cond_init(&ahead_done, NULL);
    ahead_state = AHEAD_NONE;
}

static void start_ahead(void);

/* Once per process: the import of the core asks as it starts (__init__.py,
 * before its 60 modules), and core.py again for an import that did not go
 * that way. */
void hp_first_write_ahead(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, start_ahead);
}

static void start_ahead(void)
{
    pthread_attr_t attr;
    pthread_t thread;
    sigset_t all, before;
    if (pthread_attr_init(&attr))
        return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 << 10);
    /* No signal handler of the service runs on it: every signal blocked
     * (the park signal aside, above). */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before);
    /* A thread that cannot be created leaves the registration to the
     * first batch, as before. */
    pthread_create(&thread, &attr, ask_ahead, NULL);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    pthread_attr_destroy(&attr);
}
