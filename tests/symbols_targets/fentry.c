/* Functions built with ftrace-style entry hooks (-pg -mfentry -mrecord-mcount,
 * or -fpatchable-function-entry), and the hook itself: a __fentry__ that
 * returns at once, so the library needs nothing else to load. */

__asm__(".text\n"
        ".globl __fentry__\n"
        ".type __fentry__, @function\n"
        "__fentry__: ret\n"
        ".size __fentry__, 1\n");

int traced_add(int a, int b) { return a + b; }

int traced_twice(int x) { return traced_add(x, x); }
