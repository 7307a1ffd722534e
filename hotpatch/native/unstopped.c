/*
 * Writes that need no stop.
 *
 * A stop guards against one thing: a thread that has run part of the bytes
 * being replaced -- its program counter, or the one a signal frame saved,
 * strictly inside them -- would go on in the middle of the new instruction.
 * Where the bytes being replaced hold a single instruction, only its first
 * byte is an instruction boundary, so no thread can be inside: the write
 * needs no stop if every thread fetches either the old instruction or the
 * new one whole.  One atomic store within one cache line gives that: it is
 * the rule HotSpot's patch of a verified entry and Windows' hot-patch point
 * (a 2-byte `mov edi, edi` swapped for a short `jmp`) rely on.  Then a core
 * sync, so that no thread runs the old instruction once the call returns.
 *
 * Which writes qualify:
 *  - restoring an entry, or moving it to another target: the bytes there are
 *    hotpatch's `jmp rel32` and the int3 fill after it, which nothing jumps to;
 *  - patching an entry whose first instruction covers all the bytes written
 *    (-mnop-mcount's 5-byte NOP, a `sub $imm32, %rsp`, a rip-relative
 *    load...), or is a ret or jmp followed by padding (the dynamic linker's
 *    r_brk function, the loader hook's site, is `ret` and nops);
 *  - the bytes that change (a retarget changes only the jmp's displacement)
 *    fit one 8-byte store within a cache line, or one aligned 16-byte
 *    cmpxchg16b (a split locked store is not atomic for the instruction
 *    fetch, and split-lock detection traps it).
 * A batch where any write does not qualify takes the stop, whole.
 *
 * /proc/self/mem cannot do this store: the kernel copies the bytes with its
 * memcpy (rep movsb), a byte at a time as far as anyone may rely on.  So
 * the store goes through an mprotect window: the page gets write permission
 * next to its own for the microseconds of the batch and its own protection
 * back before the call returns.  Where the kernel refuses that
 * (PR_SET_MDWE, an SELinux execmod rule) the batch takes the stop, which
 * writes through /proc/self/mem.
 */
#include "hotpatch_core.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* --- which writes qualify -------------------------------------------- */

/* The bytes of a write that change, [*from, *to) from its address: a
 * retarget changes only a jmp's displacement. */
HP_RAW static void changed_span(const struct hp_write *w, uint32_t *from, uint32_t *to)
{
    uint32_t a = 0, b = w->len;
    while (a < b && w->old[a] == w->bytes[a])
        a++;
    while (b > a && w->old[b - 1] == w->bytes[b - 1])
        b--;
    *from = a;
    *to = b;
}

/* The word one atomic store changes `len` bytes at `addr` with: 8 bytes
 * within one cache line (aligned if the bytes fit, else starting or ending
 * with them), or an aligned 16 (cmpxchg16b).  Its size, 0 if none fits. */
HP_RAW static int store_word(uintptr_t addr, uint32_t len, uintptr_t *word)
{
    uintptr_t eight[3] = { addr & ~(uintptr_t)7, addr, addr + len - 8 };
    for (int i = 0; len <= 8 && i < 3; i++)
        if (eight[i] <= addr && addr + len <= eight[i] + 8 &&
            (eight[i] & ~(uintptr_t)63) == ((eight[i] + 7) & ~(uintptr_t)63)) {
            *word = eight[i];
            return 8;
        }
    *word = addr & ~(uintptr_t)15;
    return addr + len <= *word + 16 ? 16 : 0;
}

/* A write's store: the word that holds its changing bytes. */
HP_RAW static int write_word(const struct hp_write *w, uintptr_t *word)
{
    uint32_t from, to;
    changed_span(w, &from, &to);
    if (from == to) {
        *word = w->address;
        return -1;      /* nothing changes: no store */
    }
    return store_word(w->address + from, to - from, word);
}

/* Do the bytes at the write (`now`: 16 read from its address) hold one
 * instruction only, as far as any thread can be concerned?  Either the
 * first instruction covers the write, or it never falls through (a ret, a
 * jmp: hotpatch's own) and only padding follows it in the write (int3
 * fill, nops between functions), which no thread runs: the entry analysis
 * refused any branch landing there. */
static int holds_one_instruction(const struct hp_write *w, const uint8_t *now)
{
    int kind;
    int at = hp_instruction_kind(now, 16, w->address, &kind);
    if (at <= 0 || (at < (int)w->len && kind != HP_INSN_LEAVES))
        return 0;
    return at >= (int)w->len ||
           hp_padding_over(now + at, 16 - at, w->address + at, w->len - at) != 0;
}

/* May the batch be written without a stop?  Its bytes must be there as
 * expected too: a mismatch goes to the stop path, which reports it. */
static int batch_qualifies(const struct hp_write *w, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t now[16];
        uintptr_t word;
        if (!write_word(&w[i], &word) ||
            hp_read_own(hp_gettid(), now, w[i].address, sizeof now) != (long)sizeof now ||
            memcmp(now, w[i].old, w[i].len) || !holds_one_instruction(&w[i], now))
            return 0;
    }
    return 1;
}

/* Would a write changing all of the `len` bytes at `address` (as a first
 * patch of an entry does) need a stop?  1 if so: the benchmarks' count of
 * which functions can be patched without one. */
int hp_write_needs_stop(uintptr_t address, uint32_t len)
{
    uint8_t now[16];
    if (hp_read_own(hp_gettid(), now, address, sizeof now) != (long)sizeof now)
        return 1;
    return hp_write_needs_stop_over(address, len, now);
}

/* hp_write_needs_stop(), `now` holding the 16 bytes at `address`. */
int hp_write_needs_stop_over(uintptr_t address, uint32_t len, const uint8_t *now)
{
    struct hp_write w = { .address = address, .len = len };
    uintptr_t word;
    if (len > sizeof w.old)
        return 1;
    memcpy(w.old, now, len);
    for (uint32_t k = 0; k < len; k++)
        w.bytes[k] = (uint8_t)~w.old[k];
    return !write_word(&w, &word) || !holds_one_instruction(&w, now);
}

/* --- the pages' protection --------------------------------------------- */

/* PROCMAP_QUERY (Linux 6.11): one mapping's protection by ioctl on
 * /proc/self/maps, without reading the whole file.  The layout is the
 * kernel's ABI (include/uapi/linux/fs.h). */
struct procmap_query {
    uint64_t size, query_flags, query_addr, vma_start, vma_end, vma_flags, vma_page_size,
        vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
#define PROCMAP_QUERY _IOWR('f', 17, struct procmap_query)
#define QUERY_READABLE 1
#define QUERY_WRITABLE 2
#define QUERY_EXECUTABLE 4

/* Kept open across batches (like /proc/self/mem in codewrite.c): it names
 * the process's memory map, whichever thread opened it.  no_procmap_query:
 * the kernel has none (read the whole file instead). */
static struct hp_kept_fd maps_file = HP_KEPT_FD_NONE;
static int no_procmap_query;
static int maps_read;           /* the fallback read /proc/self/maps for this batch */

/* The protection of the mapping holding `page` by PROCMAP_QUERY: -1 if no
 * mapping holds it, -2 if the query cannot be made here. */
static int queried_protection(uintptr_t page)
{
    if (no_procmap_query)
        return -2;
    /* thread-self: /proc/self fails once the main thread exited */
    int fd = hp_kept_fd_open(&maps_file, "/proc/thread-self/maps", O_RDONLY);
    if (fd < 0)
        return -2;
    struct procmap_query q = { .size = sizeof q, .query_addr = page };
    if (ioctl(fd, PROCMAP_QUERY, &q) == 0)
        return (q.vma_flags & QUERY_READABLE ? PROT_READ : 0) |
               (q.vma_flags & QUERY_WRITABLE ? PROT_WRITE : 0) |
               (q.vma_flags & QUERY_EXECUTABLE ? PROT_EXEC : 0);
    if (errno == ENOENT)
        return -1;
    no_procmap_query = 1;
    return -2;
}

/* A forked child's map is its own: the kept descriptor names the parent's. */
void hp_unstopped_after_fork(void)
{
    hp_kept_fd_forget(&maps_file);
}

/* The protection of the mapping holding `page`, or -1. */
static int page_protection(uintptr_t page)
{
    int prot = queried_protection(page);
    if (prot != -2)
        return prot;
    if (!maps_read && hp_read_mappings() < 0)
        return -1;
    maps_read = 1;
    const struct hp_mapping *m = hp_mapping_of(page);
    return m ? m->prot : -1;
}

struct opened_page {
    uintptr_t page;
    int prot;       /* its own */
};

static void close_pages(const struct opened_page *pages, long npages)
{
    for (long i = 0; i < npages; i++)
        if (!(pages[i].prot & PROT_WRITE))
            hp_sys(SYS_mprotect, pages[i].page, 4096, pages[i].prot);
}

/* Give every page of the batch write permission next to its own.  The
 * number of pages opened; on a refusal, those are closed again and -1. */
static long open_pages(const struct hp_write *w, size_t n, struct opened_page *pages)
{
    long npages = 0;
    maps_read = 0;
    for (size_t i = 0; i < n; i++) {
        uintptr_t word;
        if (write_word(&w[i], &word) < 0)
            continue;
        uintptr_t page = word & ~(uintptr_t)4095;
        if (npages && pages[npages - 1].page == page)
            continue;       /* the batch is sorted: a page's writes are adjacent */
        int prot = page_protection(page);
        if (prot < 0 || (!(prot & PROT_WRITE) &&
                         hp_sys(SYS_mprotect, page, 4096, prot | PROT_WRITE) < 0)) {
            close_pages(pages, npages);
            return -1;
        }
        pages[npages++] = (struct opened_page){ page, prot };
    }
    return npages;
}

/* --- the stores ---------------------------------------------------------- */

/* 16-byte compare-and-swap: 1 if `*p` was `*expected` and is now
 * `desired`, else 0 with `*expected` what it is. */
static int swap16(void *p, uint64_t expected[2], const uint64_t desired[2])
{
    uint8_t swapped;
    __asm__ __volatile__("lock cmpxchg16b %1\n\tsete %0"
                         : "=q"(swapped), "+m"(*(volatile uint64_t(*)[2])p),
                           "+a"(expected[0]), "+d"(expected[1])
                         : "b"(desired[0]), "c"(desired[1])
                         : "memory", "cc");
    return swapped;
}

/* Store one write's changing bytes with one compare-and-swap of their
 * word, the bytes around them kept as they are.  0, or -1 if the bytes of
 * the write in that word are not `old`. */
static int store_write(const struct hp_write *w)
{
    uintptr_t word;
    int size = write_word(w, &word);
    if (size < 0)
        return 0;
    /* the part of the write inside the word: [lo, hi) of the word */
    size_t lo = w->address > word ? w->address - word : 0;
    size_t hi = w->address + w->len < word + size ? w->address + w->len - word : (size_t)size;
    size_t skip = word + lo - w->address;    /* into the write's bytes */
    uint64_t seen[2], want[2];
    if (size == 8)
        seen[0] = __atomic_load_n((uint64_t *)word, __ATOMIC_ACQUIRE);
    else
        hp_copy_words(seen, (const void *)word, 16);    /* a torn read only fails the swap */
    for (;;) {
        if (memcmp((uint8_t *)seen + lo, w->old + skip, hi - lo))
            return -1;
        hp_copy_words(want, seen, sizeof want);
        memcpy((uint8_t *)want + lo, w->bytes + skip, hi - lo);
        if (size == 8 ? __atomic_compare_exchange_n((uint64_t *)word, &seen[0], want[0], 0,
                                                    __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)
                      : swap16((void *)word, seen, want))
            return 0;
    }
}

/* Write a batch (sorted by address) without a stop, if it qualifies.
 * HP_UNSTOPPED_DONE, HP_UNSTOPPED_NEEDS_STOP (nothing written), or
 * HP_UNSTOPPED_CHANGED: the bytes of write `*failed` changed under us
 * after the check, the writes before it are made (the caller undoes them
 * with a stop).  hp_lock held, signals blocked. */
int hp_write_unstopped(const struct hp_write *w, size_t n, size_t *failed)
{
    if (!batch_qualifies(w, n))
        return HP_UNSTOPPED_NEEDS_STOP;
    struct opened_page few[16], *pages = n <= 16 ? few : malloc(n * sizeof *pages);
    long npages = pages ? open_pages(w, n, pages) : -1;
    if (npages < 0) {
        if (pages != few)
            free(pages);
        return HP_UNSTOPPED_NEEDS_STOP;
    }
    int rc = HP_UNSTOPPED_DONE;
    for (size_t i = 0; i < n && rc == HP_UNSTOPPED_DONE; i++)
        if (store_write(&w[i])) {
            *failed = i;
            rc = HP_UNSTOPPED_CHANGED;
        }
    close_pages(pages, npages);
    if (pages != few)
        free(pages);
    return rc;      /* the caller syncs the cores: no old instruction runs after it returns */
}
