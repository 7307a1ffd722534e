/*
 * xrefs.c -- the direct branches of a loaded object that land in a range,
 * and what a batch of functions looks like at their entries (hp_scan_entries).
 *
 * The policy (which branches make a redirect unsafe) is in Python
 * (x86_64/xrefs.py, x86_64/entry.py).  This file answers "which relative
 * branches of the object land in [lo, hi)" without sweeping the whole object
 * first: capstone -- the C library the capstone wheel ships, loaded by
 * hp_capstone_load without its Python binding -- decodes about 2 instructions a
 * microsecond here, so a sweep of libc costs a quarter of a second, and the
 * first patch of a process must cost a few milliseconds.
 *
 *  1. Prefilter on raw bytes.  At index time every byte position whose bytes
 *     could encode a rel32 branch (E8, E9, 0F 8x, C7 F8) aimed inside the
 *     object is bucketed by target; rel8 forms (7x, EB, E0-E3) reach only
 *     +-128 bytes, so a query looks for them in the bytes around [lo, hi).
 *     Every real branch is among these candidates; most candidates that are
 *     not branches aim outside the object or outside [lo, hi).
 *  2. Confirm by decoding.  A candidate is decoded with capstone as part of
 *     its *region*: from the function symbol start (or executable segment
 *     start) before it, by linear sweep, one byte past anything undecodable
 *     -- the real instruction boundaries, which a sweep of the whole object
 *     also finds once it is in step at a function's start.  A region is
 *     decoded once and its branches kept.
 *
 * cffi releases the GIL around every call into this module, so the
 * service's Python threads keep running while regions are decoded.
 */
#include <capstone/capstone.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "hotpatch_core.h"

#define BUCKET_SHIFT 6          /* candidates bucketed by 64-byte target blocks */
#define REL8_REACH 130          /* a rel8 branch ends within 127 bytes before, 128 after */

struct branch {
    uint64_t target;
    uint64_t source;
};

struct segment {                /* one executable range, copied */
    uintptr_t lo, hi;
    uint8_t *code;
    uint32_t *bucket_start;     /* (hi - lo) >> BUCKET_SHIFT buckets + 1 */
    uint32_t *candidates;       /* offsets of rel32 opcodes, by target bucket */
};

struct region {                 /* [start, next region's start) */
    uintptr_t start;
    int decoded;
    uint32_t n;
    struct branch *branches;
};

struct hp_branch_index {
    pthread_mutex_t lock;       /* regions are decoded on demand */
    csh handle;
    cs_insn *insn;
    int nsegments;
    struct segment *segments;
    size_t nregions;
    struct region *regions;     /* sorted by start */
};

/* The few entry points of libcapstone used here, looked up once. */
static struct {
    cs_err (*open)(cs_arch, cs_mode, csh *);
    cs_err (*close)(csh *);
    cs_err (*option)(csh, cs_opt_type, size_t);
    cs_insn *(*malloc)(csh);
    bool (*disasm_iter)(csh, const uint8_t **, size_t *, uint64_t *, cs_insn *);
    void (*free)(cs_insn *, size_t);
    cs_err (*regs_access)(csh, const cs_insn *, cs_regs, uint8_t *, cs_regs, uint8_t *);
    const char *(*reg_name)(csh, unsigned);
} cs;
static pthread_mutex_t cs_lock = PTHREAD_MUTEX_INITIALIZER;

/* Load libcapstone from `path` (the file the capstone wheel ships): 0, or
 * -1 with the reason in `err`.  Idempotent.  Every function of it the core
 * calls is looked up here, once: the decoders below run in the loader's
 * worker too, which must not call the dynamic linker (loader.py). */
int hp_capstone_load(const char *path, char *err)
{
    int rc = 0;
    pthread_mutex_lock(&cs_lock);
    if (!cs.disasm_iter) {
        void *lib = dlopen(path, RTLD_NOW);
        if (!lib) {
            snprintf(err, HP_ERRLEN, "cannot load %s: %s", path, dlerror());
            rc = -1;
        } else {
            cs.open = dlsym(lib, "cs_open");
            cs.close = dlsym(lib, "cs_close");
            cs.option = dlsym(lib, "cs_option");
            cs.malloc = dlsym(lib, "cs_malloc");
            cs.free = dlsym(lib, "cs_free");
            cs.regs_access = dlsym(lib, "cs_regs_access");
            cs.reg_name = dlsym(lib, "cs_reg_name");
            cs.disasm_iter = dlsym(lib, "cs_disasm_iter");
            if (!cs.open || !cs.close || !cs.option || !cs.malloc || !cs.free
                    || !cs.regs_access || !cs.reg_name || !cs.disasm_iter) {
                snprintf(err, HP_ERRLEN, "%s lacks the cs_disasm_iter or cs_regs_access API", path);
                memset(&cs, 0, sizeof cs);
                rc = -1;
            }
        }
    }
    pthread_mutex_unlock(&cs_lock);
    return rc;
}

/* ---- 1. the prefilter ------------------------------------------------ */

static int32_t rel32_at(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* Where the rel32 branch whose opcode is at code[i] would end (its target
 * is that end + the displacement), or 0 if these bytes cannot be one. */
static size_t rel32_end(const uint8_t *code, size_t len, size_t i)
{
    if ((code[i] == 0xE8 || code[i] == 0xE9) && i + 5 <= len)
        return i + 5;
    if (i + 6 <= len && ((code[i] == 0x0F && (code[i + 1] & 0xF0) == 0x80)
                         || (code[i] == 0xC7 && code[i + 1] == 0xF8)))
        return i + 6;
    return 0;
}

/* The target of the rel8 branch whose opcode is at code[i], if these bytes
 * can be one (Jcc, JMP, LOOPcc/LOOP/JrCXZ). */
static int rel8_target(const struct segment *s, size_t i, uintptr_t *target)
{
    size_t len = s->hi - s->lo;
    uint8_t op = s->code[i];
    if (i + 2 > len || !((op >= 0x70 && op <= 0x7F) || op == 0xEB || (op >= 0xE0 && op <= 0xE3)))
        return 0;
    *target = s->lo + i + 2 + (int8_t)s->code[i + 1];
    return 1;
}

/* A 0x66 prefix may shrink a rel32 to rel16 as capstone decodes it. */
static int rel16_target(const struct segment *s, size_t i, uintptr_t *target)
{
    size_t len = s->hi - s->lo, end;
    int16_t d;
    if (i == 0 || s->code[i - 1] != 0x66)
        return 0;
    end = i + ((s->code[i] == 0xE8 || s->code[i] == 0xE9) ? 3 : 4);
    if (!rel32_end(s->code, len, i) || end > len)
        return 0;
    memcpy(&d, s->code + end - 2, 2);
    *target = s->lo + end + d;
    return 1;
}

/* Do the bytes at s->code[k] encode a rel8 or rel16 branch into [a, b)? */
static int near_branch_into(const struct segment *s, size_t k, uintptr_t a, uintptr_t b)
{
    uintptr_t t;
    return (rel8_target(s, k, &t) && a <= t && t < b) ||
           (rel16_target(s, k, &t) && a <= t && t < b);
}

static const struct segment *segment_of(const struct hp_branch_index *ix, uintptr_t a)
{
    for (int i = 0; i < ix->nsegments; i++)
        if (ix->segments[i].lo <= a && a < ix->segments[i].hi)
            return &ix->segments[i];
    return NULL;
}

/* Bucket every rel32 candidate of `s` aimed inside `s` by its target: one
 * pass over the bytes, then a counting sort by bucket.  A branch from one
 * executable segment into another is not a candidate: the objects of a
 * toolchain have one executable PT_LOAD (text, PLT and init together). */
static int bucket_candidates(struct segment *s)
{
    size_t len = s->hi - s->lo, nbuckets = (len >> BUCKET_SHIFT) + 1, n = 0, room = 4096;
    uint32_t (*found)[2] = malloc(room * sizeof *found), *fill = NULL;
    int rc = -1;

    if (!found)
        return -1;
    for (size_t i = 0; i + 5 <= len; i++) {
        uint8_t op = s->code[i];
        size_t end;
        int64_t target;
        if (op != 0xE8 && op != 0xE9 && op != 0x0F && op != 0xC7)
            continue;
        if (!(end = rel32_end(s->code, len, i)))
            continue;
        target = (int64_t)end + rel32_at(s->code + end - 4);
        if (target < 0 || (size_t)target >= len)
            continue;
        if (n == room) {
            uint32_t (*more)[2] = realloc(found, (room *= 2) * sizeof *found);
            if (!more)
                goto out;
            found = more;
        }
        found[n][0] = (uint32_t)((size_t)target >> BUCKET_SHIFT);
        found[n++][1] = (uint32_t)i;
    }
    s->bucket_start = calloc(nbuckets + 1, sizeof *s->bucket_start);
    s->candidates = malloc((n + 1) * sizeof *s->candidates);
    fill = malloc(nbuckets * sizeof *fill);
    if (!s->bucket_start || !s->candidates || !fill)
        goto out;
    for (size_t k = 0; k < n; k++)
        s->bucket_start[found[k][0] + 1]++;
    for (size_t b = 0; b < nbuckets; b++)
        s->bucket_start[b + 1] += s->bucket_start[b];
    memcpy(fill, s->bucket_start, nbuckets * sizeof *fill);
    for (size_t k = 0; k < n; k++)
        s->candidates[fill[found[k][0]]++] = found[k][1];
    rc = 0;
out:
    free(fill);
    free(found);
    return rc;
}

/* ---- 2. confirming by decoding a region ------------------------------ */

static size_t region_of(const struct hp_branch_index *ix, uintptr_t a)
{
    size_t first = 0, last = ix->nregions;   /* the last region starting <= a */
    while (last - first > 1) {
        size_t mid = first + (last - first) / 2;
        if (ix->regions[mid].start <= a)
            first = mid;
        else
            last = mid;
    }
    return first;
}

/* Without operand details capstone still prints a relative branch's
 * operand as its absolute target ("0x1234"): the kind comes from the last
 * word of the mnemonic ("bnd jmp", "notrack call"), the target from the
 * text, exactly as capstone reports them. */
static const char *const relative_mnemonics[] = {
    "jmp", "call", "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns",
    "jp", "jnp", "jl", "jge", "jle", "jg", "jrcxz", "jecxz", "loop", "loope",
    "loopne", "xbegin",
};

/* The instruction ids of those mnemonics: most instructions are none of
 * them, and an id is cheaper to test than the text (a sweep asks every
 * instruction). */
static int branch_family(unsigned id)
{
    switch (id) {
    case X86_INS_JMP: case X86_INS_CALL: case X86_INS_JO: case X86_INS_JNO: case X86_INS_JB:
    case X86_INS_JAE: case X86_INS_JE: case X86_INS_JNE: case X86_INS_JBE: case X86_INS_JA:
    case X86_INS_JS: case X86_INS_JNS: case X86_INS_JP: case X86_INS_JNP: case X86_INS_JL:
    case X86_INS_JGE: case X86_INS_JLE: case X86_INS_JG: case X86_INS_JRCXZ: case X86_INS_JECXZ:
    case X86_INS_JCXZ: case X86_INS_LOOP: case X86_INS_LOOPE: case X86_INS_LOOPNE:
    case X86_INS_XBEGIN:
        return 1;
    }
    return 0;
}

static int relative_target(const cs_insn *insn, uint64_t *target)
{
    const char *word;
    size_t n = sizeof relative_mnemonics / sizeof *relative_mnemonics, i;
    char *end;

    if (!branch_family(insn->id))
        return 0;
    word = strrchr(insn->mnemonic, ' ');
    word = word ? word + 1 : insn->mnemonic;
    for (i = 0; i < n && strcmp(word, relative_mnemonics[i]); i++)
        ;
    if (i == n || strncmp(insn->op_str, "0x", 2))
        return 0;
    *target = strtoull(insn->op_str, &end, 16);
    return *end == 0;
}

/* Decode region `r` once: linear sweep from its start to the next region's,
 * stepping one byte past anything undecodable, keeping its branches. */
static int decode_region(struct hp_branch_index *ix, size_t r)
{
    struct region *region = &ix->regions[r];
    const struct segment *s = segment_of(ix, region->start);
    uintptr_t stop = r + 1 < ix->nregions ? ix->regions[r + 1].start : s->hi;
    const uint8_t *code = s->code + (region->start - s->lo);
    size_t len = s->hi - region->start, capacity = 0;
    uint64_t address = region->start;

    if (stop > s->hi)
        stop = s->hi;
    while (len && address < stop) {
        uint64_t at = address, target;
        if (!cs.disasm_iter(ix->handle, &code, &len, &address, ix->insn)) {
            code++, len--, address++;
            continue;
        }
        if (!relative_target(ix->insn, &target))
            continue;
        if (region->n == capacity) {
            size_t grown = capacity ? 2 * capacity : 8;
            struct branch *more = realloc(region->branches, grown * sizeof *more);
            if (!more)
                return -1;
            region->branches = more;
            capacity = grown;
        }
        region->branches[region->n++] = (struct branch){ target, at };
    }
    region->decoded = 1;
    return 0;
}

/* ---- the index ------------------------------------------------------- */

void hp_branch_index_free(struct hp_branch_index *ix)
{
    if (!ix)
        return;
    for (int i = 0; i < ix->nsegments; i++) {
        free(ix->segments[i].code);
        free(ix->segments[i].bucket_start);
        free(ix->segments[i].candidates);
    }
    for (size_t r = 0; r < ix->nregions; r++)
        free(ix->regions[r].branches);
    free(ix->segments);
    free(ix->regions);
    if (ix->insn)
        cs.free(ix->insn, 1);
    if (ix->handle)
        cs.close(&ix->handle);
    pthread_mutex_destroy(&ix->lock);
    free(ix);
}

static int by_start(const void *a, const void *b)
{
    const struct region *x = a, *y = b;
    return (x->start > y->start) - (x->start < y->start);
}

/* Copy the `n` ranges [ranges[2i], ranges[2i+1]) of this process's memory
 * and prefilter them; `starts` (the object's function symbols) begin the
 * regions decoded on demand.  NULL with the reason in `err`. */
struct hp_branch_index *hp_branch_index_build(const uintptr_t *ranges, int n,
                                              const uintptr_t *starts, size_t nstarts,
                                              char *err)
{
    struct hp_branch_index *ix = calloc(1, sizeof *ix);

    if (!cs.disasm_iter) {
        snprintf(err, HP_ERRLEN, "capstone is not loaded (hp_capstone_load)");
        free(ix);
        return NULL;
    }
    if (!ix)
        goto oom;
    pthread_mutex_init(&ix->lock, NULL);
    if (cs.open(CS_ARCH_X86, CS_MODE_64, &ix->handle) != CS_ERR_OK
        || !(ix->insn = cs.malloc(ix->handle))) {
        snprintf(err, HP_ERRLEN, "cannot open a capstone handle");
        hp_branch_index_free(ix);
        return NULL;
    }
    ix->segments = calloc(n ? n : 1, sizeof *ix->segments);
    ix->regions = calloc(nstarts + n + 1, sizeof *ix->regions);
    if (!ix->segments || !ix->regions)
        goto oom;
    for (int i = 0; i < n; i++) {
        struct segment *s = &ix->segments[ix->nsegments++];
        size_t len = ranges[2 * i + 1] - ranges[2 * i];
        s->lo = ranges[2 * i];
        s->hi = ranges[2 * i + 1];
        if (!(s->code = malloc(len ? len : 1)))
            goto oom;
        /* Copied, never read in place: another thread may unload the
         * object meanwhile. */
        if (hp_read_memory(s->lo, s->code, len) != (long)len) {
            snprintf(err, HP_ERRLEN, "cannot read the code at %#lx (%zu bytes): "
                     "unmapped meanwhile?", (unsigned long)s->lo, len);
            hp_branch_index_free(ix);
            return NULL;
        }
        if (bucket_candidates(s))
            goto oom;
        ix->regions[ix->nregions++].start = s->lo;
    }
    for (size_t i = 0; i < nstarts; i++)
        if (segment_of(ix, starts[i]))
            ix->regions[ix->nregions++].start = starts[i];
    qsort(ix->regions, ix->nregions, sizeof *ix->regions, by_start);
    return ix;
oom:
    snprintf(err, HP_ERRLEN, "out of memory indexing branches");
    hp_branch_index_free(ix);
    return NULL;
}

/* Is `t` inside one of the `k` intervals [lo, hi) of `in`? */
static int in_intervals(uintptr_t t, const uintptr_t *in, int k)
{
    for (int i = 0; i < k; i++)
        if (in[2 * i] <= t && t < in[2 * i + 1])
            return 1;
    return 0;
}

/* A vector of 4 displacements (SSE2, the x86-64 baseline; GCC's vector
 * extensions, no intrinsics). */
typedef uint32_t u32x4 __attribute__((vector_size(16)));

/* Could one of the 16 displacements starting at p[0..15] lead into the
 * span of `span` bytes, where the one at p[0] counts from `from` bytes
 * before the span?  In 32-bit arithmetic: never false where the exact
 * test (see hp_branch_candidates_into) is true, sometimes true where it is
 * false, which the exact test then sorts out.  p[0..18] are read. */
static int any_rel32_into(const uint8_t *p, uint32_t from, uint32_t span)
{
    static const u32x4 lanes[4] = { { 0, 4, 8, 12 }, { 1, 5, 9, 13 }, { 2, 6, 10, 14 },
                                    { 3, 7, 11, 15 } };
    const u32x4 spans = { span, span, span, span }, froms = { from, from, from, from };
    u32x4 hit = { 0, 0, 0, 0 };
    for (int k = 0; k < 4; k++) {
        u32x4 v;
        memcpy(&v, p + k, sizeof v);     /* the displacements at p[k], p[k + 4], ... */
        hit |= (u32x4)(v + froms + lanes[k] < spans);
    }
    return (hit[0] | hit[1] | hit[2] | hit[3]) != 0;
}

/* The rel32 forms among the `len` bytes of `buf` (read from `at`; those
 * past `opcodes` only complete a form that starts before) whose target
 * falls into one of the `k` intervals of `into`, all within [first, last):
 * at each j, where a displacement starting there would lead (almost never
 * into the span), then the opcode before it, at j - 1 (E8, E9) or j - 2
 * (0F 8x, C7 F8).  16 displacements at a time where none can lead there:
 * libc's code in 0.5 ms, not 1.5. */
static long rel32_candidates(const uint8_t *buf, size_t len, size_t opcodes, uintptr_t at,
                             uintptr_t first, uintptr_t last, const uintptr_t *into, int k)
{
    long count = 0;
    size_t end = len < 4 ? 0 : (opcodes + 2 < len - 3 ? opcodes + 2 : len - 3);  /* j < end */
    int by16 = last - first < UINT32_MAX;
    for (size_t j = 1; j < end; j++) {
        if (by16 && j % 16 == 0) {
            while (j + 19 <= len && j + 16 <= end &&
                   !any_rel32_into(buf + j, (uint32_t)(at + j + 4 - first), (uint32_t)(last - first)))
                j += 16;
            if (j >= end)
                break;
        }
        uintptr_t t = at + j + 4 + (uintptr_t)(int64_t)rel32_at(buf + j);
        if (t - first >= last - first || !in_intervals(t, into, k))
            continue;
        if ((j - 1 < opcodes && rel32_end(buf, len, j - 1) == j + 4) ||
                (j >= 2 && rel32_end(buf, len, j - 2) == j + 4))
            count++;
    }
    return count;
}

/* How many byte sequences of the code in `ranges` could encode a direct
 * branch into one of the `k` intervals [lo, hi) of `into`, counted as the
 * index finds its candidates (rel32 forms from anywhere in the interval's
 * segment, rel8 and rel16 forms within their reach), none confirmed by
 * decoding; -1 where the code cannot be read.  0 answers "does anything
 * branch there?" without the index: one pass over the bytes, a chunk at a
 * time, a third of building one (libz 0.15 ms against 0.4, libpython 4 ms
 * against 17 with its function starts).  A candidate is often random
 * bytes near a short interval (a rel8 form is 2 bytes): then the index is
 * built and decides, as before. */
long hp_branch_candidates_into(const uintptr_t *ranges, int n, const uintptr_t *into, int k)
{
    enum { CHUNK = 1 << 16, OVERLAP = 8 };  /* a rel32 form is at most 6 bytes */
    uint8_t *buf = malloc(CHUNK + OVERLAP);
    long count = 0;
    if (!buf)
        return -1;
    for (int r = 0; r < n && count >= 0; r++) {
        uintptr_t lo = ranges[2 * r], hi = ranges[2 * r + 1], first = hi, last = lo;
        for (int i = 0; i < k; i++) {       /* the intervals' span in this segment */
            uintptr_t a = into[2 * i] > lo ? into[2 * i] : lo;
            uintptr_t b = into[2 * i + 1] < hi ? into[2 * i + 1] : hi;
            if (a < b) {
                first = a < first ? a : first;
                last = b > last ? b : last;
            }
        }
        if (first >= last)
            continue;       /* as the index: no candidate from another segment */
        for (uintptr_t at = lo; at < hi && count >= 0; at += CHUNK) {
            size_t len = hi - at < CHUNK + OVERLAP ? hi - at : CHUNK + OVERLAP;
            size_t opcodes = len < CHUNK ? len : CHUNK;
            if (hp_read_memory(at, buf, len) != (long)len) {
                count = -1;
                break;
            }
            count += rel32_candidates(buf, len, opcodes, at, first, last, into, k);
        }
        /* rel8 and rel16 forms: only within reach of each interval */
        for (int i = 0; i < k && count >= 0; i++) {
            if (into[2 * i + 1] <= lo || into[2 * i] >= hi)
                continue;
            uintptr_t from = into[2 * i] - lo > REL8_REACH ? into[2 * i] - REL8_REACH : lo;
            uintptr_t to = hi - into[2 * i + 1] > REL8_REACH ? into[2 * i + 1] + REL8_REACH : hi;
            if (to - from > CHUNK + OVERLAP)
                to = from + CHUNK + OVERLAP;   /* intervals are a few bytes */
            struct segment s = { .lo = from, .hi = to, .code = buf };
            if (hp_read_memory(from, buf, to - from) != (long)(to - from)) {
                count = -1;
                break;
            }
            for (size_t p = 0; p < to - from; p++)
                if (near_branch_into(&s, p, into[2 * i], into[2 * i + 1]))
                    count++;
        }
    }
    free(buf);
    return count;
}

/* The regions a query collects branches from: each once, listed (walking
 * every region of the object per query cost more than the query). */
struct wanted {
    uint8_t *seen;              /* one bit a region */
    size_t *list, n, room;
};

/* Decode (once) the region holding the candidate opcode at `opcode`, and
 * mark it for collection; and the region before where the instruction's
 * prefixes may begin there (an instruction across a symbol's start). */
static int want_region(struct hp_branch_index *ix, uintptr_t opcode, struct wanted *w)
{
    size_t last = region_of(ix, opcode), first = region_of(ix, opcode - 14);
    for (size_t r = first <= last ? first : last; r <= last; r++) {
        if (!ix->regions[r].decoded && decode_region(ix, r))
            return -1;
        if (w->seen[r / 8] & (1 << (r % 8)))
            continue;
        if (w->n == w->room) {
            size_t *more = realloc(w->list, (w->room = w->room ? 2 * w->room : 16) * sizeof *more);
            if (!more)
                return -1;
            w->list = more;
        }
        w->seen[r / 8] |= 1 << (r % 8);
        w->list[w->n++] = r;
    }
    return 0;
}

static int by_target(const void *a, const void *b)
{
    const struct branch *x = a, *y = b;
    if (x->target != y->target)
        return x->target < y->target ? -1 : 1;
    return (x->source > y->source) - (x->source < y->source);
}

/* The relative branches landing in [lo, hi), by target then source: the
 * first `capacity` go to `sources` and `targets`; returns how many there
 * are, or -1 out of memory. */
long hp_branch_index_into(struct hp_branch_index *ix, uintptr_t lo, uintptr_t hi,
                          uint64_t *sources, uint64_t *targets, long capacity)
{
    struct wanted wanted = { calloc(ix->nregions / 8 + 1, 1), NULL, 0, 0 };
    struct branch *found = NULL;
    size_t nfound = 0, room = 0;
    long rc = -1;

    if (!wanted.seen)
        return -1;
    pthread_mutex_lock(&ix->lock);
    for (int i = 0; i < ix->nsegments; i++) {
        const struct segment *s = &ix->segments[i];
        uintptr_t a = lo > s->lo ? lo : s->lo, b = hi < s->hi ? hi : s->hi;
        if (a >= b)
            continue;
        /* rel32 candidates aimed at [a, b) */
        for (size_t bucket = (a - s->lo) >> BUCKET_SHIFT;
             bucket <= (b - 1 - s->lo) >> BUCKET_SHIFT; bucket++)
            for (uint32_t k = s->bucket_start[bucket]; k < s->bucket_start[bucket + 1]; k++)
                if (want_region(ix, s->lo + s->candidates[k], &wanted))
                    goto out;
        /* rel8 and rel16 candidates: only within reach of [a, b) */
        size_t from = a - s->lo > REL8_REACH ? a - s->lo - REL8_REACH : 0;
        size_t to = b - s->lo + REL8_REACH < s->hi - s->lo ? b - s->lo + REL8_REACH : s->hi - s->lo;
        for (size_t k = from; k < to; k++)
            if (near_branch_into(s, k, a, b) && want_region(ix, s->lo + k, &wanted))
                goto out;
    }
    for (size_t w = 0; w < wanted.n; w++) {
        size_t r = wanted.list[w];
        for (uint32_t k = 0; k < ix->regions[r].n; k++) {
            struct branch br = ix->regions[r].branches[k];
            if (br.target < lo || br.target >= hi)
                continue;
            if (nfound == room) {
                struct branch *more = realloc(found, (room = room ? 2 * room : 16) * sizeof *more);
                if (!more)
                    goto out;
                found = more;
            }
            found[nfound++] = br;
        }
    }
    qsort(found, nfound, sizeof *found, by_target);
    for (size_t k = 0; k < nfound && (long)k < capacity; k++) {
        sources[k] = found[k].source;
        targets[k] = found[k].target;
    }
    rc = (long)nfound;
out:
    pthread_mutex_unlock(&ix->lock);
    free(found);
    free(wanted.list);
    free(wanted.seen);
    return rc;
}

/* ---- one function -------------------------------------------------- */

/* Two capstone handles per decoding thread, without and with operand
 * details (details slow every decode, and few instructions need them),
 * kept while the thread lives -- opening one costs more than decoding a
 * small function -- and closed when it exits: a thread that decoded once
 * would otherwise leave about 100 KB of capstone's behind. */
struct decoder {
    csh handle;
    cs_insn *insn;
};
static __thread struct decoder thread_decoders[2];
static pthread_key_t decoders_key;
static int decoders_key_made;
static pthread_once_t decoders_key_once = PTHREAD_ONCE_INIT;

static void close_decoders(void *decoders)
{
    for (struct decoder *d = decoders; d < (struct decoder *)decoders + 2; d++)
        if (d->insn) {
            cs.free(d->insn, 1);
            cs.close(&d->handle);
            d->insn = NULL;
        }
}

static void make_decoders_key(void)
{
    decoders_key_made = pthread_key_create(&decoders_key, close_decoders) == 0;
}

/* This thread's decoder (with operand details if `detailed`), opened on
 * first use; NULL where capstone cannot be used. */
static cs_insn *open_decoder(int detailed, csh *out)
{
    struct decoder *d = &thread_decoders[detailed];

    if (!d->insn) {
        if (!cs.disasm_iter || cs.open(CS_ARCH_X86, CS_MODE_64, &d->handle) != CS_ERR_OK)
            return NULL;
        if ((detailed && cs.option(d->handle, CS_OPT_DETAIL, CS_OPT_ON) != CS_ERR_OK)
                || !(d->insn = cs.malloc(d->handle))) {
            cs.close(&d->handle);
            return NULL;
        }
        pthread_once(&decoders_key_once, make_decoders_key);
        if (decoders_key_made)      /* a value set: close_decoders runs at the thread's exit */
            pthread_setspecific(decoders_key, thread_decoders);
    }
    *out = d->handle;
    return d->insn;
}

static cs_insn *thread_decoder(csh *out)
{
    return open_decoder(0, out);
}

/* For the few instructions whose operands matter (plan.c, decode.c). */
static cs_insn *thread_detailed_decoder(csh *out)
{
    return open_decoder(1, out);
}

/* The instruction at the start of `code` (placed at `address`): its
 * length (0 if it does not decode, -1 where capstone cannot be used) and
 * in `*kind` whether it never falls through (ret, jmp, ud2, hlt), is
 * padding (nop, int3) or a call. */
int hp_instruction_kind(const uint8_t *code, size_t len, uint64_t address, int *kind)
{
    csh handle;
    cs_insn *insn = thread_decoder(&handle);
    *kind = HP_INSN_OTHER;
    if (!insn)
        return -1;
    if (!cs.disasm_iter(handle, &code, &len, &address, insn))
        return 0;
    if (insn->id == X86_INS_RET || insn->id == X86_INS_JMP || insn->id == X86_INS_UD2 ||
            insn->id == X86_INS_HLT)
        *kind = HP_INSN_LEAVES;
    else if (insn->id == X86_INS_NOP || insn->id == X86_INS_INT3)
        *kind = HP_INSN_PADDING;
    else if (insn->id == X86_INS_CALL)
        *kind = HP_INSN_CALL;
    return (int)insn->size;
}

/* Do the bytes at `code` (placed at `address`, `len` of them readable)
 * decode as padding (nop, int3) over at least their first `want`?  The
 * bytes those instructions take (`want` or more), 0 where one is not
 * padding or does not decode within `len`. */
size_t hp_padding_over(const uint8_t *code, size_t len, uint64_t address, size_t want)
{
    size_t at = 0;
    while (at < want) {
        int kind, n = hp_instruction_kind(code + at, len - at, address + at, &kind);
        if (n <= 0 || kind != HP_INSN_PADDING)
            return 0;
        at += (size_t)n;
    }
    return at;
}

/* The instruction at the start of `code` (placed at `address`), with its
 * operand details if `detailed`, or NULL where it is undecodable or
 * capstone cannot be used.  Valid until the next call in this thread. */
static const cs_insn *decode_first(int detailed, const uint8_t *code, size_t len,
                                   uint64_t address)
{
    csh handle;
    cs_insn *insn = open_decoder(detailed, &handle);

    if (!insn || !cs.disasm_iter(handle, &code, &len, &address, insn))
        return NULL;
    return insn;
}

const cs_insn *hp_decode_detailed(const uint8_t *code, size_t len, uint64_t address)
{
    return decode_first(1, code, len, address);
}

const cs_insn *hp_decode_text(const uint8_t *code, size_t len, uint64_t address)
{
    return decode_first(0, code, len, address);
}

/* Whether this thread can decode, with and without details: the two
 * functions above return NULL then only for bytes that do not decode. */
int hp_capstone_usable(void)
{
    csh handle;
    return thread_decoder(&handle) && thread_detailed_decoder(&handle);
}

/* The registers `insn` (from hp_decode_detailed, in this thread) writes,
 * implicit ones included, as capstone lists them: 0, or -1. */
int hp_registers_written(const cs_insn *insn, uint16_t *regs, uint8_t *count)
{
    csh handle;
    cs_regs read;
    uint8_t nread;

    if (!thread_detailed_decoder(&handle))
        return -1;
    return cs.regs_access(handle, insn, read, &nread, regs, count) == CS_ERR_OK ? 0 : -1;
}

/* capstone's name of register `reg` ("rax", "xmm3"), NULL where it has none. */
const char *hp_register_name(unsigned reg)
{
    csh handle;
    return thread_detailed_decoder(&handle) ? cs.reg_name(handle, reg) : NULL;
}

/* Linear sweep of `code` (placed at `address`) that stops at the first byte
 * that does not start an instruction, or at the first instruction starting
 * at or after `stop`: the entry analysis's view of one function.  The end
 * of the last instruction decoded goes to `*decoded_end`; the relative
 * branches (source, target) to `sources`/`targets` (the first `capacity`);
 * returns how many there are, or -1 where capstone cannot be used. */
long hp_function_branches(const uint8_t *code, size_t len, uint64_t address, uint64_t stop,
                          uint64_t *decoded_end, uint64_t *sources, uint64_t *targets,
                          long capacity)
{
    csh handle;
    cs_insn *insn = thread_decoder(&handle);
    long found = 0;

    *decoded_end = address;
    if (!insn)
        return -1;
    while (len && address < stop) {
        uint64_t at = address, target;
        if (!cs.disasm_iter(handle, &code, &len, &address, insn))
            break;
        *decoded_end = address;
        if (relative_target(insn, &target)) {
            if (found < capacity) {
                sources[found] = at;
                targets[found] = target;
            }
            found++;
        }
    }
    return found;
}

/* ---- a batch of entries ---------------------------------------------- */

/*
 * What the entry analysis (x86_64/entry.py) needs of each function of a
 * batch, in one call: its bytes, the instructions at its head and the
 * branches of the whole function landing just after its entry.  Through
 * capstone's Python binding that was ~50 us a function (a sweep, the
 * function's scan, a read, each with its own allocations); the decisions
 * stay in Python.
 */
static const uint8_t endbr64[4] = { 0xF3, 0x0F, 0x1E, 0xFA };

/* One linear sweep from the entry serves both questions:
 *  - the head: the instructions from `s->address` up to the first reaching
 *    HP_SCAN_COVER bytes, as entry.py's _head took them from a sweep of the
 *    first HP_SCAN_AHEAD bytes (a head instruction starts by entry + 8 and,
 *    at most 15 bytes long, ends by entry + 23: the longer sweep decodes it
 *    the same);
 *  - the function's own relative branches landing in (address, address +
 *    HP_SCAN_AHEAD), the only ones that can land inside the replaced bytes,
 *    when its end `stop` is known.
 * Decoding each instruction once halves capstone's part of a small function. */
static void scan_function(csh handle, cs_insn *insn, const uint8_t *code, struct hp_entry_scan *s)
{
    size_t len = s->len;
    uint64_t address = s->entry, next = s->address;
    int head_open = 1;

    while (len && ((head_open && address < s->entry + HP_SCAN_AHEAD) || address < s->stop)) {
        uint64_t at = address, target;
        if (!cs.disasm_iter(handle, &code, &len, &address, insn))
            break;
        if (at < s->stop)
            s->decoded_end = address;
        if (head_open && at >= s->address) {
            if (at != next || address > s->entry + HP_SCAN_AHEAD || s->nhead == HP_SCAN_HEAD) {
                head_open = 0;
            } else {
                struct hp_scanned_insn *h = &s->head[s->nhead++];
                h->address = at;
                h->size = insn->size;
                memcpy(h->mnemonic, insn->mnemonic, sizeof h->mnemonic);
                memcpy(h->op_str, insn->op_str, sizeof h->op_str);
                next = address;
                head_open = address - s->address < HP_SCAN_COVER;
            }
        }
        if (at < s->stop && relative_target(insn, &target) && target > s->address
                && target < s->address + HP_SCAN_AHEAD) {
            if (s->nbranches < HP_SCAN_BRANCHES)
                s->branches[s->nbranches] = (struct hp_scanned_branch){ at, target };
            s->nbranches++;
        }
    }
}

/* Read each entry's bytes to buf[offset, offset + len), HP_SCAN_UNMAPPED
 * where they are not mapped.  Entries close together, as a batch's usually
 * are, are read as one span (a system call's cost is per range: each one
 * pins its pages) and copied out; a gap of less than a page between two
 * windows holds no page that neither of them touches, so a span reads
 * nothing the windows alone would not.  One process_vm_readv reads up to
 * READ_BATCH spans and stops at the first it cannot read whole: that
 * span's entries are read one by one to tell, and the batch goes on after
 * it. */
#define READ_BATCH 256
#define SPAN_GAP 256
struct span {
    uint64_t start, end;
    long first, last;            /* scans[first..last) */
};

static void read_span_alone(struct hp_entry_scan *scans, const struct span *sp, uint8_t *buf)
{
    for (long k = sp->first; k < sp->last; k++)
        scans[k].status = hp_read_memory(scans[k].entry, buf + scans[k].offset, scans[k].len)
                          == (long)scans[k].len ? 0 : HP_SCAN_UNMAPPED;
}

static void read_entries(struct hp_entry_scan *scans, long n, uint8_t *buf)
{
    struct iovec local[READ_BATCH], remote[READ_BATCH];
    struct span spans[READ_BATCH];
    uint8_t *staging = NULL;
    size_t room = 0;
    long i = 0;

    while (i < n) {
        long nspans = 0, done = 0, got;
        size_t total = 0;
        for (; i < n && nspans < READ_BATCH; nspans++) {
            struct span *sp = &spans[nspans];
            *sp = (struct span){ scans[i].entry, scans[i].entry + scans[i].len, i, i + 1 };
            while (sp->last < n && scans[sp->last].entry >= sp->start
                   && scans[sp->last].entry <= sp->end + SPAN_GAP) {
                uint64_t end = scans[sp->last].entry + scans[sp->last].len;
                sp->end = end > sp->end ? end : sp->end;
                sp->last++;
            }
            i = sp->last;
            total += sp->end - sp->start;
        }
        if (total > room) {
            uint8_t *more = realloc(staging, total);
            if (!more) {        /* each entry alone, then */
                for (long k = 0; k < nspans; k++)
                    read_span_alone(scans, &spans[k], buf);
                continue;
            }
            staging = more;
            room = total;
        }
        total = 0;
        for (long k = 0; k < nspans; k++) {
            size_t len = spans[k].end - spans[k].start;
            local[k] = (struct iovec){ staging + total, len };
            remote[k] = (struct iovec){ (void *)(uintptr_t)spans[k].start, len };
            total += len;
        }
        got = hp_sys(SYS_process_vm_readv, hp_gettid(), local, nspans, remote, nspans, 0);
        for (size_t left = got > 0 ? (size_t)got : 0;
             done < nspans && left >= local[done].iov_len; done++) {
            const struct span *sp = &spans[done];
            const uint8_t *from = local[done].iov_base;
            left -= local[done].iov_len;
            for (long k = sp->first; k < sp->last; k++) {
                memcpy(buf + scans[k].offset, from + (scans[k].entry - sp->start), scans[k].len);
                scans[k].status = 0;
            }
        }
        if (done < nspans) {
            read_span_alone(scans, &spans[done], buf);
            i = spans[done].last;
        }
    }
    free(staging);
}

/* Scan `n` entries.  Each one's bytes are buf[offset, offset + len): read
 * from this process's memory at `entry` first when `read` is set (status
 * HP_SCAN_UNMAPPED where they are not mapped).  `stop` = 0: the function's
 * size is unknown, its branches are not scanned.  Returns 0, or -1 where
 * capstone cannot be used. */
long hp_scan_entries(struct hp_entry_scan *scans, long n, uint8_t *buf, int read)
{
    csh handle;
    cs_insn *insn = thread_decoder(&handle);

    if (!insn)
        return -1;
    if (read)
        read_entries(scans, n, buf);
    for (long i = 0; i < n; i++) {
        struct hp_entry_scan *s = &scans[i];
        uint8_t *code = buf + s->offset;
        s->nhead = s->nbranches = 0;
        s->decoded_end = s->entry;
        if (!read)
            s->status = 0;
        if (s->status)
            continue;
        s->address = s->len >= sizeof endbr64 && !memcmp(code, endbr64, sizeof endbr64)
                     ? s->entry + sizeof endbr64 : s->entry;
        scan_function(handle, insn, code, s);
    }
    return 0;
}
