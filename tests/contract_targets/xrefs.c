/* Shared entry points: code that branches into another function's first
 * bytes, as glibc's mempcpy jumps to memmove's entry + 3.  Written in
 * assembly: a compiler never emits it on purpose, but hand-written and
 * tail-merged code does. */
long xr_plain(long x) { return x * 3; }

__asm__(
    ".text\n"
    /* xr_target(x) = x + 1 */
    ".globl xr_target\n.type xr_target,@function\n.p2align 4\n"
    "xr_target:\n"
    "    mov %rdi, %rax\n"          /* 3 bytes */
    "    add $1, %rax\n"            /* xr_target+3: the jumper lands here */
    "    ret\n"
    ".size xr_target, .-xr_target\n"
    /* xr_jumper(x) = x + 101, through xr_target's second instruction */
    ".globl xr_jumper\n.type xr_jumper,@function\n.p2align 4\n"
    "xr_jumper:\n"
    "    lea 100(%rdi), %rax\n"
    "    jmp xr_target+3\n"
    ".size xr_jumper, .-xr_jumper\n"
    /* xr_unsized(x) = max(x + 1, 10), counting up in a loop that branches
     * back to its own second instruction; no .size */
    ".globl xr_unsized\n.type xr_unsized,@function\n.p2align 4\n"
    "xr_unsized:\n"
    "    mov %rdi, %rax\n"
    "1:  add $1, %rax\n"
    "    cmp $10, %rax\n"
    "    jl 1b\n"
    "    ret\n"
);
