"""cffi builder of ``hotpatch._native``: the C core in ``native/``.

The declarations below are the whole boundary between Python policy and the
native code; each function is documented where it is defined in C (see
``native/hotpatch_core.h`` for which file holds what).
"""
import os

from cffi import FFI

CDEF = """
typedef struct {
    uint32_t p_type;
    uint32_t p_flags;
    uint64_t p_offset;
    uint64_t p_vaddr;
    uint64_t p_paddr;
    uint64_t p_filesz;
    uint64_t p_memsz;
    uint64_t p_align;
} Elf64_Phdr;

struct hp_loaded_object {
    char name[...];
    uintptr_t base;
    uintptr_t phdr_address;
    int phnum;
    Elf64_Phdr phdr[...];
    int soname_len;
    char soname[...];
    int build_id_len;
    uint8_t build_id[...];
};
int hp_loaded_objects(struct hp_loaded_object *out, int capacity);
unsigned long long hp_loaded_generation(void);
long hp_read_memory(uintptr_t address, void *out, size_t len);

int hp_write_code(uintptr_t addr, const void *src, size_t len);
void hp_store_slot(uint64_t *slot, uint64_t value);
uintptr_t hp_alloc_code(uintptr_t near, size_t size);
uint64_t *hp_alloc_slot(uintptr_t near);
const char *hp_pool_backing(void);

typedef void (*hp_observer_fn)(void *data, uintptr_t address, uint64_t *regs);
struct hp_call_site;
struct hp_call_site *hp_call_site(uintptr_t address);
void hp_call_site_set_target(struct hp_call_site *s, uintptr_t target);
int hp_call_site_observe(struct hp_call_site *s, hp_observer_fn fn, void *data);
void hp_call_site_unobserve(struct hp_call_site *s, int slot);
uintptr_t hp_caller_near(uintptr_t near);
uintptr_t hp_call_dispatch(uintptr_t return_address, uint64_t *regs);

struct hp_write {
    uintptr_t address;
    uint8_t old[16];
    uint8_t bytes[16];
    uint32_t len;
};
int hp_write_batch(struct hp_write *w, size_t n, int timeout_ms, char *err);
int hp_write_dead_then_batch(struct hp_write *dead, size_t ndead, struct hp_write *w, size_t n,
                             int others, int timeout_ms, char *err);
int hp_write_needs_stop(uintptr_t address, uint32_t len);
#define HP_GOT_STORED ...
#define HP_GOT_CHANGED ...
#define HP_GOT_GONE ...
struct hp_got_store {
    uintptr_t slot;
    uintptr_t phdr_address;
    uint64_t expected, value;
    uint64_t found;
    int result;
};
int hp_store_got_slots(struct hp_got_store *s, size_t n);
struct hp_jump_slot {
    uintptr_t slot;
    uintptr_t phdr_address;
    uintptr_t base;
    uint64_t value;
    char name[64];
};
int hp_find_jump_slots(const uint64_t *values, size_t nvalues, uintptr_t only,
                       struct hp_jump_slot *out, int capacity);
struct hp_store {
    uint64_t *slot;
    uint64_t value;
};
struct hp_code_range {
    uintptr_t lo, hi;
};
struct hp_stack_hit {
    int32_t tid;
    int32_t frame;
    uint64_t pc;
    int32_t range;
    int32_t unreliable;
    int32_t inside;
    int32_t reserved;
};
int hp_write_batch_stack(struct hp_write *w, size_t n, const struct hp_store *stores, size_t nstores,
                         const struct hp_code_range *ranges, size_t nranges, int force,
                         int timeout_ms, struct hp_stack_hit *hit, char *err);
unsigned long hp_unwind_put_calls(void);
void hp_unwind_add_thunk(uintptr_t return_point, unsigned pushed);
uint64_t *hp_call_site_target_slot(struct hp_call_site *s);
void hp_stop_stats(uint64_t *stops, uint64_t *retries, uint64_t *stop_ns, uint64_t *hold_ns,
                   uint64_t *hold_max_ns, uint64_t *unstopped, uint64_t *alone);
void hp_stopper_info(int *uses_ptrace, int *helper_pid, int *park_signal, char *reason);
void hp_ptrace_start_ahead(void);
void hp_first_write_ahead(void);
int hp_code_writes_use_proc_mem(void);
int hp_core_sync_ready(void);
int hp_set_crash_report(const char *text);

struct hp_loader_event {
    int kind;
    int reserved;
    uint64_t seq;
    uintptr_t base;
    uintptr_t map;
    char name[...];
};
int hp_unblock_park_signal(void);
/* The loader hook's call into Python (loader.py), compiled into the module:
 * a cffi callback made at run time needs writable and executable memory,
 * which a PR_SET_MDWE process refuses. */
extern "Python" void hp_loader_py_callback(void);
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
int hp_loader_busy;
int hp_loader_write_unreachable(const struct hp_write *w, size_t n, uint64_t seq, char *err);
void hp_loader_stats(uint64_t *calls, uint64_t *events, uint64_t *abandoned, uint64_t *held_given_up,
                     uint64_t *dropped);
typedef int (*hp_shadow_ctor_t)(void *obj, void *shadow_data, void *ctor_data);
typedef void (*hp_shadow_dtor_with_t)(void *obj, void *shadow_data, void *dtor_data);
void *hp_shadow_get(void *obj, unsigned long id);
void *hp_shadow_alloc(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                      void *ctor_data);
void *hp_shadow_get_or_alloc(void *obj, unsigned long id, size_t size, hp_shadow_ctor_t ctor,
                             void *ctor_data);
int hp_shadow_free_each(void *obj, unsigned long id, int all, hp_shadow_dtor_with_t dtor,
                        void *dtor_data);
unsigned long hp_shadow_live(void);
unsigned long hp_shadow_bucket(void *obj, unsigned long id);
uintptr_t hp_api_table(void);

struct hp_branch_index;
int hp_capstone_load(const char *path, char *err);
int hp_capstone_usable(void);
struct hp_branch_index *hp_branch_index_build(const uintptr_t *ranges, int n,
                                              const uintptr_t *starts, size_t nstarts,
                                              char *err);
long hp_branch_index_into(struct hp_branch_index *ix, uintptr_t lo, uintptr_t hi,
                          uint64_t *sources, uint64_t *targets, long capacity);
void hp_branch_index_free(struct hp_branch_index *ix);
long hp_branch_candidates_into(const uintptr_t *ranges, int n, const uintptr_t *into, int k);
long hp_function_branches(const uint8_t *code, size_t len, uint64_t address, uint64_t stop,
                          uint64_t *decoded_end, uint64_t *sources, uint64_t *targets,
                          long capacity);
#define HP_SCAN_AHEAD 24
#define HP_SCAN_HEAD 8
#define HP_SCAN_BRANCHES 16
#define HP_SCAN_UNMAPPED -1
struct hp_scanned_insn {
    uint64_t address;
    uint32_t size;
    char mnemonic[32];
    char op_str[160];
};
struct hp_scanned_branch {
    uint64_t source, target;
};
struct hp_entry_scan {
    uint64_t entry, stop;
    uint64_t offset, len;
    int32_t status;
    int32_t nhead, nbranches;
    uint64_t address;
    uint64_t decoded_end;
    struct hp_scanned_insn head[8];
    struct hp_scanned_branch branches[16];
};
long hp_scan_entries(struct hp_entry_scan *scans, long n, uint8_t *buf, int read);
#define HP_DECODE_TEXT ...
#define HP_DECODE_OPERANDS ...
#define HP_DECODE_DETAILS ...
#define HP_DECODE_WRITES ...
#define HP_BRANCH_NONE ...
#define HP_BRANCH_RET ...
#define HP_BRANCH_JMP ...
#define HP_BRANCH_JCC ...
#define HP_BRANCH_CALL ...
#define HP_BRANCH_LOOP ...
#define HP_BRANCH_XBEGIN ...
#define HP_BRANCH_JMP_INDIRECT ...
#define HP_BRANCH_CALL_INDIRECT ...
#define HP_RIP_NONE ...
#define HP_RIP_FOUND ...
#define HP_RIP_MISPLACED ...
struct hp_decoded_insn {
    uint64_t address;
    uint64_t target;
    uint64_t rip_target;
    int64_t imm;
    uint16_t size;
    uint8_t branch;
    uint8_t rip;
    uint8_t rip_disp_offset;
    uint8_t has_imm;
    uint8_t nwritten;
    char mnemonic[32];
    char op_str[160];
    uint16_t written[...];
};
long hp_decode(const uint8_t *code, size_t len, uint64_t address, int mode,
               struct hp_decoded_insn *out, long capacity);
const char *hp_register_name(unsigned reg);
#define HP_PLAN_OK ...
#define HP_PLAN_PYTHON ...
#define HP_PLAN_UNWRITTEN ...
struct hp_plan {
    uint64_t entry, size;
    uint64_t stub;
    uint64_t address;
    int32_t status;
    uint32_t length;
    uint32_t stub_size;
    uint32_t code_len;
    uint8_t endbr, single_instruction, falls_through, ninsns;
    uint8_t original[24];
    uint8_t code[128];
};
struct hp_code_block {
    uint64_t address, size;
};
long hp_plan_entries(struct hp_plan *plans, long n, const uint64_t *ranges, long nranges,
                     int place, struct hp_code_block *free_blocks, size_t nfree);
long hp_plan_branched_into(struct hp_plan *plans, long n, struct hp_branch_index *ix);
struct hp_entry_change {
    uint64_t address;
    uint8_t old_op;
    uint64_t old_to;
    uint8_t new_op;
    uint64_t new_to;
    uint32_t length;
    uint8_t original[24];
    uint64_t hop;
    uint64_t hop_to;
    uint8_t old_hop, new_hop;
};
long hp_entry_writes(const struct hp_entry_change *changes, long n, struct hp_write *w,
                     uint8_t *rewritten);
struct hp_function_starts {
    uint64_t base;
    const uint64_t *starts;
    uint64_t nstarts;
    const uint64_t *sized_from, *sized_to;
    uint64_t nsized;
};
uint64_t hp_function_before(const struct hp_function_starts *f, uint64_t address);
struct hp_first {
    struct hp_plan plan;
    uint64_t target;
    uint64_t before;
    const struct hp_function_starts *starts;
    uint64_t hop;
    uint8_t hop_padding[5];
    uint8_t stops_plainly;
    uint8_t hop_known;
    int8_t written;
};
long hp_redirect_first(struct hp_first *f, const uint64_t *ranges, long nranges,
                       struct hp_code_block *free_blocks, size_t nfree, int timeout_ms,
                       char *err);
int hp_near_file(uint64_t entry, uint64_t lo, uint64_t hi);
int hp_near_file_plans(const struct hp_plan *plans, long n);
void hp_near_unfile(uint64_t entry);
int hp_near_point(uint64_t entry, uint64_t hop);
long hp_near_points(void);
long hp_near_entries(uint64_t lo, uint64_t hi, uint64_t *out, long cap);
int hp_near_point_over(uint64_t lo, uint64_t hi);
long hp_near_taken(uint64_t lo, uint64_t hi, uint64_t self, uint64_t *pairs, long cap);
#define HP_HOP_ASK_BEFORE ...
struct hp_hop_query {
    uint64_t entry, address, length, before;
    const struct hp_function_starts *starts;
    uint64_t hop;
    uint8_t stops_plainly;
    uint8_t padding[5];
    uint8_t unused[2];
};
void hp_hops_find(struct hp_hop_query *q, size_t n);
int hp_stop_forced(void);
int hp_alone(void);
void hp_sync_cores(void);
extern "Python" int _hotpatch_shadow_ctor(void *, void *, void *);
extern "Python" void _hotpatch_shadow_dtor(void *, void *, void *);

void *hp_dlopen(const char *path, int flags, char *err);
uintptr_t hp_dlsym(void *handle, const char *name);
#define RTLD_NOW ...
#define RTLD_NODELETE ...
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
"""

_here = os.path.dirname(os.path.abspath(__file__))


def _patch_module_declarations() -> str:
    """The structures of a C patch module, from hotpatch.h's
    hp-declarations section (their one definition): compiled into
    ``_native`` so that ``hotpatch.load()`` reads a module through it,
    without parsing declarations at run time (pycparser, with the GIL held)."""
    with open(os.path.join(_here, "include", "hotpatch.h")) as header:
        text = header.read()
    begin = text.index("*/", text.index("hp-declarations-begin")) + 2
    return text[begin:text.index("/* hp-declarations-end */")]


CDEF += _patch_module_declarations()

_native = os.path.join(_here, "native")
SOURCES = ["objects.c", "maps.c", "proc.c", "pool.c", "codewrite.c", "unstopped.c", "ahead.c", "gotslot.c", "stop.c", "check.c", "unwind.c",
           "stop_ptrace.c", "stop_signal.c", "caller.c", "crash.c", "shadow.c", "loader.c", "xrefs.c",
           "decode.c", "plan.c", "hop.c", "first.c", "nearby.c", "modload.c"]


def _capstone_include() -> str:
    """capstone.h from the capstone wheel (a build requirement): xrefs.c and
    decode.c call the C library that wheel ships, loaded at run time by path."""
    import capstone
    return os.path.join(os.path.dirname(capstone.__file__), "include")


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "hotpatch._native",
    '#include <dlfcn.h>\n#include "hotpatch_core.h"\n',
    # Relative to the project root, where setuptools builds.
    sources=[os.path.relpath(os.path.join(_native, name)) for name in SOURCES],
    include_dirs=[_native, _capstone_include()],
    # Hidden: nothing but the module's init is exported, and calls between
    # the core's files are direct -- the ptrace helper, which unmaps all but
    # the core's code, never goes through a PLT.
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"],
    libraries=["dl", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(_here, ".."), verbose=True)
