/* Entry shapes an optimising compiler emits, for comparing the C core's
 * plans and original stubs (native/plan.c) with the Python relocator's
 * (tests/test_plan.py).  Each shape is instantiated a few times with other
 * constants, so that no two functions are folded into one, and the file is
 * compiled with several sets of flags. */
#include <stddef.h>
#include <string.h>

#define NOINLINE __attribute__((noinline, noipa))

int plan_counter;
static int plan_table[64];
static const double plan_scale = 1.5;
static short plan_short;
static unsigned char plan_flag;
extern int plan_external(int);
int plan_external(int x) { return x * 7 + plan_counter; }

#define SHAPES(N)                                                                        \
    /* arithmetic only: nothing depends on where it runs */                            \
    NOINLINE long plan_leaf_##N(long x) { return ((x ^ (x >> 7)) * 3) + N; }            \
    /* RIP-relative loads and stores, with and without an immediate after disp32 */     \
    NOINLINE int plan_global_##N(int x) { return plan_counter + x * N; }               \
    NOINLINE void plan_store_##N(int x) { plan_counter = x + N; }                      \
    NOINLINE void plan_store_short_##N(void) { plan_short = (short)(N * 3 + 1000); }    \
    NOINLINE int plan_flag_test_##N(int x) { return plan_flag ? x + N : x - N; }        \
    NOINLINE int plan_table_##N(int i) { return plan_table[(i + N) & 63]; }             \
    NOINLINE double plan_double_##N(double x) { return x * plan_scale + N; }            \
    /* an early test and conditional jump in the first bytes */                         \
    NOINLINE int plan_early_##N(const int *p) { if (!p) return -N; return *p * 3 + N; }   \
    NOINLINE int plan_compare_##N(int x) { if (x > N) return x * 5; return x + plan_counter; } \
    /* tail calls: a jmp among the replaced bytes */                                    \
    NOINLINE int plan_tail_##N(int x) { return plan_external(x + N); }                  \
    /* calls, frames, loops */                                                          \
    NOINLINE int plan_calls_##N(int x) { int y = plan_external(x); return plan_external(y + N) + y; } \
    NOINLINE long plan_loop_##N(const long *a, long n)                                 \
    { long s = N; for (long i = 0; i < n; i++) s += a[i] * (i ^ N); return s; }         \
    NOINLINE size_t plan_strlen_##N(const char *s) { return strlen(s) + N; }            \
    NOINLINE int plan_switch_##N(int x)                                                 \
    {                                                                                   \
        switch (x) {                                                                    \
        case 0: return N; case 1: return plan_counter; case 2: return x * N;           \
        case 3: return plan_table[N & 63]; case 4: return -N; case 5: return x << N % 7; \
        default: return 0;                                                              \
        }                                                                               \
    }                                                                                   \
    NOINLINE void plan_buffer_##N(char *out)                                             \
    { char tmp[64]; memset(tmp, N, sizeof tmp); tmp[N % 64] = 0; memcpy(out, tmp, 64); }

SHAPES(1)
SHAPES(2)
SHAPES(3)
SHAPES(4)
