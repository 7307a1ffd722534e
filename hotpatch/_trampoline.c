/*
 * hotpatch C core: what must be native.
 *
 *   - loaded objects (dl_iterate_phdr), for the symbol layer;
 *   - executable memory within +-2 GiB of a target (the trampoline pool),
 *     shown as "hotpatch" in /proc/self/maps;
 *   - code writes that stay correct while other threads run the code:
 *     the int3 protocol for single-instruction sites and stop-the-world
 *     parking for multi-instruction prologues (ftrace's text_poke_bp);
 *   - the shared caller of the ftrace-style call path and its dispatch.
 *
 * Policy (what to patch, the bytes to write, the stacks of patches) lives in
 * Python.  Everything that can run while the world is stopped or inside a
 * signal handler uses only raw system calls and memory prepared beforehand.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/ucontext.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define HP_ERRLEN 256

/* ------------------------------------------------------------------ */
/* Loaded objects                                                      */
/* ------------------------------------------------------------------ */

/* A copy, made under the dynamic linker's lock: once dl_iterate_phdr()
 * returns, a dlclose() in another thread may free the linker's strings. */
#define HP_NAME_MAX 4096
#define HP_MAX_PHDRS 32
struct hp_loaded_object {
    char name[HP_NAME_MAX];  /* as the dynamic linker has it ("" = main program) */
    uintptr_t base;          /* l_addr: load bias */
    uintptr_t phdr_address;  /* where the program headers are mapped */
    int phnum;               /* headers copied below (at most HP_MAX_PHDRS) */
    ElfW(Phdr) phdr[HP_MAX_PHDRS];
};

struct loaded_list {
    struct hp_loaded_object *out;
    int capacity;
    int count;
};

static int collect_loaded(struct dl_phdr_info *info, size_t size, void *data)
{
    struct loaded_list *list = data;
    (void)size;
    if (list->count < list->capacity) {
        struct hp_loaded_object *o = &list->out[list->count];
        snprintf(o->name, sizeof o->name, "%s", info->dlpi_name ? info->dlpi_name : "");
        o->base = info->dlpi_addr;
        o->phdr_address = (uintptr_t)info->dlpi_phdr;
        o->phnum = info->dlpi_phnum < HP_MAX_PHDRS ? info->dlpi_phnum : HP_MAX_PHDRS;
        memcpy(o->phdr, info->dlpi_phdr, (size_t)o->phnum * sizeof o->phdr[0]);
    }
    list->count++;
    return 0;
}

/* Fill `out` with up to `capacity` loaded objects; return how many there are. */
int hp_loaded_objects(struct hp_loaded_object *out, int capacity)
{
    struct loaded_list list = { out, capacity, 0 };
    dl_iterate_phdr(collect_loaded, &list);
    return list.count;
}

static int read_generation(struct dl_phdr_info *info, size_t size, void *data)
{
    unsigned long long *counts = data;
    if (size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs) {
        counts[0] = info->dlpi_adds;
        counts[1] = info->dlpi_subs;
    }
    return 1;   /* the counts are the same in every entry: one is enough */
}

/* How many objects the dynamic linker has loaded and unloaded so far: the
 * list of loaded objects changed exactly when these did. */
void hp_loaded_generation(unsigned long long *adds, unsigned long long *subs)
{
    unsigned long long counts[2] = { 0, 0 };
    dl_iterate_phdr(read_generation, counts);
    *adds = counts[0];
    *subs = counts[1];
}

/* ------------------------------------------------------------------ */
/* Process-wide state, reset in a forked child                         */
/* ------------------------------------------------------------------ */

static pthread_mutex_t hp_lock = PTHREAD_MUTEX_INITIALIZER;
static int mem_fd = -1;            /* /proc/self/mem of *this* process */
static int sync_core_ready;        /* membarrier SYNC_CORE registered for this mm */

/* A child of fork() has a new mm: the inherited /proc/self/mem descriptor
 * still names the parent's memory, and membarrier registration is per mm. */
static void reset_in_child(void)
{
    if (mem_fd >= 0)
        close(mem_fd);
    mem_fd = -1;
    sync_core_ready = 0;
    pthread_mutex_init(&hp_lock, NULL);
}

static long sys_membarrier(int cmd)
{
    return syscall(__NR_membarrier, cmd, 0, 0);
}

/* HOTPATCH_CODE_WRITES=mprotect selects the mprotect window even where
 * /proc/self/mem would work: what kernels that refuse /proc/self/mem writes
 * (proc_mem.force_override=never) get anyway, so that it can be tested. */
static void open_mem_fd(void)
{
    const char *how = getenv("HOTPATCH_CODE_WRITES");
    if (mem_fd < 0 && !(how && strcmp(how, "mprotect") == 0))
        mem_fd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
    if (!sync_core_ready)
        sync_core_ready = sys_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) == 0;
}

/* ------------------------------------------------------------------ */
/* Raw code writes                                                     */
/* ------------------------------------------------------------------ */

/* Write bytes into mapped code without ever making a page writable and
 * executable: /proc/self/mem forces the write through a read-only mapping
 * (copy-on-write for file mappings, as a debugger's breakpoint does).  Where
 * that is not allowed, an mprotect window restores r-x before returning.
 * Async-signal-safe: only system calls. */
static int write_code(uintptr_t addr, const void *src, size_t len)
{
    if (mem_fd >= 0) {
        ssize_t n = pwrite(mem_fd, src, len, (off_t)addr);
        if (n == (ssize_t)len)
            return 0;
    }
    uintptr_t page = addr & ~(uintptr_t)4095;
    size_t span = ((addr + len + 4095) & ~(uintptr_t)4095) - page;
    if (mprotect((void *)page, span, PROT_READ | PROT_WRITE | PROT_EXEC))
        return -1;
    memcpy((void *)addr, src, len);
    mprotect((void *)page, span, PROT_READ | PROT_EXEC);
    return 0;
}

/* Make every thread's instruction stream see the writes (serialize cores). */
static void sync_cores(void)
{
    if (sync_core_ready && sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) == 0)
        return;
    /* No membarrier: an mprotect that removes a permission shoots down the
     * TLB of every CPU running this mm with an IPI, and an interrupt return
     * is serializing. */
    static char *page;
    if (!page)
        page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page != MAP_FAILED && page) {
        page[0] = 1;
        mprotect(page, 4096, PROT_READ);
        mprotect(page, 4096, PROT_READ | PROT_WRITE);
    }
}

/* Write code that no thread can be executing (fresh pool memory). */
int hp_write_code(uintptr_t addr, const void *src, size_t len)
{
    pthread_mutex_lock(&hp_lock);
    open_mem_fd();
    int rc = write_code(addr, src, len);
    pthread_mutex_unlock(&hp_lock);
    return rc ? -errno : 0;
}

void hp_store_slot(uint64_t *slot, uint64_t value)
{
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------ */
/* The trampoline pool: memory within +-2 GiB of a target              */
/* ------------------------------------------------------------------ */

/* A chunk is [code: r-x][data: rw-], both private mappings (so a fork()ed
 * child gets its own copy) named "hotpatch".  Code is written once, before it
 * is reachable, with write_code(); slots in the data part are retargeted with
 * one atomic 8-byte store.  Nothing is ever freed: a thread may still run an
 * old trampoline, and the design pins patched code for the process's life. */
#define CHUNK_CODE (1u << 20)
#define CHUNK_DATA (1u << 16)
#define CHUNK_SIZE (CHUNK_CODE + CHUNK_DATA)
#define MAX_CHUNKS 1024
#define REACH ((int64_t)0x7fffffff - (int64_t)CHUNK_SIZE)

struct hp_chunk {
    uintptr_t start;
    size_t code_used;
    size_t data_used;
    uintptr_t caller;        /* this chunk's copy of the shared caller */
};

static struct hp_chunk chunks[MAX_CHUNKS];
static int nchunks;
static int anon_names = -1;  /* PR_SET_VMA_ANON_NAME works: -1 unknown */
static const char *pool_backing = "unknown";

static int reaches(uintptr_t near, uintptr_t lo, uintptr_t hi)
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
    return reaches(near, at, at + CHUNK_SIZE) ? at : 0;
}

/* The free address closest to `near` (from /proc/self/maps) where a whole
 * chunk fits within reach; 0 when there is none. */
static uintptr_t find_gap(uintptr_t near)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps)
        return 0;
    uintptr_t best = 0, best_dist = UINTPTR_MAX, prev_end = GAP_ALIGN;
    char line[512];
    for (;;) {
        unsigned long lo = TOP_OF_USER, hi = TOP_OF_USER;
        int more = fgets(line, sizeof line, maps) != NULL;
        if (more && sscanf(line, "%lx-%lx", &lo, &hi) != 2)
            continue;
        if (lo > TOP_OF_USER)
            lo = TOP_OF_USER;
        uintptr_t at = lo > prev_end ? place_in_gap(near, prev_end, lo) : 0;
        uintptr_t dist = at > near ? at - near : near - at;
        if (at && dist < best_dist) {
            best = at;
            best_dist = dist;
        }
        if (!more || lo >= TOP_OF_USER)
            break;
        if (hi > prev_end)
            prev_end = hi;
    }
    fclose(maps);
    return best;
}

static struct hp_chunk *chunk_near(uintptr_t near, size_t code, size_t data)
{
    for (int i = 0; i < nchunks; i++) {
        struct hp_chunk *c = &chunks[i];
        if (reaches(near, c->start, c->start + CHUNK_SIZE) &&
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
            c->caller = 0;
            return c;
        }
        /* another thread took the gap meanwhile: look again */
    }
    return NULL;
}

/* `size` bytes of executable pool memory, 16-byte aligned, all of it within
 * rel32 reach of `near`; 0 when none can be found. */
uintptr_t hp_alloc_code(uintptr_t near, size_t size)
{
    size = (size + 15) & ~(size_t)15;
    pthread_mutex_lock(&hp_lock);
    struct hp_chunk *c = chunk_near(near, size, 0);
    uintptr_t p = 0;
    if (c) {
        p = c->start + c->code_used;
        c->code_used += size;
    }
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

/* ------------------------------------------------------------------ */
/* The ftrace-style call path                                          */
/* ------------------------------------------------------------------ */

/* A site in call form has `call hp_caller` at its address.  The caller saves
 * the argument registers, asks hp_call_dispatch() -- keyed by the return
 * address -- to run the site's observers and name the current target, drops
 * the return address and jumps there, so the target sees the original
 * arguments and returns straight to the function's caller. */
typedef void (*hp_observer_fn)(void *data, uintptr_t address, uint64_t *regs);

struct hp_observer {
    hp_observer_fn fn;
    void *data;
};

#define HP_MAX_OBSERVERS 8

/* The shared caller's fast path reads address, target and observing at
 * these offsets, and a table's mask and slots at 0 and 8: keep in step. */
struct hp_call_site {
    uintptr_t address;
    uintptr_t target;                                  /* atomic */
    uintptr_t observing;                               /* atomic: observers set */
    struct hp_observer *observers[HP_MAX_OBSERVERS];   /* atomic */
};

/* Open-addressing table, grown by publishing a copy: readers (any thread,
 * lock-free) see either table, both complete.  Old tables and site records
 * are never freed: a thread may still be reading them. */
struct call_table {
    size_t mask;
    struct hp_call_site *slots[];
};

static struct call_table *call_table;   /* atomic */
static size_t call_sites;

/* Cheap enough for the caller's fast path to compute in three instructions. */
static size_t hash_address(uintptr_t a)
{
    return (size_t)((a >> 4) ^ (a >> 20));
}

static struct hp_call_site *call_site_find(struct call_table *t, uintptr_t address)
{
    if (!t)
        return NULL;
    for (size_t i = hash_address(address);; i++) {
        struct hp_call_site *s = __atomic_load_n(&t->slots[i & t->mask], __ATOMIC_ACQUIRE);
        if (!s || s->address == address)
            return s;
    }
}

static void call_table_put(struct call_table *t, struct hp_call_site *s)
{
    size_t i = hash_address(s->address);
    while (t->slots[i & t->mask])
        i++;
    __atomic_store_n(&t->slots[i & t->mask], s, __ATOMIC_RELEASE);
}

static int call_table_grow(void)
{
    struct call_table *old = call_table;
    size_t cap = old ? (old->mask + 1) * 2 : 256;
    struct call_table *t = calloc(1, sizeof *t + cap * sizeof t->slots[0]);
    if (!t)
        return -1;
    t->mask = cap - 1;
    for (size_t i = 0; old && i <= old->mask; i++)
        if (old->slots[i])
            call_table_put(t, old->slots[i]);
    __atomic_store_n(&call_table, t, __ATOMIC_RELEASE);
    return 0;
}

/* The record of the call-form site at `address` (made on first use). */
struct hp_call_site *hp_call_site(uintptr_t address)
{
    pthread_mutex_lock(&hp_lock);
    struct hp_call_site *s = call_site_find(call_table, address);
    if (!s && (!call_table || (call_sites + 1) * 2 > call_table->mask + 1))
        if (call_table_grow())
            goto out;
    if (!s && (s = calloc(1, sizeof *s))) {
        s->address = address;
        call_table_put(call_table, s);
        call_sites++;
    }
out:
    pthread_mutex_unlock(&hp_lock);
    return s;
}

void hp_call_site_set_target(struct hp_call_site *s, uintptr_t target)
{
    __atomic_store_n(&s->target, target, __ATOMIC_RELEASE);
}

/* Add an observer; returns its index, or -1 when the site has no room. */
int hp_call_site_observe(struct hp_call_site *s, hp_observer_fn fn, void *data)
{
    struct hp_observer *o = malloc(sizeof *o);
    if (!o)
        return -1;
    o->fn = fn;
    o->data = data;
    pthread_mutex_lock(&hp_lock);
    int slot = -1;
    for (int i = 0; i < HP_MAX_OBSERVERS && slot < 0; i++)
        if (!s->observers[i]) {
            __atomic_store_n(&s->observers[i], o, __ATOMIC_RELEASE);
            __atomic_add_fetch(&s->observing, 1, __ATOMIC_SEQ_CST);
            slot = i;
        }
    pthread_mutex_unlock(&hp_lock);
    if (slot < 0)
        free(o);
    return slot;
}

/* Remove observer `slot`; its record is kept, a thread may be calling it. */
void hp_call_site_unobserve(struct hp_call_site *s, int slot)
{
    pthread_mutex_lock(&hp_lock);
    if (slot >= 0 && slot < HP_MAX_OBSERVERS && s->observers[slot]) {
        __atomic_store_n(&s->observers[slot], NULL, __ATOMIC_RELEASE);
        __atomic_sub_fetch(&s->observing, 1, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&hp_lock);
}

uintptr_t hp_call_dispatch(uintptr_t return_address, uint64_t *regs)
{
    uintptr_t address = return_address - 5;
    struct hp_call_site *s = call_site_find(__atomic_load_n(&call_table, __ATOMIC_ACQUIRE), address);
    /* A site is registered before its `call` is written and never removed,
     * so s is always found. */
    for (int i = 0; i < HP_MAX_OBSERVERS; i++) {
        struct hp_observer *o = __atomic_load_n(&s->observers[i], __ATOMIC_ACQUIRE);
        if (o)
            o->fn(o->data, address, regs);
    }
    return __atomic_load_n(&s->target, __ATOMIC_ACQUIRE);
}

_Static_assert(offsetof(struct hp_call_site, address) == 0, "fast path reads address at 0");
_Static_assert(offsetof(struct hp_call_site, target) == 8, "fast path reads target at 8");
_Static_assert(offsetof(struct hp_call_site, observing) == 16, "fast path reads observing at 16");
_Static_assert(offsetof(struct call_table, mask) == 0 && offsetof(struct call_table, slots) == 8,
               "fast path reads the table's mask at 0, slots at 8");

/* The shared caller, copied into each chunk (it must be within rel32 reach
 * of the sites).  It starts with two 8-byte words, the address of
 * hp_call_dispatch and the address of `call_table`, and reaches them
 * RIP-relatively, so the copy is position independent.
 * Stack on entry: [rsp] = site address + 5, rsp = 0 mod 16.
 *
 * Fast path: look the site up in the table (hash_address() in three
 * instructions, linear probing as call_site_find()); with no observer, drop
 * the return address and jump to the target, having touched only rax, rcx,
 * rdx (restored) and r11 (free at a call).  Otherwise the full path saves the
 * argument registers and lets hp_call_dispatch() run the observers, which
 * get the saved integer registers: rdi rsi rdx rcx r8 r9 (the arguments),
 * r10, rax. */
extern const unsigned char hp_caller_template[], hp_caller_template_end[];
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl hp_caller_template\n"
    ".hidden hp_caller_template\n"
    "hp_caller_template:\n"
    "  .quad 0\n"                     /* hp_call_dispatch */
    "  .quad 0\n"                     /* &call_table */
    "  push %rax\n push %rcx\n push %rdx\n"
    "  mov 24(%rsp), %rax\n"
    "  sub $5, %rax\n"                 /* the site's address */
    "  mov hp_caller_template+8(%rip), %rdx\n"
    "  mov (%rdx), %rdx\n"             /* the table */
    "  mov %rax, %rcx\n shr $4, %rcx\n"
    "  mov %rax, %r11\n shr $20, %r11\n"
    "  xor %r11, %rcx\n"
    "1:\n"
    "  and (%rdx), %rcx\n"
    "  mov 8(%rdx,%rcx,8), %r11\n"
    "  test %r11, %r11\n"
    "  jz 2f\n"
    "  cmp %rax, (%r11)\n"
    "  je 3f\n"
    "  inc %rcx\n"
    "  jmp 1b\n"
    "3:\n"
    "  cmpq $0, 16(%r11)\n"
    "  jne 2f\n"
    "  mov 8(%r11), %r11\n"
    "  pop %rdx\n pop %rcx\n pop %rax\n"
    "  lea 8(%rsp), %rsp\n"
    "  jmp *%r11\n"
    "2:\n"
    "  pop %rdx\n pop %rcx\n pop %rax\n"
    "  push %rbp\n"
    "  mov %rsp, %rbp\n"
    "  push %rax\n push %r10\n push %r9\n push %r8\n"
    "  push %rcx\n push %rdx\n push %rsi\n push %rdi\n"
    "  sub $136, %rsp\n"
    "  movdqu %xmm0, 0(%rsp)\n  movdqu %xmm1, 16(%rsp)\n"
    "  movdqu %xmm2, 32(%rsp)\n movdqu %xmm3, 48(%rsp)\n"
    "  movdqu %xmm4, 64(%rsp)\n movdqu %xmm5, 80(%rsp)\n"
    "  movdqu %xmm6, 96(%rsp)\n movdqu %xmm7, 112(%rsp)\n"
    "  mov 8(%rbp), %rdi\n"
    "  lea 136(%rsp), %rsi\n"
    "  call *hp_caller_template(%rip)\n"
    "  mov %rax, %r11\n"
    "  movdqu 0(%rsp), %xmm0\n  movdqu 16(%rsp), %xmm1\n"
    "  movdqu 32(%rsp), %xmm2\n movdqu 48(%rsp), %xmm3\n"
    "  movdqu 64(%rsp), %xmm4\n movdqu 80(%rsp), %xmm5\n"
    "  movdqu 96(%rsp), %xmm6\n movdqu 112(%rsp), %xmm7\n"
    "  add $136, %rsp\n"
    "  pop %rdi\n pop %rsi\n pop %rdx\n pop %rcx\n"
    "  pop %r8\n pop %r9\n pop %r10\n pop %rax\n"
    "  pop %rbp\n"
    "  lea 8(%rsp), %rsp\n"
    "  jmp *%r11\n"
    ".globl hp_caller_template_end\n"
    ".hidden hp_caller_template_end\n"
    "hp_caller_template_end:\n");

/* The entry of the shared caller within reach of `near`; 0 if none. */
uintptr_t hp_caller_near(uintptr_t near)
{
    size_t len = (size_t)(hp_caller_template_end - hp_caller_template);
    size_t size = (len + 15) & ~(size_t)15;
    uintptr_t entry = 0;
    pthread_mutex_lock(&hp_lock);
    for (int i = 0; i < nchunks && !entry; i++)
        if (chunks[i].caller && reaches(near, chunks[i].start, chunks[i].start + CHUNK_SIZE))
            entry = chunks[i].caller;
    struct hp_chunk *c = entry ? NULL : chunk_near(near, size, 0);
    unsigned char copy[512];
    if (c && len <= sizeof copy) {
        uintptr_t at = c->start + c->code_used;
        uintptr_t words[2] = { (uintptr_t)hp_call_dispatch, (uintptr_t)&call_table };
        memcpy(copy, hp_caller_template, len);
        memcpy(copy, words, sizeof words);
        open_mem_fd();
        if (write_code(at, copy, len) == 0) {
            c->code_used += size;
            c->caller = entry = at + sizeof words;
        }
    }
    pthread_mutex_unlock(&hp_lock);
    return entry;
}

/* ------------------------------------------------------------------ */
/* Safe code writes                                                    */
/* ------------------------------------------------------------------ */

/* One code write of a batch: `old` is what must be at [address, address+len)
 * now (checked before anything is written), `bytes` what goes there.
 * `single` says that the old bytes are exactly one instruction: no thread
 * can be executing inside them, so the int3 protocol suffices.  A thread
 * that hits the int3 meanwhile continues at `resume` -- after pushing
 * `push_return` when that is non-zero (emulating a call) -- which is what
 * the new bytes do. */
struct hp_write {
    uintptr_t address;
    uint8_t old[16];
    uint8_t bytes[16];
    uint32_t len;
    uint32_t single;
    uintptr_t resume;
    uintptr_t push_return;
};

/* --- int3 protocol ------------------------------------------------- */

static struct hp_write *inflight;      /* atomic: the batch being written */
static size_t inflight_count;
static int traps_active;               /* atomic: SIGTRAP handlers running */
static struct sigaction previous_trap;

static const struct hp_write *inflight_find(uintptr_t at)
{
    struct hp_write *w = __atomic_load_n(&inflight, __ATOMIC_SEQ_CST);
    if (!w)
        return NULL;
    size_t lo = 0, hi = __atomic_load_n(&inflight_count, __ATOMIC_ACQUIRE);
    while (lo < hi) {   /* the batch is sorted by address */
        size_t mid = (lo + hi) / 2;
        if (w[mid].address == at)
            return &w[mid];
        if (w[mid].address < at)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* Hand a signal to the action that was installed before ours.  For the
 * default action, reinstate it and raise: the signal is blocked while this
 * handler runs, so it is delivered -- and kills, as it would have without
 * us -- as soon as the handler returns.  (A forced SIGTRAP is never
 * ignored, so SIG_IGN is treated the same.) */
static void chain_signal(const struct sigaction *previous, int sig, siginfo_t *info, void *context)
{
    if (previous->sa_flags & SA_SIGINFO) {
        previous->sa_sigaction(sig, info, context);
    } else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN) {
        previous->sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

static void on_sigtrap(int sig, siginfo_t *info, void *context)
{
    ucontext_t *uc = context;
    int saved_errno = errno;
    greg_t *regs = uc->uc_mcontext.gregs;
    uintptr_t at = (uintptr_t)regs[REG_RIP] - 1;
    int handled = 0;

    __atomic_add_fetch(&traps_active, 1, __ATOMIC_SEQ_CST);
    if (info->si_code == SI_KERNEL) {   /* an int3, not a debugger's step */
        const struct hp_write *w = inflight_find(at);
        if (w) {
            /* Do what the new instruction does. */
            if (w->push_return) {
                regs[REG_RSP] -= 8;
                *(uint64_t *)regs[REG_RSP] = w->push_return;
            }
            regs[REG_RIP] = (greg_t)w->resume;
            handled = 1;
        } else if (*(volatile uint8_t *)at != 0xCC &&
                   !(*(volatile uint8_t *)(at - 1) == 0xCD && *(volatile uint8_t *)at == 0x03)) {
            /* The int3 this thread hit is gone: its batch finished between
             * the trap and this handler.  Run what is there now. */
            regs[REG_RIP] = (greg_t)at;
            handled = 1;
        }
    }
    __atomic_sub_fetch(&traps_active, 1, __ATOMIC_SEQ_CST);
    errno = saved_errno;
    if (!handled)
        chain_signal(&previous_trap, sig, info, context);
}

/* Install the SIGTRAP handler, chaining whatever was there.  Checked before
 * every int3 round: someone may have replaced it since. */
static int ensure_trap_handler(void)
{
    struct sigaction now, sa;
    if (sigaction(SIGTRAP, NULL, &now))
        return -1;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigtrap)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigtrap;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGTRAP, &sa, &previous_trap);
}

/* text_poke_bp: int3 on every first byte, sync, the other bytes, sync, the
 * first bytes, sync.  `from` selects the bytes being left (old or new) only
 * for the recovery pass. */
static int poke_round(struct hp_write *w, size_t n, int to_new, size_t *failed)
{
    static const uint8_t int3 = 0xCC;
    int rc = 0;
    for (size_t i = 0; i < n; i++)
        if (write_code(w[i].address, &int3, 1)) {
            *failed = i;
            return -1;
        }
    sync_cores();
    for (size_t i = 0; i < n && !rc; i++) {
        const uint8_t *b = to_new ? w[i].bytes : w[i].old;
        if (w[i].len > 1 && write_code(w[i].address + 1, b + 1, w[i].len - 1)) {
            *failed = i;
            rc = -1;
        }
    }
    sync_cores();
    for (size_t i = 0; i < n; i++) {
        const uint8_t *b = to_new && !rc ? w[i].bytes : w[i].old;
        if (write_code(w[i].address, b, 1) && !rc) {
            *failed = i;
            rc = -1;
        }
    }
    sync_cores();
    return rc;
}

static int int3_round(struct hp_write *w, size_t n, char *err)
{
    if (ensure_trap_handler()) {
        snprintf(err, HP_ERRLEN, "cannot install the SIGTRAP handler: %s", strerror(errno));
        return -1;
    }
    __atomic_store_n(&inflight_count, n, __ATOMIC_RELEASE);
    __atomic_store_n(&inflight, w, __ATOMIC_SEQ_CST);
    size_t failed = 0;
    int rc = poke_round(w, n, 1, &failed);
    int saved = errno;
    if (rc) {
        /* Put every site back as it was; threads trapping meanwhile still
         * get the new target, a state they could have seen anyway. */
        size_t ignored;
        poke_round(w, n, 0, &ignored);
    }
    __atomic_store_n(&inflight, NULL, __ATOMIC_SEQ_CST);
    /* The batch array belongs to the caller: no handler may still read it. */
    while (__atomic_load_n(&traps_active, __ATOMIC_SEQ_CST))
        sched_yield();
    if (rc) {
        snprintf(err, HP_ERRLEN, "writing code at 0x%lx failed: %s",
                 (unsigned long)w[failed].address, strerror(saved));
        return -1;
    }
    return 0;
}

/* --- stop the world ------------------------------------------------- */

#define MAX_THREADS 4096

static int park_signal;
/* Stops are numbered.  A stop is in progress while released_gen < stop_gen.
 * A parked thread records its pc, then (generation, tid) as one key, in a
 * slot; only keys of the current generation count, so the patcher never
 * waits for threads to leave the handler: one still on its way out of an
 * earlier stop (it needs a CPU, which busy threads may hold for a whole time
 * slice) is harmless, and the signal of the next stop waits, blocked, until
 * it has left.  The key is one store: written as two fields, a thread back
 * in the slot it had in the last stop could be matched by its new
 * generation beside its old tid before writing the tid -- which would then
 * land on the record of the next stop's owner of that slot. */
static int stop_gen;              /* atomic */
static int released_gen;          /* futex: = stop_gen once released */
static int parked;                /* atomic: next free slot */
static int arrivals;              /* futex: bumped by each thread once parked */
static struct {
    uint64_t key;                 /* park_key(gen, tid), written last, atomically */
    uintptr_t pc;
} parked_at[MAX_THREADS];
static pid_t signalled[MAX_THREADS];
static size_t nsignalled;

/* Counters for the benchmarks and the tree: stops, stops retried because a
 * thread was inside the bytes, and time spent waiting for threads to park. */
static struct {
    uint64_t stops, retries, park_ns;
} stop_stats;

static const struct timespec poll_interval = { 0, 1000000 };

static uint64_t park_key(int gen, pid_t tid)
{
    return (uint64_t)(uint32_t)gen << 32 | (uint32_t)tid;
}

static long futex(int *word, int op, int value, const struct timespec *timeout)
{
    return syscall(SYS_futex, word, op, value, timeout, NULL, 0);
}

/* Runs in every other thread: record where it was, wait to be released. */
static void on_park(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)info;
    int saved_errno = errno;
    int gen = __atomic_load_n(&stop_gen, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&released_gen, __ATOMIC_SEQ_CST) < gen) {
        int slot = __atomic_fetch_add(&parked, 1, __ATOMIC_SEQ_CST);
        if (slot < MAX_THREADS) {
            parked_at[slot].pc = (uintptr_t)((ucontext_t *)context)->uc_mcontext.gregs[REG_RIP];
            __atomic_store_n(&parked_at[slot].key, park_key(gen, (pid_t)syscall(SYS_gettid)),
                             __ATOMIC_SEQ_CST);
        }
        __atomic_add_fetch(&arrivals, 1, __ATOMIC_SEQ_CST);
        futex(&arrivals, FUTEX_WAKE_PRIVATE, 1, NULL);
        int released;
        while ((released = __atomic_load_n(&released_gen, __ATOMIC_SEQ_CST)) < gen)
            futex(&released_gen, FUTEX_WAIT_PRIVATE, released, NULL);
    }
    errno = saved_errno;
}

static int ensure_park_handler(char *err)
{
    if (park_signal)
        return 0;
    int sig = SIGRTMAX - 2;
    struct sigaction now, sa;
    sigaction(sig, NULL, &now);
    if (!(now.sa_flags & SA_SIGINFO) && now.sa_handler != SIG_DFL) {
        snprintf(err, HP_ERRLEN, "signal %d (SIGRTMAX-2), used to park threads, already has a handler", sig);
        return -1;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_park;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigfillset(&sa.sa_mask);
    if (sigaction(sig, &sa, NULL)) {
        snprintf(err, HP_ERRLEN, "cannot install the park handler: %s", strerror(errno));
        return -1;
    }
    park_signal = sig;
    return 0;
}

/* Thread ids of this process, read with raw getdents64: no malloc, so this
 * also works while other threads are parked holding the allocator's lock. */
static size_t list_threads(pid_t *tids, size_t max)
{
    int fd = open("/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    size_t n = 0;
    char buf[4096];
    long got;
    while ((got = syscall(SYS_getdents64, fd, buf, sizeof buf)) > 0) {
        for (long off = 0; off < got;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            pid_t tid = 0;
            for (const char *c = d->d_name; *c >= '0' && *c <= '9'; c++)
                tid = tid * 10 + (*c - '0');
            if (tid > 0 && n < max)
                tids[n++] = tid;
        }
    }
    close(fd);
    return n;
}

static int was_signalled(pid_t tid)
{
    for (size_t i = 0; i < nsignalled; i++)
        if (signalled[i] == tid)
            return 1;
    return 0;
}

/* The slot of `tid` parked in the current stop, or -1. */
static int parked_slot(pid_t tid)
{
    int count = __atomic_load_n(&parked, __ATOMIC_SEQ_CST);
    uint64_t key = park_key(stop_gen, tid);
    for (int i = 0; i < count && i < MAX_THREADS; i++)
        if (__atomic_load_n(&parked_at[i].key, __ATOMIC_SEQ_CST) == key)
            return i;
    return -1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void release_world(void)
{
    __atomic_store_n(&released_gen, stop_gen, __ATOMIC_SEQ_CST);
    futex(&released_gen, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL);
}

/* Park every other thread.  Threads started meanwhile are found by listing
 * again until every listed thread has parked; a thread that neither parks
 * nor exits before the deadline is an error naming it. */
static int stop_world(uint64_t deadline, char *err)
{
    pid_t self = (pid_t)syscall(SYS_gettid), tids[MAX_THREADS];
    uint64_t start = now_ns();
    stop_stats.stops++;
    nsignalled = 0;
    __atomic_store_n(&parked, 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&stop_gen, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        int arrived = __atomic_load_n(&arrivals, __ATOMIC_SEQ_CST);
        size_t n = list_threads(tids, MAX_THREADS), waiting = 0;
        pid_t late = 0;
        for (size_t i = 0; i < n; i++) {
            pid_t tid = tids[i];
            if (tid == self)
                continue;
            if (!was_signalled(tid)) {
                if (nsignalled == MAX_THREADS) {
                    release_world();
                    snprintf(err, HP_ERRLEN, "more than %d threads", MAX_THREADS);
                    return -1;
                }
                signalled[nsignalled++] = tid;
                if (syscall(SYS_tgkill, getpid(), tid, park_signal) && errno == ESRCH)
                    continue;   /* it exited */
            }
            if (parked_slot(tid) < 0) {
                waiting++;
                late = tid;
            }
        }
        if (!waiting) {
            stop_stats.park_ns += now_ns() - start;
            return 0;
        }
        if (now_ns() > deadline) {
            release_world();
            snprintf(err, HP_ERRLEN,
                     "thread %d did not park in time (it blocks signal %d, or is stuck in the kernel)",
                     (int)late, park_signal);
            return -1;
        }
        /* Sleep until the next thread parks: the CPU goes to the threads
         * that must run their handler. */
        futex(&arrivals, FUTEX_WAIT_PRIVATE, arrived, &poll_interval);
    }
}

/* A thread parked in this stop whose program counter lies strictly inside
 * a write's bytes (resuming there would run half-replaced code): its tid,
 * or 0 if none. */
static pid_t thread_inside(const struct hp_write *w, size_t n, uintptr_t *pc)
{
    for (size_t t = 0; t < nsignalled; t++) {
        int slot = parked_slot(signalled[t]);
        if (slot < 0)
            continue;   /* exited before parking */
        for (size_t i = 0; i < n; i++)
            if (parked_at[slot].pc > w[i].address && parked_at[slot].pc < w[i].address + w[i].len) {
                *pc = parked_at[slot].pc;
                return signalled[t];
            }
    }
    return 0;
}

static int stopped_round(struct hp_write *w, size_t n, int timeout_ms, char *err)
{
    if (ensure_park_handler(err))
        return -1;
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        if (stop_world(deadline, err))
            return -1;
        uintptr_t pc;
        pid_t tid = thread_inside(w, n, &pc);
        if (!tid)
            break;
        stop_stats.retries++;
        release_world();
        if (now_ns() > deadline) {
            snprintf(err, HP_ERRLEN, "thread %d stayed inside the bytes being replaced (pc 0x%lx)",
                     (int)tid, (unsigned long)pc);
            return -1;
        }
        struct timespec pause = { 0, 200000 };
        nanosleep(&pause, NULL);
    }
    size_t i = 0;
    int rc = 0;
    for (; i < n && !rc; i++)
        rc = write_code(w[i].address, w[i].bytes, w[i].len);
    int saved = errno;
    if (rc)   /* undo the ones written, the world still stopped */
        for (size_t j = 0; j + 1 < i; j++)
            write_code(w[j].address, w[j].old, w[j].len);
    sync_cores();
    release_world();
    if (rc) {
        snprintf(err, HP_ERRLEN, "writing code at 0x%lx failed: %s",
                 (unsigned long)w[i - 1].address, strerror(saved));
        return -1;
    }
    return 0;
}

static int by_address(const void *a, const void *b)
{
    uintptr_t x = ((const struct hp_write *)a)->address, y = ((const struct hp_write *)b)->address;
    return x < y ? -1 : x > y;
}

/* Write a batch of sites safely while other threads run: one int3 round
 * when every site is a single instruction, else one stop of the world.
 * Returns 0, or -1 with `err` filled and no byte changed. */
int hp_write_batch(struct hp_write *w, size_t n, int timeout_ms, char *err)
{
    err[0] = 0;
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (w[i].len < 1 || w[i].len > sizeof w[i].bytes) {
            snprintf(err, HP_ERRLEN, "bad write length %u at 0x%lx", w[i].len,
                     (unsigned long)w[i].address);
            return -1;
        }
    qsort(w, n, sizeof *w, by_address);
    for (size_t i = 1; i < n; i++)
        if (w[i].address < w[i - 1].address + w[i - 1].len) {
            snprintf(err, HP_ERRLEN, "writes at 0x%lx and 0x%lx overlap",
                     (unsigned long)w[i - 1].address, (unsigned long)w[i].address);
            return -1;
        }
    int all_single = 1;
    for (size_t i = 0; i < n; i++)
        all_single &= w[i].single != 0;

    pthread_mutex_lock(&hp_lock);
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++)
        if (memcmp((const void *)w[i].address, w[i].old, w[i].len)) {
            snprintf(err, HP_ERRLEN, "the code at 0x%lx is not what it was expected to be "
                     "(changed by someone else?)", (unsigned long)w[i].address);
            rc = -1;
        }
    if (!rc) {
        open_mem_fd();
        rc = all_single ? int3_round(w, n, err) : stopped_round(w, n, timeout_ms, err);
    }
    pthread_mutex_unlock(&hp_lock);
    return rc;
}

/* ------------------------------------------------------------------ */
/* The crash report: a live-patched process says so when it dies       */
/* ------------------------------------------------------------------ */

/* Like the K taint in a kernel oops: on a fatal signal, write the enabled
 * patches (text kept ready by Python on every enable and disable) to
 * stderr, then hand the signal to whatever handled it before (faulthandler,
 * or the default action). */
static const int fatal_signals[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };
#define NFATAL (sizeof fatal_signals / sizeof fatal_signals[0])
static struct sigaction previous_fatal[NFATAL];
static char crash_text[4096];
static size_t crash_len;   /* atomic */
static int crash_installed;

static void on_fatal(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    size_t len = __atomic_load_n(&crash_len, __ATOMIC_ACQUIRE);
    if (len && write(2, crash_text, len) < 0) {
        /* nothing more can be done about stderr here */
    }
    errno = saved_errno;
    for (size_t i = 0; i < NFATAL; i++)
        if (fatal_signals[i] == sig)
            chain_signal(&previous_fatal[i], sig, info, context);
}

/* Set the text of the report and make sure the handlers are in place. */
int hp_set_crash_report(const char *text)
{
    pthread_mutex_lock(&hp_lock);
    size_t len = strlen(text);
    if (len >= sizeof crash_text)
        len = sizeof crash_text - 1;
    __atomic_store_n(&crash_len, 0, __ATOMIC_RELEASE);
    memcpy(crash_text, text, len);
    __atomic_store_n(&crash_len, len, __ATOMIC_RELEASE);
    int rc = 0;
    if (!crash_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fatal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        for (size_t i = 0; i < NFATAL && !rc; i++)
            rc = sigaction(fatal_signals[i], &sa, &previous_fatal[i]);
        crash_installed = !rc;
    }
    pthread_mutex_unlock(&hp_lock);
    return rc ? -errno : 0;
}

/* Stop-the-world counters since the process started (or forked). */
void hp_stop_stats(uint64_t *stops, uint64_t *retries, uint64_t *park_ns)
{
    pthread_mutex_lock(&hp_lock);
    *stops = stop_stats.stops;
    *retries = stop_stats.retries;
    *park_ns = stop_stats.park_ns;
    pthread_mutex_unlock(&hp_lock);
}

/* What the core found about this process, for the tree and the tests. */
int hp_core_info(int *uses_proc_mem, int *uses_membarrier, int *park_sig)
{
    pthread_mutex_lock(&hp_lock);
    open_mem_fd();
    *uses_proc_mem = mem_fd >= 0;
    *uses_membarrier = sync_core_ready;
    *park_sig = park_signal ? park_signal : SIGRTMAX - 2;
    pthread_mutex_unlock(&hp_lock);
    return 0;
}

__attribute__((constructor)) static void hp_init(void)
{
    pthread_atfork(NULL, NULL, reset_in_child);
}
