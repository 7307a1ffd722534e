/*
 * The C core of hotpatch: what must be native.
 *
 *   objects.c     loaded objects (dl_iterate_phdr), for the symbol layer
 *   maps.c        this process's mappings (/proc/thread-self/maps), no malloc
 *   proc.c        what /proc says of a thread (state, tracer, signal masks)
 *   pool.c        executable memory within +-2 GiB of a target, named "hotpatch"
 *   codewrite.c   writing code while other threads run it: one stop per batch
 *   unstopped.c   the writes that need no stop: one atomic store of one instruction
 *   ahead.c       what the first write asks of the kernel, asked at the core's import
 *   gotslot.c     storing into GOT slots (PLT calls of patched functions), no stop
 *   stop.c        the stop: which stopper holds the threads, retries, counters
 *   check.c       what a stopped thread may not be doing (pc, signal frames)
 *   unwind.c      stopped threads' stacks unwound (libunwind), for the stack model
 *   stop_ptrace.c the ptrace stopper: a helper process seizes every other thread
 *   stop_signal.c the fallback stopper: park every other thread in a signal handler
 *   caller.c      the shared caller of the ftrace-style call path
 *   crash.c       the crash report of a live-patched process
 *   loader.c      the loader hook: COMING/GOING events from the dynamic linker
 *   xrefs.c       the direct branches landing in a range (capstone's C library)
 *   decode.c      runs of instructions decoded for Python (x86_64/decode.py)
 *   plan.c        the plans and original stubs of a batch's common entries
 *   first.c       a function's first redirect in one call (plan, hop, write)
 *   nearby.c      the bytes the sites write, by block: what a new site leaves alone
 *   shadow.c      shadow variables, and the table patch modules call the core through
 *
 * Policy (what to patch, the bytes, the stacks of patches) lives in Python.
 * Everything that runs while threads are stopped uses only raw system calls
 * (sys.h) and memory prepared beforehand.
 */
#ifndef HOTPATCH_CORE_H
#define HOTPATCH_CORE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <link.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/user.h>

#include "sys.h"

#define HP_ERRLEN 256
#define HP_MAX_THREADS 8192

/* Code in the stop path and in the helper process: no stack protector (the
 * helper has no thread pointer of libc's), and no loop turned into a call
 * to memset/memcpy, which a patch may have replaced. */
#define HP_RAW __attribute__((no_stack_protector, optimize("no-tree-loop-distribute-patterns")))

/* One lock for the core's state: the pool, the call table, the stop. */
extern pthread_mutex_t hp_lock;

/* --- objects.c ----------------------------------------------------- */
#define HP_NAME_MAX 4096
#define HP_MAX_PHDRS 32
struct hp_loaded_object {
    char name[HP_NAME_MAX];  /* as the dynamic linker has it ("" = main program) */
    uintptr_t base;          /* l_addr: load bias */
    uintptr_t phdr_address;  /* where the program headers are mapped */
    int phnum;               /* headers copied below (at most HP_MAX_PHDRS) */
    ElfW(Phdr) phdr[HP_MAX_PHDRS];
    /* Read from the mapped image while the linker's lock holds it: */
    int soname_len;          /* DT_SONAME's bytes below; -1: none */
    char soname[256];
    int build_id_len;        /* NT_GNU_BUILD_ID's bytes below; -1: none, -2: longer */
    uint8_t build_id[64];
};
int hp_loaded_objects(struct hp_loaded_object *out, int capacity);
unsigned long long hp_loaded_generation(void);
long hp_read_memory(uintptr_t address, void *out, size_t len);

/* --- xrefs.c ------------------------------------------------------- */
struct hp_branch_index;
int hp_capstone_load(const char *path, char *err);
struct hp_branch_index *hp_branch_index_build(const uintptr_t *ranges, int n,
                                              const uintptr_t *starts, size_t nstarts,
                                              char *err);
long hp_branch_index_into(struct hp_branch_index *ix, uintptr_t lo, uintptr_t hi,
                          uint64_t *sources, uint64_t *targets, long capacity);
void hp_branch_index_free(struct hp_branch_index *ix);
long hp_branch_candidates_into(const uintptr_t *ranges, int n, const uintptr_t *into, int k);
#define HP_INSN_OTHER 0
#define HP_INSN_LEAVES 1        /* never falls through: ret, jmp, ud2, hlt */
#define HP_INSN_PADDING 2       /* nop, int3 */
#define HP_INSN_CALL 3
int hp_instruction_kind(const uint8_t *code, size_t len, uint64_t address, int *kind);
size_t hp_padding_over(const uint8_t *code, size_t len, uint64_t address, size_t want);
long hp_function_branches(const uint8_t *code, size_t len, uint64_t address, uint64_t stop,
                          uint64_t *decoded_end, uint64_t *sources, uint64_t *targets,
                          long capacity);

/* One function of a batch for the entry analysis (see hp_scan_entries). */
#define HP_SCAN_AHEAD 24        /* endbr64 + 5 + 15: all a plan can replace */
#define HP_SCAN_COVER 5         /* the jmp rel32 written at the site */
#define HP_SCAN_HEAD 8
#define HP_SCAN_BRANCHES 16
#define HP_SCAN_UNMAPPED (-1)
struct hp_scanned_insn {
    uint64_t address;
    uint32_t size;
    char mnemonic[32];          /* as capstone's cs_insn has them */
    char op_str[160];
};
struct hp_scanned_branch {
    uint64_t source, target;
};
struct hp_entry_scan {
    uint64_t entry, stop;       /* in: the function, its end (0: unknown) */
    uint64_t offset, len;       /* in: its bytes in the batch's buffer */
    int32_t status;             /* out: 0 or HP_SCAN_UNMAPPED */
    int32_t nhead, nbranches;   /* nbranches may exceed HP_SCAN_BRANCHES */
    uint64_t address;           /* where the site goes: past an endbr64 */
    uint64_t decoded_end;       /* end of the last instruction swept before stop */
    struct hp_scanned_insn head[HP_SCAN_HEAD];
    struct hp_scanned_branch branches[HP_SCAN_BRANCHES];
};
long hp_scan_entries(struct hp_entry_scan *scans, long n, uint8_t *buf, int read);
struct cs_insn;
const struct cs_insn *hp_decode_detailed(const uint8_t *code, size_t len, uint64_t address);
int hp_branch_kind(const struct cs_insn *ci);   /* decode.c: HP_BRANCH_* */
const struct cs_insn *hp_decode_text(const uint8_t *code, size_t len, uint64_t address);
int hp_capstone_usable(void);
int hp_registers_written(const struct cs_insn *insn, uint16_t *regs, uint8_t *count);
const char *hp_register_name(unsigned reg);

/* --- decode.c ------------------------------------------------------ */
#define HP_DECODE_TEXT 0        /* address, size, mnemonic, op_str */
#define HP_DECODE_OPERANDS 1    /* and branch and rip, where the text shows they matter */
#define HP_DECODE_DETAILS 2     /* and branch and rip for every instruction */
#define HP_DECODE_WRITES 3      /* details, registers written, first operand's immediate */
#define HP_BRANCH_NONE 0
#define HP_BRANCH_RET 1         /* ret, retf, iret forms */
#define HP_BRANCH_JMP 2         /* the relative forms: target set */
#define HP_BRANCH_JCC 3
#define HP_BRANCH_CALL 4
#define HP_BRANCH_LOOP 5        /* loop, loope, loopne, jrcxz, jecxz, jcxz */
#define HP_BRANCH_XBEGIN 6
#define HP_BRANCH_JMP_INDIRECT 7 /* through a register or memory, ljmp */
#define HP_BRANCH_CALL_INDIRECT 8 /* the same for call, lcall */
#define HP_RIP_NONE 0           /* no RIP-relative memory operand */
#define HP_RIP_FOUND 1          /* its disp32 at rip_disp_offset, refers to rip_target */
#define HP_RIP_MISPLACED 2      /* capstone's disp_offset does not hold the displacement */
#define HP_DECODE_MAX_WRITTEN 64 /* capstone's cs_regs */
struct hp_decoded_insn {
    uint64_t address;
    uint64_t target;            /* a relative branch's (HP_BRANCH_JMP .. XBEGIN) */
    uint64_t rip_target;
    int64_t imm;                /* HP_DECODE_WRITES: the first operand's, if has_imm */
    uint16_t size;
    uint8_t branch;             /* HP_BRANCH_*, where details were read */
    uint8_t rip;                /* HP_RIP_*, where details were read */
    uint8_t rip_disp_offset;
    uint8_t has_imm;
    uint8_t nwritten;
    char mnemonic[32];          /* as capstone's cs_insn has them */
    char op_str[160];
    uint16_t written[HP_DECODE_MAX_WRITTEN]; /* HP_DECODE_WRITES: capstone's register ids */
};
long hp_decode(const uint8_t *code, size_t len, uint64_t address, int mode,
               struct hp_decoded_insn *out, long capacity);
int hp_wants_details(const char *mnemonic, const char *op_str);

/* --- plan.c -------------------------------------------------------- */
#define HP_HOP_SIZE 5           /* a hot-patch point's jmp rel32 (hop.c) */
#define HP_PLAN_OK 0
#define HP_PLAN_PYTHON 1        /* not a shape plan.c handles: Python plans it */
#define HP_PLAN_UNWRITTEN 2     /* planned, but its stub could not be written */
#define HP_PLAN_MAX_INSNS 8
#define HP_PLAN_MAX_REPLACED 24 /* a plan replaces at most 5 + 14 bytes */
#define HP_PLAN_MAX_STUB 128    /* endbr64, 5 instructions in their far forms, jmp back */
struct hp_plan {
    uint64_t entry, size;       /* in: the function, its size (0: unknown) */
    uint64_t stub;              /* in (not placed) or out: the stub's address */
    uint64_t address;           /* out: where the site goes */
    int32_t status;
    uint32_t length;            /* bytes replaced at address */
    uint32_t stub_size;         /* entry.py's original_stub_size_bound() */
    uint32_t code_len;
    uint8_t endbr, single_instruction, falls_through, ninsns;
    uint8_t original[HP_PLAN_MAX_REPLACED];
    uint8_t code[HP_PLAN_MAX_STUB];
};
struct hp_code_block {
    uint64_t address, size;
};
long hp_plan_entries(struct hp_plan *plans, long n, const uint64_t *ranges, long nranges,
                     int place, struct hp_code_block *free_blocks, size_t nfree);
long hp_plan_entries_from(struct hp_plan *plans, long n, const uint64_t *ranges, long nranges,
                          int place, struct hp_code_block *free_blocks, size_t nfree,
                          const uint8_t *code, size_t len);
long hp_plan_branched_into(struct hp_plan *plans, long n, struct hp_branch_index *ix);
uint64_t hp_plan_window(const struct hp_plan *plan, const uint64_t *ranges, long nranges,
                        uint64_t *end);
int hp_in_reach(uint64_t src, uint64_t dst, unsigned size);
uint8_t *hp_put_rel32(uint8_t *p, uint64_t at_end, uint64_t target);
/* One site of a batch of entry writes: what is at its entry now and what
 * it gets, each `op` (0xE9 jmp, 0xE8 call) rel32 to `to`, or its original
 * bytes where op is 0. */
struct hp_entry_change {
    uint64_t address;
    uint8_t old_op;
    uint64_t old_to;
    uint8_t new_op;
    uint64_t new_to;
    uint32_t length;
    uint8_t original[HP_PLAN_MAX_REPLACED];
    uint64_t hop;           /* 0, or the site's hot-patch point (hop.c) */
    uint64_t hop_to;        /* where the jmp at the hop goes now */
    uint8_t old_hop, new_hop;   /* the entry goes through the hop now, after */
};
struct hp_write;
long hp_entry_writes(const struct hp_entry_change *changes, long n, struct hp_write *w,
                     uint8_t *rewritten);

/* --- first.c ------------------------------------------------------- */
/* An object's function symbols by start, for the function before an entry
 * (hop.c, hp_function_before): offsets from `base`, sorted; `sized_from`
 * and `sized_to`: the starts and ends of those with a size, by start.
 * symbols.py's FunctionBefore builds it once per object. */
struct hp_function_starts {
    uint64_t base;
    const uint64_t *starts;
    uint64_t nstarts;
    const uint64_t *sized_from, *sized_to;
    uint64_t nsized;
};

struct hp_first {
    struct hp_plan plan;            /* in: its entry and size; out: as hp_plan_entries plans it */
    uint64_t target;                /* in: where the entry's calls go */
    uint64_t before;                /* in: the function before's start, 0: none (first.c) */
    const struct hp_function_starts *starts;   /* in: else where to look it up, or NULL */
    uint64_t hop;                   /* the hot-patch point taken, 0: none */
    uint8_t hop_padding[HP_HOP_SIZE];   /* its bytes before */
    uint8_t stops_plainly;          /* a jmp rel32 at the entry needs a stop */
    uint8_t hop_known;              /* hop and stops_plainly are set */
    int8_t written;                 /* 1 redirected, 0 left to the batch path, -1 failed */
};
long hp_redirect_first(struct hp_first *f, const uint64_t *ranges, long nranges,
                       struct hp_code_block *free_blocks, size_t nfree, int timeout_ms,
                       char *err);

/* --- nearby.c ------------------------------------------------------ */
int hp_near_file(uint64_t entry, uint64_t lo, uint64_t hi);
int hp_near_file_plans(const struct hp_plan *plans, long n);
void hp_near_unfile(uint64_t entry);
int hp_near_point(uint64_t entry, uint64_t hop);
long hp_near_points(void);
long hp_near_entries(uint64_t lo, uint64_t hi, uint64_t *out, long cap);
int hp_near_point_over(uint64_t lo, uint64_t hi);
long hp_near_taken(uint64_t lo, uint64_t hi, uint64_t self, uint64_t *pairs, long cap);

/* --- hop.c --------------------------------------------------------- */
uint64_t hp_function_before(const struct hp_function_starts *f, uint64_t address);
#define HP_HOP_ASK_BEFORE 1
#define HP_HOP_SEARCH 128       /* bytes before the entry that may be padding */
#define HP_HOP_BEHIND 16        /* and before those, for the instruction before the run */
uint64_t hp_hop_in(uint64_t entry, uint64_t address, uint64_t before,
                   const struct hp_function_starts *starts, const uint8_t *first,
                   const uint8_t *behind);
/* The bytes read before an entry to look for its point (hp_hop_over). */
#define HP_HOP_READ_BEHIND (HP_HOP_BEHIND + HP_HOP_SEARCH)
uint64_t hp_hop_over(uint64_t entry, uint64_t address, uint32_t length, uint64_t before,
                     const struct hp_function_starts *starts, const uint8_t *bytes,
                     uint8_t *stops_plainly, uint8_t *padding);
/* An entry asked for its hot-patch point (hp_hops_find). */
struct hp_hop_query {
    uint64_t entry, address, length;    /* the entry, its plan's address and length */
    uint64_t before;                    /* as hp_hop_in's */
    const struct hp_function_starts *starts;    /* as hp_hop_in's */
    uint64_t hop;                       /* out: as hp_hop_in's; 0 where stops_plainly is 0 */
    uint8_t stops_plainly;              /* out: the jmp rel32 at address needs a stop */
    uint8_t padding[HP_HOP_SIZE];       /* out: the bytes at hop, where there is one */
    uint8_t unused[2];
};
void hp_hops_find(struct hp_hop_query *q, size_t n);

/* --- maps.c -------------------------------------------------------- */
#define HP_MAX_MAPPINGS 65536
struct hp_mapping {
    uintptr_t lo, hi;
    int prot;
};
extern struct hp_mapping hp_mappings[HP_MAX_MAPPINGS];
extern int hp_nmappings;
int hp_read_mappings(void);
const struct hp_mapping *hp_mapping_of(uintptr_t address);

/* --- proc.c -------------------------------------------------------- */
struct hp_thread_status {
    char state;               /* 0: gone */
    int tracer;
    uint64_t pending, blocked;
    char name[32];
};
uintptr_t hp_parse_hex(const char **p);
void hp_read_thread_status(int pid, int tid, struct hp_thread_status *st);
int hp_list_threads(int *tids, int max);
int hp_thread_waits_on(int tid, uintptr_t lo, uintptr_t hi);
int hp_only_thread(void);

/* A descriptor the core keeps across batches: /proc files (opening one
 * costs 5-7 us, more than the rest of a small batch's system calls) and
 * the ptrace helper's socket.  The service may close any descriptor and
 * reuse its number: before each use the descriptor is checked to still
 * name the file kept (device and inode), and otherwise forgotten -- never
 * closed, read or written, it is not ours then. */
struct hp_kept_fd {
    int fd;                   /* -1: none */
    uint64_t dev, ino;
};
#define HP_KEPT_FD_NONE { -1, 0, 0 }
int hp_kept_fd_open(struct hp_kept_fd *k, const char *path, int flags);
int hp_kept_fd_keep(struct hp_kept_fd *k, int fd);
int hp_kept_fd_valid(struct hp_kept_fd *k);
struct stat;
int hp_kept_fd_stat(struct hp_kept_fd *k, const char *path, int flags, struct stat *st);
void hp_kept_fd_forget(struct hp_kept_fd *k);
void hp_proc_after_fork(void);

/* Gone, a zombie (a main thread ended with pthread_exit) or dead: nothing
 * that a stop can hold or needs to. */
HP_RAW static inline int hp_thread_gone(const struct hp_thread_status *st)
{
    return !st->state || st->state == 'Z' || st->state == 'X';
}

/* --- pool.c -------------------------------------------------------- */
uintptr_t hp_alloc_code(uintptr_t near, size_t size);
uintptr_t hp_alloc_code_locked(uintptr_t near, size_t size);
uint64_t *hp_alloc_slot(uintptr_t near);
const char *hp_pool_backing(void);
int hp_reaches(uintptr_t near, uintptr_t lo, uintptr_t hi);

/* --- caller.c ------------------------------------------------------- */
typedef void (*hp_observer_fn)(void *data, uintptr_t address, uint64_t *regs);
struct hp_call_site;
struct hp_call_site *hp_call_site(uintptr_t address);
void hp_call_site_set_target(struct hp_call_site *s, uintptr_t target);
uint64_t *hp_call_site_target_slot(struct hp_call_site *s);
int hp_call_site_observe(struct hp_call_site *s, hp_observer_fn fn, void *data);
void hp_call_site_unobserve(struct hp_call_site *s, int slot);
uintptr_t hp_caller_near(uintptr_t near);

/* --- crash.c -------------------------------------------------------- */
int hp_set_crash_report(const char *text);

/* --- shadow.c ------------------------------------------------------ */
#define HP_CORE       /* hotpatch.h: its types, not its calls through hotpatch_api */
#include "../include/hotpatch.h"
typedef void (*hp_shadow_dtor_with_t)(void *obj, void *shadow_data, void *dtor_data);
void *hp_shadow_get(void *obj, unsigned long id);
void *hp_shadow_alloc(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                      void *ctor_data);
void *hp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                             void *ctor_data);
int hp_shadow_free_each(void *obj, unsigned long id, int all, hp_shadow_dtor_with_t dtor,
                        void *dtor_data);
void hp_shadow_free(void *obj, unsigned long id, hp_shadow_dtor_t dtor);
void hp_shadow_free_all(unsigned long id, hp_shadow_dtor_t dtor);
unsigned long hp_shadow_live(void);
unsigned long hp_shadow_bucket(void *obj, unsigned long id);
uintptr_t hp_api_table(void);

/* --- modload.c ------------------------------------------------------ */
void *hp_dlopen(const char *path, int flags, char *err);
uintptr_t hp_dlsym(void *handle, const char *name);
/* The structures of ABI version 1 modules (hotpatch.h's before version 2
 * added hp_func.original, hp_object.build_id and hp_patch.symbols): their
 * arrays have a shorter stride, so hotpatch.load() reads them as these. */
struct hp_v1_object;
struct hp_v1_callbacks {
    int (*pre_patch)(struct hp_v1_object *obj);
    void (*post_patch)(struct hp_v1_object *obj);
    void (*pre_unpatch)(struct hp_v1_object *obj);
    void (*post_unpatch)(struct hp_v1_object *obj);
};
struct hp_v1_func { const char *old_name; void *new_func; unsigned long old_sympos; };
struct hp_v1_object {
    const char *name; struct hp_v1_func *funcs; struct hp_v1_callbacks callbacks;
};
struct hp_v1_patch { const char *name; struct hp_v1_object *objs; bool replace; };

/* --- codewrite.c ---------------------------------------------------- */
struct hp_write {
    uintptr_t address;
    uint8_t old[16];    /* what must be there now (checked with the threads stopped) */
    uint8_t bytes[16];  /* what goes there */
    uint32_t len;
};
int hp_write_code(uintptr_t addr, const void *src, size_t len);
void hp_store_slot(uint64_t *slot, uint64_t value);
int hp_write_batch(struct hp_write *w, size_t n, int timeout_ms, char *err);
int hp_write_dead_then_batch(struct hp_write *dead, size_t ndead, struct hp_write *w, size_t n,
                             int others, int timeout_ms, char *err);
struct hp_store;
struct hp_code_range;
struct hp_stack_hit;
int hp_write_batch_stack(struct hp_write *w, size_t n, const struct hp_store *stores, size_t nstores,
                         const struct hp_code_range *ranges, size_t nranges, int force,
                         int timeout_ms, struct hp_stack_hit *hit, char *err);
int hp_code_writes_use_proc_mem(void);
int hp_core_sync_ready(void);
/* Write code no thread runs (fresh pool memory), hp_lock held. */
int hp_write_code_locked(uintptr_t addr, const void *src, size_t len);
/* With the other threads stopped: write every site (undone on failure). */
struct hp_check;
int hp_write_stopped(const struct hp_check *c, char *err);
/* Serialize every core running a thread of this process (membarrier). */
void hp_sync_cores(void);

/* --- unstopped.c --------------------------------------------------- */
#define HP_UNSTOPPED_DONE 0
#define HP_UNSTOPPED_NEEDS_STOP 1   /* nothing written */
#define HP_UNSTOPPED_CHANGED 2      /* a write's bytes changed under it: the ones before made */
int hp_write_unstopped(const struct hp_write *w, size_t n, size_t *failed);
void hp_unstopped_after_fork(void);
int hp_write_needs_stop(uintptr_t address, uint32_t len);
int hp_alone(void);
int hp_write_needs_stop_over(uintptr_t address, uint32_t len, const uint8_t *now);

/* --- gotslot.c ----------------------------------------------------- */
#define HP_GOT_STORED 0
#define HP_GOT_CHANGED 1   /* the slot held something else: `found` */
#define HP_GOT_GONE 2      /* its object is no longer loaded */
struct hp_got_store {
    uintptr_t slot;          /* 8-byte aligned */
    uintptr_t phdr_address;  /* the object holding it, as dl_iterate_phdr lists it */
    uint64_t expected, value;
    uint64_t found;          /* out: what the slot held */
    int result;              /* out: HP_GOT_* or -errno */
};
int hp_store_got_slots(struct hp_got_store *s, size_t n);
struct hp_jump_slot {
    uintptr_t slot;
    uintptr_t phdr_address;  /* its object, as dl_iterate_phdr lists it */
    uintptr_t base;          /* its object's load bias */
    uint64_t value;          /* what it holds */
    char name[64];           /* the symbol it is relocated against */
};
int hp_find_jump_slots(const uint64_t *values, size_t nvalues, uintptr_t only,
                       struct hp_jump_slot *out, int capacity);

/* --- check.c -------------------------------------------------------- */
#define HP_MAX_RESTORERS 8
#define HP_FRAME_WINDOW (64u << 10)   /* stack above sp walked for signal frames */
struct hp_check {
    int pid;                               /* whose memory (process_vm_readv): a live thread's id */
    const struct hp_write *writes;         /* sorted by address */
    size_t nwrites;
    const uintptr_t *restorers;            /* sa_restorer of every handled signal */
    int nrestorers;
    uint64_t *scratch;                     /* for reading stacks */
    size_t scratch_bytes;
};
int hp_collect_restorers(uintptr_t *out, int max);
int hp_check_thread(const struct hp_check *c, uintptr_t pc, uintptr_t sp, uintptr_t *found);
int hp_check_old_bytes(const struct hp_check *c, char *err);
void hp_fmt_code_changed(char *err, uintptr_t address, int unmapped);
/* Writes `len` bytes at `address`: 0, or -1. */
typedef int (*hp_span_writer)(void *ctx, uintptr_t address, const uint8_t *bytes, size_t len);
int hp_write_spans(const struct hp_check *c, hp_span_writer put, void *ctx, char *err);

/* --- unwind.c ------------------------------------------------------- */
/* Code of a patch that no thread may be running for a transition. */
struct hp_code_range {
    uintptr_t lo, hi;
};
/* Why a stack-checked write did not happen (or, forced, what it overrode). */
struct hp_stack_hit {
    int32_t tid;          /* 0: none */
    int32_t frame;        /* 0 = where the thread is */
    uint64_t pc;          /* that frame's pc (0: unknown) */
    int32_t range;        /* index of the range found, -1 if none */
    int32_t unreliable;   /* the walk stopped at this frame: no unwind table, bad stack */
    int32_t inside;       /* the pc is inside the bytes being replaced */
    int32_t reserved;
};
extern pthread_mutex_t hp_unwind_lock;
int hp_unwind_prepare(char *err);
int hp_unwind_check(const struct user_regs_struct *regs, int pid,
                    const struct hp_code_range *ranges, size_t n, struct hp_stack_hit *hit);
int hp_unwind_check_self(const struct hp_code_range *ranges, size_t n, struct hp_stack_hit *hit);
unsigned long hp_unwind_put_calls(void);
void hp_unwind_add_thunk(uintptr_t return_point, unsigned pushed);
void hp_unwind_forget_memory(void);

/* --- stop.c --------------------------------------------------------- */
/* A stopped thread: where it is.  Filled by whichever stopper ran; only
 * ptrace fills `regs` (the stack model's unwinding needs them). */
struct hp_stopped_thread {
    int32_t tid;
    int32_t signal;     /* ptrace: signal to hand back when it is let go */
    int32_t state;      /* stopper's bookkeeping */
    int32_t reserved;
    uint64_t pc, sp;
    struct user_regs_struct regs;
};
/* A pointer-sized target (a slot, a call site's) set while threads are
 * stopped: a retarget that must not happen while a thread runs the code. */
struct hp_store {
    uint64_t *slot;
    uint64_t value;
};
extern struct hp_stopped_thread hp_stopped[HP_MAX_THREADS];
extern int hp_nstopped;

#define HP_STOP_OK 0
#define HP_STOP_FAILED (-1)       /* a thread could not be stopped or stayed inside: err says */
#define HP_STOP_REFUSED (-2)      /* this stopper cannot run here: err says why */
#define HP_STOP_CANNOT_WRITE (-3) /* the helper cannot write this process's code */
#define HP_STOP_BUSY 1            /* stack model: a thread runs code of the patch; nothing written */

/* Counters of the stops, for the tree and the benchmarks. */
struct hp_stop_stats {
    uint64_t stops, retries, stop_ns, hold_ns, hold_max_ns;
    uint64_t unstopped;     /* batches written without a stop (unstopped.c) */
    uint64_t alone;         /* batches written with no other thread to stop */
};
int hp_stop_forced(void);
extern struct hp_stop_stats hp_stats;

int hp_stop_write(struct hp_write *w, size_t n, uint64_t deadline_ns, int helper_may_write, char *err);
int hp_write_checked(struct hp_write *w, size_t n, char *err);
int hp_stop_stack_round(struct hp_write *w, size_t n, const struct hp_store *stores, size_t nstores,
                        const struct hp_code_range *ranges, size_t nranges, int force,
                        uint64_t deadline_ns, struct hp_stack_hit *hit, char *err);
void hp_stop_stats(uint64_t *stops, uint64_t *retries, uint64_t *stop_ns, uint64_t *hold_ns,
                   uint64_t *hold_max_ns, uint64_t *unstopped, uint64_t *alone);
void hp_stop_after_fork(void);
void hp_stopper_info(int *uses_ptrace, int *helper_pid, int *park_signal, char *reason);

/* --- ahead.c -------------------------------------------------------- */
void hp_first_write_ahead(void);
int hp_ahead_registration(void);
void hp_ahead_after_fork(void);

/* --- stop_ptrace.c -------------------------------------------------- */
int hp_ptrace_stop(uint64_t deadline_ns, char *err);
void hp_ptrace_release(void);
int hp_ptrace_write(const struct hp_check *c, uint64_t deadline_ns, char *err);
int hp_ptrace_helper_pid(void);
void hp_ptrace_after_fork(void);
void hp_ptrace_start_ahead(void);

/* --- stop_signal.c -------------------------------------------------- */
int hp_signal_stop(uint64_t deadline_ns, const char *why_not_ptrace, char *err);
void hp_signal_release(void);
int hp_park_signal(void);
int hp_unblock_park_signal(void);

/* --- loader.c ------------------------------------------------------- */
struct hp_loader_event {
    int kind;               /* 1 COMING, 2 GOING */
    int reserved;
    uint64_t seq;           /* from 1, in the order the dynamic linker did them */
    uintptr_t base;         /* l_addr */
    uintptr_t map;          /* the struct link_map (an identity only, never read) */
    char name[HP_NAME_MAX]; /* l_name, copied under the dynamic linker's lock */
};
uintptr_t hp_loader_brk_site(void);
uintptr_t hp_loader_entry(int which);
void hp_loader_set_original(int which, uintptr_t original);
int hp_loader_set_wanted(const char *names, size_t len);
void hp_loader_start(void (*callback)(void), int wait);
void hp_loader_stop(void);
int hp_loader_wait(int timeout_ms);
int hp_loader_take(struct hp_loader_event *out);
void hp_loader_done(uint64_t seq);
int hp_loader_take_resync(void);
int hp_loader_went_on(uint64_t seq);
void hp_loader_worker_aside(int aside);
extern int hp_loader_busy;
int hp_loader_write_unreachable(const struct hp_write *w, size_t n, uint64_t seq, char *err);
void hp_loader_stats(uint64_t *calls, uint64_t *events, uint64_t *abandoned, uint64_t *held_given_up,
                     uint64_t *dropped);
void hp_loader_brk(void);

/* Copy whole words without libc: a struct copy may become a call to
 * memcpy, which a patch may have replaced (the stop path, the helper). */
/* Byte copy without libc (HP_RAW keeps it from becoming a memcpy call). */
HP_RAW static inline void hp_copy_bytes(uint8_t *to, const uint8_t *from, size_t n)
{
    for (size_t i = 0; i < n; i++)
        to[i] = from[i];
}

HP_RAW static inline void hp_copy_words(void *to, const void *from, size_t bytes)
{
    volatile uint64_t *t = to;
    const volatile uint64_t *f = from;
    for (size_t i = 0; i < bytes / 8; i++)
        t[i] = f[i];
}

/* Small formatting without libc, for the stop path and the helper. */
HP_RAW static inline char *hp_fmt_str(char *at, char *end, const char *s)
{
    while (*s && at < end - 1)
        *at++ = *s++;
    *at = 0;
    return at;
}

HP_RAW static inline char *hp_fmt_num(char *at, char *end, long value)
{
    char digits[24];
    int n = 0;
    unsigned long v = value < 0 ? -(unsigned long)value : (unsigned long)value;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    if (value < 0 && at < end - 1)
        *at++ = '-';
    while (n && at < end - 1)
        *at++ = digits[--n];
    *at = 0;
    return at;
}

HP_RAW static inline char *hp_fmt_hex(char *at, char *end, unsigned long value)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value & 15];
        value >>= 4;
    } while (value);
    at = hp_fmt_str(at, end, "0x");
    while (n && at < end - 1)
        *at++ = digits[--n];
    *at = 0;
    return at;
}

#endif
