/*
 * A function's first redirect in one call: its plan and original stub
 * (plan.c), whether the jmp at its entry needs a stop (unstopped.c), its
 * hot-patch point (hop.c) and the entry write (codewrite.c), from one read
 * of the bytes around the entry.
 *
 * The batch path asks each of these in a call of its own, and each reads
 * the bytes it needs again (a process_vm_readv, about 2 us here); with the
 * Python between the calls, that was most of a single site's apply.  This
 * is sites.redirect()'s way for the common case: a function with no site
 * yet, sent to a target within reach.  Every decision is the batch path's
 * (the same functions take it); where this path cannot take one, it stops
 * and says how far it went, and sites.py goes on the batch way from there.
 */
#include "hotpatch_core.h"

#include <stdlib.h>
#include <string.h>

#define JMP_REL32 5
#define BEHIND HP_HOP_READ_BEHIND

/* The bytes other sites write near a first redirect's (nearby.c), at most:
 * a few sites start within the 28 bytes its writes span. */
#define TAKEN_MAX 16

/* Does [lo, hi) overlap one of the `ntaken` [lo, hi) pairs of `taken`? */
static int overlaps(uint64_t lo, uint64_t hi, const uint64_t *taken, long ntaken)
{
    for (long k = 0; k < ntaken; k++)
        if (lo < taken[2 * k + 1] && taken[2 * k] < hi)
            return 1;
    return 0;
}

/* The hot-patch point the batch path would take for the first install of
 * the planned entry (sites.py's hot_patch_point): 0 where the jmp rel32
 * needs no stop or there is none.  `bytes` starts BEHIND bytes before the
 * entry. */
static uint64_t first_hop(struct hp_first *f, const uint8_t *bytes, const uint64_t *taken,
                          long ntaken)
{
    const struct hp_plan *p = &f->plan;
    uint64_t hop = hp_hop_over(p->entry, p->address, p->length, f->before, f->starts, bytes,
                               &f->stops_plainly, f->hop_padding);
    /* HP_HOP_ASK_BEFORE: only a sweep from the function before could tell,
     * and there is none (f->before 0, no f->starts): no point, as the
     * batch path. */
    if (!hop || hop == HP_HOP_ASK_BEFORE || hp_stop_forced())
        return 0;
    /* Not where another site's entry write reaches (sites.py's _sites_reaching). */
    return overlaps(hop, hop + HP_HOP_SIZE, taken, ntaken) ? 0 : hop;
}

/* Write the entry: through the hot-patch point (its jmp rel32 first, then
 * the jmp rel8 to it at the entry), else the jmp rel32 at the entry, in
 * one call of codewrite.c.  `others`: the process has other threads (as
 * hp_alone just said).  0, or -1 with `err` and nothing left written. */
static int write_entry(struct hp_first *f, int others, int timeout_ms, char *err)
{
    const struct hp_plan *p = &f->plan;
    struct hp_entry_change c = {
        .address = p->address, .new_op = 0xE9, .new_to = f->target, .length = p->length,
        .hop = f->hop, .hop_to = f->hop ? f->target : 0, .new_hop = f->hop != 0,
    };
    struct hp_write w[2], point = { .address = f->hop, .len = HP_HOP_SIZE, .bytes = { 0xE9 } };
    uint8_t rewritten;
    memcpy(c.original, p->original, p->length);
    long n = hp_entry_writes(&c, 1, w, &rewritten);
    if (n < 0) {
        hp_fmt_str(err, err + HP_ERRLEN, "an entry write does not fit hotpatch's writes");
        return -1;
    }
    if (f->hop) {
        memcpy(point.old, f->hop_padding, HP_HOP_SIZE);
        hp_put_rel32(point.bytes + 1, f->hop + JMP_REL32, f->target);
    }
    return hp_write_dead_then_batch(&point, f->hop != 0, w, (size_t)n, others, timeout_ms,
                                    err) ? -1 : 0;
}

/*
 * The first redirect of the function at f->plan.entry (f->plan.size bytes,
 * 0: unknown) to f->target.  f->before: the start of the function before
 * it, for a hot-patch point that only a sweep from there shows (hop.c); 0
 * where there is none, or where f->starts is given to look it up in, only
 * if it is needed.  `ranges`: as hp_plan_entries'; `free_blocks`: pool
 * blocks to reuse for the stub (the one taken gets size 0).  What other
 * sites write near the entry (their entries, their hot-patch points) is
 * left alone (nearby.c).
 *
 * f->plan is planned as hp_plan_entries plans it, its stub written; where
 * its status is not HP_PLAN_OK, nothing else is done.  Then the site is
 * filed among the sites near (sites.py makes one), and f->written:
 *   1  the entry redirected, through f->hop where that is not 0 (filed as
 *      written);
 *   0  not written: the target is out of reach of a jmp rel32, or the jmp
 *      would cover bytes another site writes -- the batch path decides;
 *  -1  the write failed, `err` says why; nothing is left written.
 * f->stops_plainly and f->hop are set where f->hop_known is (not in a
 * process of one thread, which takes no point).  Returns 0, or
 * -1 where capstone cannot be used or memory is short.
 */
long hp_redirect_first(struct hp_first *f, const uint64_t *ranges, long nranges,
                       struct hp_code_block *free_blocks, size_t nfree, int timeout_ms,
                       char *err)
{
    uint64_t end, window = hp_plan_window(&f->plan, ranges, nranges, &end);
    size_t len = BEHIND + (window > HP_SCAN_AHEAD ? window : HP_SCAN_AHEAD);
    /* Most functions' bytes fit on the stack: no allocation for them. */
    uint8_t on_stack[1024];
    uint8_t *bytes = len <= sizeof on_stack ? on_stack : malloc(len);
    long rc = -1;
    err[0] = 0;
    f->written = 0;
    f->hop_known = 0;
    f->hop = 0;
    if (!bytes)
        return -1;
    /* One read for all: where the bytes before the entry are not mapped,
     * the plan reads for itself and the batch path does the rest. */
    int have = f->plan.entry >= BEHIND &&
               hp_read_memory(f->plan.entry - BEHIND, bytes, len) == (long)len;
    if (hp_plan_entries_from(&f->plan, 1, ranges, nranges, 1, free_blocks, nfree,
                             have ? bytes + BEHIND : NULL, window) < 0)
        goto out;
    const struct hp_plan *p = &f->plan;
    if (p->status == HP_PLAN_OK && hp_near_file(p->entry, p->address, p->address + p->length))
        goto out;
    rc = 0;
    if (!have || p->status != HP_PLAN_OK || !hp_in_reach(p->address, f->target, JMP_REL32))
        goto out;
    uint64_t taken[2 * TAKEN_MAX];
    long ntaken = hp_near_taken(p->entry - HP_HOP_SIZE, p->address + p->length, p->entry,
                                taken, TAKEN_MAX);
    if (ntaken > TAKEN_MAX)
        goto out;       /* more than a few sites near: the batch path decides */
    /* A process of one thread needs no stop, so no point (sites.py's
     * _hops_spare_a_stop): not looked for, the batch path looks for it
     * when it is asked again with other threads there. */
    int alone = hp_alone();
    uint64_t hop = alone ? 0 : first_hop(f, bytes, taken, ntaken);
    f->hop = hop;
    f->hop_known = !alone;
    if (overlaps(p->address, p->address + p->length, taken, ntaken) ||
            (hop && !hp_in_reach(hop, f->target, JMP_REL32)))
        goto out;
    f->written = write_entry(f, !alone, timeout_ms, err) ? -1 : 1;
    if (f->written == 1 && f->hop)
        hp_near_point(p->entry, f->hop);
out:
    if (bytes != on_stack)
        free(bytes);
    return rc;
}
