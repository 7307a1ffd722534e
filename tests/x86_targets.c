/*
 * Prologue shapes for tests/test_x86_64.py.
 *
 * The file is compiled once per flavour (-DX86T_<FLAVOUR>, with the flags in
 * the test's FLAVOURS table) and the objects are linked into one .so.  Shapes
 * whose exact bytes matter are written in top-level asm; the rest is what gcc
 * makes of ordinary C under each set of flags.
 */

#if defined(X86T_PLAIN)                 /* -O2 -fPIC -fcf-protection=none */

static int counter = 3;
int x86t_data = 42;

void x86t_set_counter(int v) { counter = v; }

/* mov counter(%rip), %eax: a RIP-relative load as the first instruction. */
int x86t_counter_plus(int x) { return counter + x; }

__attribute__((noinline, noipa)) static int helper(int a) { return a * 7; }

/* Non-leaf without a frame pointer: push %rbx; mov; call helper. */
int x86t_nofp_sum(int a, int b) { return helper(a) + b; }

#define FUNC(name) ".globl " #name "\n.type " #name ", @function\n.p2align 4\n" #name ":\n"
#define FUNC_UNALIGNED(name) ".globl " #name "\n.type " #name ", @function\n" #name ":\n"
#define END(name) ".size " #name ", .-" #name "\n"

__asm__(
".pushsection .text\n"

/* A jcc in the first bytes, leaving the replaced bytes. */
FUNC(x86t_jcc_entry)
"   test %edi, %edi\n"
"   js 1f\n"
"   lea (%rdi,%rdi), %eax\n"
"   ret\n"
"1: mov %edi, %eax\n"
"   neg %eax\n"
"   ret\n"
END(x86t_jcc_entry)

/* A loop wholly inside the replaced bytes (push 1 + dec 2 + jg 2 = 5). */
FUNC(x86t_in_region_loop)
"   push %rbx\n"
"1: dec %edi\n"
"   jg 1b\n"
"   pop %rbx\n"
"   mov %edi, %eax\n"
"   ret\n"
END(x86t_in_region_loop)

/* A loop whose branch, after the replaced bytes, jumps back into them. */
FUNC(x86t_back_into_entry)
"   xor %eax, %eax\n"
"1: add $3, %eax\n"
"   dec %edi\n"
"   jg 1b\n"
"   ret\n"
END(x86t_back_into_entry)

/* A NOP sled at the entry with a branch into it. */
FUNC(x86t_into_sled)
"   nop\n   nop\n"
"1: nop\n   nop\n   nop\n"
"   dec %edi\n"
"   jg 1b\n"
"   ret\n"
END(x86t_into_sled)

/* 1-byte function, int3 padding after it. */
FUNC(x86t_tiny_ret)
"   ret\n"
END(x86t_tiny_ret)
".p2align 4, 0xcc\n"

/* 4-byte function, NOP padding after it (gas fills code with NOPs). */
FUNC(x86t_tiny4)
"   lea (%rdi,%rsi), %eax\n"
"   ret\n"
END(x86t_tiny4)
".p2align 4\n"

/* 4-byte function followed directly by another function. */
FUNC(x86t_tiny_nopad)
"   lea (%rdi,%rsi), %eax\n"
"   ret\n"
END(x86t_tiny_nopad)
FUNC_UNALIGNED(x86t_after_tiny)
"   mov $1, %eax\n"
"   ret\n"
END(x86t_after_tiny)

/* call rel32 as the whole replaced region; the helper returns 100. */
FUNC(x86t_call_entry)
"   call .Lx86t_hundred\n"
"   add %edi, %eax\n"
"   ret\n"
END(x86t_call_entry)
".Lx86t_hundred:\n"
"   mov $100, %eax\n"
"   ret\n"

/* A call whose return address is inside the replaced bytes. */
FUNC(x86t_call_mid)
"   call *%rsi\n"
"   add $1, %eax\n"
"   ret\n"
END(x86t_call_mid)

/* Tail call by jmp rel32 (spelled out: gas would relax it to rel8). */
FUNC(x86t_tailjmp)
"   .byte 0xe9\n"
"   .long .Lx86t_inc - . - 4\n"
END(x86t_tailjmp)
".Lx86t_inc:\n"
"   lea 1(%rdi), %eax\n"
"   ret\n"

/* jmp rel8 over a ud2, to the end of the replaced bytes. */
FUNC(x86t_short_jmp)
"   xor %eax, %eax\n"
"   jmp 1f\n"
"   ud2\n"
"1: lea (%rdi,%rdi,2), %eax\n"
"   ret\n"
END(x86t_short_jmp)

/* jrcxz on the 4th argument, to the end of the replaced bytes. */
FUNC(x86t_jrcxz)
"   xor %eax, %eax\n"
"   jrcxz 1f\n"
"   mov $7, %eax\n"
"1: add %edi, %eax\n"
"   ret\n"
END(x86t_jrcxz)

/* loop on the 4th argument, wholly inside the replaced bytes. */
FUNC(x86t_loop)
"   xor %eax, %eax\n"
"1: add %edi, %eax\n"
"   loop 1b\n"
"   ret\n"
END(x86t_loop)

/* RIP-relative store with an immediate after the disp32, then a load. */
FUNC(x86t_store_imm)
"   movl $0x1234, .Lx86t_var(%rip)\n"
"   mov .Lx86t_var(%rip), %eax\n"
"   add %edi, %eax\n"
"   ret\n"
END(x86t_store_imm)

/* A RIP-relative lea that is not the first instruction. */
FUNC(x86t_table_get)
"   and $7, %edi\n"
"   lea .Lx86t_table(%rip), %rax\n"
"   mov (%rax,%rdi,4), %eax\n"
"   ret\n"
END(x86t_table_get)

FUNC(x86t_xbegin)
"   xbegin 1f\n"
"1: ret\n"
END(x86t_xbegin)

FUNC(x86t_int3)
"   int3\n"
"   ret\n"
END(x86t_int3)

FUNC(x86t_undecodable)
"   .byte 0x06\n"                       /* push %es: invalid in 64-bit mode */
"   ret\n"
END(x86t_undecodable)

".popsection\n"
".pushsection .data\n"
".p2align 2\n"
".Lx86t_var: .long 0\n"
".Lx86t_table: .long 10, 11, 12, 13, 14, 15, 16, 17\n"
".popsection\n"
);

#elif defined(X86T_FRAMEPTR)            /* -O2 -fPIC -fno-omit-frame-pointer */

__attribute__((noinline, noipa)) static int helper(int a) { return a * 5; }

/* push %rbp; mov %rsp, %rbp; ... */
int x86t_fp_sum(int a, int b) { return helper(a) + b; }

#elif defined(X86T_IBT)                 /* -O2 -fPIC -fcf-protection */

static int ibt_counter = 9;

void x86t_ibt_set(int v) { ibt_counter = v; }
int x86t_ibt_counter_plus(int x) { return ibt_counter + x; }
/* endbr64; xor %eax, %eax; ret: 7 bytes, padding needed after it. */
int x86t_ibt_zero(void) { return 0; }

#elif defined(X86T_FENTRY_NOP)          /* -O2 -pg -mfentry -mnop-mcount -fno-pic */

int x86t_fentry_nop_add(int a, int b) { return a * 3 + b; }

#elif defined(X86T_FENTRY_CALL)         /* -O2 -pg -mfentry -fPIC */

int x86t_fentry_call_add(int a, int b) { return a * 3 + b; }

#elif defined(X86T_PATCHABLE)           /* -O2 -fPIC -fpatchable-function-entry=5 */

int x86t_patchable_add(int a, int b) { return a * 3 + b; }

#elif defined(X86T_PATCHABLE_IBT)       /* ... -fpatchable-function-entry=5 -fcf-protection */

int x86t_patchable_ibt_add(int a, int b) { return a * 3 + b; }

#else
#error "compile with one of -DX86T_PLAIN, -DX86T_FRAMEPTR, -DX86T_IBT, -DX86T_FENTRY_NOP, -DX86T_FENTRY_CALL, -DX86T_PATCHABLE, -DX86T_PATCHABLE_IBT"
#endif
