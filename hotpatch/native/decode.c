/*
 * decode.c -- runs of x86-64 instructions decoded for Python
 * (x86_64/decode.py, x86_64/clobbers.py) through capstone's C library.
 *
 * One call decodes a run of bytes into fixed-size records: capstone's text
 * of each instruction and, from its operand details, the facts Python's
 * policy uses -- the branch kind and a relative branch's target, where the
 * disp32 of a RIP-relative operand sits and what it refers to, the
 * registers it writes.  Python then reads records instead of importing
 * capstone's Python binding (40-55 ms of Python at the core's import, with
 * the GIL held, for ctypes and its eighteen architectures) and building its
 * objects one instruction at a time.
 *
 * xrefs.c loaded the library and looked up every function used here
 * (hp_capstone_load): this file never calls the dynamic linker, as the
 * loader's worker, which may decode here with the GIL held, must not.
 */
#include <capstone/capstone.h>
#include <string.h>

#include "hotpatch_core.h"

static int is_return(unsigned id)
{
    switch (id) {
    case X86_INS_RET: case X86_INS_RETF: case X86_INS_RETFQ:
    case X86_INS_IRET: case X86_INS_IRETD: case X86_INS_IRETQ:
        return 1;
    }
    return 0;
}

static int is_jcc(unsigned id)
{
    switch (id) {
    case X86_INS_JO: case X86_INS_JNO: case X86_INS_JB: case X86_INS_JAE:
    case X86_INS_JE: case X86_INS_JNE: case X86_INS_JBE: case X86_INS_JA:
    case X86_INS_JS: case X86_INS_JNS: case X86_INS_JP: case X86_INS_JNP:
    case X86_INS_JL: case X86_INS_JGE: case X86_INS_JLE: case X86_INS_JG:
        return 1;
    }
    return 0;
}

/* The rel8-only branches on rcx/ecx. */
static int is_loop(unsigned id)
{
    switch (id) {
    case X86_INS_JRCXZ: case X86_INS_JECXZ: case X86_INS_JCXZ:
    case X86_INS_LOOP: case X86_INS_LOOPE: case X86_INS_LOOPNE:
        return 1;
    }
    return 0;
}

/* In a sweep, whose operand details are read: branches, returns, their
 * prefixed forms ("bnd jmp", "notrack call") and RIP-relative operands,
 * told by the text (details slow capstone down for every instruction).
 * The prefixes by their first letter: most instructions (mov, push, sub,
 * add...) start with none of them, and ten strncmp()s each were 445
 * instructions of a first redirect's plan, twice. */
static int starts_with(const char *text, const char *prefix)
{
    return strncmp(text, prefix, strlen(prefix)) == 0;
}

int hp_wants_details(const char *mnemonic, const char *op_str)
{
    if (strstr(op_str, "rip"))
        return 1;
    switch (mnemonic[0]) {
    case 'j':
        return 1;
    case 'c':
        return starts_with(mnemonic, "call");
    case 'r':
        return starts_with(mnemonic, "ret");
    case 'i':
        return starts_with(mnemonic, "iret");
    case 'l':
        return starts_with(mnemonic, "loop") || starts_with(mnemonic, "lcall") ||
               starts_with(mnemonic, "ljmp");
    case 'x':
        return starts_with(mnemonic, "xbegin");
    case 'b':
        return starts_with(mnemonic, "bnd");
    case 'n':
        return starts_with(mnemonic, "notrack");
    }
    return 0;
}

/* decode.py's branch kind (HP_BRANCH_*) of a detailed instruction: the
 * one classification, plan.c's too. */
int hp_branch_kind(const cs_insn *ci)
{
    const cs_x86 *x = &ci->detail->x86;
    unsigned id = ci->id;
    int immediate = x->op_count && x->operands[0].type == X86_OP_IMM;

    if (is_return(id))
        return HP_BRANCH_RET;
    if (id == X86_INS_LJMP)
        return HP_BRANCH_JMP_INDIRECT;
    if (id == X86_INS_LCALL)
        return HP_BRANCH_CALL_INDIRECT;
    if (id == X86_INS_JMP)
        return immediate ? HP_BRANCH_JMP : HP_BRANCH_JMP_INDIRECT;
    if (id == X86_INS_CALL)
        return immediate ? HP_BRANCH_CALL : HP_BRANCH_CALL_INDIRECT;
    if (is_jcc(id))
        return HP_BRANCH_JCC;
    if (is_loop(id))
        return HP_BRANCH_LOOP;
    if (id == X86_INS_XBEGIN)
        return HP_BRANCH_XBEGIN;
    return HP_BRANCH_NONE;
}

static void describe_branch(const cs_insn *ci, struct hp_decoded_insn *out)
{
    out->branch = (uint8_t)hp_branch_kind(ci);
    if (out->branch == HP_BRANCH_JMP || out->branch == HP_BRANCH_JCC || out->branch == HP_BRANCH_CALL
            || out->branch == HP_BRANCH_LOOP || out->branch == HP_BRANCH_XBEGIN)
        out->target = (uint64_t)ci->detail->x86.operands[0].imm;
}

/* The first RIP-relative memory operand.  capstone 5 misreports disp_size
 * after 66/VEX prefixes, so the bytes at its disp_offset (up to 4, as many
 * as the instruction has there) are checked against the displacement
 * itself before they are trusted: the relocator rewrites those 4 bytes. */
static void describe_rip_operand(const cs_insn *ci, struct hp_decoded_insn *out)
{
    const cs_x86 *x = &ci->detail->x86;

    for (int k = 0; k < x->op_count; k++) {
        const cs_x86_op *op = &x->operands[k];
        unsigned at = x->encoding.disp_offset, n;
        uint64_t value = 0;
        if (op->type != X86_OP_MEM || op->mem.base != X86_REG_RIP)
            continue;
        n = at < ci->size ? ci->size - at : 0;
        n = n > 4 ? 4 : n;
        for (unsigned i = n; i-- > 0;)
            value = value << 8 | ci->bytes[at + i];
        if (n && ci->bytes[at + n - 1] & 0x80)
            value |= ~(uint64_t)0 << (8 * n);       /* sign-extended */
        if ((int64_t)value != op->mem.disp) {
            out->rip = HP_RIP_MISPLACED;
            return;
        }
        out->rip = HP_RIP_FOUND;
        out->rip_disp_offset = (uint8_t)at;
        out->rip_target = ci->address + ci->size + (uint64_t)op->mem.disp;
        return;
    }
}

/* Decode `code` (placed at `address`) by linear sweep into `out`: the
 * first `capacity` instructions, stopping at the first byte that does not
 * start one (or an instruction cut by the end of `code`).  `mode`
 * (HP_DECODE_*) says what of the operand details is read.  Returns how
 * many records were filled (the caller asks again after the last one when
 * that is `capacity`), or -1 where capstone cannot be used. */
long hp_decode(const uint8_t *code, size_t len, uint64_t address, int mode,
               struct hp_decoded_insn *out, long capacity)
{
    size_t at = 0;
    long n = 0;

    if (!hp_capstone_usable())
        return -1;
    for (; n < capacity && at < len; n++) {
        struct hp_decoded_insn *r = &out[n];
        const cs_insn *insn = mode <= HP_DECODE_OPERANDS
                              ? hp_decode_text(code + at, len - at, address + at)
                              : hp_decode_detailed(code + at, len - at, address + at);
        if (!insn)
            break;
        memset(r, 0, offsetof(struct hp_decoded_insn, mnemonic));
        r->address = insn->address;
        r->size = insn->size;
        memcpy(r->mnemonic, insn->mnemonic, sizeof r->mnemonic);
        memcpy(r->op_str, insn->op_str, sizeof r->op_str);
        at += insn->size;
        if (mode == HP_DECODE_TEXT)
            continue;
        if (mode == HP_DECODE_OPERANDS) {
            if (!hp_wants_details(insn->mnemonic, insn->op_str))
                continue;
            insn = hp_decode_detailed(code + at - r->size, r->size, r->address);
            if (!insn)
                return -1;      /* decoded a moment ago without details */
        }
        describe_branch(insn, r);
        describe_rip_operand(insn, r);
        if (mode == HP_DECODE_WRITES) {
            const cs_x86 *x = &insn->detail->x86;
            r->has_imm = x->op_count && x->operands[0].type == X86_OP_IMM;
            r->imm = r->has_imm ? x->operands[0].imm : 0;
            if (hp_registers_written(insn, r->written, &r->nwritten))
                return -1;
        }
    }
    return n;
}
