/*
 * The sites near an address: the bytes other sites write, which a new
 * site's writes must leave alone.
 *
 * Every site sites.py keeps (a redirected entry, or one that was) is filed
 * here with the span its entry's jmp replaces and, once its hot-patch
 * point has been written, that point (hop.c): the 5 bytes before the
 * entry.  A first redirect (first.c) asks here for what its own writes
 * would reach, within the same call of the core; the batch path asks
 * which sites reach a point it found, and whether an entry's jmp would
 * cover a point.  The answer for an address is in one to three 64-byte
 * blocks: a site's bytes lie within [entry - 5, entry + 23).
 *
 * In Python this index cost a first redirect 1-1.5 us cold (two functions,
 * dictionary lookups and a loop, every call), a tenth of it.  The callers
 * hold sites.py's lock: nothing here locks.
 */
#include "hotpatch_core.h"

#include <stdlib.h>
#include <string.h>

#define BLOCK_SHIFT 6
/* The bytes a site writes, around its entry: its point before it, its
 * jmp's span after it (an endbr64, then instructions that cover 5 bytes,
 * the last starting within them: 4 + 4 + 15). */
#define BEFORE_ENTRY HP_HOP_SIZE
#define AFTER_ENTRY (4 + 4 + 15)

struct near_site {
    uint64_t entry, lo, hi;     /* [lo, hi): the bytes its entry's jmp replaces */
    uint64_t hop;               /* its hot-patch point once written, else 0 */
};

struct block {
    uint64_t key;               /* the block's number + 1; 0: an empty slot */
    uint32_t n, cap;
    struct near_site *sites;
};

static struct block *blocks;    /* open addressing, a power of 2 of slots */
static size_t nslots, nused;
static long nhops;              /* the sites whose point is written */

static size_t slot_of(uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & (nslots - 1);
}

/* The block numbered `number`, or NULL where it holds no site. */
static struct block *block_of(uint64_t number)
{
    uint64_t key = number + 1;
    if (!nslots)
        return NULL;
    for (size_t i = slot_of(key);; i = (i + 1) & (nslots - 1)) {
        if (blocks[i].key == key)
            return &blocks[i];
        if (!blocks[i].key)
            return NULL;
    }
}

/* Twice the slots (or the first 1,024), every block moved.  -1: no memory. */
static int grow(void)
{
    size_t old = nslots, size = old ? 2 * old : 1024;
    struct block *was = blocks, *now = calloc(size, sizeof *now);
    if (!now)
        return -1;
    blocks = now;
    nslots = size;
    for (size_t k = 0; k < old; k++)
        if (was[k].key) {
            size_t i = slot_of(was[k].key);
            while (blocks[i].key)
                i = (i + 1) & (nslots - 1);
            blocks[i] = was[k];
        }
    free(was);
    return 0;
}

/* The block numbered `number`, made if it is not there; NULL: no memory.
 * A block emptied stays (a service patches the same places again). */
static struct block *block_made(uint64_t number)
{
    struct block *b = block_of(number);
    if (b)
        return b;
    if ((nused + 1) * 2 > nslots && grow())
        return NULL;
    uint64_t key = number + 1;
    size_t i = slot_of(key);
    while (blocks[i].key)
        i = (i + 1) & (nslots - 1);
    blocks[i].key = key;
    nused++;
    return &blocks[i];
}

static struct near_site *site_in(struct block *b, uint64_t entry)
{
    for (uint32_t k = 0; b && k < b->n; k++)
        if (b->sites[k].entry == entry)
            return &b->sites[k];
    return NULL;
}

static struct near_site *site_of(uint64_t entry)
{
    return site_in(block_of(entry >> BLOCK_SHIFT), entry);
}

/* File the site at `entry`, its jmp replacing [lo, hi), its point not
 * written (a new site, or one made again at an entry whose object was
 * unloaded).  0, or -1 where memory is short. */
int hp_near_file(uint64_t entry, uint64_t lo, uint64_t hi)
{
    struct block *b = block_made(entry >> BLOCK_SHIFT);
    if (!b)
        return -1;
    struct near_site *s = site_in(b, entry);
    if (!s) {
        if (b->n == b->cap) {
            uint32_t cap = b->cap ? 2 * b->cap : 2;
            struct near_site *more = realloc(b->sites, cap * sizeof *more);
            if (!more)
                return -1;
            b->sites = more;
            b->cap = cap;
        }
        s = &b->sites[b->n++];
    } else if (s->hop) {
        nhops--;
    }
    *s = (struct near_site){ entry, lo, hi, 0 };
    return 0;
}

/* hp_near_file() of each planned site of a batch (plan.c's plans whose
 * status is HP_PLAN_OK: sites.py makes a site of each).  0, or -1. */
int hp_near_file_plans(const struct hp_plan *plans, long n)
{
    for (long i = 0; i < n; i++)
        if (plans[i].status == HP_PLAN_OK &&
                hp_near_file(plans[i].entry, plans[i].address,
                             plans[i].address + plans[i].length))
            return -1;
    return 0;
}

/* The site at `entry` is no longer kept (its object unloaded). */
void hp_near_unfile(uint64_t entry)
{
    struct block *b = block_of(entry >> BLOCK_SHIFT);
    struct near_site *s = site_in(b, entry);
    if (!s)
        return;
    if (s->hop)
        nhops--;
    *s = b->sites[--b->n];
}

/* The point at `hop` of the site at `entry` is written (0: no longer).
 * -1 where that site is not filed. */
int hp_near_point(uint64_t entry, uint64_t hop)
{
    struct near_site *s = site_of(entry);
    if (!s)
        return -1;
    nhops += (hop != 0) - (s->hop != 0);
    s->hop = hop;
    return 0;
}

/* How many sites have their point written. */
long hp_near_points(void)
{
    return nhops;
}

/* Call `each` for every site whose bytes may reach [lo, hi): the blocks
 * of the entries from lo - AFTER_ENTRY to hi + BEFORE_ENTRY. */
#define EACH_SITE_NEAR(lo, hi, s)                                                          \
    for (uint64_t number_ = ((lo) > AFTER_ENTRY ? (lo) - AFTER_ENTRY : 0) >> BLOCK_SHIFT;  \
         number_ <= ((hi) + BEFORE_ENTRY) >> BLOCK_SHIFT; number_++)                       \
        for (struct block *b_ = block_of(number_); b_; b_ = NULL)                          \
            for (struct near_site *s = b_->sites; s < b_->sites + b_->n; s++)

static int overlaps(uint64_t lo, uint64_t hi, uint64_t from, uint64_t to)
{
    return from < hi && lo < to;
}

/* The entries of the sites whose jmp's span overlaps [lo, hi), into
 * `out` (up to `cap`).  Returns how many there are. */
long hp_near_entries(uint64_t lo, uint64_t hi, uint64_t *out, long cap)
{
    long n = 0;
    EACH_SITE_NEAR(lo, hi, s)
        if (overlaps(lo, hi, s->lo, s->hi)) {
            if (n < cap)
                out[n] = s->entry;
            n++;
        }
    return n;
}

/* Does a written point overlap [lo, hi)? */
int hp_near_point_over(uint64_t lo, uint64_t hi)
{
    if (!nhops)
        return 0;
    EACH_SITE_NEAR(lo, hi, s)
        if (s->hop && overlaps(lo, hi, s->hop, s->hop + HP_HOP_SIZE))
            return 1;
    return 0;
}

/* The [lo, hi) pairs, flat, of the bytes the sites other than the one at
 * `self` write that overlap [lo, hi) (their jmps' spans, their written
 * points), into `pairs` (up to `cap` pairs): what first.c must leave
 * alone.  Returns how many there are. */
long hp_near_taken(uint64_t lo, uint64_t hi, uint64_t self, uint64_t *pairs, long cap)
{
    long n = 0;
    EACH_SITE_NEAR(lo, hi, s) {
        if (s->entry == self)
            continue;
        uint64_t spans[2][2] = { { s->lo, s->hi }, { s->hop, s->hop + HP_HOP_SIZE } };
        for (int k = 0; k < 1 + (s->hop != 0); k++)
            if (overlaps(lo, hi, spans[k][0], spans[k][1])) {
                if (n < cap) {
                    pairs[2 * n] = spans[k][0];
                    pairs[2 * n + 1] = spans[k][1];
                }
                n++;
            }
    }
    return n;
}
