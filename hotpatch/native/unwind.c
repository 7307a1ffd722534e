/*
 * Unwinding the stacks of stopped threads, for the stack consistency model
 * (kpatch's): is a function of the patch on some thread's stack?
 *
 * The unwinder is libunwind's remote API, driven the way perf drives it for
 * sampled stacks: an address space with accessors of our own.  Registers come
 * from what the ptrace helper captured (PTRACE_GETREGS); memory is read with
 * process_vm_readv, a page at a time, so a bad pointer is an error and never
 * a fault; the
 * unwind tables are the .eh_frame_hdr of every loaded object, listed before
 * the stop so that nothing takes the dynamic linker's lock while threads are
 * stopped.  libunwind is opened with dlopen on first need (no development
 * headers are needed: unwind_abi.h declares what we call).  With caching
 * off, libunwind's remote path keeps what it allocates in its own mmap'ed
 * pools and calls no malloc (checked with gdb breakpoints on the allocator
 * during walks of the patching thread's own stack, which take the same
 * path; see docs/notes.md), so it is safe while other threads are stopped.
 *
 * Like the kernel's reliable stack traces, a frame that cannot be unwound
 * (no unwind table for its pc, an unreadable stack) makes the whole stack
 * unreliable: the caller treats that as "not yet", never as "clean".
 */
#include "hotpatch_core.h"
#include "unwind_abi.h"

#include <dlfcn.h>
#include <string.h>

#define MAX_CODE 2048        /* executable segments with an unwind table */
#define MAX_FRAMES 1024
#define PT_GNU_EH_FRAME_TYPE 0x6474e550

/* One executable segment and its object's .eh_frame_hdr search table. */
struct code_table {
    uintptr_t lo, hi;
    uintptr_t hdr, table;
    uint64_t count;
};

static struct code_table code[MAX_CODE];
static int ncode;
static struct hp_unw_api unw;
static hp_unw_as space;
static char unavailable[HP_ERRLEN];     /* why libunwind cannot be used, once tried */
static int opened;
pthread_mutex_t hp_unwind_lock = PTHREAD_MUTEX_INITIALIZER;

/* hotpatch's thunks (x86_64/thunk.py) live in the pool, which has no
 * unwind tables; their frame is known: at the return point of their call
 * of the new code, rbp is the thunk's frame pointer, and above the saved
 * rbp lie `pushed` saved registers, then the return address to the old
 * function's caller.  Registered when a thunk is made; never removed
 * (thunks are never freed). */
#define MAX_THUNKS 4096
struct thunk_frame {
    uintptr_t ret;
    uint64_t pushed;
};
static struct thunk_frame thunks[MAX_THUNKS];
static int nthunks;

/* What the accessors read for one walk. */
struct target {
    const struct user_regs_struct *regs;
    int pid;            /* a live thread of this process, for process_vm_readv */
    int noinfo;         /* a lookup found no unwind table since it was cleared */
};

/* --- memory ------------------------------------------------------------ */

/* libunwind reads a word at a time, mostly next to the last one (the
 * search table, FDEs and CIEs parsed byte by byte, stack slots): one
 * process_vm_readv per word cost about 5 ms per thread with Python's deep
 * stacks.  Whole pages are read instead and kept for one check.  Nothing
 * can change them meanwhile: every other thread is stopped, and the cache
 * is emptied before each check (this thread's own stack moves between
 * checks) and never outlives the stop. */
#define PAGE 4096u
#define CACHED_PAGES 64
struct cached_page {
    uintptr_t page;         /* 0: empty */
    int pid;                /* read through */
    long valid;             /* bytes read from the page's start (0: unmapped) */
    uint8_t bytes[PAGE];
};
static struct cached_page cache[CACHED_PAGES];

HP_RAW void hp_unwind_forget_memory(void)
{
    for (int i = 0; i < CACHED_PAGES; i++)
        cache[i].page = 0;
}

HP_RAW static const struct cached_page *page_of(int pid, uintptr_t page)
{
    struct cached_page *c = &cache[(page / PAGE) % CACHED_PAGES];
    if (c->page != page || c->pid != pid || !page) {
        long got = hp_read_own(pid, c->bytes, page, PAGE);
        c->page = page;
        c->pid = pid;
        c->valid = got > 0 ? got : 0;
    }
    return c;
}

/* Read a word without faulting; 0, or -1 where it is not all mapped. */
HP_RAW static int read_word(int pid, uintptr_t addr, hp_unw_word *value)
{
    uint8_t *out = (uint8_t *)value;
    for (unsigned i = 0; i < sizeof *value; i++) {
        uintptr_t at = addr + i, page = at & ~(uintptr_t)(PAGE - 1);
        const struct cached_page *c = page_of(pid, page);
        if ((long)(at - page) >= c->valid)
            return -1;
        out[i] = c->bytes[at - page];
    }
    return 0;
}

/* --- the accessors --------------------------------------------------- */

HP_RAW static const struct code_table *code_of(uintptr_t ip)
{
    int lo = 0, hi = ncode;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (ip < code[mid].lo)
            hi = mid;
        else if (ip >= code[mid].hi)
            lo = mid + 1;
        else
            return &code[mid];
    }
    return 0;
}

HP_RAW static int find_proc_info(hp_unw_as as, hp_unw_word ip, void *pi, int need, void *arg)
{
    struct target *t = arg;
    const struct code_table *c = code_of(ip);
    if (!c) {
        t->noinfo = 1;
        return -HP_UNW_ENOINFO;
    }
    struct hp_unw_dyn_info di = { 0 };
    di.start_ip = c->lo;
    di.end_ip = c->hi;
    di.format = HP_UNW_INFO_FORMAT_REMOTE_TABLE;
    di.rti.segbase = c->hdr;
    di.rti.table_len = c->count;    /* one 8-byte entry is one word */
    di.rti.table_data = c->table;
    int rc = unw.search_unwind_table(as, ip, &di, pi, need, arg);
    if (rc == -HP_UNW_ENOINFO)
        t->noinfo = 1;
    return rc;
}

static unsigned long put_calls;     /* should stay 0: see hp_unwind_put_calls */

HP_RAW static void put_unwind_info(hp_unw_as as, void *pi, void *arg)
{
    put_calls++;
}

HP_RAW static int no_dynamic_info(hp_unw_as as, hp_unw_word *addr, void *arg)
{
    return -HP_UNW_ENOINFO;
}

HP_RAW static int access_mem(hp_unw_as as, hp_unw_word addr, hp_unw_word *value, int write,
                             void *arg)
{
    struct target *t = arg;
    if (write || read_word(t->pid, addr, value))
        return -HP_UNW_EINVAL;
    return 0;
}

HP_RAW static int access_reg(hp_unw_as as, int reg, hp_unw_word *value, int write, void *arg)
{
    const struct user_regs_struct *r = ((struct target *)arg)->regs;
    if (write)
        return -HP_UNW_EREADONLYREG;
    switch (reg) {
    case HP_UNW_RAX: *value = r->rax; return 0;
    case HP_UNW_RDX: *value = r->rdx; return 0;
    case HP_UNW_RCX: *value = r->rcx; return 0;
    case HP_UNW_RBX: *value = r->rbx; return 0;
    case HP_UNW_RSI: *value = r->rsi; return 0;
    case HP_UNW_RDI: *value = r->rdi; return 0;
    case HP_UNW_RBP: *value = r->rbp; return 0;
    case HP_UNW_RSP: *value = r->rsp; return 0;
    case HP_UNW_R8: *value = r->r8; return 0;
    case HP_UNW_R9: *value = r->r9; return 0;
    case HP_UNW_R10: *value = r->r10; return 0;
    case HP_UNW_R11: *value = r->r11; return 0;
    case HP_UNW_R12: *value = r->r12; return 0;
    case HP_UNW_R13: *value = r->r13; return 0;
    case HP_UNW_R14: *value = r->r14; return 0;
    case HP_UNW_R15: *value = r->r15; return 0;
    case HP_UNW_RIP: *value = r->rip; return 0;
    }
    return -HP_UNW_EBADREG;
}

HP_RAW static int no_fpreg(hp_unw_as as, int reg, void *value, int write, void *arg)
{
    return -HP_UNW_EBADREG;
}

HP_RAW static int no_resume(hp_unw_as as, hp_unw_cursor *cursor, void *arg)
{
    return -HP_UNW_EINVAL;
}

HP_RAW static int no_name(hp_unw_as as, hp_unw_word addr, char *buf, size_t len,
                          hp_unw_word *offset, void *arg)
{
    return -HP_UNW_ENOINFO;
}

static struct hp_unw_accessors accessors = {
    find_proc_info, put_unwind_info, no_dynamic_info, access_mem, access_reg, no_fpreg,
    no_resume, no_name,
};

/* --- opening libunwind ------------------------------------------------ */

static int open_libunwind(char *err)
{
    if (opened) {
        if (unavailable[0])
            hp_fmt_str(err, err + HP_ERRLEN, unavailable);
        return unavailable[0] ? -1 : 0;
    }
    opened = 1;
    void *lib = dlopen("libunwind-x86_64.so.8", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        char *at = hp_fmt_str(unavailable, unavailable + HP_ERRLEN,
                              "the stack check needs libunwind (libunwind-x86_64.so.8, "
                              "Debian/Ubuntu package libunwind8): ");
        hp_fmt_str(at, unavailable + HP_ERRLEN, dlerror());
    }
#define X(field, name)                                                           \
    if (lib && !(*(void **)&unw.field = dlsym(lib, name))) {                     \
        char *at = hp_fmt_str(unavailable, unavailable + HP_ERRLEN,              \
                              "libunwind-x86_64.so.8 has no ");                  \
        hp_fmt_str(at, unavailable + HP_ERRLEN, name);                           \
        lib = 0;                                                                 \
    }
    HP_UNW_SYMBOLS
#undef X
    if (lib && (!(space = unw.create_addr_space(&accessors, 0)) ||
                unw.set_caching_policy(space, HP_UNW_CACHE_NONE)))
        hp_fmt_str(unavailable, unavailable + HP_ERRLEN,
                   "libunwind could not create an address space");
    return open_libunwind(err);
}

/* --- the unwind tables ------------------------------------------------ */

/* Bytes of a DWARF pointer encoding's value (0: not one we read). */
static int encoded_size(int enc)
{
    switch (enc & 0x0f) {
    case 0x02: case 0x0a: return 2;
    case 0x03: case 0x0b: return 4;
    case 0x04: case 0x0c: return 8;
    }
    return 0;
}

/* The search table of an .eh_frame_hdr: version 1, the encodings of
 * eh_frame_ptr, fde_count and the table, which must be 32-bit offsets from
 * the header (datarel sdata4) for libunwind to search it. */
static int read_eh_frame_hdr(uintptr_t hdr, uintptr_t *table, uint64_t *count)
{
    const uint8_t *h = (const uint8_t *)hdr;
    int ptr_size = encoded_size(h[1]), count_size = encoded_size(h[2]);
    if (h[0] != 1 || h[3] != 0x3b || !ptr_size || (count_size != 4 && count_size != 8))
        return -1;
    const uint8_t *c = h + 4 + ptr_size;
    uint64_t n = 0;
    memcpy(&n, c, (size_t)count_size);
    *table = (uintptr_t)(c + count_size);
    *count = n;
    return 0;
}

static int add_object(struct dl_phdr_info *info, size_t size, void *data)
{
    uintptr_t hdr = 0, table;
    uint64_t count;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_GNU_EH_FRAME_TYPE)
            hdr = info->dlpi_addr + info->dlpi_phdr[i].p_vaddr;
    if (!hdr || read_eh_frame_hdr(hdr, &table, &count))
        return 0;       /* no table: a frame there is unreliable */
    for (int i = 0; i < info->dlpi_phnum && ncode < MAX_CODE; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X))
            continue;
        struct code_table c = { info->dlpi_addr + ph->p_vaddr,
                                info->dlpi_addr + ph->p_vaddr + ph->p_memsz, hdr, table, count };
        int at = ncode++;
        while (at > 0 && code[at - 1].lo > c.lo) {      /* kept sorted */
            code[at] = code[at - 1];
            at--;
        }
        code[at] = c;
    }
    return 0;
}

/* Ready to check stacks: libunwind opened and the unwind tables of every
 * loaded object listed.  Before the stop (dl_iterate_phdr takes the
 * dynamic linker's lock); hp_unwind_lock held.  0, or -1 with `err`. */
int hp_unwind_prepare(char *err)
{
    if (open_libunwind(err))
        return -1;
    ncode = 0;
    dl_iterate_phdr(add_object, 0);
    return 0;
}

/* --- thunk frames ------------------------------------------------------- */

void hp_unwind_add_thunk(uintptr_t return_point, unsigned pushed)
{
    pthread_mutex_lock(&hp_unwind_lock);
    if (nthunks < MAX_THUNKS) {     /* beyond: their frames are unreliable */
        int at = nthunks++;
        while (at > 0 && thunks[at - 1].ret > return_point) {
            thunks[at] = thunks[at - 1];
            at--;
        }
        thunks[at] = (struct thunk_frame){ return_point, pushed };
    }
    pthread_mutex_unlock(&hp_unwind_lock);
}

HP_RAW static const struct thunk_frame *thunk_at(uintptr_t pc)
{
    int lo = 0, hi = nthunks;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (pc < thunks[mid].ret)
            hi = mid;
        else if (pc > thunks[mid].ret)
            lo = mid + 1;
        else
            return &thunks[mid];
    }
    return 0;
}

/* Step over a thunk's frame (see struct thunk_frame) and start a new
 * cursor at its caller: the callee-saved registers but rbp pass through
 * the thunk unchanged.  `regs` must outlive the cursor (libunwind reads
 * registers when it needs them).  0, or -1 where memory cannot be read. */
HP_RAW static int step_over_thunk(struct target *t, hp_unw_cursor *cursor,
                                  const struct thunk_frame *f, struct user_regs_struct *regs)
{
    static const int kept[] = { HP_UNW_RBX, HP_UNW_R12, HP_UNW_R13, HP_UNW_R14, HP_UNW_R15 };
    hp_unw_word rbp, value[5], saved_rbp, ret;
    if (unw.get_reg(cursor, HP_UNW_RBP, &rbp) < 0)
        return -1;
    for (int i = 0; i < 5; i++)
        if (unw.get_reg(cursor, kept[i], &value[i]) < 0)
            return -1;
    if (read_word(t->pid, rbp, &saved_rbp) || read_word(t->pid, rbp + 8 + 8 * f->pushed, &ret))
        return -1;
    volatile uint64_t *words = (uint64_t *)regs;
    for (size_t i = 0; i < sizeof *regs / 8; i++)
        words[i] = 0;
    regs->rip = ret;
    regs->rsp = rbp + 16 + 8 * f->pushed;
    regs->rbp = saved_rbp;
    regs->rbx = value[0];
    regs->r12 = value[1];
    regs->r13 = value[2];
    regs->r14 = value[3];
    regs->r15 = value[4];
    t->regs = regs;
    return unw.init_remote(cursor, space, t) < 0 ? -1 : 0;
}

/* --- the walk ----------------------------------------------------------- */

HP_RAW static int range_of(const struct hp_code_range *r, size_t n, uintptr_t pc)
{
    for (size_t i = 0; i < n; i++)
        if (pc >= r[i].lo && pc < r[i].hi)
            return (int)i;
    return -1;
}

HP_RAW static int unreliable(struct hp_stack_hit *hit, int frame, uintptr_t pc)
{
    hit->frame = frame;
    hit->pc = pc;
    hit->range = -1;
    hit->unreliable = 1;
    return 1;
}

/* Walk one thread's stack from `regs`.  0: no frame's pc in `ranges`, and
 * the walk reached the thread's first frame.  1: `hit` says which frame
 * holds which range, or where the walk could not go on (unreliable).
 * Every frame's pc is a return address (the call is the byte before it)
 * except the first and one that a signal interrupted: those are exact. */
HP_RAW static int walk(struct target *t, const struct hp_code_range *ranges, size_t n,
                       struct hp_stack_hit *hit)
{
    hp_unw_cursor cursor;
    struct user_regs_struct past_thunk[2];     /* alternately: a cursor's registers */
    if (unw.init_remote(&cursor, space, t) < 0)
        return unreliable(hit, 0, t->regs->rip);
    int exact = 1, thunks_passed = 0;
    for (int frame = 0; frame < MAX_FRAMES; frame++) {
        hp_unw_word pc;
        if (unw.get_reg(&cursor, HP_UNW_RIP, &pc) < 0)
            return unreliable(hit, frame, 0);
        int r = range_of(ranges, n, exact ? pc : pc - 1);
        if (r >= 0) {
            hit->frame = frame;
            hit->pc = pc;
            hit->range = r;
            hit->unreliable = 0;
            return 1;
        }
        const struct thunk_frame *f = thunk_at(pc);
        if (f) {
            if (step_over_thunk(t, &cursor, f, &past_thunk[thunks_passed++ & 1]))
                return unreliable(hit, frame, pc);
            exact = 0;
            continue;
        }
        exact = unw.is_signal_frame(&cursor) > 0;
        t->noinfo = 0;
        int rc = unw.step(&cursor);
        if (rc == 0)
            return 0;       /* the first frame of the thread: a clean end */
        /* No unwind table here: libunwind's frame-pointer guess may be
         * wrong, so the stack is not reliable. */
        if (rc < 0 || (t->noinfo && !exact))
            return unreliable(hit, frame, pc);
    }
    return unreliable(hit, MAX_FRAMES, 0);
}

/* Check a stopped thread's stack (its registers as ptrace read them),
 * reading memory through thread `pid`.  See walk(). */
HP_RAW int hp_unwind_check(const struct user_regs_struct *regs, int pid,
                           const struct hp_code_range *ranges, size_t n, struct hp_stack_hit *hit)
{
    struct target t = { regs, pid, 0 };
    return walk(&t, ranges, n, hit);
}

/* Check the calling thread's own stack, from this very frame (`hit` is
 * written only when something is found): the thread
 * that patches may itself be running a function of the patch (an enable
 * from a callback of it), and no retry will change that. */
__attribute__((noinline)) int hp_unwind_check_self(const struct hp_code_range *ranges, size_t n,
                                                   struct hp_stack_hit *hit)
{
    struct user_regs_struct regs;
    memset(&regs, 0, sizeof regs);
    /* pc and sp of one instruction, and the registers callers may keep
     * their frames in. */
    __asm__ volatile("lea 0(%%rip), %%rax\n\t"
                     "mov %%rax, %0\n\t"
                     "mov %%rsp, %1\n\t"
                     "mov %%rbp, %2\n\t"
                     "mov %%rbx, %3\n\t"
                     "mov %%r12, %4\n\t"
                     "mov %%r13, %5\n\t"
                     "mov %%r14, %6\n\t"
                     "mov %%r15, %7"
                     : "=m"(regs.rip), "=m"(regs.rsp), "=m"(regs.rbp), "=m"(regs.rbx),
                       "=m"(regs.r12), "=m"(regs.r13), "=m"(regs.r14), "=m"(regs.r15)
                     :
                     : "rax", "memory");
    struct target t = { &regs, hp_gettid(), 0 };
    hp_unwind_forget_memory();
    int found = walk(&t, ranges, n, hit);
    hp_unwind_forget_memory();      /* this stack moves on */
    if (!found)
        return 0;
    hit->tid = t.pid;
    return 1;
}

/* How often libunwind handed unwind information back to us to free (it
 * frees what it allocates itself with caching off; a non-zero count would
 * mean memory kept per check). */
unsigned long hp_unwind_put_calls(void)
{
    return put_calls;
}
