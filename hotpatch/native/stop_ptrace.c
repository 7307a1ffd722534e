/*
 * The ptrace stopper: a helper process seizes every thread but the patching
 * one (PTRACE_SEIZE + PTRACE_INTERRUPT), reports where each stopped, and lets
 * them go (PTRACE_DETACH) once the code is written.
 *
 * It needs no cooperation from the threads, whatever their signal masks.  A
 * thread asleep in a system call is taken out of it and, when let go,
 * resumes it: the kernel restarts calls that fail with -ERESTART*, and the
 * helper restarts the few that fail with EINTR when stopped (epoll_wait,
 * semop, sigtimedwait, socket calls with a timeout) by pointing the thread
 * back at its `syscall` instruction -- unless a real signal is pending, whose
 * EINTR the thread must see.
 *
 * The helper is invisible to the service.  It is started on first need by a
 * double clone: an intermediate process with no exit signal (a clone child:
 * waitpid(-1) without __WALL never sees it, and no SIGCHLD is sent) which
 * starts the helper and exits, and is reaped here.  The helper is then
 * nobody's child in the service.  Both share the service's memory
 * (CLONE_VM, as vfork does): nothing is copied, so starting it costs no
 * page-table copy and it holds no copy-on-write share of the service's
 * memory; it runs on a stack of its own and keeps its own thread pointer.
 * It leaves the session, closes every descriptor it inherited but its
 * socket, writes nothing, and blocks every signal.  When the service exits
 * its socket end closes and the helper exits.  Everything the helper runs is
 * in this file and check.c: hidden functions, raw system calls.
  */
#include "hotpatch_core.h"

#include <asm/prctl.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/membarrier.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/user.h>
#include <sys/wait.h>

#ifndef PR_SET_PTRACER
#define PR_SET_PTRACER 0x59616d61
#endif

enum { PENDING, STOPPED, GONE };

/* Shared between the service and its helper (MAP_SHARED). */
struct stop_area {
    int32_t pid;              /* the service */
    int32_t helper_pid;
    int32_t self_tid;         /* the patching thread: not stopped */
    int32_t result;           /* HP_STOP_* */
    uint64_t deadline_ns;
    char message[HP_ERRLEN];
    /* a whole round ('W'): what to write and check, read from the service */
    uintptr_t writes;
    uint64_t nwrites;
    int32_t nrestorers, reserved;
    uintptr_t restorers[HP_MAX_RESTORERS];
    int32_t mem_ok;           /* the helper could open /proc/PID/mem */
    int32_t count;
    uint64_t stops, retries, hold_ns;   /* of the last round */
    struct hp_stopped_thread threads[HP_MAX_THREADS];
};

struct helper_args {
    int sock;
    struct stop_area *area;
    uintptr_t helper_sp;
};

#define HELPER_STACK (128u << 10)

static int helper_sock = -1;
static int helper_pid;
static struct stop_area *area;

/* clone(flags) with the child on `stack` calling fn(arg), then exit_group. */
long hp_clone_run(long flags, uintptr_t stack, void (*fn)(void *), void *arg);
__asm__(
    ".text\n"
    ".globl hp_clone_run\n"
    ".hidden hp_clone_run\n"
    ".type hp_clone_run, @function\n"
    "hp_clone_run:\n"
    "  sub $16, %rsi\n"
    "  mov %rdx, 0(%rsi)\n"
    "  mov %rcx, 8(%rsi)\n"
    "  xor %edx, %edx\n"
    "  xor %r10d, %r10d\n"
    "  xor %r8d, %r8d\n"
    "  mov $56, %eax\n"          /* SYS_clone */
    "  syscall\n"
    "  test %rax, %rax\n"
    "  jnz 1f\n"
    "  pop %rax\n"
    "  pop %rdi\n"
    "  xor %ebp, %ebp\n"
    "  call *%rax\n"
    "  mov $231, %eax\n"         /* SYS_exit_group */
    "  xor %edi, %edi\n"
    "  syscall\n"
    "  hlt\n"
    "1:\n"
    "  ret\n"
    ".size hp_clone_run, .-hp_clone_run\n");

/* ===================================================================== */
/* The helper process                                                     */
/* ===================================================================== */

HP_RAW static int is_digit(char c) { return c >= '0' && c <= '9'; }

HP_RAW static void fail(struct stop_area *a, int result, int tid, const struct hp_thread_status *st,
                        const char *what)
{
    char *end = a->message + HP_ERRLEN;
    char *at = hp_fmt_str(a->message, end, "thread ");
    at = hp_fmt_num(at, end, tid);
    if (st && st->name[0]) {
        at = hp_fmt_str(at, end, " (");
        at = hp_fmt_str(at, end, st->name);
        at = hp_fmt_str(at, end, ")");
    }
    hp_fmt_str(at, end, what);
    a->result = result;
}

HP_RAW static struct hp_stopped_thread *find_thread(struct stop_area *a, int tid)
{
    for (int i = 0; i < a->count; i++)
        if (a->threads[i].tid == tid)
            return &a->threads[i];
    return 0;
}

/* Seize and interrupt every thread listed now that is not held yet.
 * Returns how many were added, or -1 with the area's result set. */
HP_RAW static int seize_new_threads(struct stop_area *a, int task_fd)
{
    char buf[4096];
    long got;
    int added = 0;
    hp_sys(SYS_lseek, task_fd, 0, 0);
    while ((got = hp_sys(SYS_getdents64, task_fd, buf, sizeof buf)) > 0) {
        for (long off = 0; off < got;) {
            struct dirent64 *d = (struct dirent64 *)(buf + off);
            off += d->d_reclen;
            int tid = 0;
            for (const char *c = d->d_name; is_digit(*c); c++)
                tid = tid * 10 + (*c - '0');
            if (tid <= 0 || tid == a->self_tid || find_thread(a, tid))
                continue;
            long rc = hp_sys(SYS_ptrace, PTRACE_SEIZE, tid, 0, 0);
            if (rc == -ESRCH)
                continue;                       /* it exited */
            struct hp_thread_status st;
            if (rc < 0) {
                hp_read_thread_status(a->pid, tid, &st);
                if (hp_thread_gone(&st))
                    continue;                   /* exited, or a main thread gone */
            }
            if (rc < 0 && st.tracer != hp_getpid()) {
                char why[96];
                char *at = hp_fmt_str(why, why + sizeof why, " cannot be seized with ptrace: ");
                if (st.tracer) {
                    at = hp_fmt_str(at, why + sizeof why, "it is traced by process ");
                    hp_fmt_num(at, why + sizeof why, st.tracer);
                } else if (rc == -EPERM || rc == -ENOSYS) {
                    hp_fmt_str(at, why + sizeof why, rc == -EPERM ? "not permitted (EPERM)"
                               : "no ptrace system call (ENOSYS)");
                } else {
                    at = hp_fmt_str(at, why + sizeof why, "errno ");
                    hp_fmt_num(at, why + sizeof why, -rc);
                }
                fail(a, HP_STOP_REFUSED, tid, &st, why);
                return -1;
            }
            if (a->count == HP_MAX_THREADS) {
                hp_sys(SYS_ptrace, PTRACE_DETACH, tid, 0, 0);
                fail(a, HP_STOP_FAILED, tid, 0, ": too many threads");
                return -1;
            }
            struct hp_stopped_thread *t = &a->threads[a->count++];
            t->tid = tid;
            t->signal = 0;
            t->state = PENDING;
            t->pc = t->sp = 0;
            /* (rc < 0 here: still held since a stop gave up on it, its
             * interrupt pending) */
            if (hp_sys(SYS_ptrace, PTRACE_INTERRUPT, tid, 0, 0) == -ESRCH)
                t->state = GONE;
            added++;
        }
    }
    return added;
}

/* Take one wait status of a tracee.  A thread held by this helper but not
 * part of a stop (one that stopped only after its stop gave up on it) is
 * let go at once. */
HP_RAW static void take_status(struct stop_area *a, int tid, int status, int in_stop)
{
    struct hp_stopped_thread *t = in_stop ? find_thread(a, tid) : 0;
    if (WIFEXITED(status) || WIFSIGNALED(status)) {
        if (t)
            t->state = GONE;
        return;
    }
    if (!WIFSTOPPED(status))
        return;
    /* A signal-delivery stop holds a signal the thread must still get. */
    int sig = (status >> 16) == PTRACE_EVENT_STOP ? 0 : WSTOPSIG(status);
    if (!t || t->state != PENDING) {
        hp_sys(SYS_ptrace, PTRACE_DETACH, tid, 0, sig);
        return;
    }
    t->state = STOPPED;
    t->signal = sig;
}

HP_RAW static void drain_waits(struct stop_area *a, int in_stop)
{
    int status;
    long tid;
    while ((tid = hp_sys(SYS_wait4, -1, &status, __WALL | WNOHANG, 0)) > 0)
        take_status(a, (int)tid, status, in_stop);
}

/* Wait until every seized thread has stopped or gone, or the deadline. */
HP_RAW static int wait_for_stops(struct stop_area *a, int sigfd)
{
    for (;;) {
        drain_waits(a, 1);
        struct hp_stopped_thread *late = 0;
        for (int i = 0; i < a->count && !late; i++)
            if (a->threads[i].state == PENDING)
                late = &a->threads[i];
        if (!late)
            return 0;
        uint64_t now = hp_now_ns();
        if (now >= a->deadline_ns) {
            struct hp_thread_status st;
            hp_read_thread_status(a->pid, late->tid, &st);
            if (hp_thread_gone(&st)) {
                late->state = GONE;
                continue;
            }
            char what[64];
            char *at = hp_fmt_str(what, what + sizeof what, " did not stop in time (state ");
            *at++ = st.state;
            hp_fmt_str(at, what + sizeof what, ")");
            fail(a, HP_STOP_FAILED, late->tid, &st, what);
            return -1;
        }
        uint64_t wait = a->deadline_ns - now;
        struct timespec ts = { 0, wait > 10000000 ? 10000000 : (long)wait };
        struct pollfd p = { sigfd, POLLIN, 0 };
        if (hp_sys(SYS_ppoll, &p, 1, &ts, 0, 8) > 0) {
            struct signalfd_siginfo info[8];
            hp_sys(SYS_read, sigfd, info, sizeof info);
        }
    }
}

/* System calls that fail with EINTR, not -ERESTART*, when their thread is
 * stopped, and that are safe to start again: nothing was transferred. */
HP_RAW static int restarts_after_stop(long nr)
{
    static const short calls[] = {
        SYS_read, SYS_write, SYS_readv, SYS_writev, SYS_recvfrom, SYS_recvmsg, SYS_sendto,
        SYS_sendmsg, SYS_recvmmsg, SYS_sendmmsg, SYS_accept, SYS_accept4, SYS_epoll_wait,
        SYS_epoll_pwait, 441 /* epoll_pwait2 */, SYS_semop, SYS_semtimedop,
        SYS_rt_sigtimedwait, SYS_io_getevents, SYS_mq_timedsend, SYS_mq_timedreceive,
    };
    for (unsigned i = 0; i < sizeof calls / sizeof calls[0]; i++)
        if (nr == calls[i])
            return 1;
    return 0;
}

/* Read where a stopped thread is; restart a system call our stop made fail. */
HP_RAW static void read_registers(struct stop_area *a, struct hp_stopped_thread *t)
{
    struct user_regs_struct regs;
    if (hp_sys(SYS_ptrace, PTRACE_GETREGS, t->tid, 0, &regs) < 0) {
        t->state = GONE;
        return;
    }
    t->pc = regs.rip;
    t->sp = regs.rsp;
    hp_copy_words(&t->regs, &regs, sizeof regs);    /* for the stack model's unwinding */
    if (t->signal || (long)regs.rax != -EINTR || !restarts_after_stop((long)regs.orig_rax))
        return;
    struct hp_thread_status st;
    hp_read_thread_status(a->pid, t->tid, &st);
    if (st.pending & ~st.blocked)
        return;                     /* a real signal: its EINTR is the thread's */
    unsigned long word;
    if (hp_sys(SYS_ptrace, PTRACE_PEEKTEXT, t->tid, regs.rip - 2, &word) < 0 ||
        (word & 0xffff) != 0x050f)
        return;                     /* not right after a `syscall` */
    regs.rax = regs.orig_rax;
    regs.rip -= 2;
    hp_sys(SYS_ptrace, PTRACE_SETREGS, t->tid, 0, &regs);
}

HP_RAW static void release_threads(struct stop_area *a)
{
    for (int i = 0; i < a->count; i++)
        if (a->threads[i].state == STOPPED)
            hp_sys(SYS_ptrace, PTRACE_DETACH, a->threads[i].tid, 0, a->threads[i].signal);
    a->count = 0;
}

HP_RAW static void stop_threads(struct stop_area *a, int task_fd, int sigfd)
{
    a->count = 0;
    a->result = HP_STOP_OK;
    a->message[0] = 0;
    for (;;) {
        int added = seize_new_threads(a, task_fd);
        if (added < 0 || wait_for_stops(a, sigfd) < 0) {
            release_threads(a);
            return;
        }
        if (!added)
            break;      /* listed again and nothing new: every thread is held */
    }
    for (int i = 0; i < a->count; i++)
        if (a->threads[i].state == STOPPED)
            read_registers(a, &a->threads[i]);
}

/* The helper's own memory for a round's inputs, grown as needed. */
struct buffer {
    void *base;
    size_t size;
};

HP_RAW static void *buffer_reserve(struct buffer *b, size_t size)
{
    if (size > b->size) {
        if (b->base)
            hp_sys(SYS_munmap, b->base, b->size);
        size_t want = (size + 65535) & ~(size_t)65535;
        long p = hp_sys(SYS_mmap, 0, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        b->base = p < 0 ? 0 : (void *)p;
        b->size = p < 0 ? 0 : want;
    }
    return b->base;
}

HP_RAW static void *buffer_copy(struct buffer *b, int pid, uintptr_t from, size_t size)
{
    void *to = buffer_reserve(b, size ? size : 1);
    return to && (!size || hp_read_own(pid, to, from, size) == (long)size) ? to : 0;
}

HP_RAW static int put_through_mem(void *ctx, uintptr_t address, const uint8_t *bytes, size_t len)
{
    return hp_sys(SYS_pwrite64, *(int *)ctx, bytes, len, address) != (long)len;
}

/* A whole round: stop, check, write, let go -- retried while a thread is
 * inside the bytes, until the deadline. */
HP_RAW static void write_round(struct stop_area *a, int task_fd, int sigfd, int mem_fd,
                               struct buffer bufs[2])
{
    /* The service's memory, named by the patching thread: its main thread
     * may have exited. */
    struct hp_check c = {
        .pid = a->self_tid, .nwrites = a->nwrites, .restorers = a->restorers,
        .nrestorers = a->nrestorers,
    };
    c.writes = buffer_copy(&bufs[0], a->self_tid, a->writes, a->nwrites * sizeof(struct hp_write));
    c.scratch = buffer_reserve(&bufs[1], 1 << 16);
    c.scratch_bytes = 1 << 16;
    a->stops = a->retries = a->hold_ns = 0;
    if (!c.writes || !c.scratch) {
        a->count = 0;
        hp_fmt_str(a->message, a->message + HP_ERRLEN, "the ptrace helper cannot read what to write");
        a->result = HP_STOP_FAILED;
        return;
    }
    for (;;) {
        stop_threads(a, task_fd, sigfd);
        if (a->result != HP_STOP_OK)
            return;
        a->stops++;
        uint64_t stopped = hp_now_ns();
        uintptr_t pc = 0;
        int tid = 0;
        for (int i = 0; i < a->count && !tid; i++)
            if (a->threads[i].state == STOPPED &&
                hp_check_thread(&c, a->threads[i].pc, a->threads[i].sp, &pc))
                tid = a->threads[i].tid;
        if (!tid) {
            if (hp_check_old_bytes(&c, a->message) ||
                hp_write_spans(&c, put_through_mem, &mem_fd, a->message))
                a->result = HP_STOP_FAILED;
            /* Write, sync, let go: the helper shares the service's memory, so
             * its membarrier serializes every core running the service. */
            hp_sys(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE, 0, 0);
            release_threads(a);
            a->hold_ns = hp_now_ns() - stopped;
            return;
        }
        release_threads(a);
        a->retries++;
        if (hp_now_ns() > a->deadline_ns) {
            char what[96];
            char *at = hp_fmt_str(what, what + sizeof what, " stayed inside the bytes being replaced (pc ");
            at = hp_fmt_hex(at, what + sizeof what, pc);
            hp_fmt_str(at, what + sizeof what, "); nothing was written");
            fail(a, HP_STOP_FAILED, tid, 0, what);
            return;
        }
        hp_sleep_ns(200000);
    }
}

HP_RAW __attribute__((noreturn)) static void helper_main(void *arg)
{
    struct helper_args *args = arg;
    /* A thread pointer of its own: code built with a stack protector reads
     * its canary at %fs:0x28, and the service's thread whose block the
     * inherited one points into may exit. */
    volatile uint64_t tls[8] = { 0 };
    tls[0] = (uint64_t)tls;
    hp_sys(SYS_arch_prctl, ARCH_SET_FS, tls);

    struct stop_area *a = args->area;
    int sock = args->sock;
    hp_sys(SYS_setsid, 0);
    hp_sys(SYS_prctl, PR_SET_NAME, "hotpatch-stop");
    hp_sys(SYS_chdir, "/");
    uint64_t all = ~0ull, chld = 1ull << (SIGCHLD - 1);
    hp_sys(SYS_rt_sigprocmask, SIG_SETMASK, &all, 0, 8);
    struct { uintptr_t handler; unsigned long flags; uintptr_t restorer; uint64_t mask; } dfl = { 0 };
    hp_sys(SYS_rt_sigaction, SIGCHLD, &dfl, 0, 8);     /* tracee stops are reported */
    if (sock > 0)
        hp_sys(SYS_close_range, 0, sock - 1, 0);
    if (hp_sys(SYS_close_range, sock + 1, ~0u, 0) == -ENOSYS)
        for (int fd = 0; fd < 65536; fd++)
            if (fd != sock)
                hp_sys(SYS_close, fd);

    char path[32];
    char *at = hp_fmt_str(path, path + sizeof path, "/proc/");
    at = hp_fmt_num(at, path + sizeof path, a->pid);
    hp_fmt_str(at, path + sizeof path, "/task");
    int task_fd = (int)hp_sys(SYS_open, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int sigfd = (int)hp_sys(SYS_signalfd4, -1, &chld, 8, SFD_NONBLOCK | SFD_CLOEXEC);
    /* Its own memory is the service's: /proc/self/mem works even once the
     * service's main thread has exited. */
    int mem_fd = (int)hp_sys(SYS_open, "/proc/self/mem", O_RDWR | O_CLOEXEC);
    a->mem_ok = mem_fd >= 0;
    struct buffer bufs[2] = { { 0, 0 }, { 0, 0 } };
    a->helper_pid = hp_getpid();
    char op = task_fd >= 0 && sigfd >= 0 ? 'R' : 'E';
    hp_sys(SYS_write, sock, &op, 1);
    for (;;) {
        struct pollfd p[2] = { { sock, POLLIN, 0 }, { sigfd, POLLIN, 0 } };
        if (hp_sys(SYS_poll, p, 2, -1) < 0)
            continue;
        if (p[1].revents) {             /* late stops of threads no stop waits for */
            struct signalfd_siginfo info[8];
            hp_sys(SYS_read, sigfd, info, sizeof info);
            drain_waits(a, 0);
        }
        if (!p[0].revents)
            continue;
        if (hp_sys(SYS_read, sock, &op, 1) != 1)
            hp_sys(SYS_exit_group, 0);  /* the service is gone */
        if (op == 'W')
            write_round(a, task_fd, sigfd, mem_fd, bufs);
        else if (op == 'S')
            stop_threads(a, task_fd, sigfd);
        else if (op == 'R')
            release_threads(a);
        hp_sys(SYS_write, sock, &op, 1);
    }
}

HP_RAW __attribute__((noreturn)) static void helper_intermediate(void *arg)
{
    struct helper_args *args = arg;
    hp_clone_run(CLONE_VM | SIGCHLD, args->helper_sp, helper_main, args);
    hp_sys(SYS_exit_group, 0);
    __builtin_unreachable();
}

/* ===================================================================== */
/* The service's side                                                     */
/* ===================================================================== */

/* Our ends of the helper's socket, as kept (hp_kept_fd_valid). */
static struct hp_kept_fd helper_file = HP_KEPT_FD_NONE, spawned_file = HP_KEPT_FD_NONE;

static void stop_helper(void)
{
    if (helper_sock >= 0)
        hp_sys(SYS_close, helper_sock);
    if (helper_pid > 0)
        hp_sys(SYS_kill, helper_pid, SIGKILL);   /* its tracees are let go */
    helper_sock = -1;
    helper_pid = 0;
}

/* Wait until `deadline_ns` for the helper to answer `op`. */
HP_RAW static int await_answer(char op, uint64_t deadline_ns)
{
    for (;;) {
        uint64_t now = hp_now_ns();
        if (now >= deadline_ns)
            return -1;
        struct timespec ts = { (time_t)((deadline_ns - now) / 1000000000ull),
                               (long)((deadline_ns - now) % 1000000000ull) };
        struct pollfd p = { helper_sock, POLLIN, 0 };
        long rc = hp_sys(SYS_ppoll, &p, 1, &ts, 0, 8);
        if (rc == -EINTR)
            continue;
        if (rc <= 0)
            return -1;
        char answer;
        return hp_sys(SYS_read, helper_sock, &answer, 1) == 1 && answer == op ? 0 : -1;
    }
}

/* Send a request and wait for its answer until `deadline_ns`. */
HP_RAW static int request(char op, uint64_t deadline_ns)
{
    if (hp_sys(SYS_write, helper_sock, &op, 1) != 1)
        return -1;
    return await_answer(op, deadline_ns);
}

/* A helper spawned ahead (hp_ptrace_start_ahead) and not waited for yet:
 * our end of its socket and its intermediate, reaped when it is needed. */
static int spawned_sock = -1;
static long spawned_intermediate;

/* Spawn the helper: the double clone, without waiting for it.  -1 with
 * `err` filled where it cannot even be spawned. */
static int spawn_helper(char *err)
{
    if (!area) {
        void *p = mmap(NULL, sizeof *area, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            hp_fmt_str(err, err + HP_ERRLEN, "no memory for the ptrace helper's area");
            return -1;
        }
        area = p;
    }
    /* The helper's stack, for its life: it is never unmapped here (a helper
     * killed and replaced leaves its stack behind). */
    char *stack = mmap(NULL, HELPER_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int sv[2];
    if (stack == MAP_FAILED) {
        hp_fmt_str(err, err + HP_ERRLEN, "no memory for the ptrace helper's stack");
        return -1;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) {
        munmap(stack, HELPER_STACK);
        hp_fmt_str(err, err + HP_ERRLEN, "cannot create the ptrace helper's socket");
        return -1;
    }
    uintptr_t top = (uintptr_t)stack + HELPER_STACK;
    struct helper_args *args = (struct helper_args *)(top - 256);
    args->sock = sv[1];
    args->area = area;
    args->helper_sp = (uintptr_t)stack + HELPER_STACK / 2;
    area->pid = hp_getpid();
    area->helper_pid = 0;

    /* The intermediate runs on the top half of the stack, the helper on the
     * bottom half. */
    long pid = hp_clone_run(CLONE_VM, top - 512, helper_intermediate, args);
    hp_sys(SYS_close, sv[1]);
    if (pid < 0) {
        hp_sys(SYS_close, sv[0]);
        char *at = hp_fmt_str(err, err + HP_ERRLEN, "the ptrace helper did not start");
        at = hp_fmt_str(at, err + HP_ERRLEN, ": clone failed, errno ");
        hp_fmt_num(at, err + HP_ERRLEN, -pid);
        return -1;
    }
    spawned_sock = sv[0];
    spawned_intermediate = pid;
    hp_kept_fd_keep(&spawned_file, spawned_sock);
    return 0;
}

/* Reap the helper spawned ahead's intermediate process (it exits once it
 * has cloned the helper): the spawned helper is taken, or forgotten. */
HP_RAW static void reap_intermediate(void)
{
    int status;
    while (hp_sys(SYS_wait4, spawned_intermediate, &status, __WCLONE, 0) == -EINTR)
        ;
    spawned_sock = -1;
    spawned_intermediate = 0;
}

/* A socket end the service closed (and whose number it may reuse): the
 * helper on its other end sees it closed and exits, letting go of any
 * thread.  Forget it -- never close, write or read that number again --
 * so that the next stop starts another. */
HP_RAW static void forget_lost_helper(void)
{
    if (helper_sock >= 0 && !hp_kept_fd_valid(&helper_file)) {
        helper_sock = -1;
        helper_pid = 0;     /* not signalled: once gone, its pid may be another's */
    }
    if (spawned_sock >= 0 && !hp_kept_fd_valid(&spawned_file))
        reap_intermediate();
}

/* The helper ready to serve: spawned now unless it was ahead, and waited
 * for until it says it is ready. */
static int start_helper(char *err)
{
    if (spawned_sock < 0 && spawn_helper(err))
        return -1;
    helper_sock = spawned_sock;
    helper_file = spawned_file;
    reap_intermediate();
    int ok = await_answer('R', hp_now_ns() + 2000000000ull) == 0 && area->helper_pid > 0;
    if (!ok) {
        hp_fmt_str(err, err + HP_ERRLEN, "the ptrace helper did not start");
        stop_helper();
        return -1;
    }
    helper_pid = area->helper_pid;
    prctl(PR_SET_PTRACER, helper_pid, 0, 0, 0);   /* Yama's ptrace_scope 1; EINVAL without Yama */
    return 0;
}

/* Spawn the helper now, for a stop to come: it gets ready while the caller
 * prepares what to write (its start is otherwise half a millisecond, and
 * tens of milliseconds when the cores are busy, inside the first stop).
 * Nothing is waited for.  A failure is left to that stop, which tries
 * again and reports it.  Not with the signal stop forced (stop.c). */
void hp_ptrace_start_ahead(void)
{
    const char *how = getenv("HOTPATCH_STOPPER");
    char err[HP_ERRLEN];
    if (how && strcmp(how, "signals") == 0)
        return;
    pthread_mutex_lock(&hp_lock);
    forget_lost_helper();
    if (helper_sock < 0 && spawned_sock < 0)
        spawn_helper(err);
    pthread_mutex_unlock(&hp_lock);
}

/* Stop every other thread with the helper (started on first need). */
HP_RAW int hp_ptrace_stop(uint64_t deadline_ns, char *err)
{
    forget_lost_helper();
    if (helper_sock < 0 && start_helper(err))
        return HP_STOP_REFUSED;
    area->self_tid = hp_gettid();
    area->deadline_ns = deadline_ns;
    if (request('S', deadline_ns + 1000000000ull)) {
        stop_helper();
        hp_fmt_str(err, err + HP_ERRLEN, "the ptrace helper stopped answering");
        return HP_STOP_FAILED;
    }
    if (area->result != HP_STOP_OK) {
        hp_fmt_str(err, err + HP_ERRLEN, area->message);
        return area->result;
    }
    hp_nstopped = 0;
    for (int i = 0; i < area->count; i++)
        if (area->threads[i].state == STOPPED)
            hp_copy_words(&hp_stopped[hp_nstopped++], &area->threads[i], sizeof *hp_stopped);
    return HP_STOP_OK;
}

/* A whole round in the helper: stop, check, write through /proc/PID/mem,
 * let go.  HP_STOP_CANNOT_WRITE where the helper cannot open that file. */
HP_RAW int hp_ptrace_write(const struct hp_check *c, uint64_t deadline_ns, char *err)
{
    forget_lost_helper();
    if (helper_sock < 0 && start_helper(err))
        return HP_STOP_REFUSED;
    if (!area->mem_ok)
        return HP_STOP_CANNOT_WRITE;
    area->self_tid = hp_gettid();
    area->deadline_ns = deadline_ns;
    area->writes = (uintptr_t)c->writes;
    area->nwrites = c->nwrites;
    area->nrestorers = c->nrestorers < HP_MAX_RESTORERS ? c->nrestorers : HP_MAX_RESTORERS;
    for (int i = 0; i < area->nrestorers; i++)
        area->restorers[i] = c->restorers[i];
    if (request('W', deadline_ns + 1000000000ull)) {
        stop_helper();
        hp_fmt_str(err, err + HP_ERRLEN, "the ptrace helper stopped answering");
        return HP_STOP_FAILED;
    }
    hp_stats.stops += area->stops;
    hp_stats.retries += area->retries;
    hp_stats.hold_ns += area->hold_ns;
    if (area->hold_ns > hp_stats.hold_max_ns)
        hp_stats.hold_max_ns = area->hold_ns;
    if (area->result != HP_STOP_OK)
        hp_fmt_str(err, err + HP_ERRLEN, area->message);
    return area->result;
}

HP_RAW void hp_ptrace_release(void)
{
    if (helper_sock >= 0 && request('R', hp_now_ns() + 5000000000ull))
        stop_helper();
}

int hp_ptrace_helper_pid(void)
{
    return helper_pid;
}

/* A forked child has no helper: the parent's is not its own.  The shared
 * area is the parent's too. */
void hp_ptrace_after_fork(void)
{
    if (helper_sock >= 0)
        hp_sys(SYS_close, helper_sock);
    if (spawned_sock >= 0)
        hp_sys(SYS_close, spawned_sock);
    helper_sock = spawned_sock = -1;
    helper_pid = 0;
    spawned_intermediate = 0;
    if (area)
        munmap(area, sizeof *area);
    area = NULL;
}
