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

/* How many objects the dynamic linker has loaded and unloaded so far: the
 * list of loaded objects changed exactly when these did. */
void hp_loaded_generation(unsigned long long *adds, unsigned long long *subs)
{
    unsigned long long counts[2] = { 0, 0 };
    dl_iterate_phdr(read_generation, counts);
    *adds = counts[0];
    *subs = counts[1];
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
