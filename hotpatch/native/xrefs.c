/*
 * xrefs.c -- every direct branch of a loaded object, indexed by target.
 *
 * The policy (which branches make a redirect unsafe) is in Python
 * (x86_64/xrefs.py, x86_64/entry.py); this file only sweeps the object's
 * executable segments once and answers "which branches land in [lo, hi)".
 * It runs the same linear sweep the Python one did, with capstone's C
 * library -- the one the capstone wheel ships and its Python binding has
 * already loaded -- rather than a decoder of our own: libc took a second
 * from Python, tens of milliseconds here.  cffi releases the GIL around
 * every call into this module, so the service's Python threads keep running
 * while an index is built.
 */
#include <capstone/capstone.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hotpatch_core.h"

struct hp_branch {
    uint64_t target;
    uint64_t source;
};

struct hp_branch_index {
    struct hp_branch *branches;  /* sorted by target, then source */
    size_t n;
};

/* The few entry points of libcapstone used here, looked up once. */
static struct {
    cs_err (*open)(cs_arch, cs_mode, csh *);
    cs_err (*close)(csh *);
    cs_insn *(*malloc)(csh);
    bool (*disasm_iter)(csh, const uint8_t **, size_t *, uint64_t *, cs_insn *);
    void (*free)(cs_insn *, size_t);
} cs;
static pthread_mutex_t cs_lock = PTHREAD_MUTEX_INITIALIZER;

/* Load libcapstone from `path` (the file capstone's binding loaded): 0, or
 * -1 with the reason in `err`.  Idempotent. */
int hp_capstone_load(const char *path, char *err)
{
    int rc = 0;
    pthread_mutex_lock(&cs_lock);
    if (!cs.disasm_iter) {
        void *lib = dlopen(path, RTLD_NOW);
        if (!lib) {
            snprintf(err, HP_ERRLEN, "cannot load %s: %s", path, dlerror());
            rc = -1;
        } else {
            cs.open = dlsym(lib, "cs_open");
            cs.close = dlsym(lib, "cs_close");
            cs.malloc = dlsym(lib, "cs_malloc");
            cs.free = dlsym(lib, "cs_free");
            cs.disasm_iter = dlsym(lib, "cs_disasm_iter");
            if (!cs.open || !cs.close || !cs.malloc || !cs.free || !cs.disasm_iter) {
                snprintf(err, HP_ERRLEN, "%s lacks the cs_disasm_iter API", path);
                memset(&cs, 0, sizeof cs);
                rc = -1;
            }
        }
    }
    pthread_mutex_unlock(&cs_lock);
    return rc;
}

/* Without operand details capstone still prints a relative branch's
 * operand as its absolute target ("0x1234"): the kind comes from the last
 * word of the mnemonic ("bnd jmp", "notrack call"), the target from the
 * text, exactly as capstone reports them. */
static const char *const relative_mnemonics[] = {
    "jmp", "call", "jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns",
    "jp", "jnp", "jl", "jge", "jle", "jg", "jrcxz", "jecxz", "loop", "loope",
    "loopne", "xbegin",
};

static int relative_target(const cs_insn *insn, uint64_t *target)
{
    const char *word = strrchr(insn->mnemonic, ' ');
    char *end;
    size_t i;

    word = word ? word + 1 : insn->mnemonic;
    for (i = 0; i < sizeof relative_mnemonics / sizeof *relative_mnemonics; i++)
        if (!strcmp(word, relative_mnemonics[i]))
            break;
    if (i == sizeof relative_mnemonics / sizeof *relative_mnemonics
        || strncmp(insn->op_str, "0x", 2))
        return 0;
    *target = strtoull(insn->op_str, &end, 16);
    return *end == 0;
}

static int push(struct hp_branch_index *ix, size_t *capacity, uint64_t target, uint64_t source)
{
    if (ix->n == *capacity) {
        size_t grown = *capacity ? 2 * *capacity : 4096;
        struct hp_branch *more = realloc(ix->branches, grown * sizeof *more);
        if (!more)
            return -1;
        ix->branches = more;
        *capacity = grown;
    }
    ix->branches[ix->n++] = (struct hp_branch){ target, source };
    return 0;
}

/* Linear sweep of `code` (placed at `address`), resuming one byte after any
 * byte that does not start an instruction: compilers pad between functions
 * with NOPs and int3, which decode, so the sweep stays in step with the real
 * instructions (see x86_64/xrefs.py for what a desynchronised stretch can
 * do). */
static int sweep(csh handle, cs_insn *insn, const uint8_t *code, size_t len, uint64_t address,
                 struct hp_branch_index *ix, size_t *capacity)
{
    while (len) {
        uint64_t at = address, target;
        if (!cs.disasm_iter(handle, &code, &len, &address, insn)) {
            code++, len--, address++;
            continue;
        }
        if (relative_target(insn, &target) && push(ix, capacity, target, at))
            return -1;
    }
    return 0;
}

static int by_target(const void *a, const void *b)
{
    const struct hp_branch *x = a, *y = b;
    if (x->target != y->target)
        return x->target < y->target ? -1 : 1;
    return (x->source > y->source) - (x->source < y->source);
}

void hp_branch_index_free(struct hp_branch_index *ix)
{
    if (ix) {
        free(ix->branches);
        free(ix);
    }
}

/* Sweep the `n` ranges [ranges[2i], ranges[2i+1]) of this process's memory
 * and index their relative branches; NULL with the reason in `err`. */
struct hp_branch_index *hp_branch_index_build(const uintptr_t *ranges, int n, char *err)
{
    struct hp_branch_index *ix = calloc(1, sizeof *ix);
    size_t capacity = 0;
    csh handle;
    cs_insn *insn;
    int failed = 0;

    if (!cs.disasm_iter) {
        snprintf(err, HP_ERRLEN, "capstone is not loaded (hp_capstone_load)");
        free(ix);
        return NULL;
    }
    if (!ix || cs.open(CS_ARCH_X86, CS_MODE_64, &handle) != CS_ERR_OK) {
        snprintf(err, HP_ERRLEN, "cannot open a capstone handle");
        free(ix);
        return NULL;
    }
    insn = cs.malloc(handle);
    for (int i = 0; i < n && !failed; i++) {
        size_t len = ranges[2 * i + 1] - ranges[2 * i];
        uint8_t *code = malloc(len);
        /* Read, never dereferenced in place: another thread may unload
         * the object meanwhile. */
        if (!code || !insn || hp_read_memory(ranges[2 * i], code, len) != (long)len) {
            snprintf(err, HP_ERRLEN, "cannot read the code at %#lx (%zu bytes)%s",
                     (unsigned long)ranges[2 * i], len, code ? ": unmapped meanwhile?" : "");
            failed = 1;
        } else if (sweep(handle, insn, code, len, ranges[2 * i], ix, &capacity)) {
            snprintf(err, HP_ERRLEN, "out of memory indexing branches");
            failed = 1;
        }
        free(code);
    }
    if (insn)
        cs.free(insn, 1);
    cs.close(&handle);
    if (failed) {
        hp_branch_index_free(ix);
        return NULL;
    }
    qsort(ix->branches, ix->n, sizeof *ix->branches, by_target);
    return ix;
}

/* The branches landing in [lo, hi): the first `capacity` go to `sources`
 * and `targets`; returns how many there are. */
long hp_branch_index_into(const struct hp_branch_index *ix, uintptr_t lo, uintptr_t hi,
                          uint64_t *sources, uint64_t *targets, long capacity)
{
    size_t first = 0, last = ix->n;
    long found = 0;

    while (first < last) {  /* the first branch with target >= lo */
        size_t mid = first + (last - first) / 2;
        if (ix->branches[mid].target < lo)
            first = mid + 1;
        else
            last = mid;
    }
    for (size_t i = first; i < ix->n && ix->branches[i].target < hi; i++, found++) {
        if (found < capacity) {
            sources[found] = ix->branches[i].source;
            targets[found] = ix->branches[i].target;
        }
    }
    return found;
}
