/*
 * This process's mappings, read from /proc/thread-self/maps with raw system
 * calls into a static table (no malloc, so also while threads are stopped).
 * thread-self, not self: once the main thread has exited (pthread_exit),
 * /proc/self/maps reads empty.
 *
 * Used for the pool's free gaps and for the protection an mprotect window
 * gives back.
 */
#include "hotpatch_core.h"

#include <fcntl.h>
#include <sys/mman.h>

struct hp_mapping hp_mappings[HP_MAX_MAPPINGS];
int hp_nmappings;
static char text[1 << 16];

/* Read the table again; 0, or -1 when the file cannot be read. */
HP_RAW int hp_read_mappings(void)
{
    hp_nmappings = 0;
    int fd = (int)hp_sys(SYS_open, "/proc/thread-self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        fd = (int)hp_sys(SYS_open, "/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t kept = 0;
    for (;;) {
        long got = hp_sys(SYS_read, fd, text + kept, sizeof text - 1 - kept);
        if (got <= 0)
            break;
        size_t have = kept + (size_t)got, start = 0;
        for (size_t i = 0; i < have; i++) {
            if (text[i] != '\n')
                continue;
            const char *p = text + start;
            uintptr_t lo = hp_parse_hex(&p);
            p++;
            uintptr_t hi = hp_parse_hex(&p);
            p++;
            if (hp_nmappings < HP_MAX_MAPPINGS) {
                struct hp_mapping *m = &hp_mappings[hp_nmappings++];
                m->lo = lo;
                m->hi = hi;
                m->prot = (p[0] == 'r' ? PROT_READ : 0) | (p[1] == 'w' ? PROT_WRITE : 0) |
                          (p[2] == 'x' ? PROT_EXEC : 0);
            }
            start = i + 1;
        }
        kept = have - start;
        if (kept == sizeof text - 1)
            kept = 0;       /* a line longer than the buffer: its start was used */
        for (size_t i = 0; i < kept; i++)
            text[i] = text[start + i];
    }
    hp_sys(SYS_close, fd);
    return 0;
}

/* The mapping that contains `address`, or NULL (binary search: the kernel
 * lists mappings in address order). */
HP_RAW const struct hp_mapping *hp_mapping_of(uintptr_t address)
{
    int lo = 0, hi = hp_nmappings;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (address < hp_mappings[mid].lo)
            hi = mid;
        else if (address >= hp_mappings[mid].hi)
            lo = mid + 1;
        else
            return &hp_mappings[mid];
    }
    return 0;
}
