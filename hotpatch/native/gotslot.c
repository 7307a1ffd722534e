/*
 * Storing into GOT slots: the R_X86_64_JUMP_SLOT entries through which other
 * objects' PLT calls reach a patched function (hotpatch/plt.py decides which
 * slots and what value).
 *
 * A slot is data, not code: a PLT entry loads it with one 8-byte read
 * (`jmp *slot(%rip)`), and an aligned 8-byte store is atomic on x86-64 (SDM
 * vol. 3, 9.1.1), so every call sees the old or the new value, both of them
 * code that runs the function as it is now.  No instruction changes, so
 * there is no stop and no core sync.  The store is a compare-and-swap: a
 * slot that no longer holds what hotpatch expects (the dynamic linker bound
 * it meanwhile, or someone else rewrote it) is left as it is.
 *
 * Not through /proc/self/mem: the kernel copies such a write with its
 * memcpy, which is `rep movsb` on CPUs with FSRM (this machine's), with no
 * promise of one 8-byte store; a PLT call racing it could read a torn
 * address.  A slot of full RELRO (read-only once relocated) gets an mprotect
 * window instead: the page is made writable (never executable: a GOT is not
 * code), the CAS done, and the page given back the protection it had.
 *
 * Every store is done from dl_iterate_phdr's callback for the slot's own
 * object: the dynamic linker holds its list lock there, and dlclose removes
 * an object from that list, under that lock, before unmapping it.  So a slot
 * is only written while its object is certainly still mapped; a slot whose
 * object is not listed any more is reported gone and never touched.
 */
#include "hotpatch_core.h"

#include <errno.h>
#include <sys/mman.h>

struct stores {
    struct hp_got_store *s;
    size_t n;
    int mappings;     /* 1 read, -1 unreadable, 0 not read yet */
};

/* Whether `slot` lies in the part of the object that the dynamic linker
 * makes read-only once relocated (PT_GNU_RELRO, whole pages, as glibc's
 * _dl_protect_relro rounds it).  Only there can a GOT slot be read-only:
 * the dynamic linker writes every other one, and leaves it writable. */
static int in_relro(const struct dl_phdr_info *info, uintptr_t slot)
{
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_GNU_RELRO)
            continue;
        uintptr_t lo = (info->dlpi_addr + ph->p_vaddr) & ~(uintptr_t)4095;
        uintptr_t hi = (info->dlpi_addr + ph->p_vaddr + ph->p_memsz) & ~(uintptr_t)4095;
        if (slot >= lo && slot < hi)
            return 1;
    }
    return 0;
}

static int cas(struct hp_got_store *s)
{
    uint64_t expected = s->expected;
    int stored = __atomic_compare_exchange_n((uint64_t *)s->slot, &expected, s->value, 0,
                                             __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    s->found = expected;
    return stored ? HP_GOT_STORED : HP_GOT_CHANGED;
}

/* A RELRO slot: always through a window, even where the mappings say the
 * page is writable -- the object may be relocated by a dlopen in another
 * thread right now, which write-protects the page when it is done; the
 * window makes the store safe either way.  The page gets back what the
 * mappings said (the dynamic linker's PROT_READ, or still writable while
 * it relocates). */
static int store_relro(struct stores *all, struct hp_got_store *s)
{
    if (!all->mappings)
        all->mappings = hp_read_mappings() == 0 ? 1 : -1;
    const struct hp_mapping *m = all->mappings > 0 ? hp_mapping_of(s->slot) : NULL;
    if (!m)
        return -EFAULT;
    uintptr_t page = s->slot & ~(uintptr_t)4095;
    long rc = hp_sys(SYS_mprotect, page, 4096, (m->prot & ~PROT_EXEC) | PROT_READ | PROT_WRITE);
    if (rc < 0)
        return (int)rc;
    int result = cas(s);
    hp_sys(SYS_mprotect, page, 4096, m->prot);
    return result;
}

static int store_in_object(struct dl_phdr_info *info, size_t size, void *data)
{
    struct stores *all = data;
    (void)size;
    for (size_t i = 0; i < all->n; i++) {
        struct hp_got_store *s = &all->s[i];
        if (s->phdr_address != (uintptr_t)info->dlpi_phdr || s->result != HP_GOT_GONE)
            continue;
        if (s->slot & 7)
            s->result = -EINVAL;
        else
            s->result = in_relro(info, s->slot) ? store_relro(all, s) : cas(s);
    }
    return 0;
}

/* Compare-and-swap each slot from `expected` to `value` (see above); each
 * store's `result` says what happened: HP_GOT_STORED, HP_GOT_CHANGED (`found`
 * holds what is there), HP_GOT_GONE (its object is no longer loaded) or
 * -errno (the window could not be opened).  Returns how many were stored. */
int hp_store_got_slots(struct hp_got_store *s, size_t n)
{
    struct stores all = { s, n, 0 };
    int stored = 0;
    for (size_t i = 0; i < n; i++)
        s[i].result = HP_GOT_GONE;
    if (n == 0)
        return 0;
    pthread_mutex_lock(&hp_lock);  /* no fork copies a page left writable */
    dl_iterate_phdr(store_in_object, &all);
    pthread_mutex_unlock(&hp_lock);
    for (size_t i = 0; i < n; i++)
        stored += s[i].result == HP_GOT_STORED;
    return stored;
}

/* --- finding the slots ------------------------------------------------ */

struct search {
    const uint64_t *values;   /* sorted */
    size_t nvalues;
    uintptr_t only;           /* an object's phdr address, or 0 for every object */
    struct hp_jump_slot *out;
    int capacity, count;
};

static int holds_one_of(const struct search *s, uint64_t value)
{
    size_t lo = 0, hi = s->nvalues;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (s->values[mid] == value)
            return 1;
        if (s->values[mid] < value)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* A d_ptr of the mapped dynamic section: glibc makes it absolute in place
 * where the section is writable, not where it is read-only. */
static uintptr_t absolute(const struct dl_phdr_info *info, uintptr_t value)
{
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t lo = info->dlpi_addr + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && value >= lo && value < lo + ph->p_memsz)
            return value;
    }
    return value + info->dlpi_addr;
}

static void copy_name(char *out, size_t size, const char *name)
{
    size_t i = 0;
    for (; name && name[i] && i + 1 < size; i++)
        out[i] = name[i];
    out[i] = 0;
}

static int search_object(struct dl_phdr_info *info, size_t size, void *data)
{
    struct search *s = data;
    (void)size;
    if (s->only && s->only != (uintptr_t)info->dlpi_phdr)
        return 0;
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
    if (!dyn)
        return 0;
    uintptr_t jmprel = 0, symtab = 0, strtab = 0;
    size_t relsz = 0;
    long pltrel = DT_RELA;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_JMPREL: jmprel = absolute(info, dyn->d_un.d_ptr); break;
        case DT_PLTRELSZ: relsz = dyn->d_un.d_val; break;
        case DT_PLTREL: pltrel = (long)dyn->d_un.d_val; break;
        case DT_SYMTAB: symtab = absolute(info, dyn->d_un.d_ptr); break;
        case DT_STRTAB: strtab = absolute(info, dyn->d_un.d_ptr); break;
        }
    }
    if (!jmprel || pltrel != DT_RELA)
        return 0;
    const ElfW(Rela) *rela = (const ElfW(Rela) *)jmprel;
    for (size_t i = 0; i < relsz / sizeof *rela; i++) {
        if (ELF64_R_TYPE(rela[i].r_info) != R_X86_64_JUMP_SLOT)
            continue;
        uintptr_t slot = info->dlpi_addr + rela[i].r_offset;
        uint64_t value = __atomic_load_n((const uint64_t *)slot, __ATOMIC_RELAXED);
        if (!holds_one_of(s, value))
            continue;
        if (s->count < s->capacity) {
            struct hp_jump_slot *o = &s->out[s->count];
            o->slot = slot;
            o->phdr_address = (uintptr_t)info->dlpi_phdr;
            o->base = info->dlpi_addr;
            o->value = value;
            const ElfW(Sym) *sym = symtab ? (const ElfW(Sym) *)symtab + ELF64_R_SYM(rela[i].r_info) : NULL;
            copy_name(o->name, sizeof o->name, sym && strtab ? (const char *)strtab + sym->st_name : NULL);
        }
        s->count++;
    }
    return 0;
}

/* Every R_X86_64_JUMP_SLOT slot, of every loaded object or only of the one
 * whose program headers are at `only`, that holds one of `values` (sorted):
 * up to `capacity` of them in `out`; returns how many there are.  Read
 * under the dynamic linker's list lock, from the mapped image (the
 * relocations ld.so applied), with no system call: one pass over each
 * object's .rela.plt, a few microseconds for a whole process. */
int hp_find_jump_slots(const uint64_t *values, size_t nvalues, uintptr_t only,
                       struct hp_jump_slot *out, int capacity)
{
    struct search s = { values, nvalues, only, out, capacity, 0 };
    if (nvalues)
        dl_iterate_phdr(search_object, &s);
    return s.count;
}
