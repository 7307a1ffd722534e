/* Entries for hot-patch points (native/hop.c), laid out by hand so that
 * the bytes before each entry are known: several instructions at each
 * entry (a jmp rel32 there needs a stop), each aligned to 64 bytes with
 * padding before it.  Built next to stopper.c and shapes.c (replacement,
 * replacement2).
 *
 *  - hop_plain(x) = ((x ^ (x >> 7)) * 3) + 1, as cc -O2 builds it: a 3-byte
 *    mov first; the function before it ends in a ret, then NOPs.
 *  - hop_push(x) = 3x: a 1-byte push first, which a short jmp cannot
 *    replace (a thread past it would run the jmp's second byte).
 *  - hop_swept(x) = hop_plain's, after a function ending `mov $0, %eax;
 *    ret`: the bytes before the padding also decode as `add %al, %bl`, so
 *    only a sweep from the function before (the symbol table's) tells the
 *    padding is dead.
 *  - hop_falls(x): -1 for x < 0, else it falls through its padding into
 *    hop_fallen_into(x) = x + 5, as glibc's __memmove_chk falls into
 *    memmove: that padding is run, it is no hot-patch point.
 *  - hop_short(x) = 0, 3 bytes (after int3s: its ret is the only way to
 *    decode the bytes before the padding), then a 5-byte NOP and
 *    hop_after_short(x) = hop_plain's: hop_short's site replaces its bytes
 *    and 2 of the NOP's, where hop_after_short's hot-patch point is. */
__asm__(".text\n"
        ".p2align 6\n"
        "hop_before:\n"
        "    xor %eax, %eax\n"
        "    ret\n"

        ".p2align 6\n"
        ".globl hop_plain\n"
        ".type hop_plain, @function\n"
        "hop_plain:\n"
        "    mov %rdi, %rax\n"
        "    sar $7, %rax\n"
        "    xor %rdi, %rax\n"
        "    lea 1(%rax,%rax,2), %rax\n"
        "    ret\n"
        ".size hop_plain, .-hop_plain\n"

        ".p2align 6\n"
        ".globl hop_zero\n"
        ".type hop_zero, @function\n"
        "hop_zero:\n"
        "    mov $0, %eax\n"
        "    ret\n"
        ".size hop_zero, .-hop_zero\n"

        ".p2align 6\n"
        ".globl hop_swept\n"
        ".type hop_swept, @function\n"
        "hop_swept:\n"
        "    mov %rdi, %rax\n"
        "    sar $7, %rax\n"
        "    xor %rdi, %rax\n"
        "    lea 1(%rax,%rax,2), %rax\n"
        "    ret\n"
        ".size hop_swept, .-hop_swept\n"

        ".p2align 6\n"
        ".globl hop_push\n"
        ".type hop_push, @function\n"
        "hop_push:\n"
        "    push %rbx\n"
        "    mov %rdi, %rbx\n"
        "    lea (%rdi,%rdi,1), %rax\n"
        "    add %rbx, %rax\n"
        "    pop %rbx\n"
        "    ret\n"
        ".size hop_push, .-hop_push\n"

        ".p2align 6\n"
        ".globl hop_falls\n"
        ".type hop_falls, @function\n"
        "hop_falls:\n"
        "    mov $-1, %rax\n"
        "    test %rdi, %rdi\n"
        "    js 1f\n"
        ".size hop_falls, .-hop_falls\n"
        ".p2align 5\n"
        ".globl hop_fallen_into\n"
        ".type hop_fallen_into, @function\n"
        "hop_fallen_into:\n"
        "    lea 5(%rdi), %rax\n"
        "    add $0, %rax\n"
        "1:  ret\n"
        ".size hop_fallen_into, .-hop_fallen_into\n"

        ".p2align 6\n"
        "    .fill 16, 1, 0xcc\n"
        ".globl hop_short\n"
        ".type hop_short, @function\n"
        "hop_short:\n"
        "    xor %eax, %eax\n"
        "    ret\n"
        ".size hop_short, .-hop_short\n"
        "    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
        ".globl hop_after_short\n"
        ".type hop_after_short, @function\n"
        "hop_after_short:\n"
        "    mov %rdi, %rax\n"
        "    sar $7, %rax\n"
        "    xor %rdi, %rax\n"
        "    lea 1(%rax,%rax,2), %rax\n"
        "    ret\n"
        ".size hop_after_short, .-hop_after_short\n");
