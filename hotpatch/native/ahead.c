/*
 * What the first code write of a process asks of the kernel, asked ahead.
 *
 * codewrite.c serializes the cores after a write with membarrier's
 * SYNC_CORE command, which a process must register for first.  The
 * registration of a process with more than one thread (every service; the
 * ptrace helper, which shares the memory, counts too) waits for an RCU grace
 * period: 5-25 ms on this machine, inside the first register(), where the
 * patching thread waits.  Registered here at the import of the core instead,
 * from a thread of its own that ends once it is done: nothing waits for it,
 * and codewrite.c's own registration, which still decides whether the
 * command is used, finds the process registered and returns at once.
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

static void *ask_ahead(void *unused)
{
    /* A stop may come while this thread is in the kernel: the signal stop
     * must be able to park it, whatever mask it inherited. */
    hp_unblock_park_signal();
    hp_alloc_code((uintptr_t)&malloc, 0);       /* the pool's first chunk; see above */
    hp_sys(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
    return NULL;
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
     * first write, as before. */
    pthread_create(&thread, &attr, ask_ahead, NULL);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    pthread_attr_destroy(&attr);
}
