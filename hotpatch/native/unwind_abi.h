/*
 * The part of libunwind's remote API (x86-64, libunwind 1.6: the
 * libunwind-x86_64.so.8 that Debian's libunwind8 installs) that unwind.c
 * calls, declared here because the machines we run on have the library but
 * not its development headers.  Written from the documented ABI and checked
 * against the library's code (field offsets read where it uses them):
 * nothing here is taken from libunwind's headers.  The library is opened
 * with dlopen on first need, so none of these symbols is linked.
 */
#ifndef HOTPATCH_UNWIND_ABI_H
#define HOTPATCH_UNWIND_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef uint64_t hp_unw_word;
typedef struct hp_unw_addr_space *hp_unw_as;   /* opaque */

/* A cursor is the caller's memory (127 words on x86-64); a larger one is
 * harmless. */
typedef struct { hp_unw_word opaque[160]; } hp_unw_cursor;

/* Register numbers of the x86-64 target: DWARF's order. */
enum {
    HP_UNW_RAX, HP_UNW_RDX, HP_UNW_RCX, HP_UNW_RBX, HP_UNW_RSI, HP_UNW_RDI, HP_UNW_RBP,
    HP_UNW_RSP, HP_UNW_R8, HP_UNW_R9, HP_UNW_R10, HP_UNW_R11, HP_UNW_R12, HP_UNW_R13,
    HP_UNW_R14, HP_UNW_R15, HP_UNW_RIP,
};

/* Error numbers (returned negated). */
#define HP_UNW_EBADREG 3
#define HP_UNW_EREADONLYREG 4
#define HP_UNW_EINVAL 8
#define HP_UNW_ENOINFO 10

#define HP_UNW_CACHE_NONE 0
#define HP_UNW_INFO_FORMAT_REMOTE_TABLE 2

/* The callbacks through which a remote unwind reads its target: eight
 * pointers, copied into the address space at its creation. */
struct hp_unw_accessors {
    int (*find_proc_info)(hp_unw_as, hp_unw_word ip, void *proc_info, int need_unwind_info,
                          void *arg);
    void (*put_unwind_info)(hp_unw_as, void *proc_info, void *arg);
    int (*get_dyn_info_list_addr)(hp_unw_as, hp_unw_word *addr, void *arg);
    int (*access_mem)(hp_unw_as, hp_unw_word addr, hp_unw_word *value, int write, void *arg);
    int (*access_reg)(hp_unw_as, int reg, hp_unw_word *value, int write, void *arg);
    int (*access_fpreg)(hp_unw_as, int reg, void *value, int write, void *arg);
    int (*resume)(hp_unw_as, hp_unw_cursor *cursor, void *arg);
    int (*get_proc_name)(hp_unw_as, hp_unw_word addr, char *buf, size_t len,
                         hp_unw_word *offset, void *arg);
};

/* Where the unwind table of one object's code is: its .eh_frame_hdr's
 * binary search table (pairs of 32-bit offsets from the header: function
 * start, FDE), read through access_mem. */
struct hp_unw_dyn_info {
    void *next, *prev;           /* list links, unused here */
    hp_unw_word start_ip, end_ip;
    hp_unw_word gp;
    int32_t format;              /* HP_UNW_INFO_FORMAT_REMOTE_TABLE */
    int32_t pad;
    hp_unw_word load_offset;
    struct {
        hp_unw_word name_ptr;
        hp_unw_word segbase;     /* the .eh_frame_hdr's address */
        hp_unw_word table_len;   /* in words: one per table entry */
        hp_unw_word table_data;  /* the table's address */
    } rti;
    hp_unw_word reserved[4];     /* the rest of the library's union */
};

/* The functions used, by their exported names (nm -D). */
struct hp_unw_api {
    hp_unw_as (*create_addr_space)(struct hp_unw_accessors *, int byte_order);
    int (*set_caching_policy)(hp_unw_as, int policy);
    int (*init_remote)(hp_unw_cursor *, hp_unw_as, void *arg);
    int (*step)(hp_unw_cursor *);
    int (*get_reg)(hp_unw_cursor *, int reg, hp_unw_word *value);
    int (*is_signal_frame)(hp_unw_cursor *);
    int (*search_unwind_table)(hp_unw_as, hp_unw_word ip, struct hp_unw_dyn_info *,
                               void *proc_info, int need_unwind_info, void *arg);
};

#define HP_UNW_SYMBOLS                                                     \
    X(create_addr_space, "_Ux86_64_create_addr_space")                     \
    X(set_caching_policy, "_Ux86_64_set_caching_policy")                   \
    X(init_remote, "_Ux86_64_init_remote")                                 \
    X(step, "_Ux86_64_step")                                               \
    X(get_reg, "_Ux86_64_get_reg")                                         \
    X(is_signal_frame, "_Ux86_64_is_signal_frame")                         \
    X(search_unwind_table, "_Ux86_64_dwarf_search_unwind_table")

#endif
