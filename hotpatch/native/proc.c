/*
 * What /proc says of a thread, read with raw system calls (the stop path and
 * the ptrace helper use it; no libc).
 */
#include "hotpatch_core.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>

HP_RAW static int hp_is_digit(char c) { return c >= '0' && c <= '9'; }

HP_RAW uintptr_t hp_parse_hex(const char **p)
{
    uintptr_t v = 0;
    for (;; (*p)++) {
        char c = **p;
        int d = hp_is_digit(c) ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0)
            return v;
        v = v * 16 + (uintptr_t)d;
    }
}


HP_RAW static uint64_t hex_field(const char *p)
{
    while (*p == '\t' || *p == ' ')
        p++;
    return hp_parse_hex(&p);
}

/* /proc/PID/task/TID/`file` read into `text` (NUL-terminated, at most
 * `size` - 1 bytes): how many bytes, 0 when it cannot be read (the thread
 * is gone). */
HP_RAW static long read_task_file(int pid, int tid, const char *file, char *text, size_t size)
{
    char path[64];
    char *at = hp_fmt_str(path, path + sizeof path, "/proc/");
    at = hp_fmt_num(at, path + sizeof path, pid);
    at = hp_fmt_str(at, path + sizeof path, "/task/");
    at = hp_fmt_num(at, path + sizeof path, tid);
    at = hp_fmt_str(at, path + sizeof path, "/");
    hp_fmt_str(at, path + sizeof path, file);
    int fd = (int)hp_sys(SYS_open, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    long got = hp_sys(SYS_read, fd, text, size - 1);
    hp_sys(SYS_close, fd);
    if (got <= 0)
        return 0;
    text[got] = 0;
    return got;
}

/* What /proc/PID/task/TID/status says of a thread; state 0 when it is gone. */
HP_RAW void hp_read_thread_status(int pid, int tid, struct hp_thread_status *st)
{
    char text[2048];
    st->state = 0;
    st->tracer = 0;
    st->pending = st->blocked = 0;
    st->name[0] = 0;
    if (!read_task_file(pid, tid, "status", text, sizeof text))
        return;
    for (char *line = text; *line;) {
        if (line[0] == 'N' && line[1] == 'a' && line[4] == ':') {           /* Name: */
            int k = 0;
            for (char *c = line + 6; *c && *c != '\n' && k < 31; c++)
                st->name[k++] = *c;
            st->name[k] = 0;
        } else if (line[0] == 'S' && line[1] == 't' && line[5] == ':') {    /* State: */
            st->state = line[7];
        } else if (line[0] == 'T' && line[1] == 'r' && line[8] == ':') {    /* TracerPid: */
            for (char *c = line + 10; hp_is_digit(*c); c++)
                st->tracer = st->tracer * 10 + (*c - '0');
        } else if (line[0] == 'S' && line[3] == 'P' && line[6] == ':') {
            st->pending |= hex_field(line + 7);                              /* SigPnd, ShdPnd */
        } else if (line[0] == 'S' && line[3] == 'B' && line[6] == ':') {    /* SigBlk: */
            st->blocked = hex_field(line + 7);
        }
        while (*line && *line != '\n')
            line++;
        if (*line)
            line++;
    }
}

/* Whether thread `tid` of this process is blocked in futex() on a word in
 * [lo, hi): its /proc/PID/task/TID/syscall reads "202 0xUADDR ..." then
 * ("running", or another number, otherwise). */
HP_RAW int hp_thread_waits_on(int tid, uintptr_t lo, uintptr_t hi)
{
    char text[160];
    if (!read_task_file(hp_getpid(), tid, "syscall", text, sizeof text))
        return 0;
    long nr = 0;
    const char *c = text;
    for (; hp_is_digit(*c); c++)
        nr = nr * 10 + (*c - '0');
    if (c == text || nr != SYS_futex || c[0] != ' ' || c[1] != '0' || c[2] != 'x')
        return 0;
    c += 3;
    uintptr_t word = hp_parse_hex(&c);
    return word >= lo && word < hi;
}

/* Thread ids of this process (at most `max` of them), read with raw
 * getdents64.  How many were read. */
HP_RAW int hp_list_threads(int *tids, int max)
{
    int fd = (int)hp_sys(SYS_open, "/proc/self/task", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    int n = 0;
    char buf[4096];
    long got;
    while ((got = hp_sys(SYS_getdents64, fd, buf, sizeof buf)) > 0) {
        for (long off = 0; off < got;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            int tid = 0;
            for (const char *c = d->d_name; *c >= '0' && *c <= '9'; c++)
                tid = tid * 10 + (*c - '0');
            if (tid > 0 && n < max)
                tids[n++] = tid;
        }
    }
    hp_sys(SYS_close, fd);
    return n;
}

static struct hp_kept_fd task_dir = HP_KEPT_FD_NONE;   /* /proc/self/task */

/* Is the calling thread the process's only one?  Then nothing else can run
 * the bytes while they are written: no thread to stop.  No other can start
 * meanwhile either, since only a thread of the process creates one and this
 * one is here, signals blocked.  (The ptrace helper shares the memory but
 * runs only the core's own code.)  0 where the task list cannot be read.
 * hp_lock held: it guards the kept descriptor. */
HP_RAW int hp_only_thread(void)
{
    /* The task directory's link count is 2 + the process's threads (the
     * kernel's proc_task_getattr): one fstat of a kept descriptor, where a
     * listing costs an open, two getdents and a close (6 us here). */
    struct stat st;
    if (hp_kept_fd_stat(&task_dir, "/proc/self/task", O_RDONLY | O_DIRECTORY, &st) >= 0 &&
            st.st_nlink >= 3)
        return st.st_nlink == 3;
    int tids[2];
    return hp_list_threads(tids, 2) == 1;
}

/* A forked child's threads are not the parent's: its own task directory. */
void hp_proc_after_fork(void)
{
    hp_kept_fd_forget(&task_dir);
}

/* Remember that `fd` is ours (0), or -1 where it cannot be looked at;
 * `st`: its status. */
HP_RAW static int keep_fd(struct hp_kept_fd *k, int fd, struct stat *st)
{
    if (hp_sys(SYS_fstat, fd, st) != 0)
        return -1;
    *k = (struct hp_kept_fd){ fd, (uint64_t)st->st_dev, (uint64_t)st->st_ino };
    return 0;
}

HP_RAW int hp_kept_fd_keep(struct hp_kept_fd *k, int fd)
{
    struct stat st;
    return keep_fd(k, fd, &st);
}

/* Is `k`'s descriptor still the file it was kept on (`st`: its status)?
 * If not (closed by the service, its number maybe reused), it is
 * forgotten: 0. */
HP_RAW static int valid_fd(struct hp_kept_fd *k, struct stat *st)
{
    if (k->fd >= 0 && (hp_sys(SYS_fstat, k->fd, st) != 0 || (uint64_t)st->st_dev != k->dev ||
                       (uint64_t)st->st_ino != k->ino))
        k->fd = -1;
    return k->fd >= 0;
}

HP_RAW int hp_kept_fd_valid(struct hp_kept_fd *k)
{
    struct stat st;
    return valid_fd(k, &st);
}

/* hp_kept_fd_open(), with the status of the file the descriptor names
 * (the fstat that checks it, no second one). */
HP_RAW int hp_kept_fd_stat(struct hp_kept_fd *k, const char *path, int flags, struct stat *st)
{
    if (!valid_fd(k, st)) {
        int fd = (int)hp_sys(SYS_openat, AT_FDCWD, path, flags | O_CLOEXEC);
        if (fd < 0)
            return -1;
        if (keep_fd(k, fd, st)) {
            hp_sys(SYS_close, fd);
            return -1;
        }
    }
    return k->fd;
}

/* `k`'s descriptor, still the file it was opened on, else `path` opened
 * now (`flags`); -1 where it cannot be.  Raw system calls: a patch may
 * have replaced libc's open or fstat. */
HP_RAW int hp_kept_fd_open(struct hp_kept_fd *k, const char *path, int flags)
{
    struct stat st;
    return hp_kept_fd_stat(k, path, flags, &st);
}

/* Drop `k` in a forked child: the inherited descriptor names the parent's
 * memory.  Closed: the child's copy is ours. */
HP_RAW void hp_kept_fd_forget(struct hp_kept_fd *k)
{
    if (k->fd >= 0)
        hp_sys(SYS_close, k->fd);
    k->fd = -1;
}
