/*
 * The loader hook: COMING and GOING from the dynamic linker (the kernel's
 * module notifiers).
 *
 * The dynamic linker calls _r_debug.r_brk (_dl_debug_state) on every load
 * and unload, with its lock held; at RT_CONSISTENT after a load the new
 * objects are mapped but neither relocated nor initialised.  hotpatch
 * redirects r_brk to hp_loader_brk(), which walks the link maps of every
 * namespace, diffs them with the last walk, and queues an event for each
 * object that appeared or disappeared and whose name (basename of l_name,
 * l_name itself, or DT_SONAME) Python asked for.  Names of such objects are
 * copied here, under the dynamic linker's lock: after a dlclose, l_name is
 * freed.
 *
 * Who handles the events (Python) depends on the loading thread:
 *  - it holds the GIL (an import, a ctypes.CDLL that keeps it): Python runs
 *    right here, in this thread, through the callback;
 *  - otherwise (a native thread, or a thread that released the GIL around
 *    dlopen): the loading thread wakes hotpatch's worker thread and waits
 *    for it at most `wait_ms`.  Not much longer: the worker needs the GIL,
 *    and the GIL's holder may itself be waiting for the lock this thread
 *    holds.  Once the wait is over the events are *abandoned*: the object's
 *    code may run from then on, and it may even be unloaded again.  So an
 *    event the worker has taken already (it is reading the object) keeps
 *    its loading thread -- and with it the object -- until it is handled,
 *    unless some thread waits for the dynamic linker's lock (which the GIL's
 *    holder may be doing); and the worker handles an event abandoned before
 *    it took it only with a reference on its object (dlopen RTLD_NOLOAD,
 *    loader.py).
 *
 * hp_loader_write_unreachable() is how Python writes into an object still
 * being loaded: under the queue lock, only while the loading thread still
 * waits for that event (so no thread can run the object's code yet), no
 * stop.  When the wait was abandoned it writes nothing and says so.
 *
 * Where r_brk cannot be patched, the fallback wrappers of dlopen, dlmopen
 * and dlclose run the same walk after the call returns (outside the lock,
 * after constructors: every event is then late).
 */
#include "hotpatch_core.h"

#include <dlfcn.h>
#include <link.h>
#include <errno.h>
#include <string.h>

#define MAX_MAPS 4096
#define MAX_TRACKED 256
#define QUEUE 256
#define WANTED_BYTES 65536

enum { EV_COMING = 1, EV_GOING = 2 };

struct map_entry {
    const struct link_map *map;
    uintptr_t addr;
    int tracked;            /* index in `tracked_names`, -1 when not asked for */
};

static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_more = PTHREAD_COND_INITIALIZER;   /* an event was queued */
static pthread_cond_t q_done = PTHREAD_COND_INITIALIZER;   /* events were handled */

/* The last walk (`prev`, `nprev` entries) and the one being made: two
 * buffers swapped after each diff. */
static struct map_entry lists[2][MAX_MAPS];
static struct map_entry *prev = lists[0], *cur = lists[1];
static int nprev;
static char tracked_names[MAX_TRACKED][HP_NAME_MAX];
static int tracked_used[MAX_TRACKED];
static int ntracked;                       /* entries of tracked_used set */

static char wanted[WANTED_BYTES];          /* NUL-separated names */
static size_t wanted_len;

static struct hp_loader_event queue[QUEUE];
static uint64_t q_head, q_tail;            /* seq of the last event taken / queued (from 1) */
static uint64_t done_seq, abandoned_seq;   /* handled up to; given up waiting up to */
static uint64_t n_calls, n_events, n_abandoned, n_dropped, n_held_given_up;
static int resync;                         /* events were dropped since the last take */

/* Names were asked for since the last diff: the objects of the current
 * walk they name are tracked at the next one (q_lock). */
static int retrack;

static int started, wait_ms = 1000;
/* An event the worker has taken holds its loading thread this long at
 * most, checking every HELD_CHECK_MS that no thread waits for the dynamic
 * linker's lock. */
#define HELD_MAX_MS 60000
#define HELD_CHECK_MS 50
/* The dynamic linker's writable data: its locks are there. */
static uintptr_t linker_data_lo, linker_data_hi;
/* The worker waits, mid-event, for the dynamic linker (loader.py's step
 * aside): an event it holds keeps nobody then. */
static int worker_aside;
static void (*py_callback)(void);
static void (*brk_original)(void);
static void *(*real_dlopen)(const char *, int);
static void *(*real_dlmopen)(Lmid_t, const char *, int);
static int (*real_dlclose)(void *);
static __thread int in_python;

/* --- names ----------------------------------------------------------- */

static int is_wanted(const char *name)
{
    for (size_t at = 0; at < wanted_len; at += strlen(wanted + at) + 1)
        if (strcmp(wanted + at, name) == 0)
            return 1;
    return 0;
}

/* DT_SONAME from the object's dynamic section (mapped: it is loaded). */
static const char *soname_of(const struct link_map *m)
{
    const ElfW(Dyn) *d = m->l_ld;
    uintptr_t strtab = 0, soname = 0;
    int has_soname = 0;
    for (; d && d->d_tag != DT_NULL; d++) {
        if (d->d_tag == DT_STRTAB)
            strtab = d->d_un.d_ptr;
        else if (d->d_tag == DT_SONAME) {
            soname = d->d_un.d_val;
            has_soname = 1;
        }
    }
    if (!strtab || !has_soname)
        return NULL;
    /* glibc relocates d_ptr in place only where PT_DYNAMIC is writable. */
    if (strtab < m->l_addr)
        strtab += m->l_addr;
    return (const char *)(strtab + soname);
}

static int asked_for(const struct link_map *m)
{
    const char *name = m->l_name;
    if (!name || !*name || wanted_len == 0)
        return 0;
    const char *slash = strrchr(name, '/');
    if (is_wanted(name) || is_wanted(slash ? slash + 1 : name))
        return 1;
    const char *soname = soname_of(m);
    return soname && is_wanted(soname);
}

/* --- the walk and the diff ------------------------------------------ */

static int walk(struct map_entry *out)
{
    int n = 0;
    struct r_debug_extended *ns = (struct r_debug_extended *)&_r_debug;
    for (; ns; ns = ns->base.r_version >= 2 ? ns->r_next : NULL)
        for (const struct link_map *m = ns->base.r_map; m && n < MAX_MAPS; m = m->l_next) {
            out[n].map = m;
            out[n].addr = m->l_addr;
            out[n].tracked = -1;
            n++;
        }
    return n;
}

static int consistent(void)
{
    struct r_debug_extended *ns = (struct r_debug_extended *)&_r_debug;
    for (; ns; ns = ns->base.r_version >= 2 ? ns->r_next : NULL)
        if (ns->base.r_state != RT_CONSISTENT)
            return 0;
    return 1;
}

static void push(int kind, const struct map_entry *e, const char *name)
{
    if (q_tail - q_head >= QUEUE) {
        n_dropped++;    /* Python resynchronises from the loaded list (see loader.py) */
        resync = 1;
        return;
    }
    struct hp_loader_event *ev = &queue[q_tail % QUEUE];
    ev->kind = kind;
    ev->seq = ++q_tail;
    ev->base = e->addr;
    ev->map = (uintptr_t)e->map;
    hp_fmt_str(ev->name, ev->name + HP_NAME_MAX, name);
    n_events++;
}

static int same(const struct map_entry *a, const struct map_entry *b)
{
    return a->map == b->map && a->addr == b->addr;
}

static int new_tracked(const char *name)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (!tracked_used[i]) {
            tracked_used[i] = 1;
            ntracked++;
            hp_fmt_str(tracked_names[i], tracked_names[i] + HP_NAME_MAX, name);
            return i;
        }
    return -1;
}

/* GOING for the tracked objects among prev[lo..hi): they were unloaded. */
static void went(int lo, int hi)
{
    for (int i = lo; i < hi; i++)
        if (prev[i].tracked >= 0) {
            push(EV_GOING, &prev[i], tracked_names[prev[i].tracked]);
            tracked_used[prev[i].tracked] = 0;
            ntracked--;
        }
}

/* A survivor of the last walk, named by names asked for since: tracked
 * from now on.  Only an object of the current walk is looked at, in the
 * dynamic linker's hook: one of the last walk may be unmapped by now. */
static void track_if_asked(struct map_entry *e)
{
    if (retrack && e->tracked < 0 && asked_for(e->map))
        e->tracked = new_tracked(e->map->l_name);
}

/* track_if_asked() for every object of the last walk, which must all be
 * mapped still (see its callers). */
static void track_asked_in_last_walk(void)
{
    for (int i = 0; i < nprev; i++)
        track_if_asked(&prev[i]);
    retrack = 0;
}

/* Walk the link maps and diff them with the last walk in the same pass;
 * queue GOING then COMING events.  Returns the seq of the last event
 * queued, 0 if none.  q_lock held.
 *
 * The dynamic linker appends a new object at the end of its namespace's
 * list and unlinks an unloaded one without reordering the others, so the
 * survivors appear in both walks in the same order: each entry is
 * normally the next one of the last walk, and only an entry that is not
 * costs a scan of the rest of it.  This runs twice per dlopen and per
 * dlclose in every process with a patch waiting for an object, so it is
 * kept to one pass with no copy (benchmarks/loader.py). */
static uint64_t diff(void)
{
    static int fresh[MAX_MAPS];
    int nfresh = 0, i = 0, n = 0;
    uint64_t before = q_tail;
    struct r_debug_extended *ns = (struct r_debug_extended *)&_r_debug;
    for (; ns; ns = ns->base.r_version >= 2 ? ns->r_next : NULL)
        for (const struct link_map *m = ns->base.r_map; m && n < MAX_MAPS; m = m->l_next, n++) {
            struct map_entry *e = &cur[n];
            e->map = m;
            e->addr = m->l_addr;
            e->tracked = -1;
            if (i < nprev && same(&prev[i], e)) {
                e->tracked = prev[i++].tracked;
                track_if_asked(e);
                continue;
            }
            int k = i + 1;
            while (k < nprev && !same(&prev[k], e))
                k++;
            if (k >= nprev) {
                fresh[nfresh++] = n;
                continue;
            }
            went(i, k);
            e->tracked = prev[k].tracked;
            track_if_asked(e);
            i = k + 1;
        }
    went(i, nprev);
    retrack = 0;
    for (int f = 0; f < nfresh; f++) {
        struct map_entry *e = &cur[fresh[f]];
        if (asked_for(e->map)) {
            e->tracked = new_tracked(e->map->l_name);
            push(EV_COMING, e, e->map->l_name);
        }
    }
    struct map_entry *swap = prev;
    prev = cur;
    cur = swap;
    nprev = n;
    return q_tail != before ? q_tail : 0;
}

/* --- delivery ----------------------------------------------------------- */

extern int PyGILState_Check(void);

static void abandon(uint64_t last)
{
    if (done_seq < last && abandoned_seq < last) {
        abandoned_seq = last;
        n_abandoned++;
    }
}

/* `ms` from now on the clock pthread_cond_timedwait uses by default. */
static struct timespec deadline_in(int ms)
{
    struct timespec at;
    clock_gettime(CLOCK_REALTIME, &at);
    at.tv_sec += ms / 1000;
    at.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (at.tv_nsec >= 1000000000L) {
        at.tv_sec++;
        at.tv_nsec -= 1000000000L;
    }
    return at;
}

/* Threads inside the dynamic linker's lock that run, or wait for,
 * hotpatch's Python right now.  Python threads about to call the dynamic
 * linker with the GIL held read it and wait with the GIL released while it
 * is non-zero (loader.py), so that the GIL this thread needs back is never
 * held by a thread waiting for the lock this thread holds. */
int hp_loader_busy;

/* Whether the worker is handling an event now (taken, not done): it may be
 * reading the object, which must stay mapped.  q_lock held. */
static int worker_holds_one(void)
{
    return q_head > done_seq && !worker_aside;
}

/* Whether another thread is blocked on one of the dynamic linker's locks
 * (a futex in its data).  This thread holds one, so the GIL's holder may
 * be that thread, and then the worker could wait for the GIL for ever. */
static int someone_waits_for_the_linker(void)
{
    int tids[1024], self = hp_gettid();
    int n = hp_list_threads(tids, 1024);
    if (!linker_data_hi || n == 1024)
        return 1;       /* cannot tell: assume so */
    for (int i = 0; i < n; i++)
        if (tids[i] != self && hp_thread_waits_on(tids[i], linker_data_lo, linker_data_hi))
            return 1;
    return 0;
}

static int passed(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return now.tv_sec > t->tv_sec || (now.tv_sec == t->tv_sec && now.tv_nsec >= t->tv_nsec);
}

/* Wait for the events up to `last` to be done: `ms` at most, and after
 * that as long as the worker holds one of them (it may be reading the
 * object, which stays mapped only while this thread waits), unless someone
 * waits for the dynamic linker, up to HELD_MAX_MS.  q_lock held. */
static void wait_for_worker(uint64_t last, int ms)
{
    struct timespec deadline = deadline_in(ms), held_max = deadline_in(HELD_MAX_MS);
    while (done_seq < last) {
        if (!worker_holds_one()) {
            if (pthread_cond_timedwait(&q_done, &q_lock, &deadline) == ETIMEDOUT && !worker_holds_one())
                return;
        } else {
            struct timespec check = deadline_in(HELD_CHECK_MS);
            if (pthread_cond_timedwait(&q_done, &q_lock, &check) == ETIMEDOUT && worker_holds_one() &&
                passed(&deadline) && (passed(&held_max) || someone_waits_for_the_linker())) {
                n_held_given_up++;
                return;
            }
        }
    }
}

/* Have the events up to `last` handled: here when this thread holds the
 * GIL, else by the worker, waited for at most wait_ms -- longer while the
 * worker holds one of them (see wait_for_worker). */
static void deliver(uint64_t last)
{
    __atomic_add_fetch(&hp_loader_busy, 1, __ATOMIC_SEQ_CST);
    if (!in_python && py_callback && PyGILState_Check()) {
        in_python = 1;
        py_callback();
        in_python = 0;
        pthread_mutex_lock(&q_lock);
        abandon(last);
        pthread_mutex_unlock(&q_lock);
        __atomic_sub_fetch(&hp_loader_busy, 1, __ATOMIC_SEQ_CST);
        return;
    }
    pthread_mutex_lock(&q_lock);
    if (!in_python && py_callback) {
        pthread_cond_broadcast(&q_more);
        wait_for_worker(last, wait_ms);
    } else {
        pthread_cond_broadcast(&q_more);   /* nested in our own handler, or not started */
    }
    abandon(last);
    pthread_mutex_unlock(&q_lock);
    __atomic_sub_fetch(&hp_loader_busy, 1, __ATOMIC_SEQ_CST);
}

/* `late`: the objects' code may run already (the fallback wrappers). */
/* Set when the dynamic linker announced an unload (RT_DELETE) since the
 * last walk: objects may have been unlinked, the last walk's tail with
 * them.  Only r_brk calls touch it, and the dynamic linker's lock
 * serialises those. */
static int unloading;
/* Set when it announced a load (RT_ADD) since the last walk. */
static int loading;

/* Objects appended after the last walk's tail: what a dlopen in the base
 * namespace adds.  Valid only when nothing was unloaded since (the tail is
 * then still linked).  q_lock held. */
static uint64_t appended(void)
{
    uint64_t before = q_tail;
    for (const struct link_map *m = prev[nprev - 1].map->l_next; m && nprev < MAX_MAPS; m = m->l_next) {
        struct map_entry *e = &prev[nprev++];
        e->map = m;
        e->addr = m->l_addr;
        e->tracked = -1;
        if (asked_for(m)) {
            e->tracked = new_tracked(m->l_name);
            push(EV_COMING, e, m->l_name);
        }
    }
    return q_tail != before ? q_tail : 0;
}

/* What changed since the last walk, as events.  The full diff walks and
 * compares every object; the common cases take less (this runs twice per
 * dlopen and per dlclose, in every process with a patch waiting for an
 * object).  With one namespace and no object of interest loaded:
 *  - only a load announced (RT_ADD) since the last walk: objects were only
 *    appended after the last tail;
 *  - only an unload announced (RT_DELETE): objects nobody asked for were
 *    only removed, so the list is taken again with no events.
 * The fallback wrappers (`late`) see neither announcement: they always
 * diff.  q_lock held. */
static uint64_t changes(int late)
{
    struct r_debug_extended *base = (struct r_debug_extended *)&_r_debug;
    int simple = base->base.r_version < 2 || base->r_next == NULL;
    simple = simple && ntracked == 0 && nprev > 0 && !late && !retrack;
    uint64_t last = 0;
    if (simple && !unloading)
        last = appended();
    else if (simple && !loading)
        nprev = walk(prev);
    else
        last = diff();
    unloading = loading = 0;
    return last;
}

static void rescan(int late)
{
    pthread_mutex_lock(&q_lock);
    n_calls++;
    uint64_t last = started ? changes(late) : 0;
    if (late && last)
        abandon(last);
    pthread_mutex_unlock(&q_lock);
    if (last)
        deliver(last);
}

/* At a load's or an unload's announcement: the last walk is the list as
 * it is (every change since was announced first, under the linker's lock,
 * which is held now), so its objects are all mapped, and those the names
 * asked for since name are tracked now -- an object unloaded by this very
 * operation is still mapped, and its GOING is reported at its end. */
static void track_asked_before_change(void)
{
    pthread_mutex_lock(&q_lock);
    if (retrack && started)
        track_asked_in_last_walk();
    pthread_mutex_unlock(&q_lock);
}

/* What r_brk is redirected to.  The dynamic linker's lock is held. */
void hp_loader_brk(void)
{
    int saved = errno;
    if (_r_debug.r_state == RT_DELETE) {
        track_asked_before_change();
        unloading = 1;
    } else if (_r_debug.r_state == RT_ADD) {
        track_asked_before_change();
        loading = 1;
    } else if (consistent())
        rescan(0);
    errno = saved;
    if (brk_original)
        brk_original();
}

/* The fallback: dlopen / dlmopen / dlclose interposed, the walk after. */
static void *wrap_dlopen(const char *file, int mode)
{
    void *handle = real_dlopen(file, mode);
    int saved = errno;
    rescan(1);
    errno = saved;
    return handle;
}

static void *wrap_dlmopen(Lmid_t lmid, const char *file, int mode)
{
    void *handle = real_dlmopen(lmid, file, mode);
    int saved = errno;
    rescan(1);
    errno = saved;
    return handle;
}

static int wrap_dlclose(void *handle)
{
    int rc = real_dlclose(handle);
    int saved = errno;
    rescan(1);
    errno = saved;
    return rc;
}

/* --- the Python side's calls ----------------------------------------- */

/* Where r_brk points: the function to redirect. */
uintptr_t hp_loader_brk_site(void)
{
    return _r_debug.r_brk;
}

/* 0: the r_brk hook; 1, 2, 3: the dlopen, dlmopen, dlclose wrappers. */
uintptr_t hp_loader_entry(int which)
{
    switch (which) {
    case 0: return (uintptr_t)hp_loader_brk;
    case 1: return (uintptr_t)wrap_dlopen;
    case 2: return (uintptr_t)wrap_dlmopen;
    case 3: return (uintptr_t)wrap_dlclose;
    }
    return 0;
}

/* The address that runs the original of entry `which` (see above). */
void hp_loader_set_original(int which, uintptr_t original)
{
    switch (which) {
    case 0: brk_original = (void (*)(void))original; break;
    case 1: real_dlopen = (void *(*)(const char *, int))original; break;
    case 2: real_dlmopen = (void *(*)(Lmid_t, const char *, int))original; break;
    case 3: real_dlclose = (int (*)(void *))original; break;
    }
}

/* The names asked for, NUL-separated (`len` bytes in all).  Objects loaded
 * before, asked for now, are tracked from the next walk on (Python
 * handles those from the loaded list itself): the next diff, in the
 * dynamic linker's hook, where every object it walks is mapped.  Not
 * here: an object of the last walk may have been unloaded since, its link
 * map freed and its dynamic section unmapped (reading them crashed a
 * process whose threads loaded and unloaded while it registered). */
int hp_loader_set_wanted(const char *names, size_t len)
{
    if (len > sizeof wanted)
        return -1;
    pthread_mutex_lock(&q_lock);
    memcpy(wanted, names, len);
    wanted_len = len;
    retrack = 1;
    if (!brk_original)
        /* The fallback (dlopen/dlclose interposed) walks outside the
         * linker's lock anyway, after each call: track them now. */
        track_asked_in_last_walk();
    pthread_mutex_unlock(&q_lock);
    return 0;
}

/* dl_iterate_phdr callback: the dynamic linker's writable segment. */
static int find_linker_data(struct dl_phdr_info *info, size_t size, void *unused)
{
    (void)size, (void)unused;
    if (info->dlpi_addr != _r_debug.r_ldbase)
        return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type == PT_LOAD && (ph->p_flags & PF_W)) {
            uintptr_t lo = info->dlpi_addr + ph->p_vaddr, hi = lo + ph->p_memsz;
            linker_data_lo = linker_data_lo && linker_data_lo < lo ? linker_data_lo : lo;
            linker_data_hi = linker_data_hi > hi ? linker_data_hi : hi;
        }
    }
    return 1;
}

/* dl_iterate_phdr callback, run once: the first walk, under the dynamic
 * linker's write lock (held around the callbacks), which a dlclose takes to
 * unlink, unmap and free an object: the maps walked are all alive.  Taken
 * outside that lock, the walk could follow a map a concurrent dlclose just
 * freed.  Later starts (after a fork) leave the names to the hook, like
 * hp_loader_set_wanted: the last walk may then hold a map unlinked since,
 * whose RT_CONSISTENT is still to come. */
static int start_walk(struct dl_phdr_info *info, size_t size, void *unused)
{
    (void)info, (void)size, (void)unused;
    pthread_mutex_lock(&q_lock);
    retrack = 1;
    if (!started) {
        nprev = walk(prev);
        started = 1;
        track_asked_in_last_walk();
    }
    pthread_mutex_unlock(&q_lock);
    return 1;
}

/* Take the first walk (objects loaded now are no events) and start
 * delivering to `callback`, which runs with the GIL held by its thread. */
void hp_loader_start(void (*callback)(void), int wait)
{
    if (!linker_data_hi)
        dl_iterate_phdr(find_linker_data, NULL);
    pthread_mutex_lock(&q_lock);
    py_callback = callback;
    wait_ms = wait;
    pthread_mutex_unlock(&q_lock);
    dl_iterate_phdr(start_walk, NULL);
}

/* No more calls into Python (the interpreter is finalising). */
void hp_loader_stop(void)
{
    pthread_mutex_lock(&q_lock);
    py_callback = NULL;
    pthread_cond_broadcast(&q_more);
    pthread_mutex_unlock(&q_lock);
}

/* The worker: wait up to timeout_ms for an event; how many are queued. */
int hp_loader_wait(int timeout_ms)
{
    pthread_mutex_lock(&q_lock);
    if (q_head == q_tail) {
        struct timespec deadline = deadline_in(timeout_ms);
        pthread_cond_timedwait(&q_more, &q_lock, &deadline);
    }
    int n = (int)(q_tail - q_head);
    pthread_mutex_unlock(&q_lock);
    return n;
}

/* Take the oldest event; 0 when there is none. */
int hp_loader_take(struct hp_loader_event *out)
{
    pthread_mutex_lock(&q_lock);
    int got = q_head != q_tail;
    if (got)
        *out = queue[q_head++ % QUEUE];
    pthread_mutex_unlock(&q_lock);
    return got;
}

/* The worker steps aside (1) mid-event for a thread inside the dynamic
 * linker, or is back (0).  While aside it holds no loading thread: both
 * would wait for each other. */
void hp_loader_worker_aside(int aside)
{
    pthread_mutex_lock(&q_lock);
    worker_aside = aside;
    pthread_cond_broadcast(&q_done);
    pthread_mutex_unlock(&q_lock);
}

/* Whether the thread that loaded event `seq` went on without waiting for
 * it to be handled: the object's code may have run unpatched, and the
 * object may be unloaded at any time.  Asked right after the event was
 * taken, a "no" holds until it is done (see worker_holds_one). */
int hp_loader_went_on(uint64_t seq)
{
    pthread_mutex_lock(&q_lock);
    int went_on = seq <= abandoned_seq;
    pthread_mutex_unlock(&q_lock);
    return went_on;
}

/* Whether events were dropped on a full queue since the last call: Python
 * then compares the loaded list with what it tracks. */
int hp_loader_take_resync(void)
{
    pthread_mutex_lock(&q_lock);
    int was = resync;
    resync = 0;
    pthread_mutex_unlock(&q_lock);
    return was;
}

/* Events up to `seq` handled: the loading thread waiting for them goes on. */
void hp_loader_done(uint64_t seq)
{
    pthread_mutex_lock(&q_lock);
    if (seq > done_seq)
        done_seq = seq;
    pthread_cond_broadcast(&q_done);
    pthread_mutex_unlock(&q_lock);
}

/* Write into an object still being loaded by the event `seq`: no stop, as
 * no thread can run its code while its loading thread waits for us.
 * 0 written; 1 nothing written, the loading thread went on (use a stop);
 * -1 nothing written, `err` says why (the bytes are not what was expected). */
int hp_loader_write_unreachable(const struct hp_write *w, size_t n, uint64_t seq, char *err)
{
    err[0] = 0;
    pthread_mutex_lock(&q_lock);
    int rc = seq <= abandoned_seq || seq <= done_seq ? 1 : 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        uint8_t now[16];
        if (w[i].len > sizeof now || hp_read_memory(w[i].address, now, w[i].len) != (long)w[i].len ||
            memcmp(now, w[i].old, w[i].len) != 0) {
            char *at = hp_fmt_str(err, err + HP_ERRLEN, "the code at ");
            at = hp_fmt_hex(at, err + HP_ERRLEN, w[i].address);
            hp_fmt_str(at, err + HP_ERRLEN, " is not what it was expected to be");
            rc = -1;
        }
    }
    for (size_t i = 0; i < n && rc == 0; i++)
        if (hp_write_code(w[i].address, w[i].bytes, w[i].len)) {
            while (i--)    /* put back what was written: all or nothing */
                hp_write_code(w[i].address, w[i].old, w[i].len);
            hp_fmt_str(err, err + HP_ERRLEN, "writing code into an object being loaded failed");
            rc = -1;
        }
    pthread_mutex_unlock(&q_lock);
    return rc;
}

/* Counters for the tree: r_brk/wrapper calls, events, waits abandoned
 * (of those, waits for an event the worker held, given up because a thread
 * waited for the dynamic linker), events dropped on a full queue. */
void hp_loader_stats(uint64_t *calls, uint64_t *events, uint64_t *abandoned, uint64_t *held_given_up,
                     uint64_t *dropped)
{
    pthread_mutex_lock(&q_lock);
    *calls = n_calls;
    *events = n_events;
    *abandoned = n_abandoned;
    *held_given_up = n_held_given_up;
    *dropped = n_dropped;
    pthread_mutex_unlock(&q_lock);
}

/* A forked child has one thread and no worker yet: nothing waits. */
static void after_fork_in_child(void)
{
    pthread_mutex_init(&q_lock, NULL);
    pthread_cond_init(&q_more, NULL);
    pthread_cond_init(&q_done, NULL);
    in_python = 0;
    worker_aside = 0;
    if (q_head > done_seq)      /* the worker's event died with it */
        done_seq = q_head;
}

__attribute__((constructor)) static void hp_loader_init(void)
{
    pthread_atfork(NULL, NULL, after_fork_in_child);
}
