/*
 * The crash report: a live-patched process says so when it dies.
 */
#include "hotpatch_core.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

/* Hand a signal to the action that was installed before ours.  For the
 * default action, reinstate it and raise: the signal is blocked while this
 * handler runs, so it is delivered -- and kills, as it would have without
 * us -- as soon as the handler returns.  (A fault is never ignored, so
 * SIG_IGN is treated the same.) */
static void chain_signal(const struct sigaction *previous, int sig, siginfo_t *info, void *context)
{
    if (previous->sa_flags & SA_SIGINFO) {
        previous->sa_sigaction(sig, info, context);
    } else if (previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN) {
        previous->sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

/* Like the K taint in a kernel oops: on a fatal signal, write the enabled
 * patches (text kept ready by Python on every enable and disable) to
 * stderr, then hand the signal to whatever handled it before (faulthandler,
 * or the default action). */
static const int fatal_signals[] = { SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT };
#define NFATAL (sizeof fatal_signals / sizeof fatal_signals[0])
static struct sigaction previous_fatal[NFATAL];
static char crash_text[4096];
static size_t crash_len;   /* atomic */
static int crash_installed;

/* Where the fatal signal came from, as an oops gives RIP: the signal, the
 * thread, the pc and (for a fault) the address. */
static size_t describe_fatal(char *out, size_t size, int sig, const siginfo_t *info,
                             const void *context)
{
    char *end = out + size, *at = hp_fmt_str(out, end, "hotpatch: signal ");
    at = hp_fmt_num(at, end, sig);
    at = hp_fmt_str(at, end, " in thread ");
    at = hp_fmt_num(at, end, hp_gettid());
    if (context) {
        at = hp_fmt_str(at, end, " at pc ");
        at = hp_fmt_hex(at, end, (uintptr_t)((const ucontext_t *)context)->uc_mcontext.gregs[REG_RIP]);
    }
    if (info && info->si_code > 0) {     /* a fault the kernel raised: where it was */
        at = hp_fmt_str(at, end, ", address ");
        at = hp_fmt_hex(at, end, (uintptr_t)info->si_addr);
    }
    at = hp_fmt_str(at, end, "\n");
    return (size_t)(at - out);
}

static void on_fatal(int sig, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    size_t len = __atomic_load_n(&crash_len, __ATOMIC_ACQUIRE);
    if (len) {
        char where[160];
        size_t n = describe_fatal(where, sizeof where, sig, info, context);
        if (write(2, crash_text, len) < 0 || write(2, where, n) < 0) {
            /* nothing more can be done about stderr here */
        }
    }
    errno = saved_errno;
    for (size_t i = 0; i < NFATAL; i++)
        if (fatal_signals[i] == sig)
            chain_signal(&previous_fatal[i], sig, info, context);
}

/* Set the text of the report and make sure the handlers are in place. */
int hp_set_crash_report(const char *text)
{
    pthread_mutex_lock(&hp_lock);
    size_t len = strlen(text);
    if (len >= sizeof crash_text)
        len = sizeof crash_text - 1;
    __atomic_store_n(&crash_len, 0, __ATOMIC_RELEASE);
    memcpy(crash_text, text, len);
    __atomic_store_n(&crash_len, len, __ATOMIC_RELEASE);
    int rc = 0;
    if (!crash_installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fatal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        for (size_t i = 0; i < NFATAL && !rc; i++)
            rc = sigaction(fatal_signals[i], &sa, &previous_fatal[i]);
        crash_installed = !rc;
    }
    pthread_mutex_unlock(&hp_lock);
    return rc ? -errno : 0;
}
