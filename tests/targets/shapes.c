/* Functions of many entry shapes, each computing something checkable from
 * one long argument; tests redirect them, call their originals and restore. */
#include <stdint.h>

#define NOINLINE __attribute__((noinline, visibility("default")))

/* The replacement every shape is redirected to. */
NOINLINE long replacement(long x) { return x + 1000; }
NOINLINE long replacement2(long x) { return x + 2000; }

/* lea + ret: exactly five bytes, no fall-through into the rest. */
NOINLINE long plain_add(long x) { return x + 1; }

/* A frame-pointer prologue: push rbp; mov rbp, rsp. */
__attribute__((optimize("no-omit-frame-pointer"))) NOINLINE long frame_pointer(long x)
{
    volatile long y = x * 3;
    return y + 1;
}

/* A RIP-relative load in the first instruction. */
static volatile long table_value = 40;
NOINLINE long rip_load(long x) { return x + table_value; }

/* Compute-then-call: keeps the callee's call out of the first bytes. */
NOINLINE long calls_other(long x) { return plain_add(x) * 2; }

/* Shapes whose exact bytes matter are written in assembly. */
__asm__(
    ".text\n"
    /* A leaf with a jcc in its first five bytes: test (3) + jz rel8 (2). */
    ".p2align 4\n"
    ".globl jcc_leaf\n.type jcc_leaf,@function\n"
    "jcc_leaf:\n"
    "  test %rdi, %rdi\n"
    "  jz 1f\n"
    "  lea 1(%rdi), %rax\n"
    "  ret\n"
    "1:\n"
    "  mov $-1, %rax\n"
    "  ret\n"
    ".size jcc_leaf, .-jcc_leaf\n"

    /* Three bytes and a ret... followed by alignment padding: patchable. */
    ".p2align 4\n"
    ".globl short_padded\n.type short_padded,@function\n"
    "short_padded:\n"
    "  xor %eax, %eax\n"
    "  ret\n"
    ".size short_padded, .-short_padded\n"
    ".p2align 4\n"

    /* Three bytes directly followed by another function: refused. */
    ".globl short_unpadded\n.type short_unpadded,@function\n"
    "short_unpadded:\n"
    "  xor %eax, %eax\n"
    "  ret\n"
    ".size short_unpadded, .-short_unpadded\n"
    ".globl right_after\n.type right_after,@function\n"
    "right_after:\n"
    "  mov %rdi, %rax\n"
    "  ret\n"
    ".size right_after, .-right_after\n"

    /* A loop that jumps back into the first five bytes: refused. */
    ".p2align 4\n"
    ".globl jumps_back\n.type jumps_back,@function\n"
    "jumps_back:\n"
    "  mov %rdi, %rax\n"
    "2:\n"
    "  dec %rax\n"
    "  jg 2b\n"
    "  ret\n"
    ".size jumps_back, .-jumps_back\n"

    /* An int3 that is nobody's patch. */
    ".p2align 4\n"
    ".globl raise_trap\n.type raise_trap,@function\n"
    "raise_trap:\n"
    "  int3\n"
    "  mov $7, %eax\n"
    "  ret\n"
    ".size raise_trap, .-raise_trap\n");

/* An observer for the call path: counts calls and keeps the first argument. */
long observed_calls, observed_arg;
void count_observer(void *data, uintptr_t address, uint64_t *regs)
{
    __atomic_add_fetch(&observed_calls, 1, __ATOMIC_RELAXED);
    observed_arg = (long)regs[0];
}
