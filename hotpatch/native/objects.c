/*
 * Loaded objects, copied under the dynamic linker's lock: once
 * dl_iterate_phdr() returns, a dlclose() in another thread may free the
 * linker's strings.
 */
#include "hotpatch_core.h"

#include <stdio.h>
#include <string.h>

struct loaded_list {
    struct hp_loaded_object *out;
    int capacity;
    int count;
};

/* The PT_LOAD segment holding [address, address + len), or NULL. */
static const ElfW(Phdr) *load_holding(const struct hp_loaded_object *o, uintptr_t address,
                                      size_t len)
{
    for (int i = 0; i < o->phnum; i++) {
        const ElfW(Phdr) *ph = &o->phdr[i];
        uintptr_t lo = o->base + ph->p_vaddr;
        if (ph->p_type == PT_LOAD && lo <= address && address + len <= lo + ph->p_memsz)
            return ph;
    }
    return NULL;
}

/* DT_SONAME of the mapped image (objects.py took it there before: the
 * file may have been replaced since); -1 where there is none.  glibc
 * relocates d_ptr in place where PT_DYNAMIC is writable, not in a
 * read-only one: both forms are accepted. */
static int mapped_soname(const struct hp_loaded_object *o, char *out, size_t cap)
{
    const ElfW(Phdr) *dynamic = NULL, *load;
    for (int i = 0; i < o->phnum && !dynamic; i++)
        if (o->phdr[i].p_type == PT_DYNAMIC)
            dynamic = &o->phdr[i];
    if (!dynamic || !load_holding(o, o->base + dynamic->p_vaddr, dynamic->p_memsz))
        return -1;
    uintptr_t strtab = 0, soname = 0;
    int have_strtab = 0, have_soname = 0;
    size_t n = (dynamic->p_memsz & ~(size_t)15) / sizeof(ElfW(Dyn)), done = 0;
    ElfW(Dyn) chunk[64];        /* one read a chunk: most tables fit in one */
    while (done < n) {
        size_t take = n - done < 64 ? n - done : 64, i;
        if (hp_read_memory(o->base + dynamic->p_vaddr + done * sizeof *chunk, chunk,
                           take * sizeof *chunk) != (long)(take * sizeof *chunk))
            return -1;
        for (i = 0; i < take && chunk[i].d_tag != DT_NULL; i++) {
            if (chunk[i].d_tag == DT_STRTAB)
                strtab = chunk[i].d_un.d_ptr, have_strtab = 1;
            else if (chunk[i].d_tag == DT_SONAME)
                soname = chunk[i].d_un.d_val, have_soname = 1;
        }
        if (i < take)
            break;              /* DT_NULL */
        done += take;
    }
    if (!have_strtab || !have_soname)
        return -1;
    if (!load_holding(o, strtab, 1))
        strtab += o->base;
    if (!(load = load_holding(o, strtab + soname, 1)))
        return -1;
    size_t room = o->base + load->p_vaddr + load->p_memsz - (strtab + soname);
    size_t want = room < cap ? room : cap;
    if (hp_read_memory(strtab + soname, out, want) != (long)want)
        return -1;
    size_t len = strnlen(out, want);
    return (int)len;
}

/* NT_GNU_BUILD_ID of the first PT_NOTE holding one: its length, -1 where
 * there is none, -2 where Python must read it (a note segment larger than
 * the buffer, an id longer than `cap` or cut by its segment's end). */
static int mapped_build_id(const struct hp_loaded_object *o, uint8_t *out, size_t cap)
{
    uint8_t notes[4096];
    for (int i = 0; i < o->phnum; i++) {
        const ElfW(Phdr) *ph = &o->phdr[i];
        uintptr_t at = o->base + ph->p_vaddr;
        size_t len = ph->p_memsz, align = ph->p_align == 8 ? 8 : 4, pos = 0;
        if (ph->p_type != PT_NOTE || !load_holding(o, at, len))
            continue;
        if (len > sizeof notes)
            return -2;
        if (hp_read_memory(at, notes, len) != (long)len)
            return -1;
        while (pos + 12 <= len) {
            uint32_t hdr[3];
            memcpy(hdr, notes + pos, sizeof hdr);
            size_t name_at = pos + 12, desc_at = name_at + ((hdr[0] + align - 1) & -align);
            if (hdr[2] == NT_GNU_BUILD_ID && hdr[0] == 4 && name_at + 4 <= len
                    && !memcmp(notes + name_at, "GNU", 4)) {
                if (hdr[1] > cap || desc_at + hdr[1] > len)
                    return -2;
                memcpy(out, notes + desc_at, hdr[1]);
                return (int)hdr[1];
            }
            pos = desc_at + ((hdr[1] + align - 1) & -align);
        }
    }
    return -1;
}

static int collect_loaded(struct dl_phdr_info *info, size_t size, void *data)
{
    struct loaded_list *list = data;
    (void)size;
    if (list->count < list->capacity) {
        struct hp_loaded_object *o = &list->out[list->count];
        snprintf(o->name, sizeof o->name, "%s", info->dlpi_name ? info->dlpi_name : "");
        o->base = info->dlpi_addr;
        o->phdr_address = (uintptr_t)info->dlpi_phdr;
        o->phnum = info->dlpi_phnum < HP_MAX_PHDRS ? info->dlpi_phnum : HP_MAX_PHDRS;
        memcpy(o->phdr, info->dlpi_phdr, (size_t)o->phnum * sizeof o->phdr[0]);
        o->soname_len = mapped_soname(o, o->soname, sizeof o->soname);
        o->build_id_len = mapped_build_id(o, o->build_id, sizeof o->build_id);
    }
    list->count++;
    return 0;
}

/* Fill `out` with up to `capacity` loaded objects; return how many there are. */
int hp_loaded_objects(struct hp_loaded_object *out, int capacity)
{
    struct loaded_list list = { out, capacity, 0 };
    dl_iterate_phdr(collect_loaded, &list);
    return list.count;
}

static int read_generation(struct dl_phdr_info *info, size_t size, void *data)
{
    unsigned long long *counts = data;
    if (size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs) {
        counts[0] = info->dlpi_adds;
        counts[1] = info->dlpi_subs;
    }
    return 1;   /* the counts are the same in every entry: one is enough */
}

/* How many objects the dynamic linker has loaded and unloaded so far, as
 * one count: both only grow, so the list of loaded objects changed exactly
 * when their sum did. */
unsigned long long hp_loaded_generation(void)
{
    unsigned long long counts[2] = { 0, 0 };
    dl_iterate_phdr(read_generation, counts);
    return counts[0] + counts[1];
}

/* Copy `len` bytes of this process's memory at `address` into `out` without
 * faulting where it is no longer mapped (an object unloaded meanwhile by
 * another thread): the number of bytes copied, or -errno. */
long hp_read_memory(uintptr_t address, void *out, size_t len)
{
    /* By thread id: once the main thread has exited, the process id names
     * a zombie without memory. */
    return hp_read_own(hp_gettid(), out, address, len);
}
