/*
 * The ftrace-style call path.
 *
 * A site in call form has `call hp_caller` at its address.  The caller saves
 * the argument registers, asks hp_call_dispatch() -- keyed by the return
 * address -- to run the site's observers and name the current target, drops
 * the return address and jumps there, so the target sees the original
 * arguments and returns straight to the function's caller.
 */
#include "hotpatch_core.h"

#include <stdlib.h>
#include <string.h>


struct hp_observer {
    hp_observer_fn fn;
    void *data;
};

#define HP_MAX_OBSERVERS 8

/* The shared caller's fast path reads address, target and observing at
 * these offsets, and a table's mask and slots at 0 and 8: keep in step. */
struct hp_call_site {
    uintptr_t address;
    uintptr_t target;                                  /* atomic */
    uintptr_t observing;                               /* atomic: observers set */
    struct hp_observer *observers[HP_MAX_OBSERVERS];   /* atomic */
};

/* Open-addressing table, grown by publishing a copy: readers (any thread,
 * lock-free) see either table, both complete.  Old tables and site records
 * are never freed: a thread may still be reading them. */
struct call_table {
    size_t mask;
    struct hp_call_site *slots[];
};

static struct call_table *call_table;   /* atomic */
static size_t call_sites;

/* Cheap enough for the caller's fast path to compute in three instructions. */
static size_t hash_address(uintptr_t a)
{
    return (size_t)((a >> 4) ^ (a >> 20));
}

static struct hp_call_site *call_site_find(struct call_table *t, uintptr_t address)
{
    if (!t)
        return NULL;
    for (size_t i = hash_address(address);; i++) {
        struct hp_call_site *s = __atomic_load_n(&t->slots[i & t->mask], __ATOMIC_ACQUIRE);
        if (!s || s->address == address)
            return s;
    }
}

static void call_table_put(struct call_table *t, struct hp_call_site *s)
{
    size_t i = hash_address(s->address);
    while (t->slots[i & t->mask])
        i++;
    __atomic_store_n(&t->slots[i & t->mask], s, __ATOMIC_RELEASE);
}

static int call_table_grow(void)
{
    struct call_table *old = call_table;
    size_t cap = old ? (old->mask + 1) * 2 : 256;
    struct call_table *t = calloc(1, sizeof *t + cap * sizeof t->slots[0]);
    if (!t)
        return -1;
    t->mask = cap - 1;
    for (size_t i = 0; old && i <= old->mask; i++)
        if (old->slots[i])
            call_table_put(t, old->slots[i]);
    __atomic_store_n(&call_table, t, __ATOMIC_RELEASE);
    return 0;
}

/* The record of the call-form site at `address` (made on first use). */
struct hp_call_site *hp_call_site(uintptr_t address)
{
    pthread_mutex_lock(&hp_lock);
    struct hp_call_site *s = call_site_find(call_table, address);
    if (!s && (!call_table || (call_sites + 1) * 2 > call_table->mask + 1))
        if (call_table_grow())
            goto out;
    if (!s && (s = calloc(1, sizeof *s))) {
        s->address = address;
        call_table_put(call_table, s);
        call_sites++;
    }
out:
    pthread_mutex_unlock(&hp_lock);
    return s;
}

void hp_call_site_set_target(struct hp_call_site *s, uintptr_t target)
{
    __atomic_store_n(&s->target, target, __ATOMIC_RELEASE);
}

/* Where a site's target is kept, for a store made while threads are
 * stopped (the stack model's retargets). */
uint64_t *hp_call_site_target_slot(struct hp_call_site *s)
{
    return (uint64_t *)&s->target;
}

/* Add an observer; returns its index, or -1 when the site has no room. */
int hp_call_site_observe(struct hp_call_site *s, hp_observer_fn fn, void *data)
{
    struct hp_observer *o = malloc(sizeof *o);
    if (!o)
        return -1;
    o->fn = fn;
    o->data = data;
    pthread_mutex_lock(&hp_lock);
    int slot = -1;
    for (int i = 0; i < HP_MAX_OBSERVERS && slot < 0; i++)
        if (!s->observers[i]) {
            __atomic_store_n(&s->observers[i], o, __ATOMIC_RELEASE);
            __atomic_add_fetch(&s->observing, 1, __ATOMIC_SEQ_CST);
            slot = i;
        }
    pthread_mutex_unlock(&hp_lock);
    if (slot < 0)
        free(o);
    return slot;
}

/* Remove observer `slot`; its record is kept, a thread may be calling it. */
void hp_call_site_unobserve(struct hp_call_site *s, int slot)
{
    pthread_mutex_lock(&hp_lock);
    if (slot >= 0 && slot < HP_MAX_OBSERVERS && s->observers[slot]) {
        __atomic_store_n(&s->observers[slot], NULL, __ATOMIC_RELEASE);
        __atomic_sub_fetch(&s->observing, 1, __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&hp_lock);
}

__attribute__((noreturn, cold)) static void call_from_unknown_site(uintptr_t address)
{
    char text[160], *end = text + sizeof text;
    char *at = hp_fmt_str(text, end, "hotpatch: the shared caller was called from ");
    at = hp_fmt_hex(at, end, address);
    hp_fmt_str(at, end, ", which is no call site of hotpatch's: aborting\n");
    hp_sys(SYS_write, 2, (long)text, (long)strlen(text));
    abort();
}

uintptr_t hp_call_dispatch(uintptr_t return_address, uint64_t *regs)
{
    uintptr_t address = return_address - 5;
    struct hp_call_site *s = call_site_find(__atomic_load_n(&call_table, __ATOMIC_ACQUIRE), address);
    /* A site is registered before its `call` is written and never removed,
     * so s is found unless something else wrote a call to the shared caller
     * (or memory is corrupt).  Then there is no target to continue at: stop
     * with a message that says where, not with a NULL dereference. */
    if (!s)
        call_from_unknown_site(address);
    for (int i = 0; i < HP_MAX_OBSERVERS; i++) {
        struct hp_observer *o = __atomic_load_n(&s->observers[i], __ATOMIC_ACQUIRE);
        if (o)
            o->fn(o->data, address, regs);
    }
    return __atomic_load_n(&s->target, __ATOMIC_ACQUIRE);
}

_Static_assert(offsetof(struct hp_call_site, address) == 0, "fast path reads address at 0");
_Static_assert(offsetof(struct hp_call_site, target) == 8, "fast path reads target at 8");
_Static_assert(offsetof(struct hp_call_site, observing) == 16, "fast path reads observing at 16");
_Static_assert(offsetof(struct call_table, mask) == 0 && offsetof(struct call_table, slots) == 8,
               "fast path reads the table's mask at 0, slots at 8");

/* The shared caller, copied into each chunk (it must be within rel32 reach
 * of the sites).  It starts with two 8-byte words, the address of
 * hp_call_dispatch and the address of `call_table`, and reaches them
 * RIP-relatively, so the copy is position independent.
 * Stack on entry: [rsp] = site address + 5, rsp = 0 mod 16.
 *
 * Fast path: look the site up in the table (hash_address() in three
 * instructions, linear probing as call_site_find()); with no observer, drop
 * the return address and jump to the target, having touched only rax, rcx,
 * rdx (restored) and r11 (free at a call).  Otherwise the full path saves the
 * argument registers and lets hp_call_dispatch() run the observers, which
 * get the saved integer registers: rdi rsi rdx rcx r8 r9 (the arguments),
 * r10, rax. */
extern const unsigned char hp_caller_template[], hp_caller_template_end[];
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl hp_caller_template\n"
    ".hidden hp_caller_template\n"
    "hp_caller_template:\n"
    "  .quad 0\n"                     /* hp_call_dispatch */
    "  .quad 0\n"                     /* &call_table */
    "  push %rax\n push %rcx\n push %rdx\n"
    "  mov 24(%rsp), %rax\n"
    "  sub $5, %rax\n"                 /* the site's address */
    "  mov hp_caller_template+8(%rip), %rdx\n"
    "  mov (%rdx), %rdx\n"             /* the table */
    "  mov %rax, %rcx\n shr $4, %rcx\n"
    "  mov %rax, %r11\n shr $20, %r11\n"
    "  xor %r11, %rcx\n"
    "1:\n"
    "  and (%rdx), %rcx\n"
    "  mov 8(%rdx,%rcx,8), %r11\n"
    "  test %r11, %r11\n"
    "  jz 2f\n"
    "  cmp %rax, (%r11)\n"
    "  je 3f\n"
    "  inc %rcx\n"
    "  jmp 1b\n"
    "3:\n"
    "  cmpq $0, 16(%r11)\n"
    "  jne 2f\n"
    "  mov 8(%r11), %r11\n"
    "  pop %rdx\n pop %rcx\n pop %rax\n"
    "  lea 8(%rsp), %rsp\n"
    "  jmp *%r11\n"
    "2:\n"
    "  pop %rdx\n pop %rcx\n pop %rax\n"
    "  push %rbp\n"
    "  mov %rsp, %rbp\n"
    "  push %rax\n push %r10\n push %r9\n push %r8\n"
    "  push %rcx\n push %rdx\n push %rsi\n push %rdi\n"
    "  sub $136, %rsp\n"
    "  movdqu %xmm0, 0(%rsp)\n  movdqu %xmm1, 16(%rsp)\n"
    "  movdqu %xmm2, 32(%rsp)\n movdqu %xmm3, 48(%rsp)\n"
    "  movdqu %xmm4, 64(%rsp)\n movdqu %xmm5, 80(%rsp)\n"
    "  movdqu %xmm6, 96(%rsp)\n movdqu %xmm7, 112(%rsp)\n"
    "  mov 8(%rbp), %rdi\n"
    "  lea 136(%rsp), %rsi\n"
    "  call *hp_caller_template(%rip)\n"
    "  mov %rax, %r11\n"
    "  movdqu 0(%rsp), %xmm0\n  movdqu 16(%rsp), %xmm1\n"
    "  movdqu 32(%rsp), %xmm2\n movdqu 48(%rsp), %xmm3\n"
    "  movdqu 64(%rsp), %xmm4\n movdqu 80(%rsp), %xmm5\n"
    "  movdqu 96(%rsp), %xmm6\n movdqu 112(%rsp), %xmm7\n"
    "  add $136, %rsp\n"
    "  pop %rdi\n pop %rsi\n pop %rdx\n pop %rcx\n"
    "  pop %r8\n pop %r9\n pop %r10\n pop %rax\n"
    "  pop %rbp\n"
    "  lea 8(%rsp), %rsp\n"
    "  jmp *%r11\n"
    ".globl hp_caller_template_end\n"
    ".hidden hp_caller_template_end\n"
    "hp_caller_template_end:\n");

/* Copies of the shared caller made so far: one serves every site within
 * rel32 reach of it. */
#define MAX_CALLERS 1024
static uintptr_t callers[MAX_CALLERS];
static int ncallers;

/* The entry of the shared caller within reach of `near`; 0 if none. */
uintptr_t hp_caller_near(uintptr_t near)
{
    size_t len = (size_t)(hp_caller_template_end - hp_caller_template);
    uintptr_t entry = 0;
    pthread_mutex_lock(&hp_lock);
    for (int i = 0; i < ncallers && !entry; i++)
        if (hp_reaches(near, callers[i], callers[i] + len))
            entry = callers[i];
    unsigned char copy[512];
    uintptr_t at = entry || ncallers == MAX_CALLERS || len > sizeof copy
        ? 0 : hp_alloc_code_locked(near, len);
    if (at) {
        uintptr_t words[2] = { (uintptr_t)hp_call_dispatch, (uintptr_t)&call_table };
        memcpy(copy, hp_caller_template, len);
        memcpy(copy, words, sizeof words);
        if (hp_write_code_locked(at, copy, len) == 0)
            callers[ncallers++] = entry = at + sizeof words;
    }
    pthread_mutex_unlock(&hp_lock);
    return entry;
}
