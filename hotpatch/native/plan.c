/*
 * plan.c -- the plans and original stubs of a batch's common entries.
 *
 * The entry analysis and the relocator are Python's (x86_64/entry.py,
 * x86_64/relocate.py): they decide every shape and word every refusal.  A
 * big patch made them most of its cost (tens of microseconds a function),
 * so the shapes an optimising compiler emits at function entries are
 * planned and relocated here, for a whole batch in one call: instructions
 * that do not depend on where they run, RIP-relative operands (their disp32
 * moved), and relative jmp/jcc (re-encoded, near or far), and a function
 * shorter than the jump that ends in a ret or jmp with padding after it.
 * Anything else -- a NOP or call at the entry, a call, loop or xbegin among
 * the replaced instructions, a branch inside them, a function too short
 * with no padding, a refusal of any kind -- is left to Python
 * (HP_PLAN_PYTHON), which then plans that
 * function as before.  The decisions taken here are the Python ones for
 * these shapes, step by step (the function names below are entry.py's and
 * relocate.py's); tests/test_plan.py compares both on real code, stub byte
 * for byte, so that they cannot drift apart.
 */
#include <capstone/capstone.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hotpatch_core.h"

#define JMP_REL32 5
#define JCC_REL32 6
#define JMP_ABS 14             /* jmp [rip+0]; .quad target */
#define POOL_ALIGN 16          /* pool.c rounds every code block up to this */
#define CHUNK 256              /* functions scanned at a time */

static const uint8_t endbr64[4] = { 0xF3, 0x0F, 0x1E, 0xFA };

enum branch { NONE, RET, JMP, JMP_INDIRECT, JCC, OTHER };

/* What relocate.py's Instruction holds, for the shapes handled here. */
struct insn {
    uint64_t address;
    uint32_t size;
    uint8_t raw[16];
    enum branch branch;
    int ud2;
    uint64_t target;            /* JMP, JCC */
    int rip_disp_offset;        /* -1: no RIP-relative operand */
    uint64_t rip_target;
};

/* Can an instruction of `size` bytes at `src` reach `dst` with a rel32? */
int hp_in_reach(uint64_t src, uint64_t dst, unsigned size)
{
    int64_t d = (int64_t)(dst - (src + size));
    return d >= INT32_MIN && d <= INT32_MAX;
}

static int can_fall_through(const struct insn *i)
{
    return i->branch != JMP && i->branch != JMP_INDIRECT && i->branch != RET && !i->ud2;
}

/* One head instruction as decode.py's _instruction() describes it; 0 where
 * Python must (undecodable, a disp32 capstone misplaces). */
static int describe(const struct hp_scanned_insn *h, const uint8_t *raw, struct insn *out)
{
    memset(out, 0, sizeof *out);
    out->address = h->address;
    out->size = h->size;
    memcpy(out->raw, raw, h->size);
    out->branch = NONE;
    out->ud2 = !strcmp(h->mnemonic, "ud2");
    out->rip_disp_offset = -1;
    /* decode.py's described(): operand details only where they matter. */
    if (!hp_wants_details(h->mnemonic, h->op_str))
        return 1;
    const cs_insn *ci = hp_decode_detailed(raw, h->size, h->address);
    if (!ci || ci->size != h->size)
        return 0;
    const cs_x86 *x = &ci->detail->x86;
    switch (hp_branch_kind(ci)) {
    case HP_BRANCH_RET: out->branch = RET; break;
    case HP_BRANCH_JMP: out->branch = JMP; break;
    case HP_BRANCH_JMP_INDIRECT: out->branch = JMP_INDIRECT; break;
    case HP_BRANCH_JCC: out->branch = JCC; break;
    case HP_BRANCH_CALL: case HP_BRANCH_CALL_INDIRECT: case HP_BRANCH_LOOP:
    case HP_BRANCH_XBEGIN: out->branch = OTHER; break;
    }
    if (out->branch == JMP || out->branch == JCC)
        out->target = (uint64_t)x->operands[0].imm;
    for (int k = 0; k < x->op_count; k++) {
        const cs_x86_op *op = &x->operands[k];
        if (op->type != X86_OP_MEM || op->mem.base != X86_REG_RIP)
            continue;
        int32_t disp;
        unsigned at = x->encoding.disp_offset;
        if (at + 4 > h->size)
            return 0;
        memcpy(&disp, raw + at, 4);
        if (disp != op->mem.disp)
            return 0;       /* decode.py refuses it, in its words */
        out->rip_disp_offset = (int)at;
        out->rip_target = h->address + h->size + (int64_t)op->mem.disp;
        break;
    }
    return 1;
}

/* relocate.py's _size(): bytes an instruction takes in the stub. */
static unsigned stub_size(const struct insn *i, int far)
{
    if (i->rip_disp_offset >= 0)
        return i->size;
    if (i->branch == JMP)
        return far ? JMP_ABS : JMP_REL32;
    if (i->branch == JCC)
        return far ? 2 + JMP_ABS : JCC_REL32;
    return i->size;
}

/* The rel32 from `at_end` (the instruction's end) to `target`, at p. */
uint8_t *hp_put_rel32(uint8_t *p, uint64_t at_end, uint64_t target)
{
    int32_t d = (int32_t)(int64_t)(target - at_end);
    memcpy(p, &d, 4);
    return p + 4;
}

static uint8_t *put_jmp_abs(uint8_t *p, uint64_t target)
{
    static const uint8_t jmp_rip[6] = { 0xFF, 0x25, 0, 0, 0, 0 };
    memcpy(p, jmp_rip, sizeof jmp_rip);
    memcpy(p + sizeof jmp_rip, &target, 8);
    return p + JMP_ABS;
}

/* The condition nibble of a jcc, from its opcode after any prefixes. */
static unsigned condition_code(const struct insn *i)
{
    unsigned k = 0;
    while (k < i->size && (i->raw[k] == 0x26 || i->raw[k] == 0x2E || i->raw[k] == 0x36
                           || i->raw[k] == 0x3E || i->raw[k] == 0x64 || i->raw[k] == 0x65
                           || i->raw[k] == 0x66 || i->raw[k] == 0x67 || i->raw[k] == 0xF0
                           || i->raw[k] == 0xF2 || i->raw[k] == 0xF3
                           || (i->raw[k] & 0xF0) == 0x40))
        k++;
    return (i->raw[k] == 0x0F ? i->raw[k + 1] : i->raw[k]) & 0x0F;
}

/* entry.py's build_original() with relocate.py's relocate(): the stub's code
 * at plan->stub, or 0 where a RIP-relative operand does not reach from
 * there (Python refuses it). */
static int encode_stub(struct hp_plan *plan, const struct insn *insns, int n)
{
    uint64_t at = plan->stub;
    uint8_t *p = plan->code;
    unsigned offsets[HP_PLAN_MAX_INSNS + 1];
    int far[HP_PLAN_MAX_INSNS] = { 0 };

    if (plan->endbr) {
        memcpy(p, endbr64, sizeof endbr64);
        p += sizeof endbr64;
        at += sizeof endbr64;
    }
    /* A branch goes far only when its near form does not reach; a few
     * rounds settle it (relocate.py's loop). */
    for (;;) {
        int changed = 0;
        offsets[0] = 0;
        for (int k = 0; k < n; k++)
            offsets[k + 1] = offsets[k] + stub_size(&insns[k], far[k]);
        for (int k = 0; k < n; k++) {
            unsigned size = insns[k].branch == JCC ? JCC_REL32 : JMP_REL32;
            if (!far[k] && insns[k].rip_disp_offset < 0
                    && (insns[k].branch == JMP || insns[k].branch == JCC)
                    && !hp_in_reach(at + offsets[k], insns[k].target, size))
                far[k] = changed = 1;
        }
        if (!changed)
            break;
    }
    for (int k = 0; k < n; k++) {
        const struct insn *i = &insns[k];
        uint64_t here = at + offsets[k];
        if (i->rip_disp_offset >= 0) {
            int64_t disp = (int64_t)(i->rip_target - (here + i->size));
            int32_t d32 = (int32_t)disp;
            if (disp != d32)
                return 0;
            memcpy(p, i->raw, i->size);
            memcpy(p + i->rip_disp_offset, &d32, 4);
            p += i->size;
        } else if (i->branch == JMP && far[k]) {
            p = put_jmp_abs(p, i->target);
        } else if (i->branch == JMP) {
            *p++ = 0xE9;
            p = hp_put_rel32(p, here + JMP_REL32, i->target);
        } else if (i->branch == JCC && far[k]) {
            *p++ = (uint8_t)(0x70 | (condition_code(i) ^ 1));   /* skips the jump */
            *p++ = JMP_ABS;
            p = put_jmp_abs(p, i->target);
        } else if (i->branch == JCC) {
            *p++ = 0x0F;
            *p++ = (uint8_t)(0x80 | condition_code(i));
            p = hp_put_rel32(p, here + JCC_REL32, i->target);
        } else {
            memcpy(p, i->raw, i->size);
            p += i->size;
        }
    }
    if (plan->falls_through) {
        uint64_t here = plan->stub + (uint64_t)(p - plan->code), resume = plan->address + plan->length;
        if (hp_in_reach(here, resume, JMP_REL32)) {
            *p++ = 0xE9;
            p = hp_put_rel32(p, here + JMP_REL32, resume);
        } else {
            p = put_jmp_abs(p, resume);
        }
    }
    plan->code_len = (uint32_t)(p - plan->code);
    return 1;
}

/* entry.py's _plan() for one scanned function, where its shape is one of
 * this file's: 1 with the plan and the stub's size bound filled, else 0. */
static int plan_one(struct hp_plan *plan, const struct hp_entry_scan *s, const uint8_t *code,
                    uint64_t segment_end, struct insn *insns)
{
    uint64_t entry = plan->entry, address = s->address, want = address + JMP_REL32;
    uint64_t function_end = plan->size ? entry + plan->size : 0, covered = address;
    int n = 0;

    /* _check_inside_segment(entry, max(function_end, address + 5)) */
    if (segment_end && (function_end > want ? function_end : want) > segment_end)
        return 0;
    /* _skippable_plan() needs a NOP or a call first: Python's. */
    if (s->nhead == 0 || !strcmp(s->head[0].mnemonic, "nop") || strstr(s->head[0].mnemonic, "call"))
        return 0;
    /* _covering_instructions() */
    for (int k = 0; k < s->nhead; k++) {
        const struct hp_scanned_insn *h = &s->head[k];
        if (covered >= want || (function_end && covered == function_end))
            break;
        if (function_end && h->address + h->size > function_end)
            return 0;
        if (n == HP_PLAN_MAX_INSNS || !describe(h, code + (h->address - entry), &insns[n]))
            return 0;
        if (!function_end && !can_fall_through(&insns[n]) && h->address + h->size < want)
            return 0;
        covered = h->address + h->size;
        n++;
    }
    if (covered < want && function_end && covered == function_end && n
            && !can_fall_through(&insns[n - 1])) {
        /* _check_padding(): a function shorter than the jump that ends in
         * a ret or jmp, followed by padding (nop, int3) it never reaches --
         * the dynamic linker's r_brk, which the loader hook takes.  Decoded
         * over _covering_window()'s bytes. */
        size_t from = function_end - entry;
        size_t window = s->len > from ? s->len - from : 0;
        if (window > JMP_REL32 + 15 - 1)
            window = JMP_REL32 + 15 - 1;
        if (!hp_padding_over(code + from, window, function_end, want - function_end))
            return 0;           /* Python refuses it, in its words */
        covered = want;
    }
    if (covered < want)         /* undecodable, or too short: Python explains */
        return 0;
    uint64_t lo = address, hi = covered;
    /* _check_replaceable() and check_relocatable(): what is left to Python */
    for (int k = 0; k < n; k++) {
        const struct insn *i = &insns[k];
        if (i->branch == OTHER || !strcmp(s->head[k].mnemonic, "int3"))
            return 0;
        if ((i->branch == JMP || i->branch == JCC) && i->target >= lo && i->target < hi)
            return 0;
    }
    if (segment_end && hi > segment_end)
        return 0;
    /* _check_no_branch_into(): the function's own branches */
    if (function_end) {
        if (s->nbranches > HP_SCAN_BRANCHES || s->decoded_end != function_end)
            return 0;
        for (int k = 0; k < s->nbranches; k++) {
            const struct hp_scanned_branch *b = &s->branches[k];
            if (!(b->source >= lo && b->source < hi) && b->target > lo && b->target < hi)
                return 0;
        }
    }
    plan->address = address;
    plan->length = (uint32_t)(hi - lo);
    plan->endbr = address != entry;
    plan->single_instruction = n == 1 && insns[0].size == plan->length;
    plan->falls_through = can_fall_through(&insns[n - 1]);
    plan->ninsns = (uint8_t)n;
    memcpy(plan->original, code + (address - entry), plan->length);
    /* original_stub_size_bound() */
    unsigned bound = plan->endbr ? sizeof endbr64 : 0;
    for (int k = 0; k < n; k++)
        bound += stub_size(&insns[k], 1);
    plan->stub_size = bound + JMP_ABS;
    return 1;
}

/* entry.py's _window(): the bytes from the plan's entry that its analysis
 * reads (the function, at least its head, never past its segment); 0 where
 * the entry is in none of `ranges` (nranges 0: not checked).  `*end`: its
 * segment's end, 0 where not checked. */
uint64_t hp_plan_window(const struct hp_plan *plan, const uint64_t *ranges, long nranges,
                        uint64_t *end)
{
    uint64_t window = plan->size > HP_SCAN_AHEAD ? plan->size : HP_SCAN_AHEAD;
    *end = 0;
    for (long r = 0; r < nranges; r++)
        if (ranges[2 * r] <= plan->entry && plan->entry < ranges[2 * r + 1])
            *end = ranges[2 * r + 1];
    if (nranges && !*end)
        return 0;
    return *end && window > *end - plan->entry ? *end - plan->entry : window;
}

/* sites.py's _alloc_code(): a free block within reach first, else new. */
static uint64_t alloc_stub(uint64_t near, uint32_t size, struct hp_code_block *free_blocks,
                           size_t nfree)
{
    for (size_t k = 0; k < nfree; k++) {
        struct hp_code_block *b = &free_blocks[k];
        if (b->size >= size && hp_in_reach(near, b->address, JMP_REL32)
                && hp_in_reach(near, b->address + b->size, JMP_REL32)) {
            uint64_t at = b->address;
            b->size = 0;            /* taken */
            return at;
        }
    }
    return hp_alloc_code(near, size);
}

struct run {
    uint64_t start;
    size_t len, room;
    uint8_t *code;
    long first;                 /* plans[first..] are in it */
};

/* Write the run of adjacent stubs; on failure mark its plans. */
static void flush_run(struct run *r, struct hp_plan *plans, long end)
{
    if (r->len && hp_write_code(r->start, r->code, r->len))
        for (long k = r->first; k < end; k++)
            if (plans[k].status == HP_PLAN_OK && plans[k].stub >= r->start
                    && plans[k].stub < r->start + r->len)
                plans[k].status = HP_PLAN_UNWRITTEN;
    r->len = 0;
}

static int append_run(struct run *r, const struct hp_plan *plan, long k)
{
    size_t block = (plan->stub_size + POOL_ALIGN - 1) & ~(size_t)(POOL_ALIGN - 1);
    if (r->len + block > r->room) {
        size_t room = r->room ? 2 * r->room : 4096;
        while (room < r->len + block)
            room *= 2;
        uint8_t *more = realloc(r->code, room);
        if (!more)
            return -1;
        r->code = more;
        r->room = room;
    }
    if (!r->len) {
        r->start = plan->stub;
        r->first = k;
    }
    memcpy(r->code + r->len, plan->code, plan->code_len);
    memset(r->code + r->len + plan->code_len, 0xCC, block - plan->code_len);   /* int3 */
    r->len += block;
    return 0;
}

/*
 * Plan the `n` functions plans[i].entry (plans[i].size bytes, 0: unknown).
 * `ranges` are the [lo, hi) pairs of the object's executable segments
 * (nranges 0: not checked).  Where `place` is set, each stub is put in pool
 * memory within reach (a block of `free_blocks` first: the one taken gets
 * size 0) and written, by runs of adjacent blocks; else it is encoded for
 * the address the caller put in plans[i].stub.  Each plan's status:
 * HP_PLAN_OK, HP_PLAN_PYTHON (Python plans it: its stub, if one was taken,
 * is plans[i].stub of plans[i].stub_size bytes, unused) or
 * HP_PLAN_UNWRITTEN (its stub could not be written).  Branches from
 * elsewhere in the object into the replaced bytes are not looked for here
 * (hp_plan_branched_into): returns how many planned functions replace more
 * than one instruction, which need that, or -1 where capstone cannot be
 * used or memory is short.
 */
long hp_plan_entries(struct hp_plan *plans, long n, const uint64_t *ranges, long nranges,
                     int place, struct hp_code_block *free_blocks, size_t nfree)
{
    return hp_plan_entries_from(plans, n, ranges, nranges, place, free_blocks, nfree, NULL, 0);
}

/* hp_plan_entries(), where `code` (NULL: read them) holds the `len` bytes
 * from the first plan's entry on: a caller that read them already (first.c)
 * spares a read of its own memory, a system call. */
long hp_plan_entries_from(struct hp_plan *plans, long n, const uint64_t *ranges, long nranges,
                          int place, struct hp_code_block *free_blocks, size_t nfree,
                          const uint8_t *code, size_t len)
{
    /* A scan is 2 KiB: as many as a chunk needs, not a whole chunk's for a
     * batch of one (its page faults would cost more than planning it); a
     * first redirect's one on the stack. */
    struct hp_entry_scan one_scan;
    struct hp_entry_scan *scans = n == 1 ? &one_scan
                                         : malloc((n < CHUNK ? (n ? n : 1) : CHUNK) * sizeof *scans);
    uint8_t *buf = NULL;
    size_t buf_room = 0;
    uint64_t segment_ends[CHUNK];
    long sized[CHUNK];
    struct insn insns[HP_PLAN_MAX_INSNS];
    struct run run = { 0 };
    long rc = -1;

    if (!scans)
        goto out;
    for (long first = 0; first < n; first += CHUNK) {
        long count = 0;
        size_t offset = 0;
        /* Each function's window (hp_plan_window); one in no segment is
         * left to Python. */
        for (long i = first; i < n && i < first + CHUNK; i++) {
            struct hp_plan *plan = &plans[i];
            uint64_t end, window = hp_plan_window(plan, ranges, nranges, &end);
            plan->status = HP_PLAN_PYTHON;
            if (place)
                plan->stub = 0;
            if (!window)
                continue;
            /* Field by field: a compound literal would clear all 2 KiB of
             * the scan, most of it for hp_scan_entries to fill. */
            scans[count].entry = plan->entry;
            scans[count].offset = offset;
            scans[count].len = window;
            scans[count].stop = plan->size ? plan->entry + plan->size : 0;
            segment_ends[count] = end;
            sized[count++] = i;
            offset += window;
        }
        /* The bytes given are scanned where they are (not read: not written). */
        int given = code && count == 1 && first == 0 && sized[0] == 0 && offset <= len;
        if (!given && offset > buf_room) {
            uint8_t *more = realloc(buf, offset);
            if (!more)
                goto out;
            buf = more;
            buf_room = offset;
        }
        uint8_t *bytes = given ? (uint8_t *)code : buf;
        if (count && hp_scan_entries(scans, count, bytes, !given) < 0)
            goto out;
        for (long c = 0; c < count; c++) {
            struct hp_plan *plan = &plans[sized[c]];
            if (scans[c].status || !plan_one(plan, &scans[c], bytes + scans[c].offset,
                                             segment_ends[c], insns))
                continue;
            if (!place) {
                if (encode_stub(plan, insns, plan->ninsns))
                    plan->status = HP_PLAN_OK;
                continue;
            }
            plan->stub = alloc_stub(plan->address, plan->stub_size, free_blocks, nfree);
            if (!plan->stub)
                continue;       /* Python finds no memory either, and says so */
            if (!encode_stub(plan, insns, plan->ninsns))
                continue;
            plan->status = HP_PLAN_OK;
            if (run.len && run.start + run.len != plan->stub)
                flush_run(&run, plans, sized[c]);
            if (append_run(&run, plan, sized[c]))
                goto out;
        }
    }
    flush_run(&run, plans, n);
    rc = 0;
    for (long i = 0; i < n; i++)
        rc += plans[i].status == HP_PLAN_OK && !plans[i].single_instruction;
out:
    free(run.code);
    free(buf);
    if (scans != &one_scan)
        free(scans);
    return rc;
}

/* entry.py's _check_no_foreign_branch_into() for the planned functions of a
 * batch, from the object's branch index: a plan into whose replaced bytes
 * a branch from elsewhere lands is left to Python (HP_PLAN_PYTHON, its
 * stub unused), which refuses it in its words.  (One replaced instruction
 * cannot be entered in its middle by real code.)  Returns 0, or -1 out of
 * memory. */
long hp_plan_branched_into(struct hp_plan *plans, long n, struct hp_branch_index *ix)
{
    for (long i = 0; i < n; i++) {
        struct hp_plan *plan = &plans[i];
        uint64_t lo = plan->address, hi = lo + plan->length;
        uint64_t sources[HP_SCAN_BRANCHES], targets[HP_SCAN_BRANCHES];
        if (plan->status != HP_PLAN_OK || plan->single_instruction)
            continue;
        long found = hp_branch_index_into(ix, lo + 1, hi, sources, targets, HP_SCAN_BRANCHES);
        if (found < 0)
            return -1;
        for (long k = 0; k < found; k++)
            if (k >= HP_SCAN_BRANCHES || !(sources[k] >= lo && sources[k] < hi))
                plan->status = HP_PLAN_PYTHON;
    }
    return 0;
}

/* ---- the entry writes of a batch ------------------------------------- */

#define JMP_REL8 0xEB

/* The bytes at an entry: `op` (jmp or call rel32) to `to`, padded with
 * int3 to the length replaced; or, `via_hop`, a jmp rel8 to the site's
 * hot-patch point (hop.c) over the first instruction, the rest of the
 * original bytes kept; or the original bytes where op is 0. */
static int entry_bytes(uint8_t *out, const struct hp_entry_change *c, uint8_t op, uint64_t to,
                       int via_hop)
{
    memcpy(out, c->original, c->length);
    if (!op)
        return 1;
    if (via_hop) {
        int64_t rel8 = (int64_t)(c->hop - (c->address + 2));
        if (op != 0xE9 || rel8 < -128 || rel8 > 127 || !hp_in_reach(c->hop, to, JMP_REL32))
            return 0;
        out[0] = JMP_REL8;
        out[1] = (uint8_t)(int8_t)rel8;
        return 1;
    }
    if (!hp_in_reach(c->address, to, JMP_REL32))
        return 0;
    out[0] = op;
    hp_put_rel32(out + 1, c->address + JMP_REL32, to);
    memset(out + JMP_REL32, 0xCC, c->length - JMP_REL32);
    return 1;
}

/* The jmp rel32 at a site's hot-patch point, from `to` to `new_to`. */
static void hop_write(struct hp_write *out, const struct hp_entry_change *c, uint64_t new_to)
{
    out->address = c->hop;
    out->len = JMP_REL32;
    out->old[0] = out->bytes[0] = 0xE9;
    hp_put_rel32(out->old + 1, c->hop + JMP_REL32, c->hop_to);
    hp_put_rel32(out->bytes + 1, c->hop + JMP_REL32, new_to);
}

/*
 * The struct hp_write[] of a batch of entry changes (sites.py's
 * _update_batch): for each change, the instruction at its entry now and the
 * one it gets, each a jmp/call rel32, a jmp rel8 to the site's hot-patch
 * point, or the original bytes.  Where the entry goes through the hop
 * before and after, a new destination is the hop's jmp alone.  An entry
 * that starts to go through its hop must find it going to the new
 * destination already (sites.py writes it first).  Changes whose bytes stay
 * the same write nothing: rewritten[i] says which do.  w has room for two
 * writes per change.  Returns how many writes went to w, or -1 where a
 * destination is out of reach or a site replaces more bytes than a write
 * holds.
 */
long hp_entry_writes(const struct hp_entry_change *changes, long n, struct hp_write *w,
                     uint8_t *rewritten)
{
    long count = 0;
    for (long i = 0; i < n; i++) {
        const struct hp_entry_change *c = &changes[i];
        struct hp_write *out = &w[count];
        if (c->length < JMP_REL32 || c->length > sizeof out->bytes)
            return -1;
        if (!entry_bytes(out->old, c, c->old_op, c->old_to, c->old_hop)
                || !entry_bytes(out->bytes, c, c->new_op, c->new_to, c->new_hop))
            return -1;
        if (c->new_hop && !c->old_hop && c->hop_to != c->new_to)
            return -1;
        uint32_t len = memcmp(out->old, out->bytes, c->length) ? c->length : 0;
        if (c->old_hop || c->new_hop)   /* only the first instruction changes */
            while (len > 0 && out->old[len - 1] == out->bytes[len - 1])
                len--;
        int retarget_hop = c->old_hop && c->new_hop && c->hop_to != c->new_to;
        rewritten[i] = len > 0 || retarget_hop;
        if (len > 0) {
            out->address = c->address;
            out->len = len;
            count++;
        }
        if (retarget_hop)
            hop_write(&w[count++], c, c->new_to);
    }
    return count;
}
