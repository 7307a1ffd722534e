/*
 * Hot-patch points: where an entry can be redirected without a stop by a
 * short jump to the padding before it.
 *
 * A first patch replaces the entry's first bytes by a `jmp rel32`.  Where
 * the first instruction is shorter than that, a thread may have run part
 * of the bytes replaced, so the write needs a stop (unstopped.c).  Windows
 * builds its functions with a 2-byte `mov edi, edi` and 5 bytes of padding
 * before them for this reason; compilers on Linux leave the padding anyway:
 * functions are aligned (16 bytes at -O2), and the bytes before an entry
 * are NOPs or int3 that no thread runs.  So the padding gets the `jmp rel32`
 * (dead bytes: no stop), then the entry's first instruction -- at least 2
 * bytes -- gets a `jmp rel8` to it: one instruction replaced by one atomic
 * store, no stop either.
 *
 * The padding must be dead, which the bytes alone cannot always tell: a
 * run of NOPs may be the end of a function falling through into the entry
 * (glibc's hand-written __memmove_chk falls into memmove).  So besides
 * decoding as NOPs or int3 up to the entry, the run must follow an
 * instruction that never falls through: a ret, jmp, ud2, hlt or call (a
 * call ending a function right before its padding is one the compiler
 * knows does not return: GCC puts nothing after a call to abort or
 * __stack_chk_fail).  Which instruction ends where the run starts is known
 * from a linear sweep from the start of the function before (the symbol
 * table gives it), or, without one, where every decoding of the bytes just
 * before the run that ends exactly there is such an instruction: the true
 * one is among them.
 */
#include "hotpatch_core.h"

#include <string.h>

#define LONGEST_INSTRUCTION 15
#define SWEEP_LIMIT 4096        /* bytes swept from the function before, at most */
#define QUERY_AHEAD 32          /* an endbr64, then the 16 bytes at the address */

/* Bytes of the padding between functions: the NOP forms gas and the
 * linkers emit (90; 66 90; 0f 1f 00; 0f 1f 40 00; 0f 1f 44 00 00; ...;
 * 66 2e 0f 1f 84 00 00 00 00 00), and int3. */
static int padding_byte(uint8_t b)
{
    switch (b) {
    case 0x90: case 0xCC: case 0x66: case 0x2E: case 0x0F: case 0x1F:
    case 0x00: case 0x40: case 0x44: case 0x80: case 0x84:
        return 1;
    }
    return 0;
}

/* Is every instruction that may end exactly at `at` one that never falls
 * through (see the top of this file)?  0 where none decodes. */
static int nothing_falls_into(const uint8_t *buf, uint64_t base, long at)
{
    int candidates = 0;
    for (long len = 1; len <= LONGEST_INSTRUCTION && len <= at; len++) {
        int kind;
        if (hp_instruction_kind(buf + at - len, len, base + at - len, &kind) != len)
            continue;
        if (kind != HP_INSN_LEAVES && kind != HP_INSN_CALL)
            return 0;
        candidates++;
    }
    return candidates > 0;
}

/* Does the linear sweep from `from` (an instruction boundary: a function's
 * start) land exactly on `at` with an instruction that never falls
 * through?  `read` holds the bytes from `read_at` up to `at`, read
 * already: a function before that starts there is swept from them. */
static int swept_to_an_end(uint64_t from, uint64_t at, const uint8_t *read, uint64_t read_at)
{
    uint8_t code[256];
    int kind = HP_INSN_OTHER;
    while (from < at) {
        size_t len = at - from < sizeof code ? at - from : sizeof code;
        if (from >= read_at)
            memcpy(code, read + (from - read_at), len);
        else if (hp_read_own(hp_gettid(), code, from, len) != (long)len)
            return 0;
        size_t done = 0;
        /* an instruction cut by the window's end is decoded again in the next one */
        while (done < len) {
            int size = hp_instruction_kind(code + done, len - done, from + done, &kind);
            if (size <= 0)
                break;
            done += size;
        }
        if (!done)
            return 0;
        from += done;
    }
    return from == at && (kind == HP_INSN_LEAVES || kind == HP_INSN_CALL);
}

/* The last index in `v` (n sorted values) whose value is <= x, -1 if none. */
static long last_at_most(const uint64_t *v, uint64_t n, uint64_t x)
{
    long lo = 0, hi = (long)n;      /* the answer + 1 is in [lo, hi] */
    while (lo < hi) {
        long mid = lo + (hi - lo) / 2;
        if (v[mid] <= x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

/* Where the function holding `address` starts, else the last one starting
 * before it; 0 where none does: symbols.function_before's answer, from
 * elf.SymbolTable.start_index (symbols.FunctionBefore).  The symbol
 * starting exactly there first, then a sized one holding it, then the
 * nearest start before. */
uint64_t hp_function_before(const struct hp_function_starts *f, uint64_t address)
{
    if (address < f->base)
        return 0;
    uint64_t offset = address - f->base;
    long i = last_at_most(f->starts, f->nstarts, offset);
    if (i >= 0 && f->starts[i] == offset)
        return address;
    long k = last_at_most(f->sized_from, f->nsized, offset);
    if (k >= 0 && offset < f->sized_to[k])
        return f->base + f->sized_from[k];
    return i >= 0 ? f->base + f->starts[i] : 0;
}

/* The hot-patch point of the function at `entry` whose redirecting jump
 * goes at `address` (after any endbr64): the 5 bytes of dead padding just
 * before the entry, within a short jump of it, or 0 if there are none or
 * the first instruction is shorter than the short jump (a thread past a
 * 1-byte push would run the jump's second byte).  `before`: the start of
 * the function before the entry, else 0 and `starts`, where to look it up
 * only if the padding is there but only a sweep from it can tell whether
 * it is dead (NULL: HP_HOP_ASK_BEFORE then, the caller has none).  From the
 * bytes read already: `first`, the 15 at `address`, and `behind`, the
 * HP_HOP_BEHIND + HP_HOP_SEARCH just before the entry. */
uint64_t hp_hop_in(uint64_t entry, uint64_t address, uint64_t before,
                   const struct hp_function_starts *starts, const uint8_t *first,
                   const uint8_t *behind)
{
    uint64_t base = entry - (HP_HOP_BEHIND + HP_HOP_SEARCH);
    int kind;
    if (address < entry || address + 2 - (entry - HP_HOP_SIZE) > 128 ||
            hp_instruction_kind(first, LONGEST_INSTRUCTION, address, &kind) < 2)
        return 0;
    long end = HP_HOP_BEHIND + HP_HOP_SEARCH, run = end;
    while (run > HP_HOP_BEHIND && padding_byte(behind[run - 1]))
        run--;
    /* The run may have taken the last bytes of the instruction before it
     * (a displacement of zeros): the padding starts at the first byte from
     * which it decodes as padding. */
    for (long start = run; end - start >= HP_HOP_SIZE; start++)
        if (hp_padding_over(behind + start, end - start, base + start, end - start)) {
            uint64_t at = base + start;
            if (nothing_falls_into(behind, base, start))
                return entry - HP_HOP_SIZE;
            if (!before && starts)
                before = hp_function_before(starts, entry - 1);
            if (!before)
                return HP_HOP_ASK_BEFORE;
            return before < at && at - before <= SWEEP_LIMIT &&
                   swept_to_an_end(before, at, behind, base) ? entry - HP_HOP_SIZE : 0;
        }
    return 0;
}

/* Whether a jmp rel32 replacing the `length` bytes at `address` needs a
 * stop (hp_write_needs_stop_over, into *stops_plainly) and, where it does,
 * the entry's hot-patch point (as hp_hop_in's; 0 where it needs none), its
 * bytes into `padding`.  `bytes`: the HP_HOP_READ_BEHIND before `entry`,
 * then those from `entry` to 16 past `address`.  hp_hops_find's and
 * first.c's one decision. */
uint64_t hp_hop_over(uint64_t entry, uint64_t address, uint32_t length, uint64_t before,
                     const struct hp_function_starts *starts, const uint8_t *bytes,
                     uint8_t *stops_plainly, uint8_t *padding)
{
    const uint8_t *at = bytes + HP_HOP_READ_BEHIND + (address - entry);
    *stops_plainly = (uint8_t)hp_write_needs_stop_over(address, length, at);
    if (!*stops_plainly)
        return 0;
    uint64_t hop = hp_hop_in(entry, address, before, starts, at, bytes);
    if (hop && hop != HP_HOP_ASK_BEFORE)
        memcpy(padding, bytes + HP_HOP_READ_BEHIND - (entry - hop), HP_HOP_SIZE);
    return hop;
}

/* hp_write_needs_stop() and hp_hop_in() of each of `n` entries, from one
 * read of each one's bytes (see struct hp_hop_query).  An entry too near
 * the start of its mapping for that read is asked hp_write_needs_stop()
 * alone: no point. */
void hp_hops_find(struct hp_hop_query *q, size_t n)
{
    int tid = hp_gettid();
    for (; n--; q++) {
        uint8_t bytes[HP_HOP_READ_BEHIND + QUERY_AHEAD];
        uint64_t ahead = q->address - q->entry + 16;
        q->hop = 0;
        q->stops_plainly = 1;
        if (q->address < q->entry || ahead > QUERY_AHEAD)
            continue;
        if (q->entry < HP_HOP_READ_BEHIND ||
                hp_read_own(tid, bytes, q->entry - HP_HOP_READ_BEHIND, HP_HOP_READ_BEHIND + ahead) !=
                (long)(HP_HOP_READ_BEHIND + ahead)) {
            q->stops_plainly = (uint8_t)hp_write_needs_stop(q->address, (uint32_t)q->length);
            continue;
        }
        q->hop = hp_hop_over(q->entry, q->address, (uint32_t)q->length, q->before, q->starts,
                             bytes, &q->stops_plainly, q->padding);
    }
}
