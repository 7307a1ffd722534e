/*
 * The trampoline pool: executable memory within +-2 GiB of a target.
 *
 * A chunk is [code: r-x][data: rw-], both private mappings (so a fork()ed
 * child gets its own copy) named "hotpatch".  Code is written once, before it
 * is reachable, with hp_write_code(); slots in the data part are retargeted
 * with one atomic 8-byte store.  Nothing is ever freed: a thread may still run
 * an old trampoline, and the design pins patched code for the process's life.
 */
#include "hotpatch_core.h"

#include <stdio.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define CHUNK_CODE (1u << 20)
#define CHUNK_DATA (1u << 16)
#define CHUNK_SIZE (CHUNK_CODE + CHUNK_DATA)
#define MAX_CHUNKS 1024
#define REACH ((int64_t)0x7fffffff - (int64_t)CHUNK_SIZE)

struct hp_chunk {
    uintptr_t start;
    size_t code_used;
    size_t data_used;
};

static struct hp_chunk chunks[MAX_CHUNKS];
static int nchunks;
static int anon_names = -1;  /* PR_SET_VMA_ANON_NAME works: -1 unknown */
static const char *pool_backing = "unknown";

int hp_reaches(uintptr_t near, uintptr_t lo, uintptr_t hi)
{
    return (int64_t)(lo - near) > -REACH && (int64_t)(hi - near) < REACH;
}

static void *map_chunk_anon(uintptr_t at)
{
    void *p = mmap((void *)at, CHUNK_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    if (prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)p, CHUNK_SIZE,
              (unsigned long)"hotpatch")) {
        munmap(p, CHUNK_SIZE);
        return MAP_FAILED;   /* the kernel has no anonymous names */
    }
    mprotect(p, CHUNK_CODE, PROT_READ | PROT_EXEC);
    return p;
}

static void *map_chunk_memfd(uintptr_t at)
{
    int fd = memfd_create("hotpatch", MFD_CLOEXEC);
    if (fd < 0)
        return NULL;
    void *p = MAP_FAILED;
    if (ftruncate(fd, CHUNK_SIZE) == 0) {
        p = mmap((void *)at, CHUNK_CODE, PROT_READ | PROT_EXEC,
                 MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, 0);
        if (p != MAP_FAILED &&
            mmap((char *)p + CHUNK_CODE, CHUNK_DATA, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, CHUNK_CODE) == MAP_FAILED) {
            munmap(p, CHUNK_CODE);
            p = MAP_FAILED;
        }
    }
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

/* Map a chunk exactly at `at`, naming it where the kernel allows. */
static void *map_chunk(uintptr_t at)
{
    if (anon_names != 0) {
        void *p = map_chunk_anon(at);
        if (p != MAP_FAILED) {
            anon_names = 1;
            pool_backing = "anonymous (PR_SET_VMA_ANON_NAME)";
            return p;
        }
        anon_names = 0;
    }
    pool_backing = "memfd_create(\"hotpatch\")";
    return map_chunk_memfd(at);
}

#define TOP_OF_USER 0x7ffffffff000ul
#define GAP_ALIGN 0x10000ul

/* The chunk address inside the free gap [lo, hi) closest to `near`, or 0. */
static uintptr_t place_in_gap(uintptr_t near, uintptr_t lo, uintptr_t hi)
{
    if (hi < lo + CHUNK_SIZE + GAP_ALIGN)
        return 0;
    uintptr_t first = (lo + GAP_ALIGN - 1) & ~(GAP_ALIGN - 1);
    uintptr_t last = (hi - CHUNK_SIZE) & ~(GAP_ALIGN - 1);
    uintptr_t at = near & ~(GAP_ALIGN - 1);
    if (at < first)
        at = first;
    if (at > last)
        at = last;
    return hp_reaches(near, at, at + CHUNK_SIZE) ? at : 0;
}

/* The free address closest to `near` (from the mappings) where a whole
 * chunk fits within reach; 0 when there is none. */
static uintptr_t find_gap(uintptr_t near)
{
    if (hp_read_mappings())
        return 0;
    uintptr_t best = 0, best_dist = UINTPTR_MAX, prev_end = GAP_ALIGN;
    for (int i = 0; i <= hp_nmappings; i++) {
        uintptr_t lo = i < hp_nmappings ? hp_mappings[i].lo : TOP_OF_USER;
        if (lo > TOP_OF_USER)
            lo = TOP_OF_USER;
        uintptr_t at = lo > prev_end ? place_in_gap(near, prev_end, lo) : 0;
        uintptr_t dist = at > near ? at - near : near - at;
        if (at && dist < best_dist) {
            best = at;
            best_dist = dist;
        }
        if (lo >= TOP_OF_USER)
            break;
        if (hp_mappings[i].hi > prev_end)
            prev_end = hp_mappings[i].hi;
    }
    return best;
}

static struct hp_chunk *chunk_near(uintptr_t near, size_t code, size_t data)
{
    for (int i = 0; i < nchunks; i++) {
        struct hp_chunk *c = &chunks[i];
        if (hp_reaches(near, c->start, c->start + CHUNK_SIZE) &&
            c->code_used + code <= CHUNK_CODE && c->data_used + data <= CHUNK_DATA)
            return c;
    }
    if (nchunks == MAX_CHUNKS)
        return NULL;
    for (int attempt = 0; attempt < 8; attempt++) {
        uintptr_t at = find_gap(near);
        if (!at)
            return NULL;
        void *p = map_chunk(at);
        if (p) {
            struct hp_chunk *c = &chunks[nchunks++];
            c->start = (uintptr_t)p;
            c->code_used = 0;
            c->data_used = 0;
            return c;
        }
        /* another thread took the gap meanwhile: look again */
    }
    return NULL;
}

/* hp_alloc_code() with hp_lock already held. */
uintptr_t hp_alloc_code_locked(uintptr_t near, size_t size)
{
    size = (size + 15) & ~(size_t)15;
    struct hp_chunk *c = chunk_near(near, size, 0);
    if (!c)
        return 0;
    uintptr_t p = c->start + c->code_used;
    c->code_used += size;
    return p;
}

/* `size` bytes of executable pool memory, 16-byte aligned, all of it within
 * rel32 reach of `near`; 0 when none can be found. */
uintptr_t hp_alloc_code(uintptr_t near, size_t size)
{
    pthread_mutex_lock(&hp_lock);
    uintptr_t p = hp_alloc_code_locked(near, size);
    pthread_mutex_unlock(&hp_lock);
    return p;
}

/* One 8-byte writable slot within rel32 reach of `near` (for `jmp [rip+d]`). */
uint64_t *hp_alloc_slot(uintptr_t near)
{
    pthread_mutex_lock(&hp_lock);
    struct hp_chunk *c = chunk_near(near, 0, 8);
    uint64_t *p = NULL;
    if (c) {
        p = (uint64_t *)(c->start + CHUNK_CODE + c->data_used);
        c->data_used += 8;
    }
    pthread_mutex_unlock(&hp_lock);
    return p;
}

const char *hp_pool_backing(void)
{
    return pool_backing;
}
